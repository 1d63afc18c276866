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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext

from drift_core.schemas import DriftConfig, ModelConfig
from flows.config import load_config
from flows.orphans import task_runs_without_owner_tags
from flows.runners import shard_runner
from flows.stages import (
    EvalSet,
    StageRunner,
    default_run_name,
    engine_identity,
    eval_label,
    evaluate_stage,
    format_promotion,
    link_mlflow_run,
    log_promotion,
    log_suite_params,
    per_turn_rows,
    prepare_eval_suite,
    publish_summary,
    result_fields,
    run_tags,
    sharded_calls,
    track_eval,
    track_stage,
)
from flows.train_flow import train_on_pool
from tasks.caching import stage_key
from tasks.ceilings import suite_ceilings
from tasks.engines import release_engines
from tasks.golds import checked_verifier
from tasks.ingest import ingest, ingest_key
from tasks.models import fingerprint_model, resolve_model
from tasks.promote import current_champion, promote
from tasks.reference_rollouts import import_reference_rollouts, is_reference_file
from tasks.registry import RegisteredVersion, pin_registered, register_model, without_credentials
from tasks.rollout import collect_rollouts, rollout_shard
from tasks.rollout_log import log_rollouts, rollouts_dataset_input
from tasks.store import ArtifactStore, Manifest, sha256_file
from tasks.tracking import Tracker, redact
from tasks.train import train
from tasks.weights import weigh_rollouts

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def _flow_run_name() -> str:
    """The flow run's name, which is also its MLflow parent run's: ``run_name`` when given, else
    ``<run.name>-<MMDD>-<HHMMSS>`` (UTC), so the Prefect and MLflow UIs name a run alike."""
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    if params.get("run_name"):
        return str(params["run_name"])
    try:
        cfg = load_config(
            params.get("config_path", "configs/demo.yaml"),
            params.get("overrides") or [],
            raw=params.get("config"),
        )
    except Exception:  # the flow itself reports a bad config, with its message
        return default_run_name(DriftConfig())
    return default_run_name(cfg)


@flow(name="drift", flow_run_name=_flow_run_name, log_prints=True, persist_result=False)
def drift(
    config_path: str = "configs/demo.yaml",
    overrides: list[str] | None = None,
    config: dict[str, Any] | None = None,
    rollouts_from: str | None = None,
    retrain: bool = False,
    run_name: str | None = None,
) -> dict[str, Any]:
    """Run the DRIFT pipeline from one YAML config (``overrides``: ``key.sub=value`` strings).

    ``rollouts_from`` re-uses the rollouts of an earlier run (an MLflow run id or a rollout
    manifest JSON path) and never generates new ones. ``retrain=True`` (the ``retrain``
    deployment) makes ``rollouts_from`` required, so a retrain can never roll out by accident.
    ``run_name`` names the MLflow parent run (default ``<run.name>-<UTC time>``).
    """
    cfg = load_config(config_path, overrides or [], raw=config)
    if retrain and not rollouts_from:
        raise ValueError(
            "retrain needs rollouts_from: the MLflow run id of an earlier drift run (or a rollout "
            "manifest JSON path); run drift/full-pipeline to generate rollouts"
        )
    store = ArtifactStore(cfg.run.artifact_store)
    tracker = Tracker(
        cfg,
        run_name=run_name or _current_flow_run_name() or default_run_name(cfg),
        tags=run_tags(),
        omit_sections=("online",) if cfg.iterate.rounds > 1 else ("online", "iterate"),
    )
    link_mlflow_run(tracker, cfg.run.name)
    status = "FAILED"
    try:
        context = FlowRunContext.get()
        with (
            task_runs_without_owner_tags(),
            shard_runner(cfg, context.task_runner if context else None) as runner,
        ):
            run = PipelineRun(cfg, store, StageRunner(store, runner), tracker, get_run_logger())
            summary = _pipeline(run, rollouts_from)
        status = "FINISHED"
        return summary
    finally:
        tracker.finish(status)
        release_engines()


def _current_flow_run_name() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.name if flow_run.id else None


@dataclass
class PipelineRun:
    """What every stage of one flow run shares."""

    cfg: DriftConfig
    store: ArtifactStore
    stages: StageRunner
    tracker: Tracker
    logger: Any
    base_dir: str = field(default_factory=os.getcwd)
    rollouts_run_id: str = ""  # the MLflow run whose rollouts/ artifacts hold this run's rollouts

    @property
    def root(self) -> str:
        return self.store.url


@dataclass
class Reference:
    """The reference model as this run uses it: one registry version for the whole run."""

    cfg: ModelConfig
    path: str
    fingerprint: str


def _pipeline(run: PipelineRun, rollouts_from: str | None) -> dict:
    # Every benchmark of the eval suite is ingested and its golds checked first: a data/verifier
    # mismatch fails now, not after rollouts and training.
    suite = prepare_eval_suite(run.cfg, run.stages, run.base_dir)
    log_suite_params(run.tracker, suite)
    reference = _reference(run)
    rollouts, rollouts_fp = _rollouts(run, reference, rollouts_from)
    weighted = _weights(run, rollouts)
    model, base = _train(run, weighted, reference, rollouts, rollouts_fp)
    registered = _register(run, model, base, rollouts, rollouts_fp)
    by_benchmark = _evaluate(run, suite, model, reference, registered)
    results = by_benchmark[suite[0].name]  # the first benchmark is the run's primary metric
    promotion = _promote(run, registered, suite, results, reference)
    _tell_the_story(run, suite[0].name, results, registered)
    summary = {
        "mlflow_run_id": run.tracker.run_id,
        "mlflow_url": run.tracker.ui_url(),
        "tracking_uri": run.tracker.uri,
        "model_dir": run.store.local_path(model),
        "stage_states": run.stages.states,
        "stage_seconds": {k: round(v, 2) for k, v in run.stages.timings.items()},
        "eval": {name: m.meta for name, m in results.items()},  # the primary (first) benchmark
        "suite": {b: {name: m.meta for name, m in ms.items()} for b, ms in by_benchmark.items()},
        "verifiers": {ev.name: ev.verifier.kind for ev in suite},
        "ceilings": suite_ceilings(run.store, suite),
        "weights": {k: v for k, v in weighted.meta.items() if k != "histogram"},
        "rollout": rollouts.meta,
        "registered": registered and {**registered.model_dump(), "uri": registered.uri},
        "promotion": promotion,
    }
    run.tracker.log_dict(run.tracker.run_id, summary, "summary.json")
    return summary


def _tell_the_story(
    run: PipelineRun, benchmark: str, results: dict[str, Manifest], registered: RegisteredVersion | None
) -> None:
    """The parent run explains itself: cache tags, a description (per-turn table, stages, links),
    and the same text as the flow run's keyed Prefect artifact."""
    from flows.story import cache_tags, describe_run, prefect_flow_run_url

    tracker = run.tracker
    for key, value in cache_tags(run.stages.states).items():
        tracker.client.set_tag(tracker.run_id, key, value)
    experiment = tracker.experiment_id
    links = {
        "Prefect flow run": prefect_flow_run_url(run_tags().get("prefect.flow_run_id")),
        "registered version": registered
        and f"[{registered.name} version {registered.version}](#/models/{registered.name}/versions/{registered.version})",
        "rollouts": run.rollouts_run_id
        and f"[run {run.rollouts_run_id}, `rollouts/`](#/experiments/{experiment}/runs/{run.rollouts_run_id}/artifacts/rollouts)",
    }
    run_name = tracker.client.get_run(tracker.run_id).info.run_name
    text = describe_run(run_name, results, benchmark, run.stages.states, run.stages.timings, links)
    tracker.client.set_tag(tracker.run_id, "mlflow.note.content", text)
    publish_summary(tracker, run.cfg.run.name, text)


def _reference(run: PipelineRun) -> Reference:
    """A models:/ alias is resolved to one version for the whole run, in run.tracking_uri's
    registry unless configured otherwise; other model references come back unchanged."""
    cfg = pin_registered(run.cfg.reference_model, run.cfg.run.tracking_uri)
    return Reference(cfg, resolve_model(cfg), fingerprint_model(cfg))


def _rollouts(run: PipelineRun, reference: Reference, rollouts_from: str | None) -> tuple[Manifest, str]:
    """1. Reference rollouts: ingest -> K trajectories per prompt, graded turn by turn (or the
    rollouts of an earlier run). Returns them and the fingerprint of the model that made them."""
    if rollouts_from:
        rollouts, rollouts_fp = _reused_rollouts(run, reference, rollouts_from)
    else:
        rollouts, rollouts_fp = _fresh_rollouts(run, reference), reference.fingerprint
    tracker = run.tracker
    tracker.client.set_tag(
        tracker.run_id, "drift.rollout_manifest", redact("uri", rollouts.model_dump_json())
    )
    tracker.client.set_tag(tracker.run_id, "drift.reference_fingerprint", rollouts_fp)
    track_stage(tracker, run.stages, "rollout", rollouts, {"reference_fingerprint": rollouts_fp})
    stage_run = tracker.stage_runs["rollout"]
    run.rollouts_run_id = log_rollouts(tracker, stage_run, run.store, rollouts, rollouts_fp)
    tracker.client.set_tag(tracker.run_id, "drift.rollouts_run_id", run.rollouts_run_id)
    tracker.client.log_inputs(stage_run, [rollouts_dataset_input(rollouts, rollouts_fp, run.rollouts_run_id)])
    return rollouts, rollouts_fp


def _reused_rollouts(run: PipelineRun, reference: Reference, rollouts_from: str) -> tuple[Manifest, str]:
    """An earlier run's rollouts (``drift retrain``), with the fingerprint of the model that made
    them; a reference that has moved since is tagged, so the MLflow UI says so."""
    tracker = run.tracker
    tracker.open_stage("rollout")
    if is_reference_file(rollouts_from):
        rollouts = _imported_rollouts(run, rollouts_from)
    else:
        rollouts = _find_rollouts(rollouts_from, run.store, tracker)
    run.logger.info("re-using rollouts %s (%s rows); rollout not run", rollouts.uri, rollouts.rows)
    tracker.client.set_tag(tracker.run_id, "drift.rollouts_from", rollouts_from)
    rollouts_fp = _rollouts_fingerprint(rollouts_from, rollouts, tracker.client) or "unknown"
    if rollouts_fp == "unknown":
        run.logger.warning(
            "rollouts_from=%r does not record the reference model that made it; "
            "tagging drift.reference_fingerprint=unknown",
            rollouts_from,
        )
    if rollouts_fp != reference.fingerprint:
        tracker.client.set_tag(tracker.run_id, "drift.reference_fingerprint_now", reference.fingerprint)
    return rollouts, rollouts_fp


def _imported_rollouts(run: PipelineRun, path: str) -> Manifest:
    """Rollouts in the reference scripts' JSONL (tasks.reference_rollouts), cached by the file's
    content: the same file is imported once, and weights onwards are keyed by its hash."""
    file = Path(path) if Path(path).is_absolute() else Path(run.base_dir) / path
    if not file.is_file():
        raise ValueError(f"rollouts_from={path!r}: no such reference rollout file")
    return run.stages.run(
        "rollout-import",
        import_reference_rollouts,
        path=str(file),
        store_root=run.root,
        key=stage_key("rollout-import", file=sha256_file(file)),
    )


def _fresh_rollouts(run: PipelineRun, reference: Reference) -> Manifest:
    """Ingest, then the rollout shards (each cached on its own), then their collection."""
    cfg, stages, tracker = run.cfg, run.stages, run.tracker
    tracker.open_stage("ingest")
    problems = stages.run(
        "ingest",
        ingest,
        cfg=cfg.data,
        store_root=run.root,
        base_dir=run.base_dir,
        key=ingest_key(cfg.data, run.base_dir),
    )
    track_stage(tracker, stages, "ingest", problems, {"data.source": cfg.data.source})
    verifier = checked_verifier(
        run.store, problems, cfg.data, cfg.verifier, "", run.base_dir
    )  # resolves auto
    rollout_base = stage_key(
        "rollout",
        problems=problems.sha256,
        model=reference.fingerprint,
        protocol=cfg.protocol,
        verifier=result_fields(verifier),
        rollout=result_fields(cfg.rollout),
        engine=engine_identity(cfg.engine),
    )
    common = {
        "model_path": reference.path,
        "model_cfg": reference.cfg,
        "engine_cfg": cfg.engine,
        "protocol": cfg.protocol,
        "verifier": verifier,
        "sampling": cfg.rollout.sampling,
        "k": cfg.rollout.k,
        "max_turns": cfg.protocol.max_turns,
        "seed": cfg.rollout.seed,
        "store_root": run.root,
    }
    tracker.open_stage("rollout")
    calls = sharded_calls("rollout-shard", problems, cfg.rollout.shard_size, rollout_base, common)
    shards = stages.map("rollout", rollout_shard, calls)
    return stages.run(
        "rollout",
        collect_rollouts,
        shards=shards,
        store_root=run.root,
        key=stage_key("rollout", base=rollout_base, shards=[m.key for m in shards]),
        max_turns=cfg.protocol.max_turns,
        k=cfg.rollout.k,
        reference_fingerprint=reference.fingerprint,
    )


def _weights(run: PipelineRun, rollouts: Manifest) -> Manifest:
    """2. Importance weights within each prompt's group of K."""
    run.tracker.open_stage("weights")
    weighted = run.stages.run(
        "weights",
        weigh_rollouts,
        rollouts=rollouts,
        cfg=run.cfg.weights,
        store_root=run.root,
        key=stage_key("weights", rollouts=rollouts.sha256, weights=run.cfg.weights),
    )
    track_stage(run.tracker, run.stages, "weights", weighted, run.cfg.weights.model_dump(), histogram=True)
    return weighted


def _train(
    run: PipelineRun, weighted: Manifest, reference: Reference, rollouts: Manifest, rollouts_fp: str
) -> tuple[Manifest, Reference]:
    """3. Weighted SFT of the base model on the terminal (or every) assistant turn."""
    cfg = run.cfg
    train_run = run.tracker.open_stage("train")
    dataset = rollouts_dataset_input(rollouts, rollouts_fp, run.rollouts_run_id)
    run.tracker.client.log_inputs(train_run, [dataset])  # the train run's "Datasets used"
    release_engines()  # the rollout model must not hold (GPU) memory while training runs
    if cfg.train_model == cfg.reference_model:
        base = reference
    else:
        base_cfg = pin_registered(cfg.train_model, cfg.run.tracking_uri)
        base = Reference(base_cfg, resolve_model(base_cfg), fingerprint_model(base_cfg))
    train_task, train_args = train, {"model_cfg": base.cfg.model_copy(update={"path": base.path})}
    if cfg.train.work_pool:  # its own deployment (drift-train/<pool>), whose worker resolves the model
        pool_cfg = without_credentials(base.cfg)  # deployment parameters are stored: no passwords
        train_task, train_args = train_on_pool, {"model_cfg": pool_cfg, "work_pool": cfg.train.work_pool}
    model = run.stages.run(
        "train",
        train_task,
        weighted=weighted,
        cfg=cfg.train,
        store_root=run.root,
        key=stage_key(
            "train", weighted=weighted.sha256, model=base.fingerprint, train=result_fields(cfg.train)
        ),
        **train_args,
    )
    track_stage(
        run.tracker, run.stages, "train", model, {"base_fingerprint": base.fingerprint}, loss_history=True
    )
    return model, base


def _register(
    run: PipelineRun, model: Manifest, base: Reference, rollouts: Manifest, rollouts_fp: str
) -> RegisteredVersion | None:
    """3b. The trained model as a version of run.registered_model, with its lineage."""
    cfg, tracker = run.cfg, run.tracker
    if not cfg.run.register_model:
        return None
    lineage = {
        "drift.mlflow_parent_run_id": tracker.run_id,
        "drift.prefect_flow_run_id": run_tags().get("prefect.flow_run_id", ""),
        "drift.reference_fingerprint": rollouts_fp,
        "drift.rollout_key": rollouts.key,
        "drift.rollouts_run_id": run.rollouts_run_id,
        "drift.rollouts": f"runs:/{run.rollouts_run_id}/rollouts",
        "drift.experiment_id": tracker.experiment_id,
        "drift.weights": json.dumps(cfg.weights.model_dump(), sort_keys=True),
        "drift.base_model": redact("uri", base.cfg.path),
        "drift.base_fingerprint": base.fingerprint,
        "drift.config_name": cfg.run.name,
    }
    registered = register_model(
        model_dir=run.store.local_path(model),
        sha256=model.sha256,
        name=cfg.registered_model,
        tracking_uri=tracker.uri,
        experiment_id=tracker.experiment_id,
        train_run_id=tracker.stage_runs["train"],
        lineage=lineage,
    )
    for key, value in {
        "drift.registered_model": registered.name,
        "drift.model_version": registered.version,
    }.items():
        tracker.client.set_tag(tracker.run_id, key, value)
        tracker.client.set_tag(tracker.stage_runs["train"], key, value)
    return registered


def _evaluate(
    run: PipelineRun,
    suite: list[EvalSet],
    model: Manifest,
    reference: Reference,
    registered: RegisteredVersion | None = None,
) -> dict[str, dict[str, Manifest]]:
    """4. Multi-turn evaluation, greedy, of the trained model (and the reference, for comparison),
    on every benchmark of the suite: ``{benchmark: {system: manifest}}``."""
    cfg, stages, store = run.cfg, run.stages, run.store
    trained_path = store.local_path(model)
    systems = {"trained": (trained_path, "sha256:" + model.sha256, ModelConfig(path=trained_path))}
    if cfg.eval.evaluate_reference:
        systems = {"reference": (reference.path, reference.fingerprint, reference.cfg), **systems}
    by_benchmark: dict[str, dict[str, Manifest]] = {}
    for ev in suite:
        for name, (path, fp, model_cfg) in systems.items():
            label = eval_label(name, ev, suite)
            run.tracker.open_stage(label)
            manifest = evaluate_stage(cfg, stages, ev, label, name, path, fp, model_cfg)
            params = {"system": name, "model_fingerprint": fp}  # the reference as of now
            track_eval(run.tracker, stages, label, ev, manifest, f"{ev.name}.{name}", params)
            if name == "trained" and registered is not None and registered.model_id:
                _log_model_metrics(run.tracker, registered.model_id, label, f"{ev.name}.{name}", manifest)
            by_benchmark.setdefault(ev.name, {})[name] = manifest
    _log_comparison(run.tracker, stages, by_benchmark[suite[0].name], suite[0].name)
    return by_benchmark


def _promote(
    run: PipelineRun,
    registered: RegisteredVersion | None,
    suite: list[EvalSet],
    results: dict[str, Manifest],
    reference: Reference,
) -> dict | None:
    """5. The promotion gate: challenger always, champion when it beats the champion (no champion:
    the reference) on the same eval problems (the suite's first benchmark)."""
    cfg, tracker = run.cfg, run.tracker
    if registered is None or not cfg.promote.enabled:
        return None
    champion = current_champion(tracker.uri, registered.name)
    baseline: Manifest | None = None
    if champion == registered.version:
        label = f"champion (version {champion})"
    elif champion is None or f"mlflow:{registered.name}/{champion}" == reference.fingerprint:
        label = "reference" if champion is None else f"champion (version {champion}, the reference)"
        baseline = results.get("reference") or _evaluate_for_gate(
            run, suite, "reference", reference.path, reference.fingerprint, reference.cfg
        )  # eval.evaluate_reference off: the gate still needs the reference
    else:
        label = f"champion (version {champion})"
        champion_cfg = pin_registered(
            ModelConfig(path=f"models:/{registered.name}/{champion}"), cfg.run.tracking_uri
        )
        path, fp = resolve_model(champion_cfg), fingerprint_model(champion_cfg)
        baseline = _evaluate_for_gate(run, suite, "champion", path, fp, champion_cfg)
    result = promote(
        name=registered.name,
        version=registered.version,
        challenger=results["trained"],
        baseline=baseline,
        baseline_label=label,
        cfg=cfg.promote,
        store_root=run.root,
        tracking_uri=tracker.uri,
        run_id=tracker.run_id,
    )
    log_promotion(tracker, result)
    print(format_promotion(result))
    return result


def _evaluate_for_gate(
    run: PipelineRun, suite: list[EvalSet], system: str, path: str, fp: str, model_cfg: ModelConfig
) -> Manifest:
    """The gate's baseline evaluated on the suite's first benchmark (cached like any evaluation)."""
    ev = suite[0]
    label = eval_label(system, ev, suite)
    run.tracker.open_stage(label)
    manifest = evaluate_stage(run.cfg, run.stages, ev, label, system, path, fp, model_cfg)
    params = {"system": system, "model_fingerprint": fp}
    track_eval(run.tracker, run.stages, label, ev, manifest, f"{ev.name}.{system}", params)
    return manifest


# ------------------------------------------------------------------------------------ helpers


def _log_comparison(
    tracker: Tracker, stages: StageRunner, results: dict[str, Manifest], benchmark: str
) -> None:
    """Reference and trained multi@t on one chart (the suite's first benchmark), 95% intervals shaded."""
    from tasks.plots import plot_file, plot_multi_at, wilson_interval

    curves = {name: m.meta.get("multi_at", []) for name, m in results.items()}
    n = max((int(m.meta.get("n_problems") or 0) for m in results.values()), default=0)
    bands = {name: [wilson_interval(v, n) for v in values] for name, values in curves.items()}
    draw = lambda path: plot_multi_at(curves, path, intervals=bands, benchmark=benchmark, n=n)  # noqa: E731
    data = {"curves": curves, "benchmark": benchmark, "n": n, "bands": "wilson95"}
    with plot_file(stages.plots_dir, "multi_at.png", draw, data) as png:
        tracker.log_file(tracker.run_id, png)


def _log_model_metrics(tracker: Tracker, model_id: str, label: str, prefix: str, manifest: Manifest) -> None:
    """The trained model's evaluation on its logged model (the model page's Metrics), logged once:
    a cached re-run evaluates the same model to the same numbers, and would only repeat them."""
    logged = tracker.client.get_logged_model(model_id)
    if any(m.key.startswith(f"{prefix}.") for m in logged.metrics or []):
        return
    tracker.log_metric_steps(
        tracker.stage_runs[label], per_turn_rows(prefix, manifest.meta), model_id=model_id
    )


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
            source_run = tracker.client.get_run(ref)
        except Exception as exc:
            raise ValueError(
                f"rollouts_from={ref!r}: not a manifest file and not an MLflow run id ({exc})"
            ) from exc
        tag = source_run.data.tags.get("drift.rollout_manifest")
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
