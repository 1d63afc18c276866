"""Rollouts made by the DRIFT reference scripts, trained by drift: ``drift run CONFIG
--rollouts-from rollouts.jsonl`` on a file in exactly the format the reference generation script
writes (tests/fixtures/README.md says how it was made)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from helpers import drift_cli, flow_run_of, mlflow_run_id, raw_task_states, states_by_task

from drift_core.schemas import WeightsConfig
from flows import cli_weights
from tasks.reference_rollouts import import_reference_rollouts, reference_rollout_frame
from tasks.store import ArtifactStore, Manifest
from tasks.weights import weigh_rollouts

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "reference_rollouts.jsonl"
TINY = ROOT / "configs" / "tiny.yaml"

# By hand from the fixture (gamma 0.9, lambda 0.5; tests/fixtures/README.md):
#   sample_0/0: t2 right: 0.9; answers ["8", "7"] distinct: no repetition term      R = 0.9
#   sample_0/1: t1 right                                                             R = 1
#   sample_1/0: nothing right, one unparseable turn (-0.1), ["12", "12"]: 0.5 * 1/2  R = -0.35
#   sample_1/1: t1 right ("10 || 12" read as "10" with one action a turn)            R = 1
RETURNS = [0.9, 1.0, -0.35, 1.0]


def _group_weights(returns: list[float], beta: float) -> list[float]:
    ex = [math.exp(r / beta) for r in returns]
    return [e / (sum(ex) / len(ex)) for e in ex]


WEIGHTS = [*_group_weights(RETURNS[:2], 0.1), *_group_weights(RETURNS[2:], 0.1)]


def test_reference_records_become_a_rollout_artifact():
    df = reference_rollout_frame(FIXTURE)
    assert df["prompt_id"].to_list() == ["sample_0", "sample_0", "sample_1", "sample_1"]
    assert df["traj_idx"].to_list() == [0, 1, 0, 1]  # file order within each prompt
    assert df["n_turns"].to_list() == [2, 1, 3, 1]
    assert df["trainable"].to_list() == [True] * 4
    last = [m[-1] for m in df["messages"].to_list()]
    assert [m["role"] for m in last] == ["assistant"] * 4
    assert last[3]["content"] == "<think>x</think><answer>10</answer>"  # the reference's own re-rendering
    # the script's turn rewards: t1..t3 for every record, zeros after the episode ended
    assert df["turn_rewards"].to_list()[0] == [0.0, 1.0, 0.0]


def test_records_without_an_assistant_message_are_weighted_then_left_out(tmp_path):
    recs = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    recs[1]["messages"] = recs[1]["messages"][:2]  # system + user only: weight_sft.py cannot train on it
    recs[0]["messages"].append({"role": "user", "content": "Correct!"})  # after the last assistant
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    store = ArtifactStore(str(tmp_path / "store"))
    rollouts = import_reference_rollouts.fn(str(path), store.url, "k")
    weighted = weigh_rollouts.fn(rollouts, WeightsConfig(gamma=0.9, beta=0.1), store.url, "w")
    out = store.read_parquet(weighted)
    # the dropped record still counts in its group's mean, as in weight_sft.py
    assert out["prompt_id"].to_list() == ["sample_0", "sample_1", "sample_1"]
    np.testing.assert_allclose(out["weight"].to_list(), [WEIGHTS[0], *WEIGHTS[2:]], rtol=1e-9)
    assert out["messages"].to_list()[0][-1]["role"] == "assistant"  # the trailing message is cut
    assert weighted.meta["dropped_untrainable"] == 1


def test_empty_objects_in_every_row_do_not_break_drift_weights(tmp_path, capsys):
    # the reference writes reward_details.tN.info = {} for an unparseable turn; here t1's is {} in
    # every row, which polars reads as a struct without fields, and parquet cannot store that
    rec = json.loads(FIXTURE.read_text().splitlines()[2])
    assert rec["reward_details"]["t1"]["info"] == {}
    recs = [{**rec, "prompt_id": p} for p in ("a", "a", "b")]
    src = tmp_path / "empty.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    parser = cli_weights.argparse.ArgumentParser()
    cli_weights.add_weights_parser(parser.add_subparsers())
    args = parser.parse_args(["weights", str(src), "-o", str(tmp_path / "w.parquet")])
    assert args.func(args) == 0, capsys.readouterr().err
    out = pl.read_parquet(tmp_path / "w.parquet")
    assert out["reward_details"].dtype == pl.String  # the column that holds {} is kept as JSON text
    assert [json.loads(v) for v in out["reward_details"]] == [r["reward_details"] for r in recs]
    assert out["messages"].dtype != pl.String  # the other columns keep their types
    np.testing.assert_allclose(out["return"].to_list(), [-0.35] * 3, rtol=1e-9)


@pytest.mark.timeout(1200)
def test_drift_run_trains_and_evaluates_reference_rollouts(tmp_path, prefect_server, tiny_answering_dir):
    shutil.copy(FIXTURE, tmp_path / "rollouts.jsonl")
    env = prefect_server
    args = [
        "run",
        str(TINY),
        "--set",
        f"reference_model.path={tiny_answering_dir}",
        "--set",
        "train.max_seq_len=512",
        "--rollouts-from",
        "rollouts.jsonl",  # relative to where the user runs drift
    ]
    done = drift_cli(args, tmp_path, env, check=True)
    assert "trained model:" in done.stdout and "multi@2" in done.stdout
    run_id = mlflow_run_id(done.stdout)
    tracking = f"sqlite:///{tmp_path / '.drift' / 'mlflow.db'}"
    states = states_by_task(raw_task_states(env, flow_run_of(tracking, run_id)))
    assert states["rollout-import"] == ["Completed"], states
    assert "rollout-shard" not in states and "ingest-train" not in states  # nothing rolled out
    for name in ("weights", "train", "evaluate-trained-shard", "evaluate-trained-summary"):
        assert set(states[name]) == {"Completed"}, (name, states)
    store = ArtifactStore(str(tmp_path / ".drift" / "artifacts"))
    (found,) = (tmp_path / ".drift" / "artifacts" / "weights").glob("*/manifest.json")
    out = store.read_parquet(Manifest.model_validate_json(found.read_text()))
    np.testing.assert_allclose(out["weight"].to_list(), WEIGHTS, rtol=1e-9)  # the script's weights
    assert out["traj_idx"].to_list() == [0, 1, 0, 1]
