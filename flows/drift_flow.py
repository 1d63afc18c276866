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

from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext

from drift_core.errors import InputError
from drift_core.schemas import DriftConfig, ModelConfig, VerifierConfig
from flows.config import load_config
from flows.evaluation import (
    EvalSet,
    System,
    eval_label,
    evaluate,
    log_comparison,
    log_suite_params,
    prepare_eval_suite,
)
from flows.orphans import task_runs_without_owner_tags
from flows.registration import gate, register
from flows.reused_rollouts import reused_rollouts
from flows.runners import shard_runner
from flows.stages import PipelineRun, Record, Shards, StageRunner, sharded_calls
from flows.story import default_run_name, link_mlflow_run, run_tags, tell_the_story
from flows.train_flow import train_on_pool
from tasks.caching import generation_key, result_fields, stage_key
from tasks.ceilings import suite_ceiling_notes, suite_ceilings
from tasks.engines import compute_dtype, release_engines
from tasks.golds import checked_verifier
from tasks.ingest import ingest, ingest_key
from tasks.models import ResolvedModel, resolved_model
from tasks.registry import RegisteredVersion, without_credentials
from tasks.rollout import collect_rollouts, rollout_shard
from tasks.rollout_log import log_rollouts, rollouts_dataset_input
from tasks.store import ArtifactStore, Manifest
from tasks.tracking import Tracker, per_turn_rows, redact
from tasks.train import train
from tasks.weights import weigh_rollouts


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
        raise InputError(
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
            stages = StageRunner(store, runner, tracker)
            summary = _pipeline(PipelineRun(cfg, store, stages, tracker, get_run_logger()), rollouts_from)
        status = "FINISHED"
        return summary
    finally:
        tracker.finish(status)
        release_engines()


def _current_flow_run_name() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.name if flow_run.id else None


def _pipeline(pipeline: PipelineRun, rollouts_from: str | None) -> dict:
    # Every benchmark of the eval suite is ingested and its golds checked first: a data/verifier
    # mismatch fails now, not after rollouts and training.
    suite = prepare_eval_suite(pipeline.cfg, pipeline.stages, pipeline.base_dir)
    # The training data too, before the reference model is made or downloaded (minutes on a first
    # run): a malformed file fails in seconds.
    training = None if rollouts_from else _training_problems(pipeline)
    rollout_verifier = training[1].kind if training else None
    log_suite_params(pipeline.tracker, suite, pipeline.cfg, not rollouts_from, rollout_verifier)
    reference = resolved_model(pipeline.cfg.reference_model, pipeline.cfg.run.tracking_uri)
    rollouts, rollouts_fp = _rollouts(pipeline, reference, rollouts_from, training)
    weighted = _weights(pipeline, rollouts)
    model, base = _train(pipeline, weighted, reference, rollouts, rollouts_fp)
    registered = register(pipeline, model, base, rollouts, rollouts_fp)
    by_benchmark = _evaluate(pipeline, suite, model, reference, registered)
    results = by_benchmark[suite[0].name]  # the first benchmark is the run's primary metric
    promotion = gate(pipeline, registered, suite, results, reference)
    tell_the_story(
        pipeline.tracker,
        pipeline.stages,
        pipeline.cfg.run.name,
        results,
        suite[0].name,
        registered,
        pipeline.rollouts_run_id,
    )
    summary = {
        "mlflow_run_id": pipeline.tracker.run_id,
        "mlflow_url": pipeline.tracker.ui_url(),
        "tracking_uri": pipeline.tracker.uri,
        "model_dir": pipeline.store.local_path(model),
        "stage_states": pipeline.stages.states,
        "stage_seconds": {k: round(v, 2) for k, v in pipeline.stages.timings.items()},
        "eval": {name: m.meta for name, m in results.items()},  # the primary (first) benchmark
        "suite": {b: {name: m.meta for name, m in ms.items()} for b, ms in by_benchmark.items()},
        "verifiers": {ev.name: ev.verifier.kind for ev in suite},
        "ceilings": suite_ceilings(pipeline.store, suite),
        "ceiling_notes": suite_ceiling_notes(pipeline.store, suite),
        "weights": {k: v for k, v in weighted.meta.items() if k != "histogram"},
        "rollout": rollouts.meta,
        "rollouts_uri": rollouts.uri,
        "registered": registered and {**registered.model_dump(), "uri": registered.uri},
        "promotion": promotion,
    }
    pipeline.tracker.log_dict(pipeline.tracker.run_id, summary, "summary.json")
    return summary


def _rollouts(
    pipeline: PipelineRun,
    reference: ResolvedModel,
    rollouts_from: str | None,
    training: tuple[Manifest, VerifierConfig] | None = None,
) -> tuple[Manifest, str]:
    """1. Reference rollouts: ingest -> K trajectories per prompt, graded turn by turn (or the
    rollouts of an earlier run). Returns them and the fingerprint of the model that made them."""
    if rollouts_from:
        rollouts, rollouts_fp = reused_rollouts(
            pipeline.stages, rollouts_from, reference.fingerprint, pipeline.base_dir, pipeline.logger
        )
    else:
        problems, verifier = training or _training_problems(pipeline)
        rollouts, rollouts_fp = (
            _fresh_rollouts(pipeline, reference, problems, verifier),
            reference.fingerprint,
        )
    tracker = pipeline.tracker
    tracker.set_tags(
        {
            "drift.rollout_manifest": redact("uri", rollouts.model_dump_json()),
            "drift.reference_fingerprint": rollouts_fp,
        }
    )
    stage_run = pipeline.stages.record("rollout", rollouts, Record({"reference_fingerprint": rollouts_fp}))
    pipeline.rollouts_run_id = log_rollouts(tracker, stage_run, pipeline.store, rollouts, rollouts_fp)
    tracker.set_tags({"drift.rollouts_run_id": pipeline.rollouts_run_id})
    tracker.log_inputs(stage_run, [rollouts_dataset_input(rollouts, rollouts_fp, pipeline.rollouts_run_id)])
    return rollouts, rollouts_fp


def _training_problems(pipeline: PipelineRun) -> tuple[Manifest, VerifierConfig]:
    """Ingest the training data and check its golds against the verifier (``auto`` resolved)."""
    cfg, stages = pipeline.cfg, pipeline.stages
    problems = stages.stage(
        "ingest",
        ingest,
        record=Record({"data.source": cfg.data.source}),
        cfg=cfg.data,
        store_root=pipeline.root,
        base_dir=pipeline.base_dir,
        key=ingest_key(cfg.data, pipeline.base_dir),
    )
    verifier = checked_verifier(
        pipeline.store, problems, cfg.data, cfg.verifier, "", pipeline.base_dir
    )  # resolves auto
    return problems, verifier


def _fresh_rollouts(
    pipeline: PipelineRun, reference: ResolvedModel, problems: Manifest, verifier: VerifierConfig
) -> Manifest:
    """The rollout shards (each cached on its own), then their collection."""
    cfg, stages = pipeline.cfg, pipeline.stages
    rollout_base = generation_key(
        "rollout",
        model=reference.fingerprint,
        problems=problems.sha256,
        protocol=cfg.protocol,
        verifier=verifier,
        engine=cfg.engine,
        dtype=compute_dtype(reference.path, reference.cfg, cfg.engine),
        rollout=result_fields(cfg.rollout),
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
        "store_root": pipeline.root,
    }
    calls = sharded_calls("rollout-shard", problems, cfg.rollout.shard_size, rollout_base, common)
    return stages.stage(  # recorded by _rollouts, like reused rollouts
        "rollout",
        collect_rollouts,
        shards=Shards(rollout_shard, calls, rollout_base, "rollout"),
        store_root=pipeline.root,
        max_turns=cfg.protocol.max_turns,
        k=cfg.rollout.k,
        reference_fingerprint=reference.fingerprint,
    )


def _weights(pipeline: PipelineRun, rollouts: Manifest) -> Manifest:
    """2. Importance weights within each prompt's group of K."""
    weights_cfg = pipeline.cfg.weights
    return pipeline.stages.stage(
        "weights",
        weigh_rollouts,
        record=Record(weights_cfg.model_dump(), histogram=True),
        rollouts=rollouts,
        cfg=weights_cfg,
        store_root=pipeline.root,
        key=stage_key("weights", rollouts=rollouts.sha256, weights=weights_cfg),
    )


def _train(
    pipeline: PipelineRun,
    weighted: Manifest,
    reference: ResolvedModel,
    rollouts: Manifest,
    rollouts_fp: str,
) -> tuple[Manifest, ResolvedModel]:
    """3. Weighted SFT of the base model on the terminal (or every) assistant turn."""
    cfg = pipeline.cfg
    release_engines()  # the rollout model must not hold (GPU) memory while training runs
    if cfg.train_model == cfg.reference_model:
        base = reference
    else:
        base = resolved_model(cfg.train_model, cfg.run.tracking_uri)
    train_task, train_args = train, {"model_cfg": base.loadable_cfg}
    if cfg.train.work_pool:  # its own deployment (drift-train/<pool>), whose worker resolves the model
        pool_cfg = without_credentials(base.cfg)  # deployment parameters are stored: no passwords
        train_task, train_args = train_on_pool, {"model_cfg": pool_cfg, "work_pool": cfg.train.work_pool}
    dataset = rollouts_dataset_input(rollouts, rollouts_fp, pipeline.rollouts_run_id)
    model = pipeline.stages.stage(
        "train",
        train_task,
        record=Record(
            {"base_fingerprint": base.fingerprint}, loss_history=True, inputs=(dataset,)
        ),  # inputs: the train run's "Datasets used"
        weighted=weighted,
        cfg=cfg.train,
        store_root=pipeline.root,
        key=stage_key(
            "train", weighted=weighted.sha256, model=base.fingerprint, train=result_fields(cfg.train)
        ),
        **train_args,
    )
    return model, base


def _evaluate(
    pipeline: PipelineRun,
    suite: list[EvalSet],
    model: Manifest,
    reference: ResolvedModel,
    registered: RegisteredVersion | None = None,
) -> dict[str, dict[str, Manifest]]:
    """4. Multi-turn evaluation, greedy, of the trained model (and the reference, for comparison),
    on every benchmark of the suite: ``{benchmark: {system: manifest}}``."""
    trained_path = pipeline.store.local_path(model)
    trained = ResolvedModel(ModelConfig(path=trained_path), trained_path, "sha256:" + model.sha256)
    systems = [System.of("trained", trained)]
    if pipeline.cfg.eval.evaluate_reference:
        systems.insert(0, System.of("reference", reference))
    by_benchmark = evaluate(pipeline.cfg, pipeline.stages, suite, systems)
    if registered is not None and registered.model_id:
        for ev in suite:
            label, manifest = eval_label("trained", ev, suite), by_benchmark[ev.name]["trained"]
            _log_model_metrics(pipeline.tracker, registered.model_id, label, f"{ev.name}.trained", manifest)
    log_comparison(pipeline.tracker, pipeline.stages, by_benchmark[suite[0].name], suite[0].name)
    return by_benchmark


def _log_model_metrics(tracker: Tracker, model_id: str, label: str, prefix: str, manifest: Manifest) -> None:
    """The trained model's evaluation on its logged model (the model page's Metrics), logged once:
    a cached re-run evaluates the same model to the same numbers, and would only repeat them."""
    if any(key.startswith(f"{prefix}.") for key in tracker.model_metric_keys(model_id)):
        return
    tracker.log_metric_steps(
        tracker.stage_runs[label], per_turn_rows(prefix, manifest.meta), model_id=model_id
    )
