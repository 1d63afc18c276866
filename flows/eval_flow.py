"""The ``drift-eval`` flow: multi-turn evaluation of any model on any dataset (``drift eval``)."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow

from drift_core.schemas import ModelConfig
from flows.config import load_config
from flows.orphans import task_runs_without_owner_tags
from flows.stages import (
    StageRunner,
    eval_label,
    evaluate_stage,
    log_suite_params,
    prepare_eval_suite,
    run_tags,
    track_eval,
)
from tasks.ceilings import suite_ceilings
from tasks.engines import release_engines
from tasks.models import fingerprint_model, resolve_model
from tasks.registry import pin_registered
from tasks.store import ArtifactStore
from tasks.tracking import Tracker


@flow(name="drift-eval", log_prints=True, persist_result=False)
def evaluate_model(
    model: str, config_path: str = "configs/demo.yaml", overrides: list[str] | None = None
) -> dict[str, Any]:
    """Evaluate ``model`` (a directory, hub id, builtin or models:/ URI) on every benchmark of the
    config's eval suite (``eval.data`` is a suite of one), with the config's protocol."""
    with task_runs_without_owner_tags():
        return _evaluate_model(model, config_path, overrides)


def _evaluate_model(model: str, config_path: str, overrides: list[str] | None) -> dict[str, Any]:
    cfg = load_config(config_path, overrides or [])
    store = ArtifactStore(cfg.run.artifact_store)
    stages = StageRunner(store)
    suite = prepare_eval_suite(cfg, stages, os.getcwd())  # every gold checked before the model loads
    model_cfg = ModelConfig(path=model, trust_remote_code=cfg.reference_model.trust_remote_code)
    model_cfg = pin_registered(model_cfg, cfg.run.tracking_uri)  # models:/: one version, run's registry
    path = resolve_model(model_cfg)
    fingerprint = fingerprint_model(model_cfg)
    tracker = Tracker(
        cfg,
        run_name=f"eval-{os.path.basename(model.rstrip('/'))}",
        tags={**run_tags(), "drift.flow": "drift-eval"},
        omit_sections=("online", "iterate", "weights", "train", "promote"),  # an evaluation uses none
    )
    status = "FAILED"
    try:
        log_suite_params(tracker, suite)
        resolved = model_cfg.model_copy(update={"path": path})
        results = {}
        for ev in suite:
            label = eval_label("model", ev, suite)
            manifest = evaluate_stage(cfg, stages, ev, label, "model", path, fingerprint, resolved)
            params = {"model": model, "fingerprint": fingerprint}
            track_eval(tracker, stages, label, ev, manifest, ev.name, params)
            results[ev.name] = manifest
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
            "stage_states": stages.states,
        }
    finally:
        tracker.finish(status)
        release_engines()
