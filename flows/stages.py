"""The pieces every drift flow shares: running a stage task with drift's caching conventions, sharding
a stage over problems, which config fields belong in cache keys, the evaluation stage, and recording
a stage in MLflow. ``flows/drift_flow.py`` and ``flows/eval_flow.py`` are built from these."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import TaskRunner

from drift_core.protocol import CHOICE_INSTRUCTION
from drift_core.schemas import DriftConfig, EngineConfig, EvalEntry, ProtocolConfig, VerifierConfig
from tasks.caching import key_from_parameters, stage_key
from tasks.engines.base import allow_generation, stop_generation
from tasks.evaluate import greedy, summarize_eval
from tasks.golds import checked_verifier
from tasks.ingest import ingest, ingest_key
from tasks.rollout import rollout_shard
from tasks.store import ArtifactStore, Manifest
from tasks.tracking import Tracker

__all__ = [
    "EvalSet",
    "StageRunner",
    "eval_label",
    "engine_identity",
    "evaluate_stage",
    "log_suite_params",
    "prepare_eval_suite",
    "result_fields",
    "run_tags",
    "sharded_calls",
    "track_eval",
    "track_stage",
]


class StageRunner:
    """Runs one stage task with drift's caching conventions and records what happened."""

    def __init__(self, store: ArtifactStore, runner: TaskRunner | None = None):
        self.store = store
        self.runner = runner  # shards go here; None: the flow's own task runner
        self.results_dir = Path(store.root) / "prefect-results" if store.is_local else None
        self.plots_dir = Path(store.root) / "plots" if store.is_local else None  # tasks.plots.plot_file
        self.states: dict[str, list[str]] = {}
        self.timings: dict[str, float] = {}
        allow_generation()  # a new flow run: an earlier interrupted one's stop no longer applies

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
        if task.task_run_name is None:  # a task that names its own runs (train-on-<pool>) keeps it
            task = task.with_options(task_run_name=task_run_name(label, task.name))
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
        try:
            wait_interruptibly(futures)
        except BaseException:  # Ctrl-C, or SIGTERM (Prefect's TerminationSignal), while shards run:
            stop_generation()  # their threads stop at the next token, so the process can end now
            raise
        wait(futures)  # all done: Prefect's own bookkeeping of the final states
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


def wait_interruptibly(futures: Sequence[PrefectFuture], poll_s: float = 0.5) -> None:
    """Wait until every future is done, waking every ``poll_s`` seconds.

    Python runs a signal's handler (Ctrl-C's KeyboardInterrupt, Prefect's SIGTERM bridge) in the
    main thread only, and a main thread blocked in an untimed wait runs it only when the kernel
    happened to deliver the signal to that thread; with shards generating in worker threads it
    usually did not, and a Ctrl-C took effect when the last shard finished (75 s on a tiny-model
    shard of 128 three-turn trajectories). A timed wait returns to the interpreter, which then runs
    the pending handler."""
    if not futures:
        return
    remaining = len(futures)
    lock, all_done = threading.Lock(), threading.Event()

    def one_done(_future: PrefectFuture) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            if remaining == 0:
                all_done.set()

    for future in futures:
        future.add_done_callback(one_done)
    while not all_done.wait(poll_s):
        pass


def task_run_name(label: str, task_name: str) -> str:
    """The name a stage's task run shows in the Prefect UI: what it is, which data or model it is
    for (``ingest-train``, ``ingest-eval``, ``rollout-collect``, ``evaluate-trained-summary``)."""
    if label == "ingest":
        return "ingest-train"
    if task_name == label or label.startswith("ingest-"):
        return label
    step = {"collect-rollouts": "collect", "summarize-eval": "summary"}.get(task_name, task_name)
    return f"{label}-{step}"


def sharded_calls(label: str, problems: Manifest, shard_size: int, base_key: str, common: dict) -> list[dict]:
    rows = problems.rows or 0
    calls = []
    for shard, start in enumerate(range(0, rows, shard_size)):
        stop = min(rows, start + shard_size)
        key = stage_key(label, base=base_key, start=start, stop=stop)
        calls.append(
            {**common, "problems": problems, "shard": shard, "start": start, "stop": stop, "key": key}
        )
    return calls


def result_fields(model) -> dict:
    """A config section without the fields that change speed, not results (kept out of cache keys).
    Shard size stays out too: each shard's key holds its own prompt range, and a joined artifact's
    key holds its shards' keys (not their content hashes, which include timings)."""
    drop = _SPEED_ONLY.get(type(model).__name__, set())
    return {k: v for k, v in model.model_dump(mode="json").items() if k not in drop}


def engine_identity(engine: EngineConfig) -> str:
    """What of the engine settings goes into rollout and evaluation keys: its kind, and its decoding
    path unless standard (compiled kernels and paged attention may change the last bits of the
    logits, hence sampled tokens), so keys made before decoding paths existed stay valid."""
    return engine.kind if engine.decoding == "standard" else f"{engine.kind}/{engine.decoding}"


# Per section: the settings that change where or how fast a stage runs, never what it produces.
# (train.batch_size is NOT here: it changes the optimisation; the engine's batch_size is not keyed.)
_SPEED_ONLY: dict[str, set[str]] = {
    "VerifierConfig": {"workers"},
    "RolloutConfig": {"shard_size"},
    # packing, loss_kernel and compile compute the same objective with other kernels (equal loss
    # within bf16 tolerance, tests/test_fast_paths.py): speed settings, like the process count
    "TrainConfig": {
        "work_pool",
        "checkpoint_every",
        "num_processes",
        "accelerate_config",
        "packing",
        "loss_kernel",
        "compile",
    },
}


@dataclass(frozen=True)
class EvalSet:
    """One benchmark of the eval suite, ingested and checked: what its evaluate stages run with."""

    name: str
    config_key: str  # "eval" (eval.data) or "eval.suite[i]": named in messages
    problems: Manifest
    verifier: VerifierConfig  # kind resolved (never auto)
    requested_kind: str  # the kind as configured (may be auto)
    protocol: ProtocolConfig  # the run's protocol with the eval turns and the entry's overrides
    max_new_tokens: int


def _entry_protocol(cfg: DriftConfig, entry: EvalEntry) -> ProtocolConfig:
    update: dict[str, Any] = {"max_turns": cfg.eval_max_turns}
    answer_format = entry.answer_format or cfg.eval.answer_format
    if answer_format is not None:
        update["answer_format"] = answer_format
    if entry.task_instruction is not None:
        update["task_instruction"] = entry.task_instruction
    elif entry.data.multiple_choice and cfg.protocol.task_instruction is None:
        update["task_instruction"] = CHOICE_INSTRUCTION
    return cfg.protocol.model_copy(update=update)


def prepare_eval_suite(cfg: DriftConfig, stages: StageRunner, base_dir: str) -> list[EvalSet]:
    """Ingest every benchmark of the suite and check every gold against its verifier (resolving
    ``auto``): run before any generation, so a data/verifier mismatch fails in seconds."""
    entries = cfg.eval.entries()
    out = []
    for config_key, entry in entries:
        label = "ingest-eval" if len(entries) == 1 else f"ingest-eval-{entry.name}"
        problems = stages.run(
            label,
            ingest,
            cfg=entry.data,
            store_root=stages.store.url,
            base_dir=base_dir,
            key=ingest_key(entry.data, base_dir),
            context=f"{config_key}.data",
        )
        requested = cfg.eval_verifier(entry)
        verifier = checked_verifier(
            stages.store, problems, entry.data, requested, config_key, base_dir, entry.name
        )
        max_new = entry.max_new_tokens or cfg.eval.max_new_tokens or cfg.rollout.sampling.max_new_tokens
        out.append(
            EvalSet(
                entry.name,
                config_key,
                problems,
                verifier,
                requested.kind,
                _entry_protocol(cfg, entry),
                max_new,
            )
        )
    return out


def evaluate_stage(
    cfg: DriftConfig, stages: StageRunner, ev: EvalSet, label: str, system: str, path: str, fp: str, model_cfg
) -> Manifest:
    """Evaluate model ``system`` on one benchmark (shards, then their summary), as stage ``label``."""
    max_turns = ev.protocol.max_turns
    base = stage_key(
        "evaluate",
        model=fp,
        problems=ev.problems.sha256,
        protocol=ev.protocol,
        verifier=result_fields(ev.verifier),
        max_new_tokens=ev.max_new_tokens,
        engine=engine_identity(cfg.engine),
    )
    # task runs evaluate-trained-shard-0, evaluate-reference-math500-shard-0, ...
    shard_task = rollout_shard.with_options(name="eval-shard", task_run_name=f"{label}-shard-{{shard}}")
    shards = stages.map(
        label,
        shard_task,
        sharded_calls(
            "eval-shard",
            ev.problems,
            cfg.eval.shard_size,
            base,
            {
                "model_path": path,
                "model_cfg": model_cfg,
                "engine_cfg": cfg.engine,
                "protocol": ev.protocol,
                "verifier": ev.verifier,
                "sampling": greedy(ev.max_new_tokens),
                "k": 1,
                "max_turns": max_turns,
                "seed": 0,
                "store_root": stages.store.url,
                "stage": "eval-shard",
            },
        ),
    )
    return stages.run(
        label,
        summarize_eval,
        shards=shards,
        label=system,
        max_turns=max_turns,
        store_root=stages.store.url,
        key=stage_key("evaluate", base=base, shards=[m.key for m in shards]),
    )


def eval_label(system: str, ev: EvalSet, suite: list[EvalSet]) -> str:
    """Stage name: ``evaluate-<system>`` for a suite of one, ``evaluate-<system>-<benchmark>``."""
    return f"evaluate-{system}" if len(suite) == 1 else f"evaluate-{system}-{ev.name}"


def track_eval(
    tracker: Tracker,
    stages: StageRunner,
    label: str,
    ev: EvalSet,
    manifest: Manifest,
    prefix: str,
    params: dict,
) -> None:
    """Record one evaluation: a stage run with its metrics by turn, and on the parent run the
    metrics under ``prefix`` (``<benchmark>`` or ``<benchmark>.<system>``): ``math500.multi_at_t5``."""
    params = {
        **params,
        "benchmark": ev.name,
        "verifier.kind": ev.verifier.kind,
        "verifier.requested": ev.requested_kind,
    }
    track_stage(tracker, stages, label, manifest, params, eval_metrics=True, parent_prefix=prefix)


def log_suite_params(tracker: Tracker, suite: list[EvalSet]) -> None:
    """The verifier each benchmark is graded with (``auto`` resolved), on the parent run."""
    params = {}
    for ev in suite:
        params[f"eval.suite.{ev.name}.verifier.kind"] = ev.verifier.kind
        params[f"eval.suite.{ev.name}.verifier.requested"] = ev.requested_kind
        params[f"eval.suite.{ev.name}.problems"] = ev.problems.rows
    tracker.log_params(tracker.run_id, params)


def run_tags() -> dict[str, str]:
    tags = {"drift.flow": "drift"}
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            tags["prefect.flow_run_id"] = str(flow_run.id)
            tags["prefect.flow_run_name"] = str(flow_run.name)
    except Exception:
        pass
    return tags


#: trailing steps of the loss series whose mean is the run's train-loss summary
LOSS_TAIL_STEPS = 10
#: per-turn evaluation quantities, logged as ``<prefix>.<name>_t<t>`` (one name per turn)
PER_TURN = ("multi_at", "accuracy_at_turn", "correction_rate")
#: manifest meta that is not a metric of its stage (its loss curve is logged by step instead)
_NOT_METRICS = {"final_loss", "max_turns"}


def stage_section(name: str) -> str:
    """The config section a stage's params belong to: ``eval`` for the evaluate stages, else the
    stage itself (``rollout``, ``weights``, ``train``, ``ingest``)."""
    return "eval" if name.startswith("evaluate") else name


def per_turn_rows(prefix: str, meta: dict) -> list[tuple[str, Any, int]]:
    """``(<prefix>.<quantity>_t<t>, value, 0)`` for each per-turn evaluation quantity: a per-turn
    value has the turn in its name, so no metric's "last value" means a different turn per run."""
    return [
        (f"{prefix}.{key}_t{t}", value, 0)
        for key in PER_TURN
        for t, value in enumerate(meta.get(key, []), start=1)
        if value is not None
    ]


def track_stage(
    tracker: Tracker,
    stages: StageRunner,
    name: str,
    manifest: Manifest,
    params: dict,
    histogram: bool = False,
    loss_history: bool = False,
    eval_metrics: bool = False,
    parent_prefix: str | None = None,
) -> None:
    """A nested MLflow run for stage ``name``. Its params carry their section's prefix
    (``weights.beta``, ``rollout.artifact``, ``eval.system``: the names the parent's config params
    use); its metrics carry the same names on the stage run and on the parent run,
    ``<parent_prefix>.<metric>`` (default prefix: the stage name), so one quantity has one name
    everywhere. The loss is a series by step with its tail mean beside it; per-turn values are one
    metric per turn (``arith.trained.multi_at_t2``)."""
    prefix = parent_prefix or name
    section = stage_section(name)
    params = {**params, "artifact": manifest.uri, "sha256": manifest.sha256}
    run_id = tracker.stage(
        name,
        params={k if "." in k else f"{section}.{k}": v for k, v in params.items()},
        cached=stages.cached(name),
    )
    meta = manifest.meta
    scalars = {
        k: v
        for k, v in meta.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k not in _NOT_METRICS
    }
    if eval_metrics:
        scalars.pop("n_problems", None)  # a count, logged as the stage's rows
    if manifest.rows is not None:
        scalars["rows"] = manifest.rows
    scalars["stage_seconds"] = stages.timings.get(name, 0.0)
    # one write per run: every metric write is a database transaction
    stage_rows = [(f"{prefix}.{k}", v, 0) for k, v in scalars.items()]
    if histogram and "histogram" in meta:
        from tasks.plots import plot_file, plot_weight_histogram

        hist = meta["histogram"]
        notes = {k: meta.get(k) for k in ("ess_overall", "max_weight")}
        notes["beta"] = params.get("beta")
        draw = lambda path: plot_weight_histogram(hist["counts"], hist["edges"], path, **notes)  # noqa: E731
        with plot_file(stages.plots_dir, "weights.png", draw, {"hist": hist, "notes": notes}) as png:
            tracker.log_file(run_id, png)
            tracker.log_file(tracker.run_id, png)
    if loss_history and (history := meta.get("loss_history", [])):
        for step, loss, lr in history:
            stage_rows += [(f"{prefix}.loss", loss, int(step)), (f"{prefix}.lr", lr, int(step))]
        tail = [loss for _step, loss, _lr in history[-LOSS_TAIL_STEPS:]]
        stage_rows.append((f"{prefix}.loss_tail_mean", sum(tail) / len(tail), 0))
        tracker.log_params(run_id, {f"{section}.loss_tail_steps": len(tail)})
    if eval_metrics:
        stage_rows += per_turn_rows(prefix, meta)
    tracker.log_metric_steps(run_id, stage_rows)
    tracker.log_metric_steps(tracker.run_id, stage_rows)
    if eval_metrics:
        for file in ("metrics.json", "multi_at.png"):
            path = Path(stages.store.dir_for(manifest.stage, manifest.key)) / file
            if stages.store.is_local and path.exists():
                tracker.log_file(run_id, path)
    tracker.log_dict(run_id, manifest.model_dump(mode="json"), "manifest.json")
    tracker.end_stage(name)
    from flows.story import stage_line

    _logger().info(stage_line(name, stages.cached(name), stages.timings.get(name, 0.0), manifest))


def _logger():
    """The flow run's logger (its lines reach the Prefect UI), or a plain one outside a flow run."""
    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("drift")


def default_run_name(cfg: DriftConfig, suffix: str = "") -> str:
    """``<run.name>[-<suffix>]-<UTC time>``: parent runs tell apart in MLflow's chart legends."""
    stamp = time.strftime("%m%d-%H%M%S", time.gmtime())  # short: the MLflow runs table cuts names
    return "-".join(p for p in (cfg.run.name, suffix, stamp) if p)


def artifact_key(run_name: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes): ``drift-<run.name>-<what>``, so
    each config's runs collect under one key in the Prefect UI's Artifacts page."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-") or "run"
    return f"drift-{slug}-{what}"


def link_mlflow_run(tracker: Tracker, key_name: str) -> None:
    """A keyed Prefect link artifact on the flow run pointing at its MLflow run page (for a local
    store: the address ``mlflow ui`` serves, see ``flows.story``); the MLflow run already carries the
    flow run id (tag ``prefect.flow_run_id``)."""
    try:
        from prefect.artifacts import create_link_artifact
        from prefect.runtime import flow_run

        if not flow_run.id:
            return
        create_link_artifact(
            key=artifact_key(key_name, "mlflow-run"),
            link=tracker.ui_url(),
            link_text=f"MLflow run {tracker.run_id}",
            description=_ui_note(tracker),
        )
    except Exception as exc:  # a missing link must never fail a run
        get_run_logger().warning("could not create the MLflow link artifact: %s", exc)


def _ui_note(tracker: Tracker) -> str:
    from flows.story import ui_command

    command = ui_command(tracker.uri)
    where = f"experiment {tracker.experiment_id}, run {tracker.run_id}"
    return f"MLflow {where}" + (f"; start the UI with `{command}`" if command else "")


def publish_summary(tracker: Tracker, key_name: str, description: str) -> None:
    """The parent run's description as a keyed Prefect markdown artifact (the same story in both UIs)."""
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.runtime import flow_run

        if not flow_run.id:
            return
        create_markdown_artifact(
            key=artifact_key(key_name, "summary"),
            markdown=f"[MLflow run {tracker.run_id}]({tracker.ui_url()})\n\n{description}",
            description=_ui_note(tracker),
        )
    except Exception as exc:  # a missing summary must never fail a run
        get_run_logger().warning("could not create the summary artifact: %s", exc)


def log_promotion(tracker: Tracker, result: dict) -> None:
    """This run's promotion outcome on its parent run: a tag, a table artifact, and as metrics
    ``promote.is_champion`` (every run) and, only when this run compared, ``promote.promoted`` and
    the gain with its interval; a cached re-run's version already is the champion, it compared
    nothing, and logs no 0 that would read like a failed promotion."""
    from tasks.promote import ALREADY_CHAMPION, promotion_table

    tracker.client.set_tag(tracker.run_id, "drift.promotion", f"{result['outcome']}: {result['reason']}")
    metrics = {"promote.is_champion": float(result.get("champion") == result["version"])}
    if result["outcome"] != ALREADY_CHAMPION:
        metrics["promote.promoted"] = float(result["promoted"])
        metrics |= {f"promote.{k}": result[k] for k in ("delta", "ci_low", "ci_high") if k in result}
    tracker.log_metrics(tracker.run_id, metrics)
    tracker.client.log_table(
        tracker.run_id, data=promotion_table(result).to_pandas(), artifact_file="promotion.json"
    )


def format_promotion(result: dict) -> str:
    head = f"promotion: {result['name']} version {result['version']} "
    if result.get("outcome") == "already champion":
        head += "already is the champion (nothing to compare)"
    elif result["promoted"]:
        head += "PROMOTED to champion"
    else:
        head += f"not promoted (champion: {result.get('champion')})"
    lines = [head, f"  vs {result['baseline']}: {result['reason']}"]
    if "delta" in result:
        lines.append(
            f"  multi@T {100 * result['challenger_multi_at_t']:.1f} vs {100 * result['baseline_multi_at_t']:.1f} "
            f"on {result['n_problems']} problems; delta {100 * result['delta']:+.1f} pts, "
            f"{100 * (1 - result['alpha']):.0f}% interval [{100 * result['ci_low']:+.1f}, {100 * result['ci_high']:+.1f}]"
        )
    return "\n".join(lines)
