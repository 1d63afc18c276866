"""The reference-model watcher: re-make the rollouts when the reference model changes.

Rollouts come from a fixed reference policy, so they only go stale when that policy changes. The
watcher (deployment ``drift-reference-watcher/watch-reference``, on an interval schedule)

1. fingerprints the config's ``reference_model``: a local directory by content
   (``tasks.models.fingerprint_model``, the same fingerprint the rollout cache keys on); a Hugging
   Face id by the commit its revision resolves to, asked of the hub (no answer: no decision); an
   MLflow registered model ``models:/name@alias`` or ``models:/name/<version>`` by its version
   (``tasks.registry.registry_fingerprint``, again what the rollout cache keys on);
2. reads the fingerprint of the last successful rollout from MLflow: the newest FINISHED parent run
   of the config's experiment and reference path that generated rollouts (tag
   ``drift.reference_fingerprint``; retrain runs, tagged ``drift.rollouts_from``, did not);
3. starts ``drift/full-pipeline`` with the same config through ``run_deployment`` only when the two
   differ and no run of that deployment with those parameters is already queued or running.

MLflow, not a state file, holds "the last rollout": it is what the pipeline already writes, it is
shared whenever ``run.tracking_uri`` is a server, and a failed run leaves nothing behind, so the
next tick tries again.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from drift_core.schemas import DriftConfig, ModelConfig
from flows.config import load_config
from tasks.registry import registry_fingerprint, registry_uri_for  # registry_fingerprint: public here too

FULL_PIPELINE = "drift/full-pipeline"


def hub_fingerprint(repo_id: str, revision: str | None) -> str | None:
    """``hub:<id>@<commit>`` as the rollout cache records it, or None when the hub does not answer
    (an offline guess would differ from the recorded commit and re-roll for nothing)."""
    try:
        from huggingface_hub import HfApi

        return f"hub:{repo_id}@{HfApi().model_info(repo_id, revision=revision).sha}"
    except Exception:
        return None


@task(name="fingerprint-reference")
def fingerprint_reference(model: ModelConfig, tracking_uri: str) -> str | None:
    """The reference model's current fingerprint; None when it cannot be known right now."""
    from pathlib import Path

    from tasks.models import fingerprint_model, resolve_model

    if model.path.startswith("models:/"):  # the registry the pipeline resolves the alias in, too
        return registry_fingerprint(model.path, registry_uri_for(model.registry_uri, tracking_uri))
    resolved = resolve_model(model)  # builtins are materialised; a missing local dir raises
    if Path(resolved).is_dir():
        return fingerprint_model(model)
    return hub_fingerprint(resolved, model.revision)


@task(name="last-rollout")
def last_rollout(cfg: DriftConfig) -> dict[str, str] | None:
    """Run id and reference fingerprint of the newest FINISHED drift run that rolled out with this
    config's reference model path (None: there is none)."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import local_tracking_uri

    client = MlflowClient(tracking_uri=local_tracking_uri(cfg.run.tracking_uri))
    experiment = client.get_experiment_by_name(cfg.run.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="attributes.status = 'FINISHED' and tags.`drift.flow` = 'drift'",
        order_by=["attributes.start_time DESC"],
        max_results=500,
    )
    for run in runs:
        tags, params = run.data.tags, run.data.params
        if (
            "drift.reference_fingerprint" in tags
            and "drift.rollouts_from" not in tags
            and params.get("reference_model.path") == cfg.reference_model.path
        ):
            return {"run_id": run.info.run_id, "fingerprint": tags["drift.reference_fingerprint"]}
    return None


def _pending_run(deployment: str, parameters: dict[str, Any]) -> str | None:
    """Id of a queued or running flow run of ``deployment`` with these parameters, if any."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    open_states = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]
    with get_client(sync_client=True) as client:
        target = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[target.id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=open_states))
            ),
        )
    for run in runs:
        if all(run.parameters.get(k) == v for k, v in parameters.items()):
            return str(run.id)
    return None


@flow(name="drift-reference-watcher", log_prints=True, persist_result=False)
def watch_reference(
    config_path: str = "configs/demo.yaml",
    overrides: list[str] | None = None,
    deployment: str = FULL_PIPELINE,
) -> dict[str, Any]:
    """Start ``deployment`` with this config when the reference model changed since the last
    successful rollout. Returns the decision: ``started``, ``unchanged``, ``already-running``
    or ``unknown`` (the fingerprint could not be taken), with the fingerprints compared."""
    logger = get_run_logger()
    cfg = load_config(config_path, overrides or [])
    current = fingerprint_reference(cfg.reference_model, cfg.run.tracking_uri)
    last = last_rollout(cfg)
    decision: dict[str, Any] = {
        "reference": cfg.reference_model.path,
        "fingerprint": current,
        "last_fingerprint": last and last["fingerprint"],
        "last_run_id": last and last["run_id"],
        "flow_run_id": None,
    }
    parameters = {"config_path": config_path, "overrides": list(overrides or [])}
    if current is None:
        decision["decision"] = "unknown"
    elif last is not None and last["fingerprint"] == current:
        decision["decision"] = "unchanged"
    elif pending := _pending_run(deployment, parameters):
        decision.update(decision="already-running", flow_run_id=pending)
    else:
        from prefect.deployments import run_deployment

        run = run_deployment(deployment, parameters=parameters, timeout=0)
        decision.update(decision="started", flow_run_id=str(run.id))
    logger.info(
        "reference %s: %s (now %s, last rollout %s in run %s)%s",
        decision["reference"],
        decision["decision"],
        current,
        decision["last_fingerprint"],
        decision["last_run_id"],
        f"; flow run {decision['flow_run_id']}" if decision["flow_run_id"] else "",
    )
    return decision
