"""The ``drift-eval`` flow: multi-turn evaluation of any model on any dataset (``drift eval``)."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow

from drift_core.schemas import ModelConfig
from flows.config import load_config
from flows.evaluation import System, evaluate, log_suite_params, prepare_eval_suite
from flows.orphans import task_runs_without_owner_tags
from flows.stages import StageRunner
from flows.story import run_tags
from tasks.ceilings import suite_ceiling_notes, suite_ceilings
from tasks.engines import release_engines
from tasks.models import resolved_model
from tasks.store import ArtifactStore
from tasks.tracking import Tracker


@flow(name="drift-eval", log_prints=True, persist_result=False)
def evaluate_model(
    model: str, config_path: str | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Evaluate ``model`` (a directory, hub id, builtin or models:/ URI) on every benchmark of the
    config's eval suite (``eval.data`` is a suite of one), with the config's protocol; without
    ``config_path``, the schema's defaults (``DriftConfig()``) and ``overrides``."""
    with task_runs_without_owner_tags():
        return _evaluate_model(model, config_path, overrides)


def _evaluate_model(model: str, config_path: str | None, overrides: list[str] | None) -> dict[str, Any]:
    cfg = load_config(config_path, overrides or [])
    store = ArtifactStore(cfg.run.artifact_store)
    stages = StageRunner(store)
    suite = prepare_eval_suite(cfg, stages, os.getcwd())  # every gold checked before the model loads
    # a models:/ alias pinned to one version, in the run's registry
    resolved = resolved_model(
        ModelConfig(path=model, trust_remote_code=cfg.reference_model.trust_remote_code), cfg.run.tracking_uri
    )
    tracker = Tracker(
        cfg,
        run_name=f"eval-{os.path.basename(model.rstrip('/'))}",
        tags={**run_tags(), "drift.flow": "drift-eval"},
        omit_sections=("online", "iterate", "weights", "train", "promote"),  # an evaluation uses none
    )
    stages.tracker = tracker
    status = "FAILED"
    try:
        log_suite_params(tracker, suite, cfg, rollout=False)
        system = System(
            "model",
            resolved.path,
            resolved.fingerprint,
            resolved.loadable_cfg,
            params={"model": model, "fingerprint": resolved.fingerprint},
            named_metrics=False,
        )
        results = {
            name: by_system["model"] for name, by_system in evaluate(cfg, stages, suite, [system]).items()
        }
        status = "FINISHED"
        primary = results[suite[0].name]
        return {
            "mlflow_run_id": tracker.run_id,
            "mlflow_url": tracker.ui_url(),
            "tracking_uri": tracker.uri,
            "eval": {"model": primary.meta},  # the first benchmark: the run's primary metric
            "suite": {name: {"model": m.meta} for name, m in results.items()},
            "verifiers": {ev.name: ev.verifier.kind for ev in suite},
            "ceilings": suite_ceilings(store, suite),
            "ceiling_notes": suite_ceiling_notes(store, suite),
            "stage_states": stages.states,
        }
    finally:
        tracker.finish(status)
        release_engines()
