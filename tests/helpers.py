"""Helpers shared by the tests that drive real runs: the drift and prefect CLIs in a fresh
interpreter, a Prefect client on a test server, MLflow run ids from the output, and task-run states
from the Prefect API."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the stage tasks of one tiny run (task-run names, shard numbers merged): rollout and evaluation
#: shards, their summaries, and the single-task stages (register-model and promote not included)
STAGE_TASKS = {
    "ingest-train",
    "ingest-eval",
    "rollout-shard",
    "rollout-collect",
    "weights",
    "train",
    "evaluate-reference-shard",
    "evaluate-reference-summary",
    "evaluate-trained-shard",
    "evaluate-trained-summary",
}

_RUN_SUFFIX = re.compile(r"-(\d+|[0-9a-f]{3,})$")  # rollout-shard-0, ingest-7f3 -> task name


def _cli(
    program: str, module: str, args: list[str], cwd: Path, env: dict, timeout: float, check: bool
) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in a fresh interpreter; ``check`` asserts success and shows the
    output's tail when it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, (
            f"{program} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def drift_cli(
    args: list[str], cwd: Path, env: dict, timeout: int = 900, check: bool = False
) -> subprocess.CompletedProcess:
    """The real command line, ``python -m flows.cli ...``, as a user runs it from ``cwd``."""
    return _cli("drift", "flows.cli", args, cwd, {**env, "PYTHONPATH": str(ROOT)}, timeout, check)


def prefect_cli(
    args: list[str], env: dict, timeout: float = 600, check: bool = False
) -> subprocess.CompletedProcess:
    """The ``prefect`` CLI, run from the repository root like a user would."""
    return _cli("prefect", "prefect", args, ROOT, env, timeout, check)


@contextlib.contextmanager
def prefect_client(env: dict):
    """A sync Prefect client on the server at env's ``PREFECT_API_URL`` (the test's server, not
    this process's profile)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        yield client


def mlflow_run_id(stdout: str) -> str:
    """The MLflow parent run id that ``drift run``/``drift eval`` prints last."""
    match = re.search(r"MLflow run id: ([0-9a-f]{32})", stdout)
    assert match, stdout
    return match.group(1)


def flow_run_of(tracking_uri: str, run_id: str) -> str:
    """The Prefect flow run behind an MLflow parent run (its ``prefect.flow_run_id`` tag)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).get_run(run_id).data.tags["prefect.flow_run_id"]


def raw_task_states(env: dict, flow_run_id: str) -> dict[str, list[str]]:
    """Task-run states of one flow run, by task-run name, from the server at env's PREFECT_API_URL."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with prefect_client(env) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = defaultdict(list)
    for tr in runs:
        states[tr.name].append(tr.state.name)
    return dict(states)


def states_by_task(states: dict[str, list[str]]) -> dict[str, list[str]]:
    """Merge the runs of one task (``rollout-shard-0``, ``rollout-shard-1`` -> ``rollout-shard``)."""
    merged: dict[str, list[str]] = defaultdict(list)
    for name, values in states.items():
        merged[_RUN_SUFFIX.sub("", name)].extend(values)
    return dict(merged)


def stop_session(proc: subprocess.Popen, grace: float = 60) -> None:
    """End a process started with ``start_new_session=True`` and everything in its session: SIGTERM
    to the group, up to ``grace`` seconds to exit, then SIGKILL to whatever of the group is left
    (a worker's flow-run child, left running when a watch timed out)."""
    import os
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """``rows`` as JSON lines, with ``raw_lines`` (malformed on purpose) inserted at their indices."""
    lines = [json.dumps(r) for r in rows]
    for at, line in sorted((raw_lines or {}).items()):
        lines.insert(at, line)
    path.write_text("\n".join(lines) + "\n")
    return path
