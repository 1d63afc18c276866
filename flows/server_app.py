"""The app factory of drift's temporary Prefect server: Prefect's own API app, plus a watchdog that
stops the server once the ``drift`` process that started it is gone.

The CLI stops its server at exit (``atexit``), which a SIGKILL, an OOM kill or a SIGTERM that ends
the process without unwinding skips: the server was then left running, orphaned, for good. The
watchdog needs nothing from the parent: every half second it compares ``os.getppid()`` with the pid
it was started under, and when they differ (the server was re-parented) it sends itself SIGTERM,
which uvicorn answers with a graceful shutdown; if that has not ended the process within
``_GRACE_S`` it exits hard.

Loaded by uvicorn in the server process (``--factory flows.server_app:create_app``); imports
nothing of drift.
"""

from __future__ import annotations

import os
import signal
import threading
import time

PARENT_PID_ENV = "DRIFT_SERVER_PARENT_PID"
_POLL_S = 0.5
_GRACE_S = 10.0


def exit_with_parent(parent: int, poll_s: float = _POLL_S, grace_s: float = _GRACE_S) -> threading.Thread:
    """Start the watchdog thread (a daemon: it never keeps the server alive by itself)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)  # the graceful shutdown hung (an open connection, a stuck lifespan task)

    thread = threading.Thread(target=watch, name="drift-exit-with-parent", daemon=True)
    thread.start()
    return thread


def create_app():
    """Prefect's server app; with ``DRIFT_SERVER_PARENT_PID`` set, one that ends with that process."""
    from prefect.server.api.server import create_app as prefect_app

    parent = os.environ.get(PARENT_PID_ENV)
    if parent:
        exit_with_parent(int(parent))
    return prefect_app()
