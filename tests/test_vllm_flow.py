"""`drift run` with ``engine.kind: vllm`` end to end, through the real CLI and a real Prefect server:
a run killed mid-rollout resumes from its stored shard, rollouts and both evaluations are made by
vLLM's CPU build (the reference and the LoRA-trained model, merged into plain weights that vLLM
loads), and every stage is cached on the run after."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from helpers import STAGE_TASKS, drift_cli, flow_run_of, mlflow_run_id, raw_task_states, states_by_task

if not os.environ.get("CI"):
    pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs its CPU build)")
else:  # in CI vLLM must be there: a missing install fails, never skips
    importlib.import_module("vllm")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# `extended`: not in `make test` (CI), which checks its parts one by one (the engine, equivalence
# and stop request in test_vllm.py; kill and resume, caching and shard manifests in test_stages.py
# and test_flow.py); `make test-vllm` and `make test-all` run it (about 3 minutes).
pytestmark = [pytest.mark.vllm, pytest.mark.extended, pytest.mark.timeout(1500)]


def test_drift_run_on_vllm_resumes_after_a_kill_evaluates_and_caches(tmp_path, prefect_server):
    from tasks.models import materialize_tiny

    # the tiny model with heads vLLM's CPU attention supports (builtin:tiny-smollm2 has 16)
    shutil.copytree(materialize_tiny(head_dim=32), tmp_path / "reference")
    args = [
        "run",
        str(TINY),
        "--set",
        f"reference_model.path={tmp_path / 'reference'}",
        "--set",
        "engine.kind=vllm",
        "--set",
        "train.lora.enabled=true",
        "--set",
        "run.register_model=false",
    ]
    env = {**prefect_server, "PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS": "1"}  # shards one by one
    tracking = f"sqlite:///{tmp_path / '.drift' / 'mlflow.db'}"
    store = tmp_path / ".drift" / "artifacts"

    # 1. killed (SIGKILL, the whole session: CLI, vLLM's engine processes, graders) once the first
    #    of the two rollout shards is stored
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while not list(store.glob("rollout-shard/*/manifest.json")):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    finished = list(store.glob("rollout-shard/*/manifest.json"))
    assert len(finished) == 1, finished

    # 2. the same command: the stored shard is served from cache, everything else runs on vLLM
    first = drift_cli(args, tmp_path, env, timeout=1200, check=True)
    run1 = mlflow_run_id(first.stdout)
    states = states_by_task(raw_task_states(env, flow_run_of(tracking, run1)))
    assert set(states) == STAGE_TASKS, states
    assert sorted(states.pop("rollout-shard")) == ["Cached", "Completed"]
    # the killed run had ingested both problem sets before its rollout began
    assert states.pop("ingest-train") == ["Cached"] and states.pop("ingest-eval") == ["Cached"], states
    assert all(s == "Completed" for ss in states.values() for s in ss), states

    # every shard of the rollout and of both evaluations says vLLM made it
    shard_engines = [
        json.loads(m.read_text())["meta"].get("engine") for m in store.glob("*shard*/*/manifest.json")
    ]
    assert len(shard_engines) == 2 + 1 + 1, shard_engines  # 2 rollout shards, one per evaluation
    assert set(shard_engines) == {"vllm"}, shard_engines

    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking).get_run(run1).data.params["engine.kind"] == "vllm"
    (rollouts,) = store.glob("rollout/*/data.parquet")
    df = pl.read_parquet(rollouts)
    assert df.height == 8 * 2  # 8 prompts x K=2, the killed run's shard included
    assert df.group_by("prompt_id").len()["len"].to_list() == [2] * 8
    assert (df["gen_tokens"].list.sum() > 0).all()
    trained_evals = [p for p in store.glob("evaluate/*/metrics.json") if '"trained"' in p.read_text()]
    assert trained_evals, "the LoRA-trained model was evaluated"

    # 3. once more: every stage served from cache, no engine started
    second = drift_cli(args, tmp_path, env, timeout=600, check=True)
    run2 = mlflow_run_id(second.stdout)
    states2 = states_by_task(raw_task_states(env, flow_run_of(tracking, run2)))
    assert set(states2) == STAGE_TASKS, states2
    assert all(s == "Cached" for ss in states2.values() for s in ss), states2
