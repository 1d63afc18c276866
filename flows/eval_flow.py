"""The ``drift-eval`` flow: multi-turn evaluation of any model on any dataset (``drift eval``)."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow

from drift_core.schemas import ModelConfig
from flows.config import load_config
from flows.stages import StageRunner, evaluate_stage, run_tags, track_stage
from tasks.engines import release_engines
from tasks.ingest import ingest, ingest_key
from tasks.models import fingerprint_model, resolve_model
from tasks.registry import pin_registered
from tasks.store import ArtifactStore
from tasks.tracking import Tracker


@flow(name="drift-eval", log_prints=True, persist_result=False)
def evaluate_model(
    model: str, config_path: str = "configs/demo.yaml", overrides: list[str] | None = None
) -> dict[str, Any]:
    """Evaluate ``model`` (a directory, hub id, builtin or models:/ URI) with the config's protocol and eval set."""
    cfg = load_config(config_path, overrides or [])
    store = ArtifactStore(cfg.run.artifact_store)
    stages = StageRunner(store)
    model_cfg = ModelConfig(path=model, trust_remote_code=cfg.reference_model.trust_remote_code)
    model_cfg = pin_registered(model_cfg, cfg.run.tracking_uri)  # models:/: one version, run's registry
    path = resolve_model(model_cfg)
    fingerprint = fingerprint_model(model_cfg)
    tracker = Tracker(
        cfg,
        run_name=f"eval-{os.path.basename(model.rstrip('/'))}",
        tags={**run_tags(), "drift.flow": "drift-eval"},
    )
    status = "FAILED"
    try:
        base_dir = os.getcwd()
        problems = stages.run(
            "ingest-eval",
            ingest,
            cfg=cfg.eval.data,
            store_root=store.url,
            base_dir=base_dir,
            key=ingest_key(cfg.eval.data, base_dir),
        )
        manifest = evaluate_stage(
            cfg, stages, problems, "model", path, fingerprint, model_cfg.model_copy(update={"path": path})
        )
        track_stage(
            tracker,
            stages,
            "evaluate-model",
            manifest,
            {"model": model, "fingerprint": fingerprint},
            eval_metrics=True,
        )
        status = "FINISHED"
        return {
            "mlflow_run_id": tracker.run_id,
            "eval": {"model": manifest.meta},
            "stage_states": stages.states,
        }
    finally:
        tracker.finish(status)
        release_engines()
