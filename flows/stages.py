"""A stage is one call: ``StageRunner.stage(label, task, ...)`` opens the stage's MLflow run, runs
its task with drift's caching conventions (or serves it from cache, checked against the artifact's
hash), and records it. A sharded stage (rollout, evaluation) runs its shard tasks first and hands
their manifests to its task. Cache-key policy is ``tasks.caching``'s; recording is
``tasks.tracking.Tracker``'s; the evaluation stage is ``flows.evaluation``."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import TaskRunner

from drift_core.schemas import DriftConfig
from tasks.caching import key_from_parameters, stage_key
from tasks.engines.base import allow_generation, stop_generation
from tasks.store import ArtifactStore, Manifest
from tasks.tracking import Tracker

__all__ = [
    "PipelineRun",
    "Record",
    "Shards",
    "StageRunner",
    "sharded_calls",
    "task_run_name",
    "wait_interruptibly",
]


@dataclass(frozen=True)
class Shards:
    """A sharded stage's first step: ``task`` once per call, run concurrently; the stage's own task
    then joins their manifests under ``stage_key(key_stage, base=base, shards=<their keys>)``."""

    task: Any
    calls: list[dict[str, Any]]
    base: str
    key_stage: str


@dataclass(frozen=True)
class Record:
    """What a stage's MLflow run records besides its manifest (``Tracker.record_stage``)."""

    params: dict[str, Any] = field(default_factory=dict)
    histogram: bool = False  # the weights stage's histogram
    loss_history: bool = False  # the train stage's loss by step
    eval_metrics: bool = False  # per-turn evaluation metrics
    prefix: str | None = None  # metric names' prefix (default: the stage label)
    files: tuple[str, ...] = ()  # side files of the artifact to attach (metrics.json, ...)
    inputs: tuple[Any, ...] = ()  # MLflow datasets the stage used


class StageRunner:
    """Runs one stage task with drift's caching conventions and records what happened."""

    def __init__(
        self, store: ArtifactStore, runner: TaskRunner | None = None, tracker: Tracker | None = None
    ):
        self.store = store
        self.runner = runner  # shards go here; None: the flow's own task runner
        self.tracker = tracker  # stage() records here; None: run() and map() only
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

    def stage(
        self, label: str, task, /, *, shards: Shards | None = None, record: Record | None = None, **params
    ) -> Manifest:
        """One stage: open its MLflow run (so the run's duration is the stage's), run its shards
        when it has any, run or serve its task, verify the artifact, and record it (``record``
        None: the caller records it, as the rollout stage does for its two sources)."""
        assert self.tracker is not None, "StageRunner.stage needs a tracker"
        run_id = self.tracker.open_stage(label)
        if record is not None and record.inputs:
            self.tracker.log_inputs(run_id, list(record.inputs))
        if shards is not None:
            done = self.map(label, shards.task, shards.calls)
            key = stage_key(shards.key_stage, base=shards.base, shards=[m.key for m in done])
            params = {**params, "shards": done, "key": key}
        manifest = self.run(label, task, **params)
        if record is not None:
            self.record(label, manifest, record)
        return manifest

    def record(self, label: str, manifest: Manifest, record: Record) -> str:
        """Record stage ``label`` on its MLflow run (cached or not, its time) and log its line."""
        assert self.tracker is not None, "StageRunner.record needs a tracker"
        seconds = self.timings.get(label, 0.0)
        artifact_dir = Path(self.store.dir_for(manifest.stage, manifest.key)) if self.store.is_local else None
        files = tuple(
            artifact_dir / name for name in record.files if artifact_dir and (artifact_dir / name).exists()
        )
        run_id = self.tracker.record_stage(
            label,
            manifest,
            record.params,
            cached=self.cached(label),
            seconds=seconds,
            plots_dir=self.plots_dir,
            histogram=record.histogram,
            loss_history=record.loss_history,
            eval_metrics=record.eval_metrics,
            prefix=record.prefix,
            files=files,
        )
        _logger().info(stage_line(label, self.cached(label), seconds, manifest))
        return run_id

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


@dataclass
class PipelineRun:
    """What every stage of one flow run shares (named ``pipeline`` throughout: ``run`` in this
    module is always an MLflow run)."""

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
    """One call per shard of ``problems``: its prompt range and its own key."""
    rows = problems.rows or 0
    calls = []
    for shard, start in enumerate(range(0, rows, shard_size)):
        stop = min(rows, start + shard_size)
        key = stage_key(label, base=base_key, start=start, stop=stop)
        calls.append(
            {**common, "problems": problems, "shard": shard, "start": start, "stop": stop, "key": key}
        )
    return calls


_KEY_NUMBERS = {
    "rollout": ("trajectories", "solved_by_turn_1", "mean_turns", "tokens_per_s"),
    "weights": ("ess_overall", "max_weight", "unsolved_group_share"),
    "train": ("steps", "final_loss", "tokens_per_s"),
    "ingest": (),
}


def stage_line(label: str, cached: bool, seconds: float, manifest: Manifest) -> str:
    """One log line per stage: ``weights: computed in 0.4 s; 64 rows; ess_overall=0.41, ...``."""
    meta = manifest.meta
    section = "evaluate" if label.startswith("evaluate") else label
    numbers = [
        f"{k}={meta[k]:.4g}" for k in _KEY_NUMBERS.get(section, ()) if isinstance(meta.get(k), int | float)
    ]
    if section == "evaluate" and meta.get("multi_at"):
        numbers.append(
            "multi@t " + " / ".join("" if v is None else f"{100 * v:.1f}%" for v in meta["multi_at"])
        )
    rows = f"; {manifest.rows} rows" if manifest.rows is not None else ""
    extra = f"; {', '.join(numbers)}" if numbers else ""
    return f"{label}: {'cached' if cached else 'computed'} in {seconds:.1f} s{rows}{extra} (key {manifest.key[:12]})"


def _logger():
    """The flow run's logger (its lines reach the Prefect UI), or a plain one outside a flow run."""
    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("drift")
