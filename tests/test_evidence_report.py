"""The evidence report (benchmarks/evidence.py, issue 10): the machine-readable summary has the keys
and units the issue fixes, pooled over seeds, with online runs of another length kept apart.

Synthetic per-problem frames on the real eval problems of configs/evidence.yaml, with solved sets
chosen so every figure is computable by hand."""

from __future__ import annotations

import importlib
import sys

import polars as pl
import pytest

from flows.config import load_config
from tasks.ingest import load_problems
from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(120)  # synthetic frames: seconds

T = 3


@pytest.fixture(scope="module")
def evidence():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("evidence")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def prompt_ids(evidence) -> list[str]:
    cfg = load_config(str(ROOT / evidence.CONFIG), [])
    df, _ = load_problems(cfg.eval.data)
    return sorted(df["prompt_id"].to_list())


def frame(ids: list[str], solved_at: dict[int, int]) -> pl.DataFrame:
    """Problem i solved at turn solved_at[i] (1-based), unsolved otherwise; answers '7', '7', '8'
    on unsolved problems (one repeat), distinct otherwise."""
    rows = []
    for i, pid in enumerate(ids):
        turn = solved_at.get(i)
        correct = [turn is not None and t + 1 >= turn for t in range(T)][: turn or T]
        answers = ["7", "7", "8"] if turn is None else [str(j) for j in range(turn)]
        rows.append(
            {"prompt_id": pid, "answers": answers, "normalized_answers": answers, "turn_correct": correct}
        )
    return pl.DataFrame(rows)


def write(evidence, df: pl.DataFrame, tag: str, name: str) -> str:
    return evidence._save_frame(df, tag, name)


def cost(tokens: int, steps: int, wall: float) -> dict:
    return {"generated_tokens": tokens, "optimizer_steps": steps, "wall_s": wall}


def test_summary_pools_seeds_and_keeps_a_longer_online_run_apart(evidence, prompt_ids, tmp_path, monkeypatch):
    monkeypatch.setattr(evidence, "RESULTS", tmp_path)
    monkeypatch.setattr(evidence, "FRAMES", tmp_path / "evidence_frames")
    n = len(prompt_ids)
    assert n == 300
    ref = write(evidence, frame(prompt_ids, {i: 1 for i in range(n) if i % 10 == 0}), "drift-s0", "reference")
    records = [
        {
            "tag": "drift-s0", "system": "drift", "seed": 0,
            "frames": {"reference": ref, "trained": write(
                evidence, frame(prompt_ids, {i: 2 for i in range(n) if i % 5 == 0}), "drift-s0", "trained")},
            "cost": cost(9000, 6, 100.0), "rollout_solved_by_turn_1": 0.104,
        },
        {
            "tag": "drift-s1", "system": "drift", "seed": 1,
            "frames": {"reference": ref, "trained": write(
                evidence, frame(prompt_ids, {i: 3 for i in range(n) if i % 4 == 0}), "drift-s1", "trained")},
            "cost": cost(9000, 6, 300.0),
        },
        {
            "tag": "online_rl-s0", "system": "online_rl", "seed": 0, "optimizer_steps": 12,
            "frames": {"trained": write(
                evidence, frame(prompt_ids, {i: 1 for i in range(n) if i % 10 == 0}), "online_rl-s0", "trained")},
            "cost": cost(15000, 12, 3000.0),
        },
        {
            "tag": "online_rl-24steps-s0", "system": "online_rl", "seed": 0, "optimizer_steps": 24,
            "frames": {"trained": write(
                evidence, frame(prompt_ids, {i: 1 for i in range(n) if i % 2 == 0}), "online_rl-24steps-s0", "trained")},
            "cost": cost(30000, 24, 6000.0),
        },
    ]  # fmt: skip
    table, summary = evidence.report(records, n_boot=400)

    assert set(summary) >= {
        "task",
        "turns",
        "n_eval",
        "question_blind_ceiling",
        "reference_turn1_rollout_acc",
    }
    assert summary["turns"] == T and summary["n_eval"] == 300
    assert summary["gold_distinct_answers"] == 58.0  # 174 distinct golds in the 300 test problems
    assert summary["reference_turn1_rollout_acc"] == 10.4
    systems = summary["systems"]
    assert set(systems) == {"reference", "drift", "online_rl", "online_rl_24steps"}
    # percent units, pooled over seeds: (60 + 75) / 600 problems solved
    assert systems["reference"]["multi_at_T"] == 10.0 and systems["reference"]["seeds"] == 0
    assert systems["drift"]["multi_at_T"] == 22.5 and systems["drift"]["seeds"] == 2
    assert systems["online_rl"]["multi_at_T"] == 10.0 and systems["online_rl"]["seeds"] == 1
    assert systems["online_rl_24steps"]["multi_at_T"] == 50.0
    lo, hi = systems["drift"]["ci"]
    assert lo < 22.5 < hi
    # costs are the mean over seeds; the longer online run keeps its own
    assert systems["drift"]["wall_s"] == 200.0 and systems["drift"]["generated_tokens"] == 9000
    assert systems["online_rl_24steps"]["generated_tokens"] == 30000
    assert systems["online_rl_24steps"]["optimizer_steps"] == 24
    # unsolved problems answer 7, 7, 8: one repeat among three answers
    assert systems["reference"]["repeated"] == pytest.approx(100 * 270 / (270 * 3 + 30 * 1), abs=0.01)
    # answer sequences, both seeds pooled: 240 + 225 of 600 problems answer 7, 7, 8; each seed
    # gives 2 distinct sequences over 300 problems
    assert systems["drift"]["top_sequence"] == ["7", "7", "8"]
    assert systems["drift"]["top_sequence_share"] == 77.5
    assert systems["drift"]["distinct_sequences"] == round(100 * 2 / 300, 2)
    assert systems["reference"]["top_sequence_share"] == 90.0
    # paired: per problem, DRIFT's seeds averaged, minus the other system
    paired = summary["paired"]
    assert paired["drift-reference"][0] == 12.5
    assert paired["drift-online_rl"][0] == 12.5
    assert paired["drift-online_rl_24steps"][0] == -27.5
    d, lo, hi = paired["drift-online_rl_24steps"]
    assert lo < d < hi < 0
    assert "drift-uniform" not in paired  # no uniform run: no invented figure
    assert "| online_rl_24steps | 1 |" in table
    assert table.index("| online_rl |") < table.index("| online_rl_24steps |")


def test_answer_sequences_are_read_as_the_verifier_reads_them(evidence):
    """ "48 + 69 = 97" and "97" are one answer: a guesser that sometimes writes the equation is still
    one guess; two problems with different answers are two sequences."""
    df = pl.DataFrame(
        {
            "answers": [["1 + 1 = 10", "11"], ["10", "2 + 9 = 11"], ["5", "6"], ["10", "11"]],
            "normalized_answers": [["10", "11"], ["10", "11"], ["5", "6"], ["10", "11"]],
        }
    )
    share, top, distinct = evidence.answer_sequences([df])
    assert (share, top, distinct) == (0.75, ["10", "11"], 0.5)
    share, top, distinct = evidence.answer_sequences([df, df.head(2)])  # pooled share, mean distinct
    assert (share, top, distinct) == (5 / 6, ["10", "11"], 0.5)


def test_online_runs_are_named_by_their_length(evidence):
    assert evidence.online_tag(0, evidence.V2_ONLINE_STEPS) == "online_rl-s0"
    assert evidence.online_system(evidence.V2_ONLINE_STEPS) == "online_rl"
    assert evidence.online_tag(1, 24) == "online_rl-24steps-s1"
    assert evidence.online_system(24) == "online_rl_24steps"


def test_the_ablation_is_paired_with_drift_and_success_only(evidence, prompt_ids, tmp_path, monkeypatch):
    """DRIFT with its unsolved groups dropped is compared per problem with the reference, DRIFT and
    success_only (uniform has no run here: no figure for it)."""
    monkeypatch.setattr(evidence, "RESULTS", tmp_path)
    monkeypatch.setattr(evidence, "FRAMES", tmp_path / "evidence_frames")
    n = len(prompt_ids)
    ref = write(evidence, frame(prompt_ids, {}), "drift-s0", "reference")
    solved_every = {"drift": 5, "drift_solved_groups": 4, "success_only": 2}  # 60, 75, 150 problems
    records = [
        {
            "tag": f"{name}-s0", "system": name, "seed": 0,
            "frames": {"reference": ref, "trained": write(
                evidence, frame(prompt_ids, {i: 1 for i in range(n) if i % k == 0}), f"{name}-s0", "trained")},
            "cost": cost(9000, 6, 100.0),
        }
        for name, k in solved_every.items()
    ]  # fmt: skip
    table, summary = evidence.report(records, n_boot=400)
    assert summary["systems"]["drift_solved_groups"]["multi_at_T"] == 25.0
    paired = summary["paired"]
    assert paired["drift_solved_groups-reference"][0] == 25.0  # the reference solves nothing here
    assert paired["drift_solved_groups-drift"][0] == 5.0  # (75 - 60) / 300
    assert paired["drift_solved_groups-success_only"][0] == -25.0  # (75 - 150) / 300
    assert "drift_solved_groups-uniform" not in paired
    assert "- drift_solved_groups − success_only: -25.0" in table
    assert table.index("| success_only |") < table.index("| drift_solved_groups |")


def test_feedback_summary_has_the_issue_schema_and_hand_computed_values(
    evidence, prompt_ids, tmp_path, monkeypatch
):
    """Issue 30's feedback_summary.json on the direction setting: percent units, seeds pooled for
    multi@t, fixed after feedback = multi@T - multi@1, paired differences per problem (seeds
    averaged), the question-blind ceiling of direction feedback (2**T - 1 guesses) and the
    reference rollouts' corrections (solved by turn T - solved at turn 1)."""
    from collections import Counter

    monkeypatch.setattr(evidence, "RESULTS", tmp_path)
    monkeypatch.setattr(evidence, "FRAMES", tmp_path / "evidence_frames")
    n = len(prompt_ids)
    ref = write(evidence, frame(prompt_ids, {i: 1 for i in range(n) if i % 10 == 0}), "d-s0", "reference")

    def rec(system: str, seed: int, solved_at: dict[int, int], rollouts: str = "direction") -> dict:
        tag = f"{system}-{rollouts}-s{seed}"
        trained = write(evidence, frame(prompt_ids, solved_at), tag, "trained")
        return {
            "tag": tag, "system": system, "seed": seed, "rollouts": rollouts,
            "frames": {"reference": ref, "trained": trained}, "cost": cost(9000, 24, 100.0),
        }  # fmt: skip

    records = [
        rec("drift", 0, {i: 2 for i in range(n) if i % 5 == 0})  # 60 problems, all after feedback
        | {
            "rollout_solved_by_turn_1": 0.05,
            "rollout_solved_by_turn_3": 0.0575,
            "weights": {"ess_overall": 139.1},
        },
        rec("drift", 1, {i: 3 for i in range(n) if i % 4 == 0}),  # 75, all at turn 3
        rec("success_only", 0, {i: 1 for i in range(n) if i % 3 == 0}),  # 100, all at turn 1
        rec("drift", 0, {}, rollouts="k16"),  # another rollout setting: not in this summary
    ]
    summary = evidence.feedback_summary(records, "direction", n_boot=400)

    assert {"task", "feedback", "turns", "n_eval", "question_blind_ceiling", "reference_rollout_corrections",
            "systems", "paired"} <= set(summary)  # fmt: skip
    assert summary["feedback"] == "direction" and summary["turns"] == 3 and summary["n_eval"] == 300
    cfg = load_config(str(ROOT / evidence.CONFIG), [])
    golds = load_problems(cfg.eval.data)[0]["gold"].to_list()
    top7 = sum(c for _, c in Counter(golds).most_common(7))  # a binary search over 7 values
    assert summary["question_blind_ceiling"] == round(100 * top7 / 300, 2)
    assert summary["reference_rollout_corrections"] == pytest.approx(0.75)
    systems = summary["systems"]
    assert set(systems) == {"reference", "drift", "success_only"}  # no uniform run: none invented
    assert {k: systems["reference"][k] for k in ("seeds", "multi_at_1", "multi_at_T", "fixed_after_feedback")} == {
        "seeds": 0, "multi_at_1": 10.0, "multi_at_T": 10.0, "fixed_after_feedback": 0.0}  # fmt: skip
    assert {k: systems["drift"][k] for k in ("seeds", "multi_at_1", "multi_at_T", "fixed_after_feedback")} == {
        "seeds": 2, "multi_at_1": 0.0, "multi_at_T": 22.5, "fixed_after_feedback": 22.5}  # fmt: skip
    assert (
        systems["success_only"]["multi_at_T"] == 33.33
        and systems["success_only"]["fixed_after_feedback"] == 0.0
    )
    lo, hi = systems["drift"]["ci"]
    assert lo < 22.5 < hi
    paired = summary["paired"]
    assert set(paired) == {"drift-reference", "drift-success_only", "drift-reference_fixed"}
    assert paired["drift-reference"][0] == 12.5  # (60 + 75) / 2 / 300 - 30 / 300
    assert paired["drift-success_only"][0] == round(100 * (67.5 - 100) / 300, 2)
    assert paired["drift-reference_fixed"][0] == 22.5
    d, lo, hi = paired["drift-reference_fixed"]
    assert 0 < lo < d < hi
    assert summary["fixed_after_feedback_by_seed"]["drift"] == [20.0, 25.0]
    assert summary["drift_weights"] == {"ess_overall": 139.1}
    # turn 2 after a wrong number: the reference repeats 7 after 7 (270 problems, none changed);
    # DRIFT's fixed problems go 0 -> 1, toward the gold exactly when the gold is above 0
    moved = summary["turn_2_after_a_wrong_number"]
    gold_of = dict(zip(load_problems(cfg.eval.data)[0]["prompt_id"].to_list(), golds, strict=True))
    seven = [p for i, p in enumerate(prompt_ids) if i % 10 and gold_of[p] != "7"]  # 7 is no feedback
    above = sum(float(gold_of[p]) > 7 for p in seven)  # told "larger" after 7
    none = {"toward_gold": None, "closer": None, "overshot": None,
            "counts": {"changed": 0, "toward_gold": 0, "closer": 0, "overshot": 0}}  # fmt: skip
    assert moved["reference"] == {
        "problems": len(seven), "changed": 0.0, **none,
        "told_larger": {"problems": above, "changed": 0.0, **none},
        "told_smaller": {"problems": len(seven) - above, "changed": 0.0, **none},
    }  # fmt: skip
    # DRIFT's fixed problems go 0 -> 1: toward the gold exactly when it was told "larger"
    fixed = [p for i, p in enumerate(prompt_ids) if i % 5 == 0] + [
        p for i, p in enumerate(prompt_ids) if i % 4 == 0
    ]
    up = sum(float(gold_of[p]) > 0 for p in fixed)
    larger, smaller = moved["drift"]["told_larger"], moved["drift"]["told_smaller"]
    assert larger["toward_gold"] == 100.0 and round(larger["changed"] * larger["problems"] / 100) == up
    assert smaller["toward_gold"] == 0.0 and round(smaller["changed"] * smaller["problems"] / 100) == 135 - up
    # per seed: the pooled counts split by seed, without the larger/smaller split
    by_seed = summary["turn_2_after_a_wrong_number_by_seed"]
    assert [len(by_seed[k]) for k in ("reference", "drift", "success_only")] == [1, 2, 1]
    assert by_seed["reference"][0] == {
        k: v for k, v in moved["reference"].items() if not k.startswith("told_")
    }
    for key in ("changed", "toward_gold", "closer", "overshot"):
        assert sum(s["counts"][key] for s in by_seed["drift"]) == moved["drift"]["counts"][key]
    assert sum(s["problems"] for s in by_seed["drift"]) == moved["drift"]["problems"]


def test_moved_as_told_counts_closer_and_overshot_changes_by_hand(evidence):
    """Gold 10 everywhere. From 4 (told "larger"): 7 is closer; 13 overshoots yet ends closer (3 < 6);
    20 overshoots and ends farther; 2 goes the wrong way; 4 repeats. From 15 (told "smaller"): 10
    lands on the gold (closer, no overshoot). Left out: right at turn 1, no number at turn 1 or 2."""
    rows = [
        ("p1", ["4", "7"], [False, False]),
        ("p2", ["4", "13"], [False, False]),
        ("p3", ["4", "20"], [False, False]),
        ("p4", ["4", "2"], [False, False]),
        ("p5", ["4", "4"], [False, False]),
        ("p6", ["15", "10"], [False, True]),
        ("p7", ["10", "10"], [True, True]),
        ("p8", [None, "9"], [False, False]),
        ("p9", ["4", "x"], [False, False]),
    ]
    df = pl.DataFrame(
        [{"prompt_id": p, "normalized_answers": a, "turn_correct": c} for p, a, c in rows],
        schema={
            "prompt_id": pl.String,
            "normalized_answers": pl.List(pl.String),
            "turn_correct": pl.List(pl.Boolean),
        },
    )
    moved = evidence.moved_as_told(df, {p: "10" for p, _, _ in rows})
    # 6 problems, 5 changes: 4 the told way (p1, p2, p3, p6), 3 closer (p1, p2, p6), 2 overshoot (p2, p3)
    assert {k: moved[k] for k in ("problems", "changed", "toward_gold", "closer", "overshot", "counts")} == {
        "problems": 6, "changed": 83.33, "toward_gold": 80.0, "closer": 60.0, "overshot": 40.0,
        "counts": {"changed": 5, "toward_gold": 4, "closer": 3, "overshot": 2},
    }  # fmt: skip
    assert moved["told_larger"] == {
        "problems": 5, "changed": 80.0, "toward_gold": 75.0, "closer": 50.0, "overshot": 50.0,
        "counts": {"changed": 4, "toward_gold": 3, "closer": 2, "overshot": 2},
    }  # fmt: skip
    assert moved["told_smaller"] == {
        "problems": 1, "changed": 100.0, "toward_gold": 100.0, "closer": 100.0, "overshot": 0.0,
        "counts": {"changed": 1, "toward_gold": 1, "closer": 1, "overshot": 0},
    }  # fmt: skip
