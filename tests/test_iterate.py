"""Iterated DRIFT as operations, end to end on 127.0.0.1: a real Prefect server, a real ``mlflow
server`` (tracking and model registry through its REST API), the ``drift-iterate/iterate`` and
``drift/full-pipeline`` deployments from prefect.yaml and a process worker.

The registry starts with a weak champion (version 1: the tiny *random* model, which never answers
in format). ``drift-iterate/iterate`` with 3 rounds on the tiny config, reference
``models:/NAME@champion`` and base model a tiny model that learned the 32 eval problems by heart
(``oracle_dir``: a challenger known to be better, so the gate's first decision is not left to what
two SFT steps of a 2-layer model happen to learn); training at a learning rate of 1e-6, so each
round's model differs in its bytes (a new version) but not in its greedy answers:

* round 1 rolls out from version 1, trains the oracle, registers version 2, and the gate promotes
  it (it solves problems the champion cannot: the paired interval is above 0);
* round 2 rolls out from and trains version 2 (pinned ``models:/NAME/2``), registers version 3,
  as good as version 2: not promoted, so the loop stops there (``iterate.stop_on_no_promotion``)
  and round 3 never runs.

Then the watcher, configured on ``models:/NAME@champion``, sees that the champion moved since the
last rollout from that alias and starts ``drift/full-pipeline`` (left queued: no worker by then),
once, however often it ticks.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import prefect_cli, prefect_client, stop_session

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def seed_champion(client, name: str, model_dir: Path) -> None:
    """Version 1 of ``name``: ``model_dir`` logged as a run's artifacts; alias champion on it."""
    client.create_registered_model(name)
    experiment = client.create_experiment(f"seed-{name}")
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_terminated(run.info.run_id)
    client.set_registered_model_alias(name, "champion", "1")


EVAL_N = 32


@pytest.fixture(scope="module")
def oracle_dir() -> Path:
    """The tiny model trained on the tiny config's eval problems (eval.data.arith.n = EVAL_N): it
    solves about a quarter of them within two turns (measured: 9 of 32), the random model none."""
    from drift_core.schemas import ArithConfig
    from tasks.ingest import generate_arith
    from tasks.models import materialize_tiny_answering

    problems = generate_arith(ArithConfig(n=EVAL_N, digits=1, seed=0), "test", "eval.data")
    return materialize_tiny_answering(problems=[tuple(p) for p in problems])


@pytest.fixture(scope="module")
def loop(deployed, mlflow_server, tmp_path_factory, tiny_model_dir, oracle_dir):
    """The session's deployments, a worker on drift-cpu, and one ``drift-iterate/iterate`` run of 3
    rounds."""
    from mlflow.tracking import MlflowClient

    work = tmp_path_factory.mktemp("iterate")
    name = f"drift-loop-{uuid.uuid4().hex[:8]}"  # a fresh name: nothing cached under it anywhere
    registry = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    seed_champion(registry, name, tiny_model_dir)
    env = dict(deployed)
    overrides = [
        f"run.artifact_store={work / 'artifacts'}",
        f"run.tracking_uri={mlflow_server}",
        f"run.registered_model={name}",
        f"reference_model.path=models:/{name}@champion",
        f"base_model.path={oracle_dir}",
        "train.learning_rate=1e-6",
        f"eval.data.arith.n={EVAL_N}",  # the problems the oracle learned
        f"eval.shard_size={EVAL_N}",
    ]
    log = work / "worker.log"
    with log.open("w") as f:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "worker",
                "start",
                "--pool",
                "drift-cpu",
                "--work-queue",
                "default",
            ],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its flow-run processes share the session: ended with it below
        )
    try:
        params = {"config_path": "configs/tiny.yaml", "overrides": overrides, "rounds": 3}
        proc = prefect_cli(
            [
                "deployment",
                "run",
                "drift-iterate/iterate",
                "--params",
                json.dumps(params),
                "--watch",
                "--watch-timeout",
                "1800",
            ],
            env,
            timeout=1800,
        )
    finally:
        stop_session(worker)  # the watcher's run below must stay queued
    match = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
    assert match and proc.returncode == 0, (
        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{log.read_text()[-6000:]}"
    )
    return {
        "env": env,
        "name": name,
        "registry": registry,
        "flow_run_id": match.group(1),
        "overrides": overrides,
        "oracle_dir": oracle_dir,
    }


def test_two_rounds_register_promote_and_stop(loop):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    name, registry = loop["name"], loop["registry"]
    with prefect_client(loop["env"]) as client:
        parent = client.read_flow_run(loop["flow_run_id"])
        rounds = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id]))
        )
    assert parent.state.is_completed(), parent.state
    rounds = sorted(rounds, key=lambda r: r.start_time)
    # run names end with their start time (tiny-round1-1206-082646): compared without it
    assert [re.sub(r"(-\d+)+$", "", r.name) for r in rounds] == ["tiny-round1", "tiny-round2"], rounds
    assert all(r.state.is_completed() for r in rounds), [r.state for r in rounds]

    # The registry: the seed, round 1's promoted model, round 2's challenger; the loop stopped.
    versions = {v.version: v for v in registry.search_model_versions(f"name = '{name}'")}
    assert sorted(versions) == ["1", "2", "3"], versions
    assert registry.get_registered_model(name).aliases == {"champion": "2", "challenger": "3"}
    assert "drift.iterate.owner" not in registry.get_registered_model(name).tags  # the guard let go

    # Lineage: each version names its Prefect flow run, its MLflow parent run, what it came from.
    for version, flow_run, reference_fp, base, promotion in (
        ("2", rounds[0], f"mlflow:{name}/1", None, "promoted"),
        ("3", rounds[1], f"mlflow:{name}/2", f"models:/{name}/2", "not promoted"),
    ):
        tags = versions[version].tags
        assert tags["drift.prefect_flow_run_id"] == str(flow_run.id), tags
        assert tags["drift.reference_fingerprint"] == reference_fp, tags
        assert tags["drift.promotion"] == promotion, tags
        assert json.loads(tags["drift.weights"])["beta"] == 0.1
        if base:
            assert tags["drift.base_model"] == base and tags["drift.base_fingerprint"] == base.replace(
                "models:/", "mlflow:"
            )
        run = registry.get_run(tags["drift.mlflow_parent_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["prefect.flow_run_id"] == str(flow_run.id)
        assert run.data.tags["drift.promotion"].startswith(promotion)
        assert (
            run.data.tags["drift.rollout_manifest"]
            and json.loads(run.data.tags["drift.rollout_manifest"])["key"] == tags["drift.rollout_key"]
        )
        assert versions[version].run_id in {
            c.info.run_id
            for c in registry.search_runs(
                [run.info.experiment_id],
                f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.`drift.stage` = 'train'",
            )
        }
    assert versions["2"].tags["drift.base_model"].endswith(loop["oracle_dir"].name)
    round2 = registry.get_run(versions["3"].tags["drift.mlflow_parent_run_id"])
    assert round2.data.params["reference_model.path"] == f"models:/{name}/2"


def test_watcher_starts_the_pipeline_when_the_champion_moved(loop, monkeypatch):
    """Round 1 rolled out from ``models:/NAME@champion`` = version 1; the gate moved the alias to
    version 2: the watcher starts drift/full-pipeline, and a second tick finds it in flight."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelled

    from deployments.watcher import watch_reference

    env, name = loop["env"], loop["name"]
    overrides = [o for o in loop["overrides"] if not o.startswith("base_model.")]
    monkeypatch.setenv("PREFECT_API_URL", env["PREFECT_API_URL"])
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        try:
            first = watch_reference(config_path=str(TINY), overrides=overrides)
            second = watch_reference(config_path=str(TINY), overrides=overrides)
        finally:
            APILogHandler().flush()
            EventsWorker.drain_all(timeout=30)
    assert first["decision"] == "started", first
    assert first["fingerprint"] == f"mlflow:{name}/2" and first["last_fingerprint"] == f"mlflow:{name}/1", (
        first
    )
    assert second["decision"] == "already-running" and second["flow_run_id"] == first["flow_run_id"], second
    with prefect_client(env) as client:
        started = client.read_flow_run(first["flow_run_id"])
        assert started.parameters == {"config_path": str(TINY), "overrides": overrides}
        assert started.state.type == StateType.SCHEDULED
        client.set_flow_run_state(started.id, Cancelled(), force=True)  # nothing left queued


def test_loop_runs_to_its_last_round_when_told_to_go_on(tmp_path, prefect_api):
    """``iterate.stop_on_no_promotion: false``: every requested round runs, whatever the gate says,
    and round 2 rolls out from and trains round 1's own model (version 1, pinned). In this process
    against the session's Prefect server, tracking and registry in a sqlite file."""
    from mlflow.tracking import MlflowClient

    from flows.iterate_flow import iterate

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = f"drift-last-{uuid.uuid4().hex[:8]}"
    overrides = [
        f"run.artifact_store={tmp_path / 'artifacts'}",
        f"run.tracking_uri={tracking}",
        f"run.registered_model={name}",
        "iterate.stop_on_no_promotion=false",
        "data.arith.n=4",
        "train.max_steps=1",
        "eval.data.arith.n=2",
    ]
    result = iterate(config_path=str(TINY), overrides=overrides, rounds=2)
    assert [s["round"] for s in result["rounds"]] == [1, 2], result
    assert result["stopped"] == "ran all 2 rounds" and result["registered_model"] == name

    registry = MlflowClient(tracking, registry_uri=tracking)
    versions = {v.version: v for v in registry.search_model_versions(f"name = '{name}'")}
    assert sorted(map(str, versions)) == ["1", "2"], versions
    assert [s["registered"]["version"] for s in result["rounds"]] == ["1", "2"]
    assert str(registry.get_registered_model(name).aliases["challenger"]) == "2"
    round2 = registry.get_run(versions[max(versions, key=int)].tags["drift.mlflow_parent_run_id"])
    assert round2.data.params["reference_model.path"] == f"models:/{name}/1"
    assert round2.data.params["base_model.path"] == f"models:/{name}/1"
    assert "drift.iterate.owner" not in registry.get_registered_model(name).tags  # the guard let go
