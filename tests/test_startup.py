"""What a run pays before its first stage: the CLI's own temporary Prefect server, heavy imports kept
out of a cached run, plots drawn once per picture."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from procs import readline_within

ROOT = Path(__file__).resolve().parents[1]
# Prefect's temporary servers start in fresh interpreters: up to minutes on 2 busy cores
pytestmark = pytest.mark.timeout(600)


def test_pipeline_modules_import_no_torch_transformers_or_matplotlib():
    """A fully cached run imports the flow modules and nothing that computes: torch, transformers
    and matplotlib come with the stages that run (train, rollout, a new plot)."""
    code = (
        "import sys, flows.cli, flows.drift_flow, flows.eval_flow, flows.stages, tasks.train\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'matplotlib', 'accelerate') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_plot_is_drawn_once_per_picture(tmp_path):
    from tasks.plots import plot_file

    calls = []

    def draw(path: Path) -> None:
        calls.append(path)
        path.write_bytes(b"png:" + str(len(calls)).encode())

    with plot_file(tmp_path, "weights.png", draw, {"counts": [1, 2]}) as first:
        assert first.name == "weights.png" and first.read_bytes() == b"png:1"
    with plot_file(tmp_path, "weights.png", draw, {"counts": [1, 2]}) as again:
        assert again == first and len(calls) == 1  # served from the directory, not drawn
    with plot_file(tmp_path, "weights.png", draw, {"counts": [1, 3]}) as other:
        assert other != first and other.read_bytes() == b"png:2"
    files = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert files == {first, other}  # no temporary files left beside them
    with plot_file(None, "multi_at.png", draw, {}) as temp:
        assert temp.read_bytes() == b"png:3"
    assert not temp.exists()  # without a cache directory the picture lives for the block only


def test_configured_api_starts_no_server():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.prefect_server import start_if_needed

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert start_if_needed() is None


def test_temporary_server_answers_then_stops_and_a_taken_port_is_retried(monkeypatch):
    """The first port is taken (uvicorn exits with 3): the server comes up on the next one, Prefect's
    client inside ``use_temporary_server`` talks to it, and ``stop`` ends the process."""
    import flows.prefect_server as ps

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    monkeypatch.setattr(ps, "_free_port", lambda: next(ports, None) or _os_free_port())
    server = ps.TemporaryServer()
    before = os.environ.get("PREFECT_API_URL")
    try:
        server.start()
        first = server.port
        server.wait_ready(timeout=300)  # a loaded 2-core machine; the CLI allows 120 s by default
        with ps.use_temporary_server(server):
            assert server.port != first  # retried on a free port
            assert os.environ["PREFECT_API_URL"] == server.api_url
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                assert client.api_url.port == server.port
                assert isinstance(client.read_flow_runs(limit=1), list)  # the API answers
        assert os.environ.get("PREFECT_API_URL") == before  # restored after the block
        with urllib.request.urlopen(f"{server.api_url}/health", timeout=5) as response:
            assert response.status == 200
        proc = server.proc
        server.stop()
        assert proc is not None and proc.poll() is not None and server.proc is None
    finally:
        server.stop()
        taken.close()


def test_temporary_server_stops_itself_when_its_process_is_killed(tmp_path):
    """A SIGKILL (or an OOM kill) skips the CLI's exit handlers, which stop its server: the server
    sees that it was orphaned and stops itself, so no Prefect server outlives the run."""
    code = textwrap.dedent(
        """
        import time
        from flows.prefect_server import TemporaryServer

        server = TemporaryServer()
        server.start()
        server.wait_ready(timeout=300)
        print(server.proc.pid, server.api_url, flush=True)
        time.sleep(600)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect")}
    parent = subprocess.Popen(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    server = None
    try:
        line = readline_within(parent.stdout, 360)  # the server answers (or the parent failed: EOF)
        assert line, f"no server within 360 s (parent exit status: {parent.poll()})"
        pid, url = line.split()
        server = psutil.Process(int(pid))
        assert server.ppid() == parent.pid
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 60  # the watchdog polls every 0.5 s; shutdown takes ~1 s
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server), f"the orphaned server (pid {pid}) is still running"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=2)
    finally:
        parent.kill()
        if server is not None and _alive(server):
            server.kill()


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE  # a zombie has exited: only its reaping is left
    except psutil.NoSuchProcess:
        return False


def _os_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
