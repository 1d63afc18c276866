"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random model of its architecture, and
(for the slower tests) the real SmolLM2-135M-Instruct. Models are materialised once per machine
under DRIFT_MODEL_CACHE (default ~/.cache/drift/models)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# `make test` runs the suite in two pytest-xdist workers (one per core here, whole files per
# worker): each worker and every process it starts computes on one thread, so two workers never
# oversubscribe the cores (OpenMP threads spinning against each other), and what one worker waits
# on (a server starting, a CLI run's interpreter) overlaps the other's work.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from tasks.models import materialize_tiny

    return materialize_tiny()


@pytest.fixture(scope="session")
def tiny_answering_dir() -> Path:
    """``builtin:tiny-smollm2``: the tiny model after a few seconds of training on arithmetic in
    the protocol format, so rollouts have varied returns (some answers right, some wrong)."""
    from tasks.models import materialize_tiny_answering

    return materialize_tiny_answering()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from tasks.models import materialize_smollm2

    return materialize_smollm2()


@pytest.fixture(scope="session")
def smol_tokenizer(tiny_model_dir):
    from tasks.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from tasks.models import load_model

    return load_model(str(tiny_model_dir))


# ------------------------------------------------------------------------------------------
# Real services on 127.0.0.1, started once per test session and stopped at its end.
# ------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc, timeout: float, what: str) -> None:
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{what} did not answer on {url} within {timeout} s")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect API server on 127.0.0.1 with its own PREFECT_HOME; yields the env to use."""
    import os
    import subprocess
    import sys

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")  # noqa: SIM115 - open for the whole session
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_http(f"{url}/health", proc, 180, "prefect server")
        yield {**env, "PREFECT_API_URL": url}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1: tracking and model registry through the REST API,
    artifacts served by the server (``mlflow-artifacts:/``); yields its URL."""
    import os
    import subprocess
    import sys

    home = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # MLflow 3's job execution (huey consumers for GenAI jobs and periodic trace rollups: 5 extra
    # interpreters polling all session long) is a feature drift never uses: off, on 2 cores
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = open(home / "server.log", "w")  # noqa: SIM115 - open for the whole session
    # fmt: off
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(home / "artifacts"),
    ]  # fmt: on
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/health", proc, 300, "mlflow server")
        yield url
    finally:
        import contextlib
        import signal

        with contextlib.suppress(ProcessLookupError):  # uvicorn's workers share its session: end all
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture()
def prefect_api(prefect_server):
    """Flows and tasks called in this process talk to the session's Prefect server; queued logs and
    events are sent before the test ends (drained at exit instead, they retry against a stopped
    server for a minute or more)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        yield prefect_server
        drain_prefect_queues()


def drain_prefect_queues() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    EventsWorker.drain_all(timeout=30)


@pytest.fixture(scope="session")
def deployed(prefect_server):
    """The work pools and every deployment of prefect.yaml on the session's Prefect server, made
    once (``prefect deploy --all``, a fresh interpreter that imports every flow) for the modules
    that run deployments (test_deployments, test_iterate); each module starts its own workers.
    Yields the env for the ``prefect`` CLI and workers (workers poll every 2 s)."""
    from helpers import prefect_cli

    env = {**prefect_server, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    for pool in ("drift-cpu", "drift-gpu"):  # drift-gpu: no GPU here, a process pool all the same
        prefect_cli(["work-pool", "create", pool, "--type", "process", "--overwrite"], env, check=True)
    prefect_cli(["--no-prompt", "deploy", "--all"], env, check=True)
    return env


# The default suite (`make test`, what CI runs) must finish in 10 minutes on 2 cores from empty
# caches; every drift process pays ~10 s of CPU importing torch, transformers, Prefect and MLflow,
# so each end-to-end run costs tens of seconds there. These deeper variants run in `make test-all`
# (and the vLLM ones in `make test-vllm`); each names the default-suite test that covers its path.
EXTENDED = {
    # a second launcher beside test_train.py::test_accelerate_config_launches_through_accelerate
    "test_train.py::test_two_process_torchrun_matches_single_process",
    "test_loss.py::test_ddp_gradients_are_all_reduced",
    # the same stop path as the ctrl-c case, by another signal
    "test_stages.py::test_interrupt_mid_rollout_stops_generation_at_once[sigterm]",
    # each corruption is a unit test in test_caching.py; this one plays them through a flow
    "test_stages.py::test_corrupt_cached_artifacts_are_recomputed_not_used",
    # training from cached rollouts: test_flow.py's fifth run (--rollouts-from)
    "test_deployments.py::test_retrain_reuses_rollouts_and_fails_clearly_without_them",
    # the watcher's decision: test_deployments.py::test_registry_fingerprint_follows_alias_and_version
    "test_deployments.py::test_watcher_starts_a_run_only_when_the_reference_changes",
    # `drift eval` without a config: step 3 of test_newcomer.py
    "test_cli.py::test_drift_eval_without_a_config_uses_the_schema_defaults",
    "test_flow.py::test_drift_eval_evaluates_any_model_directory",
    # a suite through `drift run`: the same suite through `drift eval` stays
    "test_suite.py::test_drift_run_evaluates_reference_and_trained_on_every_benchmark",
    # the online RL baseline (TRL GRPO): its episode and sampler tests stay
    "test_online_rl.py::test_online_grpo_smoke",
    "test_online_rl.py::test_online_grpo_resumes_after_interruption",
    # two full rounds of drift-iterate: test_loop_runs_to_its_last_round_when_told_to_go_on stays
    "test_iterate.py::test_two_rounds_register_promote_and_stop",
    "test_iterate.py::test_watcher_starts_the_pipeline_when_the_champion_moved",
    # shards on a Dask cluster: the task runner choice stays (test_task_runner_for_follows_the_config)
    "test_distributed.py::test_dask_shards_match_thread_shards",
    # reference rollouts through `drift run`: their reading and weighting stay
    "test_reference_rollouts.py::test_drift_run_trains_and_evaluates_reference_rollouts",
}

# The files that take longest run first: `make test` hands whole files to two xdist workers in
# collection order, and a long file started last would leave one worker running it alone at the end.
# Measured cold under `make test` (docs/benchmarks.md, "The test suite"); the rest keep their order.
LONGEST_FIRST = [
    "test_vllm.py",
    "test_stages.py",
    "test_newcomer.py",
    "test_deployments.py",
    "test_flow.py",
    "test_suite.py",
    "test_rollout.py",
    "test_train.py",
    "test_cli.py",
    "test_startup.py",
    "test_mlflow_ui.py",
]


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the marks
def pytest_collection_modifyitems(session, config, items) -> None:
    for item in items:
        if f"{item.path.name}::{item.name}" in EXTENDED:
            item.add_marker(pytest.mark.extended)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
