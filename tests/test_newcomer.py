"""A newcomer's first hour, as the acceptance test of the default suite: the ``drift`` command
installed by ``make setup``, run from a directory outside the checkout with an empty ``$HOME``
(no model cache, no Hugging Face cache, no Prefect home, no MLflow store), exactly as on a machine
that has never run drift.

* bad data: drift's one paragraph on stderr and nothing else, exit 2, before any server starts or
  any model is made;
* ``drift run configs/tiny.yaml`` completes, its servers listening on 127.0.0.1 only, and the
  first-run work (making the builtin model) shows drift's own line, not third-party progress bars;
* ``drift eval --model <that model> --data <a user's JSONL>`` with no config runs the schema's
  neutral protocol (no demo calculator prompt), prints it before generating, and finishes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
DRIFT = Path(sys.executable).parent / "drift"  # the console script `make setup` installs
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Environment a newcomer's shell would not have: drift's, Prefect's, MLflow's and the caches' settings.
_NOT_ON_A_NEW_MACHINE = (
    "PREFECT_",
    "MLFLOW_",
    "DRIFT_",
    "HF_",
    "TRANSFORMERS_",
    "VLLM_",
    "XDG_",
    "PYTHONPATH",
)


def _listening_sockets(root_pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of ``root_pid`` and its descendants."""
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children[int(fields[1])].append(int(stat.parent.name))
    pids, stack = set(), [root_pid]
    while stack:
        pid = stack.pop()
        pids.add(pid)
        stack.extend(children.get(pid, []))
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                    continue
                addr, port = cols[1].split(":")
                raw = bytes.fromhex(addr)
                if v6:  # four little-endian 32-bit words
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.add((socket.inet_ntop(socket.AF_INET6, raw), int(port, 16)))
                else:
                    found.add((socket.inet_ntoa(raw[::-1]), int(port, 16)))
    return found


def _run(args: list[str], cwd: Path, env: dict, timeout: float = 600) -> tuple[int, str, str, set]:
    """``drift ARGS`` from ``cwd``; returns exit code, stdout, stderr and every listening socket
    seen on it or its children while it ran."""
    proc = subprocess.Popen(
        [str(DRIFT), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    listening: set[tuple[str, int]] = set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        listening |= _listening_sockets(proc.pid)
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout, stderr, listening


@pytest.fixture
def newcomer(tmp_path) -> tuple[Path, dict]:
    """An empty home and an empty working directory outside the checkout."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_ON_A_NEW_MACHINE)}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1")
    return work, env


def test_a_newcomers_first_hour(newcomer):
    work, env = newcomer
    home = Path(env["HOME"])

    # 1. Bad data: one paragraph, exit 2, in seconds; no server, no model, nothing under $HOME.
    bad = write_jsonl(
        work / "mine.jsonl",
        [{"question": "What is 1 + 1?", "answer": "2"}],
        raw_lines={1: '{"question": "What is 3 + 3?", "answer": '},
    )
    rc, stdout, stderr, listening = _run(["run", str(TINY), "--set", f"data.source={bad}"], work, env)
    assert rc == 2, stderr
    assert stderr.splitlines()[-1] == "(run with --debug for the traceback)", stderr
    paragraph = " ".join(stderr.splitlines()[:-1])
    assert paragraph.startswith("drift run: IngestError: "), stderr
    assert f"{bad}: line 2: malformed JSON" in paragraph and "data.on_bad_rows=skip" in paragraph, stderr
    assert len(stderr.splitlines()) <= 4, stderr  # the paragraph (wrapped at 100) and the hint
    assert not listening, listening  # refused before the Prefect server started
    assert not (home / ".cache").exists(), "a model was made before the data was read"

    # 2. The smoke run: completes; servers on loopback only; drift says what it makes on a first run.
    rc, stdout, stderr, listening = _run(["run", str(TINY)], work, env)
    assert rc == 0, stderr
    assert listening, "the temporary Prefect server was never seen listening"
    assert {addr for addr, _ in listening} <= {"127.0.0.1", "::1"}, listening
    assert "drift: training the tiny model" in stderr and str(home / ".cache" / "drift") in stderr, stderr
    for noise in (
        "Loading weights",
        "Writing model shards",
        "Removed shared tensor",
        "Creating initial MLflow",
    ):
        assert noise not in stderr, (noise, stderr)
    assert "protocol:" in stdout and "MLflow run id: " in stdout, stdout
    guide = stdout.splitlines()[
        [line.startswith("reading it: ") for line in stdout.splitlines()].index(True) + 1
    ]
    rollouts = Path(guide.split("; the rollouts trained on: ")[1].removesuffix("."))
    assert rollouts.exists() and str(work) in str(rollouts), guide  # the store under the working directory
    model_dir = next(
        line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("trained model: ")
    )
    assert (Path(model_dir) / "config.json").is_file()

    # 3. Their own data, no config: the schema's neutral protocol, printed before generating.
    mine = write_jsonl(
        work / "sums.jsonl",
        [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "What is 4 + 4?", "answer": "8"}],
    )
    rc, stdout, stderr, _ = _run(["eval", "--model", model_dir, "--data", str(mine)], work, env)
    assert rc == 0, stderr
    assert "calculator" not in stdout.lower() and "configs/demo.yaml" not in stdout + stderr
    block = stdout[stdout.index("protocol:") : stdout.index("MLflow run id")]
    from drift_core.schemas import DriftConfig

    defaults = DriftConfig()
    assert "system prompt:" in block and "verifier" in block, block
    assert f"{defaults.engine.kind}, dtype {defaults.reference_model.dtype}" in block, block
    assert stdout.index("protocol:") < stdout.index("MLflow run id"), stdout
    summary_line = next(line for line in stdout.splitlines() if line.startswith("MLflow run id: "))
    assert len(summary_line.split(": ", 1)[1]) == 32, summary_line
