"""The trained model in the MLflow registry: its version, with the run's lineage (stage 3b), and
the promotion gate that moves ``champion`` to it when it beats the champion (stage 5)."""

from __future__ import annotations

import json

from drift_core.schemas import ModelConfig
from flows.evaluation import EvalSet, System, evaluate
from flows.stages import PipelineRun
from flows.story import run_tags
from tasks.models import ResolvedModel, resolved_model
from tasks.promote import current_champion, log_promotion, promote
from tasks.registry import RegisteredVersion, register_model
from tasks.store import Manifest
from tasks.tracking import redact

__all__ = ["gate", "register"]


def register(
    pipeline: PipelineRun, model: Manifest, base: ResolvedModel, rollouts: Manifest, rollouts_fp: str
) -> RegisteredVersion | None:
    """3b. The trained model as a version of run.registered_model, with its lineage."""
    cfg, tracker = pipeline.cfg, pipeline.tracker
    if not cfg.run.register_model:
        return None
    lineage = {
        "drift.mlflow_parent_run_id": tracker.run_id,
        "drift.prefect_flow_run_id": run_tags().get("prefect.flow_run_id", ""),
        "drift.reference_fingerprint": rollouts_fp,
        "drift.rollout_key": rollouts.key,
        "drift.rollouts_run_id": pipeline.rollouts_run_id,
        "drift.rollouts": f"runs:/{pipeline.rollouts_run_id}/rollouts",
        "drift.experiment_id": tracker.experiment_id,
        "drift.weights": json.dumps(cfg.weights.model_dump(), sort_keys=True),
        "drift.base_model": redact("uri", base.cfg.path),
        "drift.base_fingerprint": base.fingerprint,
        "drift.config_name": cfg.run.name,
    }
    registered = register_model(
        model_dir=pipeline.store.local_path(model),
        sha256=model.sha256,
        name=cfg.registered_model,
        tracking_uri=tracker.uri,
        experiment_id=tracker.experiment_id,
        train_run_id=tracker.stage_runs["train"],
        lineage=lineage,
    )
    tags = {"drift.registered_model": registered.name, "drift.model_version": registered.version}
    tracker.set_tags(tags)
    tracker.set_tags(tags, tracker.stage_runs["train"])
    return registered


def gate(
    pipeline: PipelineRun,
    registered: RegisteredVersion | None,
    suite: list[EvalSet],
    results: dict[str, Manifest],
    reference: ResolvedModel,
) -> dict | None:
    """5. The promotion gate: challenger always, champion when it beats the champion (no champion:
    the reference) on the same eval problems (the suite's first benchmark)."""
    cfg, tracker = pipeline.cfg, pipeline.tracker
    if registered is None or not cfg.promote.enabled:
        return None
    champion = current_champion(tracker.uri, registered.name)
    baseline: Manifest | None = None
    if champion == registered.version:
        label = f"champion (version {champion})"
    elif champion is None or f"mlflow:{registered.name}/{champion}" == reference.fingerprint:
        label = "reference" if champion is None else f"champion (version {champion}, the reference)"
        baseline = results.get("reference") or _evaluate_for_gate(
            pipeline, suite, System.of("reference", reference)
        )  # eval.evaluate_reference off: the gate still needs the reference
    else:
        label = f"champion (version {champion})"
        champion_model = resolved_model(
            ModelConfig(path=f"models:/{registered.name}/{champion}"), cfg.run.tracking_uri
        )
        baseline = _evaluate_for_gate(pipeline, suite, System.of("champion", champion_model))
    result = promote(
        name=registered.name,
        version=registered.version,
        challenger=results["trained"],
        baseline=baseline,
        baseline_label=label,
        cfg=cfg.promote,
        store_root=pipeline.root,
        tracking_uri=tracker.uri,
        run_id=tracker.run_id,
    )
    log_promotion(tracker, result)
    pipeline.logger.info(
        "promotion of version %s: %s (%s)", result["version"], result["outcome"], result["reason"]
    )
    return result


def _evaluate_for_gate(pipeline: PipelineRun, suite: list[EvalSet], system: System) -> Manifest:
    """The gate's baseline evaluated on the suite's first benchmark (cached like any evaluation)."""
    results = evaluate(pipeline.cfg, pipeline.stages, suite, [system], benchmarks=suite[:1])
    return results[suite[0].name][system.name]
