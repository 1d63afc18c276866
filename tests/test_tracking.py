"""MLflow tracking: runs of a killed process are closed by the next run, live ones are left alone."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from drift_core.schemas import DriftConfig
from tasks.tracking import Tracker


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_run_closes_runs_of_a_killed_process(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = DriftConfig.model_validate({"run": {"tracking_uri": uri, "experiment": "e"}})
    first = Tracker(cfg)
    stage = first.stage("rollout")
    client = MlflowClient(uri)
    host = socket.gethostname()
    assert client.get_run(first.run_id).data.tags["drift.host"] == host
    # the first run's process "dies" (SIGKILL leaves its runs RUNNING): pretend it was another pid
    gone = str(dead_pid())
    for run_id in (first.run_id, stage):
        client.set_tag(run_id, "drift.pid", gone)
    other_host = client.create_run(first.experiment_id, tags={"drift.host": "elsewhere", "drift.pid": gone})
    alive = client.create_run(first.experiment_id, tags={"drift.host": host, "drift.pid": "1"})  # init lives

    second = Tracker(cfg)

    assert sorted(second.closed_orphans) == sorted([first.run_id, stage])
    for run_id in (first.run_id, stage):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags["drift.closed_reason"] == f"process {gone} on {host} is gone"
    assert client.get_run(other_host.info.run_id).info.status == "RUNNING"  # cannot judge another host
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(second.run_id).info.status == "RUNNING"
    second.finish()
    assert Tracker(cfg).closed_orphans == []  # finished runs are never touched


@pytest.mark.timeout(900)  # as in tests/test_robustness.py, where it was
def test_redact_masks_credentials_and_keeps_ordinary_keys():
    from tasks.tracking import redact

    assert (
        redact("run.tracking_uri", "https://alice:pw@mlflow.internal:5000")
        == "https://***@mlflow.internal:5000"
    )
    assert redact("run.artifact_store", "s3://KEY:SECRET@bucket/drift") == "s3://***@bucket/drift"
    for key in ("hf_token", "HF_TOKEN", "accessToken", "api_key", "client_secret", "db.password"):
        assert redact(key, "value") == "***", key
    for key in ("rollout.sampling.max_new_tokens", "eval.max_new_tokens", "tokens_per_s", "tokenizer"):
        assert redact(key, 64) == 64, key
    nested = {"run": {"tracking_uri": "http://u:p@h"}, "auth_token": "t", "n": [1, "ftp://a:b@c"]}
    assert redact("", nested) == {
        "run": {"tracking_uri": "http://***@h"},
        "auth_token": "***",
        "n": [1, "ftp://***@c"],
    }
