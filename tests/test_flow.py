"""The `drift` flow end to end on the tiny config, through the real CLI, against a real Prefect
server and a real MLflow store: stage outputs, tracking, and caching asserted from the task-run
states the Prefect API records (Cached vs Completed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from helpers import (
    STAGE_TASKS,
    drift_cli,
    flow_run_of,
    mlflow_run_id,
    prefect_client,
    raw_task_states,
    states_by_task,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
pytestmark = pytest.mark.timeout(1800)  # five tiny runs; minutes each on a loaded 2-core machine


def task_states(env: dict, tracking_uri: str, run_id: str) -> dict[str, list[str]]:
    """Task-run states of the Prefect flow run behind an MLflow parent run, by task name."""
    return states_by_task(raw_task_states(env, flow_run_of(tracking_uri, run_id)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_answering_dir):
    d = tmp_path_factory.mktemp("flow")
    shutil.copytree(tiny_answering_dir, d / "reference")  # a local reference model we can change
    return d


def test_tiny_pipeline_runs_caches_and_tracks(workdir, prefect_server):
    env = prefect_server
    ref = f"reference_model.path={workdir / 'reference'}"
    tracking = f"sqlite:///{workdir / '.drift' / 'mlflow.db'}"

    # 1. From nothing: every stage computes, and prints the per-turn table and the run id.
    first = drift_cli(["run", str(TINY), "--set", ref], workdir, env, check=True)
    assert "multi@2" in first.stdout and "trained model:" in first.stdout
    run1 = mlflow_run_id(first.stdout)
    states = task_states(env, tracking, run1)
    # task runs named for what they are (docs/operations.md): the stages, then the registry's two
    assert set(states) == STAGE_TASKS | {"register-model", "promote"}, states
    assert all(s == "Completed" for ss in states.values() for s in ss), states
    assert len(states["rollout-shard"]) == 2  # 8 prompts in shards of 4
    # every rollout and evaluation shard records the engine that made its tokens
    shard_engines = [
        json.loads(m.read_text())["meta"].get("engine")
        for m in (workdir / ".drift" / "artifacts").glob("*shard*/*/manifest.json")
    ]
    assert len(shard_engines) == 2 + 1 + 1 and set(shard_engines) == {"transformers"}, shard_engines
    assert {k: len(v) for k, v in states.items() if k != "rollout-shard"} == dict.fromkeys(
        set(states) - {"rollout-shard"}, 1
    ), states  # one run of every other task (4 eval problems: one shard per model)
    # The owner tags (host, pid) mark the flow run, where the next run looks for orphans, and no
    # task run: a tagged task run costs an API call for tag concurrency slots (docs/benchmarks.md).
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with prefect_client(env) as client:
        flow_run = client.read_flow_run(flow_run_of(tracking, run1))
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    assert {t.split(":")[0] for t in flow_run.tags} >= {"drift.host", "drift.pid"}, flow_run.tags
    assert len(task_runs) == len(STAGE_TASKS) + 1 + 2, task_runs  # 2 rollout shards; register, promote
    assert not [
        tr.name for tr in task_runs if any(t.startswith(("drift.host:", "drift.pid:")) for t in tr.tags)
    ]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    parent = client.get_run(run1)
    assert parent.data.params["weights.beta"] == "0.1" and "rollout.k" in parent.data.params
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run1}'"
    )
    by_stage = {c.data.tags["drift.stage"]: c for c in children}
    assert set(by_stage) == {
        "ingest",
        "rollout",
        "weights",
        "train",
        "evaluate-reference",
        "evaluate-trained",
    }
    # one name per quantity: a stage run's metrics are named as on the parent run
    assert (
        "weights.ess_overall" in by_stage["weights"].data.metrics
        and "weights.ess_overall" in parent.data.metrics
    )
    for run_id in (by_stage["train"].info.run_id, run1):
        assert len(client.get_metric_history(run_id, "train.loss")) == 2  # max_steps: 2, by step
    for run_id in (by_stage["evaluate-trained"].info.run_id, run1):
        metrics = client.get_run(run_id).data.metrics  # one metric per turn, no last-value series
        assert {"arith.trained.multi_at_t1", "arith.trained.multi_at_t2"} <= set(metrics)
        assert "arith.trained.multi_at" not in metrics and "arith.trained.accuracy_at_turn" not in metrics
    # stage params carry their section: one name per quantity, no bare "beta" or "artifact"
    assert (
        by_stage["weights"].data.params["weights.beta"] == "0.1"
        and "beta" not in by_stage["weights"].data.params
    )
    assert not [k for k in parent.data.params if k.startswith("online.")]  # a DRIFT run uses none
    assert parent.info.run_name.startswith("tiny-") and by_stage["train"].info.run_name == "train"
    with prefect_client(env) as prefect:  # the Prefect flow run is named as the MLflow run
        assert prefect.read_flow_run(flow_run_of(tracking, run1)).name == parent.info.run_name
    commit = parent.data.tags.get("mlflow.source.git.commit")  # absent outside a git checkout
    assert commit == by_stage["train"].data.tags.get("mlflow.source.git.commit")
    artifacts = {a.path for a in client.list_artifacts(run1)}
    assert {"config.json", "summary.json", "multi_at.png", "weights.png"} <= artifacts

    # The trained model is registered with its lineage; the gate set the challenger alias.
    registry = MlflowClient(tracking, registry_uri=tracking)
    [version] = registry.search_model_versions("name = 'drift-tiny'")
    assert (
        version.tags["drift.mlflow_parent_run_id"] == run1 and version.run_id == by_stage["train"].info.run_id
    )
    assert version.tags["drift.prefect_flow_run_id"] == flow_run_of(tracking, run1)
    assert version.tags["drift.reference_fingerprint"] == parent.data.tags["drift.reference_fingerprint"]
    assert json.loads(version.tags["drift.weights"])["beta"] == 0.1
    assert registry.get_registered_model("drift-tiny").aliases["challenger"] == version.version

    # The gate's decision, by hand from the two evaluations' per-problem records (the same 4
    # problems): the gain is the difference of the solved shares; no gain cannot promote.
    def solved(stage: str) -> dict[str, bool]:
        [uri] = [v for k, v in by_stage[stage].data.params.items() if k.rsplit(".", 1)[-1] == "artifact"]
        df = pl.read_parquet(uri)
        return {
            p: any(c) for p, c in zip(df["prompt_id"].to_list(), df["turn_correct"].to_list(), strict=True)
        }

    reference, trained = solved("evaluate-reference"), solved("evaluate-trained")
    assert set(reference) == set(trained) and len(trained) == 4
    gain = (sum(trained.values()) - sum(reference.values())) / 4
    assert parent.data.metrics["promote.delta"] == pytest.approx(gain)
    promoted = parent.data.metrics["promote.promoted"] == 1.0
    if gain <= 0:  # below min_delta 0, or a zero gain whose interval cannot lie above 0
        assert not promoted, parent.data.tags["drift.promotion"]
    else:  # a gain is promoted exactly when its interval lies above 0
        assert promoted == (parent.data.metrics["promote.ci_low"] > 0), parent.data.metrics
    outcome = "promoted" if promoted else "not promoted"
    assert parent.data.tags["drift.promotion"].startswith(f"{outcome}: "), parent.data.tags["drift.promotion"]
    assert version.tags["drift.promotion"] == outcome
    champion = registry.get_registered_model("drift-tiny").aliases.get("champion")
    assert (str(champion) == str(version.version)) == promoted, champion
    assert (
        "registered model: models:/drift-tiny/1" in first.stdout and "promotion: drift-tiny" in first.stdout
    )

    # 2. Unchanged config: every stage task is served from the cache, and no second version of the
    # same model is registered (register-model and promote talk to the registry: never cached).
    second = drift_cli(["run", str(TINY), "--set", ref], workdir, env, check=True)
    states = task_states(env, tracking, mlflow_run_id(second.stdout))
    stage_states = {k: v for k, v in states.items() if k not in ("register-model", "promote")}
    assert set(stage_states) == STAGE_TASKS, states  # all() over no states would pass
    assert all(s == "Cached" for ss in stage_states.values() for s in ss), states
    assert "models:/drift-tiny/1 (already registered)" in second.stdout
    assert len(registry.search_model_versions("name = 'drift-tiny'")) == 1

    # 3. New beta: weights, train and the trained model's evaluation re-run; nothing upstream does.
    third = drift_cli(["run", str(TINY), "--set", ref, "--set", "weights.beta=0.5"], workdir, env, check=True)
    states = task_states(env, tracking, mlflow_run_id(third.stdout))
    for name in (
        "ingest-train",
        "ingest-eval",
        "rollout-shard",
        "rollout-collect",
        "evaluate-reference-shard",
        "evaluate-reference-summary",
    ):
        assert set(states[name]) == {"Cached"}, (name, states)
    for name in ("weights", "train", "evaluate-trained-shard", "evaluate-trained-summary"):
        assert set(states[name]) == {"Completed"}, (name, states)

    # 4. Reference model changed on disk: everything from rollout on re-runs; ingest does not.
    from safetensors.torch import load_file, save_file

    weights_file = workdir / "reference" / "model.safetensors"
    tensors = load_file(weights_file)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, weights_file, metadata={"format": "pt"})
    fourth = drift_cli(["run", str(TINY), "--set", ref], workdir, env, check=True)
    states = task_states(env, tracking, mlflow_run_id(fourth.stdout))
    assert set(states["ingest-train"]) == set(states["ingest-eval"]) == {"Cached"}, states
    for name in (
        "rollout-shard",
        "rollout-collect",
        "weights",
        "train",
        "evaluate-reference-shard",
        "evaluate-trained-shard",
    ):
        assert set(states[name]) == {"Completed"}, (name, states)
    run4 = mlflow_run_id(fourth.stdout)
    made_fp = parent.data.tags["drift.reference_fingerprint"]
    now_fp = client.get_run(run4).data.tags["drift.reference_fingerprint"]
    assert made_fp != now_fp and "drift.reference_fingerprint_now" not in client.get_run(run4).data.tags

    # 5. Retrain on run 1's rollouts: tagged with the reference that made them (recorded in their
    # manifest), plus the reference as it is now, which is what its reference evaluation used.
    fifth = drift_cli(["run", str(TINY), "--set", ref, "--rollouts-from", run1], workdir, env, check=True)
    run5 = mlflow_run_id(fifth.stdout)
    tags = client.get_run(run5).data.tags
    assert tags["drift.rollouts_from"] == run1
    assert json.loads(tags["drift.rollout_manifest"])["meta"]["reference_fingerprint"] == made_fp
    assert tags["drift.reference_fingerprint"] == made_fp
    assert tags["drift.reference_fingerprint_now"] == now_fp
    by_stage = {
        c.data.tags["drift.stage"]: c
        for c in client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run5}'"
        )
    }
    assert by_stage["rollout"].data.params["rollout.reference_fingerprint"] == made_fp
    assert by_stage["evaluate-reference"].data.params["eval.model_fingerprint"] == now_fp


def test_rollouts_fingerprint_comes_from_what_made_the_rollouts():
    """Manifest meta first; else the source run's tag, following retrain runs to their source
    (their tag may predate the fix); None (tagged ``unknown``) when nothing records it."""
    from types import SimpleNamespace

    from flows.reused_rollouts import rollouts_fingerprint
    from tasks.store import Manifest

    runs = {
        "made": {"drift.reference_fingerprint": "sha256:old"},
        "retrain": {"drift.reference_fingerprint": "sha256:new", "drift.rollouts_from": "made"},
        "loop": {"drift.reference_fingerprint": "sha256:new", "drift.rollouts_from": "loop"},
    }
    client = SimpleNamespace(get_run=lambda rid: SimpleNamespace(data=SimpleNamespace(tags=runs[rid])))
    bare = Manifest(stage="rollout", key="k", uri="u", sha256="s")
    recorded = bare.model_copy(update={"meta": {"reference_fingerprint": "sha256:meta"}})
    assert rollouts_fingerprint("made", recorded, client) == "sha256:meta"
    assert rollouts_fingerprint("made", bare, client) == "sha256:old"
    assert rollouts_fingerprint("retrain", bare, client) == "sha256:old"
    assert rollouts_fingerprint("loop", bare, client) is None
    assert rollouts_fingerprint("gone", bare, client) is None  # get_run raises
    assert rollouts_fingerprint("/x/manifest.json", bare, client) is None


def test_drift_eval_evaluates_any_model_directory(workdir, prefect_server):
    """`drift eval` runs the multi-turn protocol on a model directory and tracks it in MLflow."""
    out = drift_cli(
        [
            "eval",
            "--model",
            str(workdir / "reference"),
            "--config",
            str(TINY),
            "--set",
            "eval.data.arith.n=3",
        ],
        workdir,
        prefect_server,
        check=True,
    )
    assert "| model" in out.stdout and "multi@2" in out.stdout
    import polars as pl
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / '.drift' / 'mlflow.db'}")
    run = client.get_run(mlflow_run_id(out.stdout))
    assert run.data.tags["drift.flow"] == "drift-eval"
    [stage] = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert stage.data.tags["drift.stage"] == "evaluate-model" and stage.info.status == "FINISHED"
    # multi@t from the stage's per-problem records, by hand: problems solved within t turns / all
    records = pl.read_parquet(stage.data.params["eval.artifact"])
    assert records.height == 3
    for t in (1, 2):
        solved = sum(any(c[:t]) for c in records["turn_correct"].to_list()) / records.height
        for r in (run, stage):
            assert r.data.metrics[f"arith.multi_at_t{t}"] == pytest.approx(solved), (t, r.data.metrics)
