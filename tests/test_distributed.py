"""Rollout shards on a real local Dask cluster (two worker processes) give the same trajectories
as the thread runner: shards are seeded per shard, so where a shard runs must not matter. And no
process that either run started (grading pools, Dask nannies and workers, resource trackers)
outlives it.

(Two-process gloo training is covered in tests/test_train.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest
from prefect import flow
from procs import children, children_within, describe, new_mark, wait_gone

from flows.config import load_config
from flows.runners import shard_runner, task_runner_for
from flows.stages import StageRunner, sharded_calls
from tasks.ingest import ingest, ingest_key
from tasks.rollout import rollout_shard
from tasks.store import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
pytestmark = pytest.mark.timeout(600)


def live_children_of_this_process() -> list[str]:
    """Run on a Dask worker: its live child processes, except the interpreter's one multiprocessing
    resource tracker (it lives as long as the worker and ends with it)."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "resource_tracker" not in cmd:
            out.append(f"pid {child.pid}: {cmd[:160]}")
    return out


@flow(name="drift-shards-test", persist_result=False)
def rollout_shards(overrides: list[str]) -> dict:
    """Ingest + the rollout shards of the tiny config under the runner its ``run`` section names."""
    from distributed import get_task_stream

    cfg = load_config(TINY, overrides)
    store = ArtifactStore(cfg.run.artifact_store)
    base_dir = str(ROOT)
    with shard_runner(cfg) as runner:
        stages = StageRunner(store, runner)
        problems = stages.run(
            "ingest",
            ingest,
            cfg=cfg.data,
            store_root=store.url,
            base_dir=base_dir,
            key=ingest_key(cfg.data, base_dir),
        )
        common = {
            "model_path": cfg.reference_model.path,
            "model_cfg": cfg.reference_model,
            "engine_cfg": cfg.engine,
            "protocol": cfg.protocol,
            "verifier": cfg.verifier,
            "sampling": cfg.rollout.sampling,
            "k": cfg.rollout.k,
            "max_turns": cfg.protocol.max_turns,
            "seed": cfg.rollout.seed,
            "store_root": store.url,
        }
        calls = sharded_calls("rollout-shard", problems, cfg.rollout.shard_size, "shards-test", common)
        dask_workers: set[str] = set()
        worker_pids: dict[str, int] = {}
        worker_children: dict[str, list[str]] = {}
        if cfg.run.task_runner == "dask":
            with get_task_stream(client=runner.client) as stream:
                manifests = stages.map("rollout", rollout_shard, calls)
            dask_workers = {record["worker"] for record in stream.data}
            worker_pids = runner.client.run(os.getpid)  # asked of each worker process itself
            # While the workers still live (a long-lived worker runs shard after shard): each
            # shard's grading pool has already ended with the shard, not with the worker.
            worker_children = runner.client.run(live_children_of_this_process)
        else:
            manifests = stages.map("rollout", rollout_shard, calls)
    frames = [store.read_parquet(m).drop("gen_seconds") for m in manifests]
    return {
        "runner": type(runner).__name__,
        "states": stages.states["rollout"],
        "table": pl.concat(frames).to_dicts(),
        "dask_workers": sorted(dask_workers),
        "worker_pids": worker_pids,
        "worker_children": worker_children,
    }


@pytest.fixture()
def prefect_api(prefect_server, monkeypatch):
    """Point this process and the Dask worker processes it starts at the test server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server["PREFECT_API_URL"])
    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        yield
        drain_prefect_queues()


def drain_prefect_queues() -> None:
    """Send queued logs and events while the server is up: drained at exit instead, they retry
    against a stopped server for a minute or more."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    EventsWorker.drain_all(timeout=30)


def test_task_runner_for_follows_the_config():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    threads = task_runner_for(load_config(TINY, ["run.max_workers=3"]))
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    remote = task_runner_for(
        load_config(TINY, ["run.task_runner=dask", "run.dask_address=tcp://10.0.0.5:8786"])
    )
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    local = task_runner_for(load_config(TINY, ["run.task_runner=dask", "run.max_workers=2"]))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs["n_workers"] == 2


def test_dask_shards_match_thread_shards(tmp_path, tiny_model_dir, prefect_api, monkeypatch):
    from multiprocessing import resource_tracker

    # the interpreter's one resource tracker lives as long as this process, not as long as a run:
    # started before the mark, it is not counted as the run's
    resource_tracker.ensure_running()
    monkeypatch.setenv("DRIFT_TEST_RUN_MARK", "")  # restored after the test
    before = children()
    common = [f"reference_model.path={tiny_model_dir}", "run.max_workers=2", "verifier.workers=1"]

    mark = new_mark()
    threads = rollout_shards([*common, f"run.artifact_store={tmp_path / 'threads'}"])
    left = wait_gone(mark, tmp_path)  # up to 60 s to exit: a nanny's worker is reaped after close
    assert not left, f"the thread runner's run left processes:\n{describe(left)}"

    mark = new_mark()
    dask = rollout_shards([*common, f"run.artifact_store={tmp_path / 'dask'}", "run.task_runner=dask"])
    left = wait_gone(mark, tmp_path)  # up to 60 s to exit: a nanny's worker is reaped after close
    assert not left, f"the Dask run left processes:\n{describe(left)}"
    assert children_within(before) == before

    assert threads["runner"] == "ThreadPoolTaskRunner" and dask["runner"] == "DaskTaskRunner"
    assert threads["states"] == dask["states"] == ["Completed", "Completed"]  # 8 prompts, shards of 4
    # two worker processes, neither of them this one, and the two shards ran one on each
    pids = dask["worker_pids"]
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values(), pids
    assert dask["dask_workers"] == sorted(pids), (dask["dask_workers"], pids)
    # after the shards and before the cluster closed: no grading pool left on either worker
    assert dask["worker_children"] == {w: [] for w in pids}, dask["worker_children"]
    assert len(threads["table"]) == 8 * 2  # 8 prompts x K=2
    assert dask["table"] == threads["table"]  # same trajectories, turn by turn
