"""Register stage: the trained model as an MLflow logged model and a registered model version.

The model directory is logged as the artifacts of an MLflow 3 *logged model* (shown on the train
run's and the experiment's Models tab) and registered as a new version of ``run.registered_model``.
The version's files are a flat transformers directory, which ``models:/NAME/<version>`` loading
(``tasks.registry``) reads back as it is. Lineage goes on the version as ``drift.*`` tags.

A model already registered under that name with the same content hash (tag ``drift.model_sha256``)
is not registered again: a cached re-run finds and returns its version.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from prefect import get_run_logger, task
from pydantic import BaseModel

__all__ = [
    "RegisteredVersion",
    "ensure_registered_model",
    "find_version",
    "register_model",
    "registry_client",
]

SHA_TAG = "drift.model_sha256"


class RegisteredVersion(BaseModel):
    name: str
    version: str
    created: bool  # False: an earlier run registered this very model
    model_id: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def registry_client(tracking_uri: str):
    """A client whose registry is the tracking server's (MLflow's default; said explicitly)."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import _local_tracking_uri

    uri = _local_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


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


def find_version(client, name: str, sha256: str) -> str | None:
    """The version of ``name`` whose model content hash is ``sha256`` (the oldest), if any."""
    found = client.search_model_versions(
        f"name = '{name}' and tags.`{SHA_TAG}` = '{sha256}'", order_by=["version_number ASC"]
    )
    return str(found[0].version) if found else None


@task(name="register-model")
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
    from mlflow.entities import LoggedModelStatus

    logger = get_run_logger()
    client = registry_client(tracking_uri)
    ensure_registered_model(client, name)
    if existing := find_version(client, name, sha256):
        logger.info("model %s is already registered as %s version %s", sha256[:12], name, existing)
        return RegisteredVersion(name=name, version=existing, created=False)
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
    version = client.create_model_version(
        name,
        source=logged.artifact_location,  # the files themselves: loadable without the logged-model API
        run_id=train_run_id,
        tags=tags,
        description=_describe(lineage),
        model_id=logged.model_id,
    )
    logger.info("registered %s version %s (model %s)", name, version.version, sha256[:12])
    return RegisteredVersion(name=name, version=str(version.version), created=True, model_id=logged.model_id)


def _describe(lineage: dict[str, Any]) -> str:
    return (
        f"Trained from {lineage.get('drift.base_model', '?')} on rollouts of "
        f"{lineage.get('drift.reference_fingerprint', '?')} (MLflow run {lineage.get('drift.mlflow_parent_run_id', '?')})."
    )
