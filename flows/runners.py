"""Task runners for the shard stages (rollout, evaluate), chosen by ``run.task_runner``.

Only shards are submitted to a runner: every other stage is a single task the flow runs inline.
So the runner is a property of the config, not of how the flow was started: ``shard_runner``
gives the ``drift`` flow the runner its config asks for whether it runs from the CLI or from a
deployment (where nobody calls ``flow.with_options``).

* ``threads`` (default): ``ThreadPoolTaskRunner(max_workers=run.max_workers)`` in the flow's process.
* ``dask``: ``prefect_dask.DaskTaskRunner`` on the cluster at ``run.dask_address``, or on a local
  cluster of ``run.max_workers`` single-threaded worker processes when the address is empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from drift_core.schemas import DriftConfig
from flows.config import ConfigError
from tasks.grade import grading_scope


def task_runner_for(cfg: DriftConfig) -> TaskRunner:
    """A fresh (not yet started) task runner for ``cfg.run``."""
    if cfg.run.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.run.max_workers)
    try:
        import dask
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # pragma: no cover - the dask extra is part of `make setup`
        raise ConfigError(
            "run.task_runner=dask needs prefect-dask and distributed: pip install 'drift[dask]'"
        ) from exc
    if cfg.run.dask_address:
        # Remote workers: start them with DASK_DISTRIBUTED__WORKER__DAEMON=False (see below).
        return DaskTaskRunner(address=cfg.run.dask_address)
    # Grading runs a process pool inside each shard; daemonic processes may not have children,
    # and Dask's nanny starts workers as daemons unless told otherwise.
    dask.config.set({"distributed.worker.daemon": False})
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": cfg.run.max_workers,
            "threads_per_worker": 1,  # one model per process: torch already uses the cores
            "processes": True,
        }
    )


@contextmanager
def shard_runner(cfg: DriftConfig, current: TaskRunner | None = None) -> Iterator[TaskRunner]:
    """The started runner for shard tasks: ``current`` (the flow's own runner) when it is already
    the kind the config asks for (the CLI sets a Dask runner on the flow), else a new one that
    lives for the ``with`` block. Every process the shards start ends with the block."""
    wanted = task_runner_for(cfg)
    # grading pools that shards start in this process end with the block (tasks.grade); a Dask
    # worker's shards end their own, and the Dask runner's exit ends the local cluster
    with grading_scope():
        if current is not None and _same_kind(current, wanted):
            yield current
            return
        with wanted:
            yield wanted


def _same_kind(current: TaskRunner, wanted: TaskRunner) -> bool:
    if isinstance(wanted, ThreadPoolTaskRunner):
        return isinstance(current, ThreadPoolTaskRunner) and current._max_workers == wanted._max_workers
    return type(current) is type(wanted)
