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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import wait
from prefect.task_runners import TaskRunner

from drift_core.schemas import DriftConfig, ModelConfig
from flows.config import load_config
from flows.runners import shard_runner
from flows.train_flow import train_on_pool
from tasks.caching import key_from_parameters, stage_key
from tasks.engines import release_engines
from tasks.evaluate import greedy, summarize_eval
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


class StageRunner:
    """Runs one stage task with drift's caching conventions and records what happened."""

    def __init__(self, store: ArtifactStore, runner: TaskRunner | None = None):
        self.store = store
        self.runner = runner  # shards go here; None: the flow's own task runner
        self.results_dir = Path(store.root) / "prefect-results" if store.is_local else None
        self.states: dict[str, list[str]] = {}
        self.timings: dict[str, float] = {}

    def options(self, task, **extra):
        opts: dict[str, Any] = {
            "cache_key_fn": key_from_parameters,
            "persist_result": True,
            "result_serializer": "json",
        }
        if self.results_dir is not None:
            opts["result_storage"] = self.results_dir  # a Path: a str would name a block
        opts.update(extra)
        return task.with_options(**opts)

    def run(self, label: str, task, /, **params) -> Manifest:
        """Run (or serve from cache) one task and verify its artifact."""
        start = time.perf_counter()
        state = self.options(task)(**params, return_state=True)
        manifest = state.result()
        if not self.store.verify(manifest):  # cached manifest, but the artifact is gone or corrupt
            get_run_logger().warning(
                "%s: cached artifact %s failed its hash check; recomputing", label, manifest.uri
            )
            state = self.options(task, refresh_cache=True)(**params, return_state=True)
            manifest = state.result()
        self.states.setdefault(label, []).append(state.name)
        self.timings[label] = self.timings.get(label, 0.0) + time.perf_counter() - start
        return manifest

    def map(self, label: str, task, calls: list[dict[str, Any]], /) -> list[Manifest]:
        """Submit shard tasks (run concurrently by the shard runner, `flows.runners`), verify each result."""
        start = time.perf_counter()
        if self.runner is None:
            futures = [self.options(task).submit(**params) for params in calls]
        else:
            futures = [self.runner.submit(self.options(task), params) for params in calls]
        wait(futures)
        manifests = []
        for params, future in zip(calls, futures, strict=False):
            manifest = future.result()
            name = future.state.name
            if not self.store.verify(manifest):
                get_run_logger().warning(
                    "%s: cached artifact %s failed its hash check; recomputing", label, manifest.uri
                )
                state = self.options(task, refresh_cache=True)(**params, return_state=True)
                manifest, name = state.result(), state.name
            self.states.setdefault(label, []).append(name)
            manifests.append(manifest)
        self.timings[label] = self.timings.get(label, 0.0) + time.perf_counter() - start
        return manifests

    def cached(self, label: str) -> bool:
        return bool(self.states.get(label)) and all(s == "Cached" for s in self.states[label])


def _sharded(label: str, problems: Manifest, shard_size: int, base_key: str, common: dict) -> list[dict]:
    rows = problems.rows or 0
    calls = []
    for shard, start in enumerate(range(0, rows, shard_size)):
        stop = min(rows, start + shard_size)
        key = stage_key(label, base=base_key, start=start, stop=stop)
        calls.append(
            {**common, "problems": problems, "shard": shard, "start": start, "stop": stop, "key": key}
        )
    return calls


def _result_fields(model) -> dict:
    """A config section without the fields that change speed, not results (kept out of cache keys).
    Shard size stays out too: each shard's key holds its own prompt range, and a joined artifact's
    key holds its shards' keys (not their content hashes, which include timings)."""
    drop = _SPEED_ONLY.get(type(model).__name__, set())
    return {k: v for k, v in model.model_dump(mode="json").items() if k not in drop}


# Per section: the settings that change where or how fast a stage runs, never what it produces.
# (train.batch_size is NOT here: it changes the optimisation; the engine's batch_size is not keyed.)
_SPEED_ONLY: dict[str, set[str]] = {
    "VerifierConfig": {"workers"},
    "RolloutConfig": {"shard_size"},
    "TrainConfig": {"work_pool", "checkpoint_every", "num_processes", "accelerate_config"},
}


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
    tracker = Tracker(cfg, tags=_run_tags())
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
        _track(tracker, stages, "ingest", problems, {"data.source": cfg.data.source})
        rollout_base = stage_key(
            "rollout",
            problems=problems.sha256,
            model=reference_fp,
            protocol=cfg.protocol,
            verifier=_result_fields(cfg.verifier),
            rollout=_result_fields(cfg.rollout),
            engine=cfg.engine.kind,
        )
        shards = stages.map(
            "rollout",
            rollout_shard,
            _sharded(
                "rollout-shard",
                problems,
                cfg.rollout.shard_size,
                rollout_base,
                {
                    "model_path": reference,
                    "model_cfg": reference_cfg,
                    "engine_cfg": cfg.engine,
                    "protocol": cfg.protocol,
                    "verifier": cfg.verifier,
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
    _track(tracker, stages, "rollout", rollouts, {"reference_fingerprint": rollouts_fp})

    # 2. Importance weights within each prompt's group of K.
    weighted = stages.run(
        "weights",
        compute_weights,
        rollouts=rollouts,
        cfg=cfg.weights,
        store_root=root,
        key=stage_key("weights", rollouts=rollouts.sha256, weights=cfg.weights),
    )
    _track(tracker, stages, "weights", weighted, cfg.weights.model_dump(), histogram=True)

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
        key=stage_key("train", weighted=weighted.sha256, model=base_fp, train=_result_fields(cfg.train)),
        **train_args,
    )
    _track(tracker, stages, "train", model, {"base_fingerprint": base_fp}, loss_history=True)

    # 4. Multi-turn evaluation, greedy, of the trained model (and the reference, for comparison).
    eval_problems = stages.run(
        "ingest-eval",
        ingest,
        cfg=cfg.eval.data,
        store_root=root,
        base_dir=base_dir,
        key=ingest_key(cfg.eval.data, base_dir),
    )
    systems = {
        "trained": (
            store.local_path(model),
            "sha256:" + model.sha256,
            ModelConfig(path=store.local_path(model)),
        )
    }
    if cfg.eval.evaluate_reference:
        systems = {"reference": (reference, reference_fp, reference_cfg), **systems}
    results = {name: _evaluate(cfg, stages, eval_problems, name, *spec) for name, spec in systems.items()}
    for name, manifest in results.items():
        params = {"system": name, "model_fingerprint": systems[name][1]}  # the reference as of now
        _track(tracker, stages, f"evaluate-{name}", manifest, params, eval_metrics=True)
    _log_comparison(tracker, results)

    summary = {
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": tracker.uri,
        "model_dir": store.local_path(model),
        "stage_states": stages.states,
        "stage_seconds": {k: round(v, 2) for k, v in stages.timings.items()},
        "eval": {name: m.meta for name, m in results.items()},
        "weights": {k: v for k, v in weighted.meta.items() if k != "histogram"},
        "rollout": rollouts.meta,
    }
    tracker.log_dict(tracker.run_id, summary, "summary.json")
    return summary


def _evaluate(
    cfg: DriftConfig, stages: StageRunner, problems: Manifest, name: str, path: str, fp: str, model_cfg
):
    max_turns = cfg.eval_max_turns
    max_new = cfg.eval.max_new_tokens or cfg.rollout.sampling.max_new_tokens
    protocol = cfg.protocol.model_copy(update={"max_turns": max_turns})
    base = stage_key(
        "evaluate",
        model=fp,
        problems=problems.sha256,
        protocol=protocol,
        verifier=_result_fields(cfg.verifier),
        max_new_tokens=max_new,
        engine=cfg.engine.kind,
    )
    shard_task = rollout_shard.with_options(name="eval-shard", task_run_name=f"eval-{name}-{{shard}}")
    shards = stages.map(
        f"evaluate-{name}",
        shard_task,
        _sharded(
            "eval-shard",
            problems,
            cfg.eval.shard_size,
            base,
            {
                "model_path": path,
                "model_cfg": model_cfg,
                "engine_cfg": cfg.engine,
                "protocol": protocol,
                "verifier": cfg.verifier,
                "sampling": greedy(max_new),
                "k": 1,
                "max_turns": max_turns,
                "seed": 0,
                "store_root": stages.store.url,
                "stage": "eval-shard",
            },
        ),
    )
    return stages.run(
        f"evaluate-{name}",
        summarize_eval,
        shards=shards,
        label=name,
        max_turns=max_turns,
        store_root=stages.store.url,
        key=stage_key("evaluate", base=base, shards=[m.key for m in shards]),
    )


# ------------------------------------------------------------------------------------ helpers


def _run_tags() -> dict[str, str]:
    tags = {"drift.flow": "drift"}
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            tags["prefect.flow_run_id"] = str(flow_run.id)
            tags["prefect.flow_run_name"] = str(flow_run.name)
    except Exception:
        pass
    return tags


def _track(
    tracker: Tracker,
    stages: StageRunner,
    name: str,
    manifest: Manifest,
    params: dict,
    histogram: bool = False,
    loss_history: bool = False,
    eval_metrics: bool = False,
) -> None:
    run_id = tracker.stage(
        name,
        params={**params, "artifact": manifest.uri, "sha256": manifest.sha256},
        cached=stages.cached(name),
    )
    meta = manifest.meta
    scalars = {k: v for k, v in meta.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if manifest.rows is not None:
        scalars["rows"] = manifest.rows
    scalars["stage_seconds"] = stages.timings.get(name, 0.0)
    tracker.log_metrics(run_id, scalars)
    tracker.log_metrics(tracker.run_id, {f"{name}.{k}": v for k, v in scalars.items()})
    if histogram and "histogram" in meta:
        import tempfile

        from tasks.plots import plot_weight_histogram

        with tempfile.TemporaryDirectory() as tmp:
            png = plot_weight_histogram(
                meta["histogram"]["counts"], meta["histogram"]["edges"], Path(tmp) / "weights.png"
            )
            tracker.log_file(run_id, png)
            tracker.log_file(tracker.run_id, png)
    if loss_history:
        for step, loss, lr in meta.get("loss_history", []):
            tracker.log_metrics(run_id, {"loss": loss, "lr": lr}, step=int(step))
    if eval_metrics:
        for key in ("multi_at", "accuracy_at_turn", "correction_rate"):
            for t, value in enumerate(meta.get(key, []), start=1):
                if value is not None:
                    tracker.log_metrics(run_id, {key: value}, step=t)
                    tracker.log_metrics(tracker.run_id, {f"{name}.{key}_t{t}": value})
        for file in ("metrics.json", "multi_at.png"):
            path = Path(stages.store.dir_for(manifest.stage, manifest.key)) / file
            if stages.store.is_local and path.exists():
                tracker.log_file(run_id, path)
    tracker.log_dict(run_id, manifest.model_dump(mode="json"), "manifest.json")
    tracker.end_stage(name)


def _log_comparison(tracker: Tracker, results: dict[str, Manifest]) -> None:
    import tempfile

    from tasks.plots import plot_multi_at

    curves = {name: m.meta.get("multi_at", []) for name, m in results.items()}
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_file(tracker.run_id, plot_multi_at(curves, Path(tmp) / "multi_at.png"))


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
