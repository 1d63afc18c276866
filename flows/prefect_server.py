"""The temporary Prefect API of one ``drift`` CLI process, started early so that its start-up overlaps
with the run's own.

Without a configured API (``PREFECT_API_URL`` in the environment or the Prefect profile), Prefect
starts a temporary server the first time a client is needed, and the run waits for it: seconds of
importing ``prefect.server`` into this process (which only needs the class that launches it), then
the server's own start in a subprocess. ``drift run``/``drift eval`` start the same server (the
command and environment of Prefect's ``SubprocessASGIServer``) before loading the config, the
pipeline's modules and the MLflow database, and wait for it only when the flow starts. With an API
configured nothing is started.

The server lives as long as the process (stopped at exit, like Prefect's own, after Prefect's log
and event workers have drained); a second CLI call in the same process reuses it. When the process
dies without running its exit handlers (SIGKILL, OOM kill), the server notices and stops itself
(``flows.server_app``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TemporaryServer", "configured_api_url", "use_temporary_server"]

# uvicorn exits with 3 when its port was taken between our check and its bind: try another port.
_PORT_IN_USE = 3
_ATTEMPTS = 3


def configured_api_url() -> str | None:
    """The API URL Prefect would use (environment, profile, prefect.toml ...), or None."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


class TemporaryServer:
    """One ``uvicorn prefect.server.api.server:create_app`` subprocess on a free local port."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._ready = False
        self._lock = threading.Lock()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        """Launch the subprocess (returns at once; :meth:`wait_ready` waits for it)."""
        from prefect.settings import get_current_settings

        from flows.server_app import PARENT_PID_ENV

        self.port = _free_port()
        settings = get_current_settings()
        # Prefect 3 derives the server's memo store from the default home (~/.prefect), not from
        # PREFECT_HOME: with PREFECT_HOME set on a machine that never ran Prefect, the server warns
        # that it cannot write there. Keep it in the home this run uses.
        memo = {"PREFECT_SERVER_MEMO_STORE_PATH": str(Path(settings.home) / "memo_store.toml")}
        Path(settings.home).mkdir(parents=True, exist_ok=True)
        env = {
            **memo,
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **settings.to_environment_variables(exclude_unset=True),
            PARENT_PID_ENV: str(os.getpid()),  # the server stops itself once this process is gone
        }
        cmd = [
            sys.executable, "-m", "uvicorn", "--app-dir", str(Path(__file__).resolve().parents[1]),
            "--factory", "flows.server_app:create_app", "--host", "127.0.0.1",
            "--port", str(self.port), "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env)
        atexit.register(self.stop)

    def wait_ready(self, timeout: float) -> str:
        """Block until ``/api/health`` answers 200; the API URL. Restarts on a taken port."""
        with self._lock:
            if self._ready and self.proc is not None and self.proc.poll() is None:
                return self.api_url
            deadline = time.monotonic() + timeout
            for _attempt in range(_ATTEMPTS):
                if self.proc is None:
                    self.start()
                assert self.proc is not None
                while time.monotonic() < deadline:
                    code = self.proc.poll()
                    if code is not None:
                        break
                    if _healthy(f"{self.api_url}/health"):
                        self._ready = True
                        return self.api_url
                    time.sleep(0.1)
                else:
                    self.stop()
                    raise RuntimeError(
                        f"temporary Prefect server on port {self.port} did not answer within {timeout:.0f} s "
                        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); set PREFECT_API_URL to a running "
                        "server (`prefect server start`) to skip it"
                    )
                self.proc = None
                if code != _PORT_IN_USE:
                    raise RuntimeError(
                        f"temporary Prefect server exited with code {code} before answering (its error is above)"
                    )
            raise RuntimeError(
                f"temporary Prefect server: start-up failed {_ATTEMPTS} times (exit code 3: a taken port, or "
                "the server's own start-up failed, its error is above)"
            )

    def stop(self) -> None:
        proc, self.proc, self._ready = self.proc, None, False
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_server: TemporaryServer | None = None


def start_if_needed() -> TemporaryServer | None:
    """Launch the process's temporary server unless Prefect has an API configured (or one runs)."""
    global _server
    from prefect.settings import get_current_settings

    if configured_api_url() or not get_current_settings().server.ephemeral.enabled:
        return None  # a configured API; or none allowed, and Prefect says so when a client is made
    if _server is None:
        _server = TemporaryServer()
    if _server.proc is None:
        _server.start()
    return _server


@contextlib.contextmanager
def use_temporary_server(server: TemporaryServer | None) -> Iterator[None]:
    """Point Prefect (this process and its children) at ``server`` for the ``with`` block, once it
    answers; a no-op for None (an API is configured)."""
    if server is None:
        yield
        return
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    url = server.wait_ready(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url  # launched children (Dask workers, trainers) use it too
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
