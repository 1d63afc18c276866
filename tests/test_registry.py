"""MLflow registered models as the reference model (``tasks.registry``), against a real registry:
a sqlite database and a local artifact root, no server.

An alias resolves to a version whose files load with drift's own loaders; moving the alias changes
the fingerprint (so the rollouts are made again) and the weights; the watcher agrees with the flow;
bad references fail with messages that name them.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

from drift_core.schemas import ModelConfig
from tasks.models import ModelError, fingerprint_model, load_model, load_tokenizer, resolve_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _no_mlflow_env(monkeypatch):
    """Tests say which registry they use; the developer's MLflow settings must not leak in."""
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


class Registry:
    """A sqlite-backed MLflow registry whose artifacts live under ``root``."""

    def __init__(self, root: Path):
        from mlflow.tracking import MlflowClient

        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.experiment = self.client.create_experiment("models", artifact_location=(root / "art").as_uri())

    def register(self, name: str, directory: Path) -> str:
        """Log ``directory`` as a run's artifacts and register them as a new version of ``name``."""
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):  # already registered: add a version
            self.client.create_registered_model(name)
        run = self.client.create_run(self.experiment)
        self.client.log_artifacts(run.info.run_id, str(directory), "hf")
        source = f"{run.info.artifact_uri}/hf"
        return self.client.create_model_version(name, source=source, run_id=run.info.run_id).version


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    """One registry for the module (creating its database takes seconds); each test its own names."""
    return Registry(tmp_path_factory.mktemp("registry"))


def _loads_with_weights_of(path: str | Path, original: Path) -> bool:
    """``load_model`` loads ``path``, and its weights are exactly those saved in ``original``."""
    from safetensors.torch import load_file

    state = load_model(str(path), device="cpu", dtype="float32").state_dict()
    saved = load_file(original / "model.safetensors")
    return all(state[k].equal(v) for k, v in saved.items())


def _perturbed_copy(src: Path, dst: Path) -> Path:
    """``src`` with every weight scaled by 1.5: another version of the "same" model."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    save_file({k: v * 1.5 for k, v in weights.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_alias_resolves_to_a_loadable_version_and_follows_the_alias(registry, tiny_model_dir, tmp_path):
    from deployments.watcher import fingerprint_reference, registry_fingerprint
    from tasks.registry import pin_registered

    cache = tmp_path / "cache"
    registry.client.set_registered_model_alias(
        "reference", "champion", registry.register("reference", tiny_model_dir)
    )
    cfg = ModelConfig(path="models:/reference@champion", registry_uri=registry.uri)

    v1 = resolve_model(cfg, cache)
    assert load_tokenizer(v1).chat_template
    assert _loads_with_weights_of(v1, tiny_model_dir)
    assert fingerprint_model(cfg) == "mlflow:reference/1"
    assert registry_fingerprint(cfg.path, registry.uri) == "mlflow:reference/1"  # the watcher's

    v2_dir = _perturbed_copy(tiny_model_dir, tmp_path / "v2")
    registry.register("reference", v2_dir)
    assert fingerprint_model(cfg) == "mlflow:reference/1"  # a new version alone moves nothing
    registry.client.set_registered_model_alias("reference", "champion", "2")
    assert fingerprint_model(cfg) == "mlflow:reference/2"  # a new rollout cache key: re-rolled
    v2 = resolve_model(cfg, cache)
    assert v2 != v1 and _loads_with_weights_of(v2, v2_dir)
    assert not _loads_with_weights_of(v2, tiny_model_dir)
    assert resolve_model(cfg.model_copy(update={"path": "models:/reference/1"}), cache) == v1  # cached

    # No registry_uri: the flow pins the alias in run.tracking_uri's registry; the watcher agrees.
    unset = ModelConfig(path="models:/reference@champion")
    pinned = pin_registered(unset, registry.uri)
    assert pinned.path == "models:/reference/2" and pinned.registry_uri == registry.uri
    assert fingerprint_model(pinned) == fingerprint_reference.fn(unset, registry.uri) == "mlflow:reference/2"
    assert pin_registered(ModelConfig(path=str(tiny_model_dir)), registry.uri).registry_uri is None


def test_a_registered_name_with_dots_registers_and_loads(registry, tiny_model_dir, tmp_path):
    """MLflow refuses '.', ':', '%' and quotes in a logged model's name but not in a registered
    model's: the register stage of a run named ``lr-1.0`` (registered model ``drift-lr-1.0``) used to
    fail after training. It registers now, and the version loads with the trained weights."""
    from prefect.logging import disable_run_logger

    from tasks.registry import register_model

    run = registry.client.create_run(registry.experiment)
    with disable_run_logger():
        version = register_model.fn(
            str(tiny_model_dir),
            "sha256:dots",
            "drift-lr-1.0",
            registry.uri,
            registry.experiment,
            run.info.run_id,
            {},
        )
    assert version.created and version.name == "drift-lr-1.0"
    assert registry.client.get_logged_model(version.model_id).name == "drift-lr-1-0"
    path = resolve_model(
        ModelConfig(path=f"models:/drift-lr-1.0/{version.version}", registry_uri=registry.uri), tmp_path
    )
    assert _loads_with_weights_of(path, tiny_model_dir)


def test_a_version_number_reused_by_the_registry_never_serves_the_old_files(
    registry, tiny_model_dir, tmp_path
):
    """Version numbers restart when a registered model is deleted and registered again (or its
    registry recreated at the same address: a wiped database, a test server on a reused port):
    version 1 is then another model, and the download cache must not hand back the first one's
    files."""
    cache = tmp_path / "cache"
    cfg = ModelConfig(path="models:/recreated/1", registry_uri=registry.uri)

    assert str(registry.register("recreated", tiny_model_dir)) == "1"
    first = resolve_model(cfg, cache)
    assert _loads_with_weights_of(first, tiny_model_dir)
    assert resolve_model(cfg, cache) == first  # downloaded once

    registry.client.delete_registered_model("recreated")
    other = _perturbed_copy(tiny_model_dir, tmp_path / "other")
    assert str(registry.register("recreated", other)) == "1"  # the same name and number, other files
    second = resolve_model(cfg, cache)
    assert second != first and _loads_with_weights_of(second, other)


def test_registry_comes_from_the_environment_when_not_configured(registry, tiny_model_dir, monkeypatch):
    registry.register("from-env", tiny_model_dir)
    cfg = ModelConfig(path="models:/from-env/latest")
    with pytest.raises(ModelError, match="registry_uri"):
        fingerprint_model(cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    assert fingerprint_model(cfg) == "mlflow:from-env/1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never asked:
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registry.uri)  # the registry URI wins
    assert fingerprint_model(cfg) == "mlflow:from-env/1"


def test_transformers_flavour_model_loads_with_its_tokenizer(registry, tiny_model_dir, tmp_path, monkeypatch):
    """``mlflow.transformers.log_model`` keeps weights under ``model/`` and the tokenizer under
    ``components/tokenizer/``: the resolved directory holds both."""
    import mlflow
    import transformers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)  # the fluent API logs there
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    with mlflow.start_run(experiment_id=registry.experiment):
        mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            registered_model_name="flavoured",
            pip_requirements=["transformers", "torch"],  # no requirement inference: fast, offline
        )
    source = registry.client.get_model_version_download_uri("flavoured", "1")
    logged = Path(source.removeprefix("file://"))
    assert (logged / "model" / "config.json").exists()
    assert (logged / "components" / "tokenizer" / "tokenizer_config.json").exists()

    path = resolve_model(
        ModelConfig(path="models:/flavoured/1", registry_uri=registry.uri), tmp_path / "cache"
    )
    assert load_tokenizer(path).chat_template
    assert _loads_with_weights_of(path, tiny_model_dir)
    assert (logged / "model" / "config.json").exists()  # copied out of the registry's store, not moved


def test_bad_references_fail_naming_the_uri(registry, tmp_path):
    cache = tmp_path / "cache"
    for uri in ("models:/a/b/c", "models:/a/Production", "models:/../1"):
        with pytest.raises(ModelError, match=re.escape(repr(uri)) + ": expected models:/"):
            resolve_model(ModelConfig(path=uri, registry_uri=registry.uri), cache)
    for uri in ("models:/unknown@champion", "models:/unknown/1", "models:/unknown/latest"):
        with pytest.raises(ModelError, match=re.escape(repr(uri))):
            resolve_model(ModelConfig(path=uri, registry_uri=registry.uri), cache)

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("not a model")
    registry.client.set_registered_model_alias("notes", "champion", registry.register("notes", notes))
    with pytest.raises(ModelError, match=r"'models:/notes@champion' \(version 1\): no config\.json"):
        resolve_model(ModelConfig(path="models:/notes@champion", registry_uri=registry.uri), cache)
    assert not any(p.name == "1" for p in cache.rglob("*"))  # nothing half-made is left cached


def test_registry_uri_with_a_password_stays_out_of_stored_parameters():
    from tasks.registry import without_credentials
    from tasks.tracking import redact

    secret = ModelConfig(path="models:/reference/1", registry_uri="https://user:hunter2@mlflow.example")
    assert without_credentials(secret).registry_uri is None
    plain = secret.model_copy(update={"registry_uri": "https://mlflow.example"})
    assert without_credentials(plain) == plain
    assert "hunter2" not in str(redact("reference_model.registry_uri", secret.registry_uri))
