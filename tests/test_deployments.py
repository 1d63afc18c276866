"""drift as a service, on 127.0.0.1: a real Prefect server, the work pools, `prefect deploy --all`
from prefect.yaml, process workers, and the commands a user types (docs/operations.md).

One module, in order, sharing one tiny pipeline run:

1. `prefect deployment run drift/full-pipeline` on the tiny config; the train stage goes to the
   `drift-gpu` pool as its own deployment (a process pool here: there is no GPU);
2. `drift/retrain` from that run's rollouts: no rollout task runs; it fails clearly when the run id
   has no rollouts or none is given;
3. the watcher: no run while the reference is unchanged, one run (not two) once it changes, and
   none after that run has rolled out with the new reference;
4. after those runs (three pipelines and a failed retrain on the same workers), no process that a
   worker started is left: the workers end with the processes they started with.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from helpers import prefect_cli, prefect_client, raw_task_states, states_by_task
from procs import MARK, describe, run_processes

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
pytestmark = pytest.mark.timeout(900)


@dataclass
class Stack:
    env: dict[str, str]
    work: Path
    tracking_uri: str
    logs: list[Path]
    workers: list[subprocess.Popen]
    mark: str  # carried by the workers and every process they start (tests/procs.py)

    @property
    def overrides(self) -> list[str]:
        return [
            f"run.artifact_store={self.work / 'artifacts'}",
            f"run.tracking_uri={self.tracking_uri}",
            f"reference_model.path={self.work / 'reference'}",
        ]

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs)


def run_deployment_cli(stack: Stack, name: str, params: dict) -> tuple[subprocess.CompletedProcess, str]:
    """`prefect deployment run NAME --params JSON --watch`; returns the process and the flow run id."""
    proc = prefect_cli(
        ["deployment", "run", name, "--params", json.dumps(params), "--watch", "--watch-timeout", "600"],
        stack.env,
    )
    match = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
    assert match, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, match.group(1)


def flow_run(env: dict, flow_run_id: str):
    with prefect_client(env) as client:
        return client.read_flow_run(flow_run_id)


def task_states(env: dict, flow_run_id: str) -> dict[str, list[str]]:
    """Task-run states of one flow run by task name (``rollout-shard-0`` -> ``rollout-shard``)."""
    return states_by_task(raw_task_states(env, flow_run_id))


def deployment_runs(env: dict, name: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with prefect_client(env) as client:
        deployment = client.read_deployment_by_name(name)
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        )


def mlflow_parent(stack: Stack, flow_run_id: str):
    """The MLflow parent run that the Prefect flow run logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.tracking_uri)
    experiment = client.get_experiment_by_name("drift-tiny")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    assert len(runs) == 1, runs
    return client, runs[0]


@pytest.fixture(scope="module")
def stack(deployed, tmp_path_factory, tiny_model_dir):
    """Work pools, deployments from prefect.yaml (the session's, tests/conftest.py: what they hold is
    the next test), and a worker on each pool."""
    work = tmp_path_factory.mktemp("deployments")
    shutil.copytree(tiny_model_dir, work / "reference")  # a local reference model we can change
    env = dict(deployed)
    mark = uuid.uuid4().hex
    env = {**env, MARK: mark}  # only the workers (and what they start) carry it
    workers, logs = [], []
    # The pipelines' queue only: the watcher's hourly schedule (its own queue, configs/demo.yaml)
    # must not start demo runs during the tests.
    for pool, extra in (("drift-cpu", ["--work-queue", "default"]), ("drift-gpu", [])):
        log = work / f"worker-{pool}.log"
        logs.append(log)
        with log.open("w") as f:
            cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, *extra]
            workers.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    try:
        yield Stack(
            env=env,
            work=work,
            tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
            logs=logs,
            workers=workers,
            mark=mark,
        )
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def first_run(stack) -> dict:
    """`prefect deployment run drift/full-pipeline` on the tiny config, training on drift-gpu."""
    params = {
        "config_path": "configs/tiny.yaml",
        "overrides": [*stack.overrides, "train.work_pool=drift-gpu"],
    }
    proc, flow_run_id = run_deployment_cli(stack, "drift/full-pipeline", params)
    assert proc.returncode == 0 and "Completed" in proc.stdout, f"{proc.stdout[-3000:]}\n{stack.log_tail()}"
    client, parent = mlflow_parent(stack, flow_run_id)
    return {"flow_run_id": flow_run_id, "run_id": parent.info.run_id, "client": client, "parent": parent}


@pytest.mark.slow
def test_prefect_yaml_declares_pools_and_the_watcher_schedule(stack):
    with prefect_client(stack.env) as c:
        deployments = {f"{c.read_flow(d.flow_id).name}/{d.name}": d for d in c.read_deployments()}
    assert deployments["drift/full-pipeline"].parameters == {"config_path": "configs/demo.yaml"}
    assert deployments["drift/retrain"].parameters["retrain"] is True
    assert deployments["drift-train/drift-gpu"].work_pool_name == "drift-gpu"
    watcher = deployments["drift-reference-watcher/watch-reference"]
    assert watcher.work_pool_name == "drift-cpu" and watcher.work_queue_name == "watcher"
    assert [s.schedule.interval.total_seconds() for s in watcher.schedules] == [3600]
    step = deployments["drift/full-pipeline"].pull_steps[0]["prefect.deployments.steps.set_working_directory"]
    assert Path(step["directory"]) == ROOT


@pytest.mark.slow
def test_full_pipeline_deployment_completes_and_tracks(stack, first_run):
    states = task_states(stack.env, first_run["flow_run_id"])
    assert len(states["rollout-shard"]) == 2 and set(states["rollout-shard"]) == {"Completed"}, states
    assert states["train-on-drift-gpu"] == ["Completed"], states
    # the train stage ran as its own flow run on the drift-gpu pool
    [train_run] = deployment_runs(stack.env, "drift-train/drift-gpu")
    assert train_run.state.is_completed() and train_run.work_pool_name == "drift-gpu"

    client, parent = first_run["client"], first_run["parent"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["drift.reference_fingerprint"].startswith("sha256:")
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert {c.data.tags["drift.stage"] for c in children} == {
        "ingest",
        "rollout",
        "weights",
        "train",
        "evaluate-reference",
        "evaluate-trained",
    }


@pytest.mark.slow
def test_retrain_reuses_rollouts_and_fails_clearly_without_them(stack, first_run):
    params = {
        "config_path": "configs/tiny.yaml",
        "overrides": stack.overrides,
        "rollouts_from": first_run["run_id"],
    }
    proc, flow_run_id = run_deployment_cli(stack, "drift/retrain", params)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{stack.log_tail()}"
    states = task_states(stack.env, flow_run_id)
    assert "rollout-shard" not in states and "rollout-collect" not in states, states
    assert {"weights", "evaluate-trained-summary"} <= set(states), states
    _, parent = mlflow_parent(stack, flow_run_id)
    assert parent.data.tags["drift.rollouts_from"] == first_run["run_id"]
    assert (
        parent.data.tags["drift.rollout_manifest"] == first_run["parent"].data.tags["drift.rollout_manifest"]
    )

    # A run id without rollouts (a stage's nested run): the run fails, naming the problem.
    client = first_run["client"]
    [weights_run] = client.search_runs(
        [first_run["parent"].info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{first_run['run_id']}' and tags.`drift.stage` = 'weights'",
    )
    params["rollouts_from"] = weights_run.info.run_id
    proc, flow_run_id = run_deployment_cli(stack, "drift/retrain", params)
    assert proc.returncode == 1 and "Failed" in proc.stdout, proc.stdout[-3000:]
    failed = flow_run(stack.env, flow_run_id)
    assert "has no rollouts" in failed.state.message, failed.state.message
    assert "rollout-shard" not in task_states(stack.env, flow_run_id)


@pytest.fixture()
def prefect_api(stack, monkeypatch):
    """Flows called in this process talk to the test server."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", stack.env["PREFECT_API_URL"])
    with temporary_settings({PREFECT_API_URL: stack.env["PREFECT_API_URL"]}):
        yield
        # send queued logs/events now: at exit they would retry against a stopped server for minutes
        APILogHandler().flush()
        EventsWorker.drain_all(timeout=30)


@pytest.mark.slow
def test_retrain_without_rollouts_from_fails_before_doing_anything(stack, prefect_api):
    from flows.drift_flow import drift

    with pytest.raises(ValueError, match="retrain needs rollouts_from"):
        drift(config_path=str(TINY), overrides=stack.overrides, retrain=True)


@pytest.mark.slow
def test_watcher_starts_a_run_only_when_the_reference_changes(stack, first_run, prefect_api):
    from safetensors.torch import load_file, save_file

    from deployments.watcher import watch_reference

    def pipeline_runs() -> list:
        return deployment_runs(stack.env, "drift/full-pipeline")

    def watch() -> dict:
        return watch_reference(config_path=str(TINY), overrides=stack.overrides)

    before = len(pipeline_runs())
    unchanged = watch()
    assert unchanged["decision"] == "unchanged", unchanged
    assert unchanged["last_run_id"] == first_run["run_id"]  # retrain runs do not count as rollouts
    assert len(pipeline_runs()) == before

    weights_file = stack.work / "reference" / "model.safetensors"
    tensors = load_file(weights_file)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, weights_file, metadata={"format": "pt"})

    started = watch()
    assert started["decision"] == "started" and started["fingerprint"] != unchanged["fingerprint"], started
    again = watch()  # the next tick while that run is queued or running: no second run
    assert again["decision"] == "already-running" and again["flow_run_id"] == started["flow_run_id"], again
    assert len(pipeline_runs()) == before + 1

    deadline = time.time() + 600
    while not (run := flow_run(stack.env, started["flow_run_id"])).state.is_final():
        assert time.time() < deadline, stack.log_tail()
        time.sleep(2)
    assert run.state.is_completed(), f"{run.state}\n{stack.log_tail()}"
    assert run.parameters == {"config_path": str(TINY), "overrides": stack.overrides}
    assert set(task_states(stack.env, str(run.id))["rollout-shard"]) == {"Completed"}  # re-rolled

    after = watch()
    assert after["decision"] == "unchanged" and after["fingerprint"] == started["fingerprint"], after
    assert len(pipeline_runs()) == before + 1


def pool_flow_runs(env: dict, pool: str) -> list:
    """The flow runs that reached a final state on a work pool, oldest first."""
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    with prefect_client(env) as client:
        runs = client.read_flow_runs(work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])))
    return sorted((r for r in runs if r.state and r.state.is_final()), key=lambda r: r.created)


@pytest.mark.slow
def test_workers_end_with_the_processes_they_started_with(stack, first_run):
    """Issue 16: every flow run a worker starts (its process, the rollout's grading pools, the
    train stage's flow run on drift-gpu) is gone once the run is over; the workers themselves are
    the only processes carrying the mark. Run after the extended tests above, the drift-cpu worker
    has run three pipelines (first run, retrain, the watcher's run) and a failed retrain; in the
    default suite it first runs pipelines until it has two, each rolling out anew (a new rollout
    seed): two flow runs' grading pools and a train stage on drift-gpu are what the check needs."""
    pipelines = [r for r in pool_flow_runs(stack.env, "drift-cpu") if r.state.is_completed()]
    for seed in range(len(pipelines), 2):
        params = {
            "config_path": "configs/tiny.yaml",
            "overrides": [*stack.overrides, f"rollout.seed={100 + seed}", "train.work_pool=drift-gpu"],
        }
        proc, _ = run_deployment_cli(stack, "drift/full-pipeline", params)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{stack.log_tail()}"
    finished = pool_flow_runs(stack.env, "drift-cpu")
    rolled_out = [r for r in finished if "rollout-shard" in task_states(stack.env, str(r.id))]
    assert len([r for r in finished if r.state.is_completed()]) >= 2, [r.state.name for r in finished]
    assert len(rolled_out) >= 2, "the runs must have started grading pools for the check to mean anything"
    assert pool_flow_runs(stack.env, "drift-gpu"), "the train stage ran on drift-gpu"

    workers = {p.pid for p in stack.workers}
    assert all(p.poll() is None for p in stack.workers), stack.log_tail()
    # A flow run reports its final state before its process has finished exiting: wait for that
    # exit (bounded), then require exactly the workers.
    deadline = time.time() + 60
    while {p.pid for p in run_processes(stack.mark)} != workers and time.time() < deadline:
        time.sleep(1)
    left = [p for p in run_processes(stack.mark) if p.pid not in workers]
    assert not left, f"processes left after {len(finished)} flow runs:\n{describe(left)}"
    for pid in workers:
        alive = [
            c for c in psutil.Process(pid).children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE
        ]
        assert not alive, describe(alive)


# ------------------------------------------------------------------ fingerprints, no server needed


def test_registry_fingerprint_follows_alias_and_version(tmp_path):
    from mlflow.tracking import MlflowClient

    from deployments.watcher import registry_fingerprint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("reference")
    client.create_model_version("reference", source=str(tmp_path / "v1"))
    client.set_registered_model_alias("reference", "champion", "1")
    assert registry_fingerprint("models:/reference@champion", uri) == "mlflow:reference/1"
    client.create_model_version("reference", source=str(tmp_path / "v2"))
    assert registry_fingerprint("models:/reference@champion", uri) == "mlflow:reference/1"
    assert registry_fingerprint("models:/reference/latest", uri) == "mlflow:reference/2"
    client.set_registered_model_alias("reference", "champion", "2")
    assert registry_fingerprint("models:/reference@champion", uri) == "mlflow:reference/2"
    assert registry_fingerprint("models:/reference/1", uri) == "mlflow:reference/1"
    with pytest.raises(ValueError, match="expected models:/"):
        registry_fingerprint("models:/a/b/c", uri)


def test_hub_fingerprint_is_the_resolved_commit_or_none_when_unreachable(monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub

    from deployments.watcher import hub_fingerprint

    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "model_info",
        lambda self, repo_id, revision=None: SimpleNamespace(sha="c0ffee"),
    )
    assert hub_fingerprint("Qwen/Qwen2.5-3B-Instruct", "main") == "hub:Qwen/Qwen2.5-3B-Instruct@c0ffee"

    def offline(self, repo_id, revision=None):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", offline)
    assert hub_fingerprint("Qwen/Qwen2.5-3B-Instruct", "main") is None  # "unknown": no re-roll


def test_pipeline_hub_fingerprint_offline_uses_the_cached_commit(monkeypatch, tmp_path):
    """Offline, a hub id is fingerprinted by the commit the local hub cache resolved (what
    from_pretrained loads); a pinned commit needs no network; with neither, the revision name."""
    import huggingface_hub
    from huggingface_hub import constants

    from tasks.models import _hub_revision

    def offline(self, repo_id, revision=None):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--Qwen--Qwen2.5-3B-Instruct" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    assert _hub_revision("Qwen/Qwen2.5-3B-Instruct", None) == "Qwen/Qwen2.5-3B-Instruct@" + "a" * 40
    assert _hub_revision("Qwen/Qwen2.5-3B-Instruct", "b" * 40) == "Qwen/Qwen2.5-3B-Instruct@" + "b" * 40
    assert _hub_revision("Qwen/Qwen2.5-3B-Instruct", "v2") == "Qwen/Qwen2.5-3B-Instruct@v2"
    (refs / "main").write_text("a" * 40 + "\n")  # as huggingface_hub may write it
    assert _hub_revision("Qwen/Qwen2.5-3B-Instruct", "main").endswith("@" + "a" * 40)
