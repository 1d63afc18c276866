"""MLflow registered models (``models:/...``) as model references.

``models:/<name>@<alias>``, ``models:/<name>/<version>`` and ``models:/<name>/latest`` name a
version in an MLflow model registry. Versions are immutable, so

* the fingerprint is ``mlflow:<name>/<version>``: the rollout cache (and the reference watcher,
  which uses the same function) sees a new version when an alias moves, and re-rolls;
* a version's files are downloaded once into
  ``<cache root>/mlflow/<server>/<name>/<version>-<identity>``, a flat transformers directory that
  ``from_pretrained`` loads. ``<server>`` is a digest of the registry URI, so two registries with a
  model of the same name never share a cache entry; ``<identity>`` is a digest of what the registry
  says the version is (its source, run id and creation time), so a registry recreated at the same
  address (a test server on a reused port, a wiped database) cannot serve another model's files
  under the same version number.

Which registry: ``ModelConfig.registry_uri``, else ``$MLFLOW_REGISTRY_URI``, else the run's
``run.tracking_uri`` (flows and the watcher pass it), else ``$MLFLOW_TRACKING_URI``, MLflow's own
rule (the registry lives on the tracking server unless told otherwise).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from drift_core.schemas import ModelConfig
from tasks.model_files import ModelError, atomic_dir, default_cache_root, model_lock
from tasks.tracking import _local_tracking_uri, redact

PREFIX = "models:/"
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")
_EXPECTED = "expected models:/<name>@<alias>, models:/<name>/<version number> or models:/<name>/latest"
# what a transformers-flavour model (mlflow.transformers.log_model) keeps where
_FLAVOUR_MODEL_DIR = "model"
_FLAVOUR_TOKENIZER_DIR = Path("components") / "tokenizer"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


@dataclass(frozen=True)
class RegistryRef:
    """A parsed ``models:/`` URI: exactly one of ``alias`` and ``version`` is set."""

    uri: str
    name: str
    alias: str | None = None
    version: str | None = None  # a number or "latest"


def is_registry_uri(path: str) -> bool:
    return path.startswith(PREFIX)


def parse_registry_uri(uri: str) -> RegistryRef:
    """Split a ``models:/`` URI; stages (``/Production``) are gone from MLflow: use an alias."""
    match = _REGISTRY_URI.match(uri)
    if match is None or match["name"] in (".", ".."):
        raise ModelError(f"{uri!r}: {_EXPECTED}")
    version = match["version"]
    if version is not None and version != "latest" and not version.isdigit():
        raise ModelError(f"{uri!r}: {_EXPECTED} (model stages are deprecated in MLflow: use an alias)")
    return RegistryRef(uri, match["name"], match["alias"], version)


def registry_uri_for(configured: str | None, run_tracking_uri: str | None = None) -> str:
    """The registry server: the configured URI, ``$MLFLOW_REGISTRY_URI``, the run's tracking URI,
    ``$MLFLOW_TRACKING_URI``, in that order (relative sqlite paths made absolute)."""
    uri = (
        configured
        or os.environ.get("MLFLOW_REGISTRY_URI")
        or run_tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
    )
    if not uri:
        raise ModelError(
            "a models:/ model reference needs a registry: set reference_model.registry_uri "
            "(or base_model.registry_uri), MLFLOW_REGISTRY_URI or MLFLOW_TRACKING_URI"
        )
    return _local_tracking_uri(uri)


def _client(registry_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)


def _model_version(uri: str, registry_uri: str):
    """The registry's record (an MLflow ``ModelVersion``) of the version ``uri``'s alias, number
    or ``latest`` points at right now."""
    from mlflow.exceptions import MlflowException

    ref = parse_registry_uri(uri)
    client = _client(registry_uri)
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        if ref.version == "latest":  # get_latest_versions is stage-based and deprecated
            found = client.search_model_versions(
                f"name = '{ref.name}'", max_results=1, order_by=["version_number DESC"]
            )
            if not found:
                raise ModelError(f"{uri!r}: registered model {ref.name!r} has no versions")
            return found[0]
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as exc:
        raise ModelError(
            f"{uri!r}: not found in the MLflow registry {redact('registry_uri', registry_uri)}: "
            f"{redact('message', exc.message)} (check the model name, alias or version, and registry_uri)"
        ) from exc


def resolve_version(uri: str, registry_uri: str) -> tuple[str, str]:
    """``(name, version)`` that ``uri``'s alias, number or ``latest`` points at right now."""
    return parse_registry_uri(uri).name, str(_model_version(uri, registry_uri).version)


def registry_fingerprint(uri: str, tracking_uri: str) -> str:
    """``mlflow:<name>/<version>`` for ``models:/name@alias``, ``models:/name/<n>`` or ``/latest``:
    registered model versions are immutable, so the version number names the weights."""
    name, version = resolve_version(uri, _local_tracking_uri(tracking_uri))
    return f"mlflow:{name}/{version}"


def pin_registered(cfg: ModelConfig, run_tracking_uri: str | None = None) -> ModelConfig:
    """``cfg`` with its alias (or ``latest``) resolved to ``models:/<name>/<version>`` and its
    registry filled in, once: loading, fingerprinting and a train worker elsewhere then all see the
    same version for the whole run, even if the alias moves meanwhile. Other paths: unchanged."""
    if not is_registry_uri(cfg.path):
        return cfg
    registry_uri = registry_uri_for(cfg.registry_uri, run_tracking_uri)
    name, version = resolve_version(cfg.path, registry_uri)
    return cfg.model_copy(update={"path": f"{PREFIX}{name}/{version}", "registry_uri": registry_uri})


def without_credentials(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` without a ``registry_uri`` that holds a password, for parameters that are stored
    (a deployment run's, in Prefect's database): the worker then finds the registry through its own
    ``MLFLOW_REGISTRY_URI`` / ``MLFLOW_TRACKING_URI``."""
    uri = cfg.registry_uri
    if uri is None or redact("registry_uri", uri) == uri:
        return cfg
    return cfg.model_copy(update={"registry_uri": None})


def _server_dir(registry_uri: str) -> str:
    return hashlib.sha256(redact("registry_uri", registry_uri).encode()).hexdigest()[:12]


def materialize_registered(uri: str, registry_uri: str, cache_root: Path | None = None) -> Path:
    """The local transformers directory of the version ``uri`` points at, downloaded once."""
    ref = parse_registry_uri(uri)
    mv = _model_version(uri, registry_uri)
    name, version = ref.name, str(mv.version)
    # the registry's record of the version, not only its number: a number reused after the model
    # was deleted (or its registry recreated at the same address) gets a cache entry of its own
    identity = hashlib.sha256(f"{mv.source}\n{mv.run_id}\n{mv.creation_timestamp}".encode()).hexdigest()[:12]
    root = (cache_root or default_cache_root()) / "mlflow" / _server_dir(registry_uri)
    target = root / quote(name, safe="") / f"{version}-{identity}"

    def build(tmp: Path) -> None:
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        # Not download_artifacts("models:/...", registry_uri=...): MLflow 3 looks the version up in
        # the process-wide registry, ignoring the argument. The version's own location has no such
        # problem (a file path, an mlflow-artifacts: URI on the tracking server, s3://...).
        with tempfile.TemporaryDirectory(prefix=".download.", dir=tmp.parent) as download:
            try:
                source = _client(registry_uri).get_model_version_download_uri(name, version)
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=download, tracking_uri=registry_uri
                )
            except MlflowException as exc:
                raise ModelError(
                    f"{uri!r} (version {version}): cannot download its files: {redact('message', exc.message)}"
                ) from exc
            _flatten_model(Path(local), tmp, f"{uri!r} (version {version})")

    with model_lock:
        return atomic_dir(target, build)


def _flatten_model(root: Path, out: Path, what: str) -> None:
    """Move the directory holding ``config.json`` (the root, a transformers flavour's ``model/``,
    else the shallowest) into ``out``, with the flavour's tokenizer beside it when it lacks one."""
    candidates = [root, root / _FLAVOUR_MODEL_DIR] + sorted(
        (p.parent for p in root.rglob("config.json")), key=lambda p: (len(p.parts), str(p))
    )
    model_dir = next((p for p in candidates if (p / "config.json").is_file()), None)
    if model_dir is None:
        raise ModelError(
            f"{what}: no config.json in its artifacts: expected a transformers model directory "
            "(save_pretrained files) or a model logged with mlflow.transformers.log_model "
            "(weights under model/)"
        )
    for entry in model_dir.iterdir():
        shutil.move(str(entry), out / entry.name)
    tokenizer_dir = root / _FLAVOUR_TOKENIZER_DIR
    if not any((out / f).exists() for f in _TOKENIZER_FILES) and tokenizer_dir.is_dir():
        for entry in tokenizer_dir.iterdir():
            if not (out / entry.name).exists():
                shutil.move(str(entry), out / entry.name)
