"""The MLflow model registry, both ways: ``models:/...`` references read as models, and the
trained model written as a registered version.

Reading. ``models:/<name>@<alias>``, ``models:/<name>/<version>`` and ``models:/<name>/latest`` name a
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

Writing (the ``register-model`` stage). The model directory is logged as the artifacts of an MLflow 3
*logged model* of the train run and registered as a new version of ``run.registered_model`` *from
that logged model*, so MLflow links the two both ways (the logged model's page names its version,
the train run lists the model, evaluation metrics logged with its ``model_id`` show on it). The
version's files are a flat transformers directory, which ``models:/NAME/<version>`` loading reads
back as it is. Lineage goes on the version as ``drift.*`` tags. A model already registered under
that name with the same content hash (tag ``drift.model_sha256``) is not registered again: a cached
re-run finds and returns its version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from prefect import get_run_logger, task
from pydantic import BaseModel

from drift_core.schemas import ModelConfig
from tasks.model_files import ModelError, atomic_dir, default_cache_root, model_lock
from tasks.tracking import local_tracking_uri, redact

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
    return local_tracking_uri(uri)


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
    name, version = resolve_version(uri, local_tracking_uri(tracking_uri))
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


# ------------------------------------------------------------------ writing: the register stage

SHA_TAG = "drift.model_sha256"
_MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # what the logged-model page reads to name its versions


class RegisteredVersion(BaseModel):
    name: str
    version: str
    created: bool  # False: an earlier run registered this very model
    model_id: str | None = None  # the logged model the version was registered from

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def registry_client(tracking_uri: str):
    """A client whose registry is the tracking server's (MLflow's default; said explicitly)."""
    return _client(local_tracking_uri(tracking_uri))


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # already there
        client.create_registered_model(
            name, description="Models trained by drift (weighted SFT on multi-turn rollouts)."
        )


def logged_model_name(registered: str) -> str:
    """The logged model's name: the registered model's, with the characters MLflow refuses in a
    logged model's name (``/ : . % " '``) but allows in a registered model's (Unity Catalog names
    are ``catalog.schema.model``; a run named ``lr-1.0``) replaced by ``-``."""
    return re.sub(r"[/:.%\"']", "-", registered)


def find_version(client, name: str, sha256: str):
    """The version (MLflow ``ModelVersion``) of ``name`` whose model content hash is ``sha256``
    (the oldest), if any."""
    found = client.search_model_versions(
        f"name = '{name}' and tags.`{SHA_TAG}` = '{sha256}'", order_by=["version_number ASC"]
    )
    return found[0] if found else None


@task(name="register-model", task_run_name="register-model")
def register_model(
    model_dir: str,
    sha256: str,
    name: str,
    tracking_uri: str,
    experiment_id: str,
    train_run_id: str,
    lineage: dict[str, str],
) -> RegisteredVersion:
    """Log ``model_dir`` as a logged model of the train run and register it (once per content hash)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    logger = get_run_logger()
    client = registry_client(tracking_uri)
    ensure_registered_model(client, name)
    if existing := find_version(client, name, sha256):
        model_id = version_model_id(existing)
        if model_id:  # the train run of this (cached) run produced that model too: listed on it
            client.log_outputs(train_run_id, [LoggedModelOutput(model_id, step=0)])
        logger.info("model %s is already registered as %s version %s", sha256[:12], name, existing.version)
        return RegisteredVersion(name=name, version=str(existing.version), created=False, model_id=model_id)
    tags = {**lineage, SHA_TAG: sha256}
    logged = client.create_logged_model(
        experiment_id,
        name=logged_model_name(name),
        source_run_id=train_run_id,
        tags=tags,
        model_type="transformers",
    )
    client.log_model_artifacts(logged.model_id, model_dir)
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(train_run_id, [LoggedModelOutput(logged.model_id, step=0)])  # run -> model
    # Registered from the logged model (source models:/<model_id>), as mlflow.register_model does:
    # the MLflow UI links a version to its logged model through that source. The registry stores
    # the logged model's artifact location as the version's download location, so loading
    # (materialize_registered) still reads the files directly.
    with _global_tracking_uri(local_tracking_uri(tracking_uri)):
        version = client.create_model_version(
            name,
            source=f"models:/{logged.model_id}",
            run_id=train_run_id,
            tags=tags,
            description=describe_version(lineage),
            model_id=logged.model_id,
        )
    # model -> version: what mlflow.register_model writes, and what the logged model's page reads
    client.set_logged_model_tags(
        logged.model_id,
        {_MODEL_VERSIONS_TAG: json.dumps([{"name": name, "version": str(version.version)}])},
    )
    logger.info("registered %s version %s (model %s)", name, version.version, sha256[:12])
    return RegisteredVersion(name=name, version=str(version.version), created=True, model_id=logged.model_id)


def version_model_id(version) -> str | None:
    """The logged model a registered version was registered from (its ``models:/<model_id>``
    source; MLflow's sqlite registry does not keep ``model_id`` itself)."""
    source = str(getattr(version, "source", "") or "")
    if source.startswith(PREFIX) and "/" not in source[len(PREFIX) :]:
        return source[len(PREFIX) :]
    return getattr(version, "model_id", None)


def _global_tracking_uri(uri: str):
    """MLflow's sqlite registry resolves a ``models:/<model_id>`` source through the process-wide
    tracking URI, not the client's (an MLflow TODO): point it at ``uri`` for the call, then back."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    return _use_tracking_uri(uri)


def describe_version(lineage: dict[str, Any]) -> str:
    """The version's description (markdown, shown on its page): what it was trained from and where
    its rollouts and runs are (links relative to the MLflow UI's own address)."""
    experiment = lineage.get("drift.experiment_id", "")
    parent = lineage.get("drift.mlflow_parent_run_id", "?")
    rollouts_run = lineage.get("drift.rollouts_run_id", "")
    lines = [
        f"Trained from `{lineage.get('drift.base_model', '?')}` on rollouts of "
        f"`{lineage.get('drift.reference_fingerprint', '?')}`.",
        "",
        f"* drift run: [{parent}](#/experiments/{experiment}/runs/{parent})",
    ]
    if rollouts_run:
        lines.append(
            f"* rollouts: [run {rollouts_run}, artifacts `rollouts/`]"
            f"(#/experiments/{experiment}/runs/{rollouts_run}/artifacts/rollouts)"
        )
    lines.append("* promotion decision: the tags `drift.promotion*` below")
    return "\n".join(lines)
