"""Finding the processes a run started, wherever they ended up: a test marks the environment with a
fresh value before the run (every process started afterwards inherits it, also across
multiprocessing spawn, Dask nannies and launchers, and keeps it once orphaned), then lists the
processes that carry the mark, or whose working directory or command line lies in the run's
directory."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import psutil

MARK = "DRIFT_TEST_RUN_MARK"


def new_mark() -> str:
    """Set a fresh mark in this process's environment (inherited by every process started after)."""
    value = uuid.uuid4().hex
    os.environ[MARK] = value
    return value


def run_processes(mark: str, run_dir: Path | None = None) -> list[psutil.Process]:
    """Live processes (other than this one) carrying ``mark``, or working in or naming ``run_dir``."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue  # exited; only its parent's bookkeeping is left
            if proc.environ().get(MARK) == mark or (
                run_dir is not None
                and (
                    Path(proc.cwd()).is_relative_to(run_dir)
                    or any(str(run_dir) in arg for arg in proc.cmdline())
                )
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def describe(procs: list[psutil.Process]) -> str:
    lines = []
    for proc in procs:
        try:
            lines.append(f"pid {proc.pid} ppid {proc.ppid()}: {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            lines.append(f"pid {proc.pid} (gone)")
    return "\n".join(lines)


def children() -> set[int]:
    """Live (non-zombie) descendants of this process."""
    out = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.add(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return out


def wait_gone(mark: str, run_dir: Path | None = None, grace: float = 60.0) -> list[psutil.Process]:
    """:func:`run_processes` once they had ``grace`` seconds to exit: a pool worker or a Dask nanny
    told to stop is still on its way out for a moment after the call that stopped it returned.
    Returns at once when none is left; what is still there after ``grace`` is a leftover."""
    deadline = time.monotonic() + grace
    while (left := run_processes(mark, run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def children_within(expected: set[int], grace: float = 60.0) -> set[int]:
    """:func:`children` once it is ``expected`` or ``grace`` seconds have passed."""
    deadline = time.monotonic() + grace
    while (now := children()) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


def readline_within(stream, timeout: float) -> str:
    """One line from a child's pipe, or "" when none came within ``timeout`` seconds (a child that
    hangs before printing must fail the test, not block it)."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return stream.readline()
