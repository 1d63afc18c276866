"""flows/stages.py: a stage is one call. ``StageRunner.stage`` opens the stage's MLflow run, runs its
shards and its task (or serves them from cache), verifies the artifact and records it; these tests
run it in a real flow against the session's Prefect server and a real MLflow store."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from helpers import (
    STAGE_TASKS,
    drift_cli,
    flow_run_of,
    mlflow_run_id,
    prefect_client,
    raw_task_states,
    states_by_task,
    write_jsonl,
)
from prefect import task

from drift_core.schemas import DriftConfig
from tasks.caching import stage_key
from tasks.store import ArtifactStore, Manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# flow runs against the session's Prefect server; drift runs killed and resumed
pytestmark = pytest.mark.timeout(900)


@task(name="numbers-shard")
def numbers_shard(
    problems: Manifest, shard: int, start: int, stop: int, key: str, store_root: str
) -> Manifest:
    """A shard: the numbers start..stop-1 of its range."""
    store = ArtifactStore(store_root)
    return store.write_parquet(pl.DataFrame({"n": list(range(start, stop))}), "numbers-shard", key)


@task(name="numbers-join")
def numbers_join(shards: list[Manifest], key: str, store_root: str) -> Manifest:
    """The join: every shard's numbers, their total in the manifest's meta."""
    store = ArtifactStore(store_root)
    table = pl.concat([store.read_parquet(m) for m in shards])
    return store.write_parquet(table, "numbers", key, meta={"total": int(table["n"].sum())})


def _config(tmp_path: Path) -> DriftConfig:
    return DriftConfig.model_validate(
        {"run": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "stages-test"}}
    )


def _one_flow_run(tmp_path: Path) -> tuple[Manifest, dict, str]:
    """A flow with one sharded stage, recorded; its manifest, the runner's states and the MLflow run."""
    from prefect import flow

    from flows.stages import Record, Shards, StageRunner, sharded_calls
    from tasks.tracking import Tracker

    store_root = str(tmp_path / "store")
    problems = Manifest(stage="problems", key="k", uri="-", sha256="-", rows=10)

    @flow(name="stages-test", persist_result=False)
    def one_run() -> tuple[Manifest, dict, str]:
        tracker = Tracker(_config(tmp_path))
        stages = StageRunner(ArtifactStore(store_root), tracker=tracker)
        base = stage_key("numbers", what="0..9")
        calls = sharded_calls("numbers-shard", problems, 4, base, {"store_root": store_root})
        manifest = stages.stage(
            "numbers",
            numbers_join,
            shards=Shards(numbers_shard, calls, base, "numbers"),
            record=Record({"what": "0..9"}),
            store_root=store_root,
        )
        tracker.finish()
        return manifest, stages.states, tracker.run_id

    return one_run()


def test_a_sharded_stage_is_one_call_run_verified_and_recorded(prefect_api, tmp_path):
    from mlflow.tracking import MlflowClient

    manifest, states, parent = _one_flow_run(tmp_path)
    assert manifest.meta["total"] == sum(range(10)) and manifest.rows == 10
    assert states["numbers"] == ["Completed"] * 4  # three shards (4, 4, 2 problems), then the join
    # the joined key holds the shards' keys, never their content
    shard_keys = [
        stage_key("numbers-shard", base=stage_key("numbers", what="0..9"), start=s, stop=min(s + 4, 10))
        for s in (0, 4, 8)
    ]
    assert manifest.key == stage_key("numbers", base=stage_key("numbers", what="0..9"), shards=shard_keys)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [child] = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert child.info.run_name == "numbers" and child.info.status == "FINISHED"
    assert child.data.tags["drift.cached"] == "false"
    assert child.data.params["numbers.what"] == "0..9"  # the stage's section prefixes its params
    assert child.data.params["numbers.artifact"] == manifest.uri
    assert child.data.params["numbers.sha256"] == manifest.sha256
    # one name per quantity, on the stage run and on the parent run
    for run in (child, client.get_run(parent)):
        assert run.data.metrics["numbers.total"] == sum(range(10))
        assert run.data.metrics["numbers.rows"] == 10
        assert "numbers.stage_seconds" in run.data.metrics


def test_a_stage_run_again_is_served_from_cache_and_says_so(prefect_api, tmp_path):
    from mlflow.tracking import MlflowClient

    first, _, _ = _one_flow_run(tmp_path)
    again, states, parent = _one_flow_run(tmp_path)
    assert again.sha256 == first.sha256
    assert states["numbers"] == ["Cached"] * 4
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [child] = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert child.data.tags["drift.cached"] == "true"


def test_stage_needs_a_tracker_but_run_does_not(tmp_path):
    from flows.stages import StageRunner

    stages = StageRunner(ArtifactStore(str(tmp_path)))
    with pytest.raises(AssertionError, match="needs a tracker"):
        stages.stage("numbers", numbers_join, shards=None, store_root=str(tmp_path), key="k")


def test_task_run_names_say_what_and_for_which_data():
    from flows.stages import task_run_name

    assert task_run_name("ingest", "ingest") == "ingest-train"
    assert task_run_name("ingest-eval", "ingest") == "ingest-eval"
    assert task_run_name("rollout", "collect-rollouts") == "rollout-collect"
    assert task_run_name("evaluate-trained", "summarize-eval") == "evaluate-trained-summary"
    assert task_run_name("weights", "weights") == "weights"


def test_shards_cover_the_problems_once_each_with_their_own_keys():
    from flows.stages import sharded_calls

    problems = Manifest(stage="problems", key="k", uri="-", sha256="-", rows=10)
    calls = sharded_calls("s", problems, 4, "base", {"x": 1})
    assert [(c["start"], c["stop"], c["shard"]) for c in calls] == [(0, 4, 0), (4, 8, 1), (8, 10, 2)]
    assert len({c["key"] for c in calls}) == 3 and all(
        c["x"] == 1 and c["problems"] == problems for c in calls
    )


# sentinel secrets, in values drift reads (a URL's password in the config file, and in a `--set`
# override): they must never reach a tracked run
URL_PASSWORD = "SENTINEL_url_password_9e0a"
SET_PASSWORD = "SENTINEL_set_password_31f7"
SET_DASK_ADDRESS = f"run.dask_address=tcp://drift:{SET_PASSWORD}@127.0.0.1:8787"


def task_runs(env: dict, tracking_uri: str, run_id: str) -> dict[str, list[str]]:
    """Task-run states (by task-run name) of the Prefect flow run behind an MLflow parent run."""
    return raw_task_states(env, flow_run_of(tracking_uri, run_id))


def by_task(states: dict[str, list[str]], task: str) -> list[str]:
    """States of every run of one task (``rollout-shard-0``, ``rollout-shard-1``, ... together)."""
    pattern = re.compile(rf"{re.escape(task)}(-(\d+|[0-9a-f]{{3,}}))?$")
    return sorted(s for name, ss in states.items() if pattern.fullmatch(name) for s in ss)


# ============================================================================================
# 2 + 3. SIGKILL mid-rollout, resume, corrupt artifacts; JSON results, no secrets
# ============================================================================================

K = 2
N_PROMPTS = 16
SHARD = 4


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, prefect_server):
    """``drift run`` SIGKILLed once its first rollout shard is stored, then run again.

    Data: 16 arithmetic problems in a JSONL file with two bad records (skipped, on_bad_rows=skip),
    K=2, shards of 4 prompts run one at a time (Prefect's thread pool set to one worker). The
    config holds a URL with a sentinel password; the second run overrides it with `--set` (another).
    """
    from drift_core.schemas import ArithConfig
    from tasks.ingest import generate_arith

    d = tmp_path_factory.mktemp("resume")
    problems = [{"question": q, "answer": a} for q, a in generate_arith(ArithConfig(n=N_PROMPTS, digits=1))]
    data = write_jsonl(
        d / "problems.jsonl",
        problems,
        raw_lines={5: '{"question": "What is 1 +', 9: '{"question": "", "answer": "3"}'},
    )
    config = yaml.safe_load(TINY.read_text())
    config["data"] = {"source": str(data), "on_bad_rows": "skip"}
    config["rollout"].update(k=K, shard_size=SHARD)
    config["rollout"]["sampling"]["max_new_tokens"] = 16
    store, tracking = d / "store", f"sqlite:///{d / 'mlflow.db'}"
    config["run"].update(
        artifact_store=str(store),
        tracking_uri=tracking,
        dask_address=f"tcp://drift:{URL_PASSWORD}@127.0.0.1:8786",  # unused by the threads runner
    )
    config_path = d / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {
        **prefect_server,
        "PYTHONPATH": str(ROOT),
        "PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS": "1",
    }

    # run 1: killed as soon as the first shard's manifest is in the store
    log = open(d / "killed-run.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(config_path)],
        cwd=d,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # No wall-clock budget of its own: how long the first shard takes depends on the machine's load
    # (a 400 s budget fired on a 2-core box shared by other jobs). A run that dies is caught here,
    # a run that hangs by the module's pytest timeout.
    try:
        while not list(store.glob("rollout-shard/*/manifest.json")):
            assert proc.poll() is None, (d / "killed-run.log").read_text()[-3000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its grading workers, if still there
        log.close()

    # what the kill left: complete, verified shards, and no partial file at any artifact's name.
    # A shard is finished when its manifest is there (the store's record, written last); a data
    # file without one (killed between the two renames) is an unfinished shard, run again.
    from tasks.store import ArtifactStore, Manifest

    s = ArtifactStore(str(store))
    # the training problems' ingest (the store also holds the eval set's): the one with our prompt ids
    tables = [pl.read_parquet(p)["prompt_id"].to_list() for p in sorted(store.glob("ingest/*/data.parquet"))]
    (order,) = [ids for ids in tables if ids and ids[0].startswith("problems-")]
    finished = set()
    for key_dir in store.glob("rollout-shard/*"):
        files = {p.name for p in key_dir.iterdir() if not p.name.startswith(".")}
        assert files in (set(), {"data.parquet"}, {"data.parquet", "manifest.json"}), files
        if "manifest.json" in files:
            manifest = Manifest.model_validate_json((key_dir / "manifest.json").read_text())
            assert s.verify(manifest)
            first = s.read_parquet(manifest)["prompt_id"][0]
            finished.add(order.index(first) // SHARD)
    assert 1 <= len(finished) < N_PROMPTS // SHARD, f"kill came too late to test resuming: {finished}"

    # run 2: the same command again, with a `--set` (which only changes an unused address)
    second = drift_cli(["run", str(config_path), "--set", SET_DASK_ADDRESS], d, env)
    assert second.returncode == 0, second.stderr[-5000:]
    run_id = mlflow_run_id(second.stdout)
    return {
        "dir": d,
        "store": store,
        "tracking": tracking,
        "env": env,
        "config": config_path,
        "finished_at_kill": finished,
        "killed_pid": proc.pid,
        "run_id": run_id,
        "states": task_runs(prefect_server, tracking, run_id),
    }


@pytest.mark.slow
def test_sigkill_mid_rollout_resumes_finished_shards(resumed):
    """Every shard finished before the kill is Cached on the rerun, whether or not the kill came
    before Prefect wrote its own record (the store decides, tasks.caching); the rest Completed."""
    states = resumed["states"]
    print("finished at kill:", sorted(resumed["finished_at_kill"]), "second run:", states)
    shard_states = {
        int(name.rsplit("-", 1)[1]): ss for name, ss in states.items() if name.startswith("rollout-shard-")
    }
    assert sorted(shard_states) == list(range(N_PROMPTS // SHARD))
    for shard, ss in shard_states.items():
        want = "Cached" if shard in resumed["finished_at_kill"] else "Completed"
        assert ss == [want], (shard, ss, resumed["finished_at_kill"])

    # exactly K trajectories per prompt, none duplicated, every prompt present
    (collected,) = resumed["store"].glob("rollout/*/data.parquet")
    df = pl.read_parquet(collected)
    assert df.height == N_PROMPTS * K
    per_prompt = df.group_by("prompt_id").agg(pl.col("traj_idx").sort())
    assert per_prompt.height == N_PROMPTS
    assert all(idx == list(range(K)) for idx in per_prompt["traj_idx"].to_list())
    assert df.select("prompt_id", "traj_idx").is_duplicated().sum() == 0


@pytest.mark.slow
def test_the_killed_run_is_marked_crashed_by_the_next_one(resumed, prefect_server):
    """SIGKILL leaves the first run's Prefect flow run Running and its MLflow runs RUNNING; the
    second `drift run` on this host marks them Crashed / KILLED (their process is gone)."""
    from mlflow.tracking import MlflowClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    pid = resumed["killed_pid"]
    with prefect_client(prefect_server) as client:
        (killed,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"drift.pid:{pid}"]))
        )
    assert killed.state.type.value == "CRASHED", killed.state
    assert f"process {pid} on" in killed.state.message

    client = MlflowClient(resumed["tracking"])
    experiment = client.get_run(resumed["run_id"]).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`drift.pid` = '{pid}'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED", parent.info
    assert parent.data.tags["drift.closed_reason"].startswith(f"process {pid} on")
    # the stage that ended before the kill (ingest) stays FINISHED; the one it interrupted
    # (rollout: killed after its first shard) is KILLED too; no later stage had started
    stages = {r.data.tags["drift.stage"]: r.info.status for r in runs if r is not parent}
    assert stages == {"ingest": "FINISHED", "rollout": "KILLED"}, stages
    assert client.get_run(resumed["run_id"]).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_mid_rollout_stops_generation_at_once(tmp_path, prefect_server, sig):
    """Ctrl-C (SIGINT) or SIGTERM (a Prefect worker's cancel, a pod's stop, ``kill``) while a rollout
    shard generates in a worker thread: the run ends within seconds, before that shard's first turn
    is done, and leaves no shard artifact. Before, the main thread's untimed wait only saw the signal
    once the shard had finished all its turns (65 s for this shard's smaller twin, 75 s for Ctrl-C)."""
    config = yaml.safe_load(TINY.read_text())
    config["rollout"].update(k=16, shard_size=8)  # one shard of 8 prompts x 16 trajectories
    config["rollout"]["sampling"]["max_new_tokens"] = 600  # turn 1 alone: minutes on a CPU
    config["protocol"]["max_turns"] = 3
    store = tmp_path / "store"
    config["run"].update(artifact_store=str(store), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", str(config_path)],
            cwd=tmp_path,
            env={**prefect_server, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while "rollout-shard 0:" not in log_path.read_text():  # the shard's progress bar: generating
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(1.0)
        os.kill(proc.pid, sig)
        sent = time.monotonic()
        code = proc.wait(timeout=60)  # the old code: still generating (the shard needs minutes)
        waited = time.monotonic() - sent
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text()
    print(f"{sig.name}: exit {code} after {waited:.1f} s")
    # Ctrl-C: the CLI's exit status 130; SIGTERM: Prefect re-raises it with the default handler
    assert code == (130 if sig == signal.SIGINT else -signal.SIGTERM), text[-3000:]
    # within seconds: measured 0.7-3.2 s (docs/reliability.md); the old untimed wait took 65-75 s
    assert waited < 20, f"{sig.name}: the run took {waited:.1f} s to end"
    assert "128/128" not in text, "turn 1 of the shard finished after the signal"
    assert not list(store.glob("rollout-shard/*/manifest.json")), "an interrupted shard was recorded"


@pytest.mark.slow
def test_skipped_rows_are_counted_in_the_manifest_and_mlflow(resumed):
    from mlflow.tracking import MlflowClient

    (manifest_file,) = [
        p for p in resumed["store"].glob("ingest/*/manifest.json") if "problems" in p.read_text()
    ]
    meta = json.loads(manifest_file.read_text())["meta"]
    assert meta["rows_read"] == N_PROMPTS + 2 and meta["rows_skipped"] == 2
    assert any("line 6: malformed JSON" in e for e in meta["skipped_examples"])
    assert any("line 10: empty question" in e for e in meta["skipped_examples"])
    client = MlflowClient(resumed["tracking"])
    parent = client.get_run(resumed["run_id"])
    assert parent.data.metrics["ingest.rows_skipped"] == 2
    (ingest_run,) = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{resumed['run_id']}' and tags.`drift.stage` = 'ingest'",
    )
    assert ingest_run.data.metrics["ingest.rows_skipped"] == 2  # the parent's name for it


@pytest.mark.slow
def test_prefect_results_are_json_not_pickles(resumed):
    files = sorted((resumed["store"] / "prefect-results").iterdir())
    assert len(files) >= 8  # ingest x2, 4 shards, collect, weights, train, eval ...
    for path in files:
        raw = path.read_bytes()
        assert not raw.startswith(b"\x80"), f"{path.name} is a pickle"
        record = json.loads(raw)
        assert record["metadata"]["serializer"]["type"] == "json", path.name
        result = json.loads(record["result"])  # the result itself is JSON too: a small manifest
        assert result["__class__"] == "tasks.store.Manifest" and "sha256" in result["data"], path.name


@pytest.mark.slow
def test_no_secret_reaches_mlflow_or_prefect(resumed, tmp_path):
    """A password in a config URL reaches neither MLflow nor Prefect; one given with `--set`
    reaches no MLflow run but is a Prefect flow-run parameter as typed (docs/reliability.md)."""
    from mlflow.tracking import MlflowClient

    secrets = (URL_PASSWORD, SET_PASSWORD)
    client = MlflowClient(resumed["tracking"])
    parent = client.get_run(resumed["run_id"])
    killed = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`drift.pid` = '{resumed['killed_pid']}'"
    )
    # both were read: the run's address is the --set one, the killed run's the file's; logged masked
    assert parent.data.params["run.dask_address"] == "tcp://***@127.0.0.1:8787"
    (killed_parent,) = [r for r in killed if "mlflow.parentRunId" not in r.data.tags]
    assert killed_parent.data.params["run.dask_address"] == "tcp://***@127.0.0.1:8786"
    runs = client.search_runs([parent.info.experiment_id])  # the killed run and the resumed one
    assert len(runs) >= 2 + 6
    n_files = 0
    for run in runs:
        tracked = json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics)])
        assert not any(s in tracked for s in secrets), run.info.run_name
        (tmp_path / run.info.run_id).mkdir()
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        for file in (p for p in local.rglob("*") if p.is_file()):
            data, n_files = file.read_bytes(), n_files + 1
            assert not any(s.encode() in data for s in secrets), (run.info.run_name, file.name)
    print(f"checked {len(runs)} MLflow runs, {n_files} artifact files")
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    with prefect_client(resumed["env"]) as prefect:
        parameters = prefect.read_flow_run(flow_run_id).parameters
    assert URL_PASSWORD not in json.dumps(parameters)  # the file's content is no parameter
    assert parameters["overrides"] == [SET_DASK_ADDRESS]  # `--set` strings are, as given


#: the stage tasks after ingest and the rollout shards (register-model and promote talk to the
#: registry: never cached)
DOWNSTREAM_OF_ROLLOUT_SHARDS = sorted(STAGE_TASKS - {"ingest-train", "ingest-eval", "rollout-shard"})


@pytest.mark.slow
def test_corrupt_cached_artifacts_are_recomputed_not_used(resumed):
    """Truncate the problems parquet and flip bytes in one rollout shard: the next run finds the
    cached manifests, fails their hash check and recomputes exactly those two tasks."""
    from tasks.store import ArtifactStore, Manifest

    store = resumed["store"]
    (problems,) = [p.parent for p in store.glob("ingest/*/manifest.json") if "problems" in p.read_text()]
    data = problems / "data.parquet"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    shard = sorted(store.glob("rollout-shard/*/data.parquet"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))

    third = drift_cli(["run", str(resumed["config"])], resumed["dir"], resumed["env"])
    assert third.returncode == 0, third.stderr[-5000:]
    states = task_runs(resumed["env"], resumed["tracking"], mlflow_run_id(third.stdout))
    print("after corrupting two artifacts:", states)
    # Prefect's record: the cached run of each corrupt task, then its recompute
    assert by_task(states, "ingest-train").count("Completed") == 1, states
    assert by_task(states, "rollout-shard") == ["Cached"] * 4 + ["Completed"], states
    # same content, same hashes downstream: every later stage is served from the cache
    for name in DOWNSTREAM_OF_ROLLOUT_SHARDS:
        assert by_task(states, name) and set(by_task(states, name)) == {"Cached"}, (name, states)
    assert by_task(states, "ingest-eval") == ["Cached"], states  # the eval problems were not touched
    tasks = set(states_by_task(states)) - {"register-model", "promote"}
    assert tasks == {"ingest-train", "ingest-eval", "rollout-shard", *DOWNSTREAM_OF_ROLLOUT_SHARDS}, states
    assert "cached artifact" in third.stderr and "failed its hash check; recomputing" in third.stderr
    s = ArtifactStore(str(store))
    for manifest_file in store.glob("*/*/manifest.json"):
        assert s.verify(Manifest.model_validate_json(manifest_file.read_text())), manifest_file
