"""No process outlives the work that started it (docs/reliability.md): a grading pool ends with the
shard that failed, and its workers exit when the process that started them is killed.
(Rollout shards on the thread runner and on a local Dask cluster: tests/test_distributed.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from procs import children, describe, readline_within

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)

ITEMS = [("The answer is \\boxed{4}.", "4", 6), ("The answer is \\boxed{5}.", "4", 6)]


def test_grading_pool_ends_with_a_failed_shard():
    """A shard that raises (or is cancelled) kills its pool before the exception leaves the block."""
    from multiprocessing import resource_tracker

    from drift_core.schemas import ProtocolConfig, VerifierConfig
    from tasks.grade import grader_for

    resource_tracker.ensure_running()  # the interpreter's own: it lives as long as this process
    before = children()
    with (
        pytest.raises(RuntimeError, match="shard failed"),
        grader_for(ProtocolConfig(), VerifierConfig(workers=2)) as grader,
    ):
        grader.grade(ITEMS)
        assert len(children() - before) == 2  # the pool is up
        raise RuntimeError("shard failed")
    assert children() - before == set()


_HOLDS_A_POOL = """
from drift_core.schemas import ProtocolConfig, VerifierConfig
from tasks.grade import Grader
g = Grader(ProtocolConfig(), VerifierConfig(workers=2))
g.grade([("\\\\boxed{4}", "4", 3)])
print("up", flush=True)
import time; time.sleep(600)
"""


def test_grading_pool_workers_exit_when_their_process_is_killed():
    """SIGKILL runs no cleanup: the pool's workers notice their parent is gone and exit (within
    a poll interval of 0.5 s; the bound is 60 s, for a loaded machine: it costs nothing when they
    exit at once), instead of waiting forever as orphans."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDS_A_POOL],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = readline_within(proc.stdout, 240)  # a pool of 2 spawned interpreters, on 2 busy cores
        assert line.strip() == "up", f"no 'up' from the child within 240 s: {line!r}"
        pool = psutil.Process(proc.pid).children(recursive=True)
        workers = [p for p in pool if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2, describe(pool)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _, alive = psutil.wait_procs(pool, timeout=60)
    for p in alive:  # clean up before failing
        p.kill()
    assert not alive, f"left after their parent was killed:\n{describe(alive)}"
