"""The ``drift`` flow: dataset -> reference rollouts -> weights -> weighted SFT -> evaluation.

Reads like the process it runs. Each stage is a Prefect task whose cache key holds exactly what
its output depends on (``tasks.caching``), so

* changing ``weights.beta`` re-runs weights, train and evaluate of the trained model only;
* changing the reference model re-runs everything from rollout on;
* re-running an unchanged config serves every stage from cache (task state ``Cached``).

Every cache hit is checked against the artifact's content hash; a missing or corrupt artifact is
recomputed (``refresh_cache``), never used. MLflow gets one parent run per flow run and one nested
run per stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext

from drift_core.schemas import DriftConfig, ModelConfig
from flows.config import load_config
from flows.runners import shard_runner
from flows.stages import (
    StageRunner,
    eval_label,
    evaluate_stage,
    log_suite_params,
    prepare_eval_suite,
    result_fields,
    run_tags,
    sharded_calls,
    track_eval,
    track_stage,
)
from flows.train_flow import train_on_pool
from tasks.caching import stage_key
from tasks.engines import release_engines
from tasks.golds import checked_verifier
from tasks.ingest import ingest, ingest_key
from tasks.models import fingerprint_model, resolve_model
from tasks.registry import pin_registered, without_credentials
from tasks.rollout import collect_rollouts, rollout_shard
from tasks.store import ArtifactStore, Manifest
from tasks.tracking import Tracker, redact
from tasks.train import train
from tasks.weights import compute_weights

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


@flow(name="drift", log_prints=True, persist_result=False)
def drift(
    config_path: str = "configs/demo.yaml",
    overrides: list[str] | None = None,
    config: dict[str, Any] | None = None,
    rollouts_from: str | None = None,
    retrain: bool = False,
) -> dict[str, Any]:
    """Run the DRIFT pipeline from one YAML config (``overrides``: ``key.sub=value`` strings).

    ``rollouts_from`` re-uses the rollouts of an earlier run (an MLflow run id or a rollout
    manifest JSON path) and never generates new ones. ``retrain=True`` (the ``retrain``
    deployment) makes ``rollouts_from`` required, so a retrain can never roll out by accident.
    """
    cfg = load_config(config_path, overrides or [], raw=config)
    if retrain and not rollouts_from:
        raise ValueError(
            "retrain needs rollouts_from: the MLflow run id of an earlier drift run (or a rollout "
            "manifest JSON path); run drift/full-pipeline to generate rollouts"
        )
    logger = get_run_logger()
    store = ArtifactStore(cfg.run.artifact_store)
    tracker = Tracker(cfg, tags=run_tags())
    status = "FAILED"
    try:
        context = FlowRunContext.get()
        with shard_runner(cfg, context.task_runner if context else None) as runner:
            stages = StageRunner(store, runner)
            summary = _pipeline(cfg, store, stages, tracker, rollouts_from, logger)
        status = "FINISHED"
        return summary
    finally:
        tracker.finish(status)
        release_engines()


def _pipeline(cfg: DriftConfig, store, stages: StageRunner, tracker: Tracker, rollouts_from, logger) -> dict:
    root = store.url
    base_dir = os.getcwd()
    # Every benchmark of the eval suite is ingested and its golds checked first: a data/verifier
    # mismatch fails now, not after rollouts and training.
    suite = prepare_eval_suite(cfg, stages, base_dir)
    log_suite_params(tracker, suite)

    # 1. Reference rollouts: ingest -> K trajectories per prompt, graded turn by turn.
    # A models:/ alias is resolved to one version for the whole run, in run.tracking_uri's registry
    # unless configured otherwise; other model references come back unchanged.
    reference_cfg = pin_registered(cfg.reference_model, cfg.run.tracking_uri)
    reference = resolve_model(reference_cfg)
    reference_fp = fingerprint_model(reference_cfg)
    rollouts_fp = reference_fp  # the model that made the rollouts this run trains on
    if rollouts_from:
        rollouts = _find_rollouts(rollouts_from, store, tracker)
        logger.info("re-using rollouts %s (%s rows); rollout not run", rollouts.uri, rollouts.rows)
        tracker.client.set_tag(tracker.run_id, "drift.rollouts_from", rollouts_from)
        rollouts_fp = _rollouts_fingerprint(rollouts_from, rollouts, tracker.client) or "unknown"
        if rollouts_fp == "unknown":
            logger.warning(
                "rollouts_from=%r does not record the reference model that made it; "
                "tagging drift.reference_fingerprint=unknown",
                rollouts_from,
            )
        if rollouts_fp != reference_fp:  # the reference has moved since: say so in the MLflow UI
            tracker.client.set_tag(tracker.run_id, "drift.reference_fingerprint_now", reference_fp)
    else:
        problems = stages.run(
            "ingest",
            ingest,
            cfg=cfg.data,
            store_root=root,
            base_dir=base_dir,
            key=ingest_key(cfg.data, base_dir),
        )
        track_stage(tracker, stages, "ingest", problems, {"data.source": cfg.data.source})
        verifier = checked_verifier(store, problems, cfg.data, cfg.verifier, "", base_dir)  # resolves auto
        rollout_base = stage_key(
            "rollout",
            problems=problems.sha256,
            model=reference_fp,
            protocol=cfg.protocol,
            verifier=result_fields(verifier),
            rollout=result_fields(cfg.rollout),
            engine=cfg.engine.kind,
        )
        shards = stages.map(
            "rollout",
            rollout_shard,
            sharded_calls(
                "rollout-shard",
                problems,
                cfg.rollout.shard_size,
                rollout_base,
                {
                    "model_path": reference,
                    "model_cfg": reference_cfg,
                    "engine_cfg": cfg.engine,
                    "protocol": cfg.protocol,
                    "verifier": verifier,
                    "sampling": cfg.rollout.sampling,
                    "k": cfg.rollout.k,
                    "max_turns": cfg.protocol.max_turns,
                    "seed": cfg.rollout.seed,
                    "store_root": root,
                },
            ),
        )
        rollouts = stages.run(
            "rollout",
            collect_rollouts,
            shards=shards,
            store_root=root,
            key=stage_key("rollout", base=rollout_base, shards=[m.key for m in shards]),
            max_turns=cfg.protocol.max_turns,
            k=cfg.rollout.k,
            reference_fingerprint=reference_fp,
        )
    tracker.client.set_tag(
        tracker.run_id, "drift.rollout_manifest", redact("uri", rollouts.model_dump_json())
    )
    tracker.client.set_tag(tracker.run_id, "drift.reference_fingerprint", rollouts_fp)
    track_stage(tracker, stages, "rollout", rollouts, {"reference_fingerprint": rollouts_fp})

    # 2. Importance weights within each prompt's group of K.
    weighted = stages.run(
        "weights",
        compute_weights,
        rollouts=rollouts,
        cfg=cfg.weights,
        store_root=root,
        key=stage_key("weights", rollouts=rollouts.sha256, weights=cfg.weights),
    )
    track_stage(tracker, stages, "weights", weighted, cfg.weights.model_dump(), histogram=True)

    # 3. Weighted SFT of the base model on the terminal (or every) assistant turn.
    release_engines()  # the rollout model must not hold (GPU) memory while training runs
    same = cfg.train_model == cfg.reference_model
    base = reference_cfg if same else pin_registered(cfg.train_model, cfg.run.tracking_uri)
    base_path = resolve_model(base)
    base_fp = reference_fp if same else fingerprint_model(base)
    train_task, train_args = train, {"model_cfg": base.model_copy(update={"path": base_path})}
    if cfg.train.work_pool:  # its own deployment (drift-train/<pool>), whose worker resolves the model
        pool_cfg = without_credentials(base)  # deployment parameters are stored: no passwords
        train_task, train_args = train_on_pool, {"model_cfg": pool_cfg, "work_pool": cfg.train.work_pool}
    model = stages.run(
        "train",
        train_task,
        weighted=weighted,
        cfg=cfg.train,
        store_root=root,
        key=stage_key("train", weighted=weighted.sha256, model=base_fp, train=result_fields(cfg.train)),
        **train_args,
    )
    track_stage(tracker, stages, "train", model, {"base_fingerprint": base_fp}, loss_history=True)

    # 4. Multi-turn evaluation, greedy, of the trained model (and the reference, for comparison),
    # on every benchmark of the suite. The first benchmark is the run's primary metric (`results`).
    systems = {
        "trained": (
            store.local_path(model),
            "sha256:" + model.sha256,
            ModelConfig(path=store.local_path(model)),
        )
    }
    if cfg.eval.evaluate_reference:
        systems = {"reference": (reference, reference_fp, reference_cfg), **systems}
    by_benchmark: dict[str, dict[str, Manifest]] = {}
    for ev in suite:
        for name, (path, fp, model_cfg) in systems.items():
            label = eval_label(name, ev, suite)
            manifest = evaluate_stage(cfg, stages, ev, label, name, path, fp, model_cfg)
            params = {"system": name, "model_fingerprint": fp}  # the reference as of now
            track_eval(tracker, stages, label, ev, manifest, f"{ev.name}.{name}", params)
            by_benchmark.setdefault(ev.name, {})[name] = manifest
    results = by_benchmark[suite[0].name]
    _log_comparison(tracker, stages, results)

    summary = {
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": tracker.uri,
        "model_dir": store.local_path(model),
        "stage_states": stages.states,
        "stage_seconds": {k: round(v, 2) for k, v in stages.timings.items()},
        "eval": {name: m.meta for name, m in results.items()},  # the primary (first) benchmark
        "suite": {b: {name: m.meta for name, m in ms.items()} for b, ms in by_benchmark.items()},
        "verifiers": {ev.name: ev.verifier.kind for ev in suite},
        "weights": {k: v for k, v in weighted.meta.items() if k != "histogram"},
        "rollout": rollouts.meta,
    }
    tracker.log_dict(tracker.run_id, summary, "summary.json")
    return summary


# ------------------------------------------------------------------------------------ helpers


def _log_comparison(tracker: Tracker, stages: StageRunner, results: dict[str, Manifest]) -> None:
    from tasks.plots import plot_file, plot_multi_at

    curves = {name: m.meta.get("multi_at", []) for name, m in results.items()}
    with plot_file(stages.plots_dir, "multi_at.png", lambda path: plot_multi_at(curves, path), curves) as png:
        tracker.log_file(tracker.run_id, png)


def _rollouts_fingerprint(ref: str, rollouts: Manifest, client: MlflowClient) -> str | None:
    """Fingerprint of the reference model that generated ``rollouts`` (None: not recorded).

    The manifest's meta first: it travels with the artifact. Else the MLflow run that rolled them
    out; a retrain run is followed to its own source, because retrain runs tagged before this was
    fixed carry the reference fingerprint of their day, not of their rollouts."""
    if fp := rollouts.meta.get("reference_fingerprint"):
        return str(fp)
    seen: set[str] = set()
    while ref not in seen and not ref.endswith(".json"):  # a bare manifest path: nothing to ask
        seen.add(ref)
        try:
            tags = client.get_run(ref).data.tags
        except Exception:
            return None
        if "drift.rollouts_from" not in tags:
            fp = tags.get("drift.reference_fingerprint")
            return fp if fp and fp != "unknown" else None
        ref = tags["drift.rollouts_from"]
    return None


def _find_rollouts(ref: str, store: ArtifactStore, tracker: Tracker) -> Manifest:
    """Rollouts of an earlier run: a manifest JSON file, or an MLflow run id whose parent run
    recorded its rollout manifest. Fails clearly when they are missing or corrupt."""
    path = Path(ref)
    if path.suffix == ".json" and path.exists():
        manifest = Manifest.model_validate_json(path.read_text())
    else:
        try:
            run = tracker.client.get_run(ref)
        except Exception as exc:
            raise ValueError(
                f"rollouts_from={ref!r}: not a manifest file and not an MLflow run id ({exc})"
            ) from exc
        tag = run.data.tags.get("drift.rollout_manifest")
        if not tag:
            raise ValueError(
                f"rollouts_from={ref!r}: MLflow run has no rollouts (tag drift.rollout_manifest)"
            )
        manifest = Manifest.model_validate(json.loads(tag))
    if manifest.stage != "rollout" or not store.verify(manifest):
        raise ValueError(
            f"rollouts_from={ref!r}: the rollout artifact {manifest.uri} is missing or fails its hash check; "
            "run the full pipeline to regenerate it"
        )
    return manifest
