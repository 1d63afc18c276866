"""builtin:guess (issue 40): the guessing game's problems and splits, its config errors, the
question-blind ceiling the results table prints for it, direction feedback on its games, and the
per-trajectory move/consistency counts (drift_core.metrics.feedback_moves)."""

from __future__ import annotations

from types import SimpleNamespace

import polars as pl
import pytest

from drift_core.metrics import FeedbackMoves, feedback_moves
from drift_core.protocol import Episode, grade_turn
from drift_core.schemas import DataConfig, GuessConfig, ProtocolConfig
from drift_core.verify import NumericVerifier, resolve_kind
from tasks.ingest import (
    IngestError,
    generate_guess,
    guess_secrets,
    ingest_key,
    load_problems,
    source_identity,
)

QUESTION = "I am thinking of a whole number from 1 to 64. Guess it."


def guess(split: str = "train", **kw) -> DataConfig:
    return DataConfig(source="builtin:guess", split=split, guess=GuessConfig(**kw))


# --------------------------------------------------------------------------------------------
# Problems and splits
# --------------------------------------------------------------------------------------------


def test_a_game_is_the_ranges_question_with_its_secret_as_gold():
    df, report = load_problems(guess(n=5))
    assert df.columns == ["prompt_id", "question", "gold", "source"]
    assert df["question"].to_list() == [QUESTION] * 5
    assert df["prompt_id"].to_list() == [f"guess-0-train-{i}" for i in range(5)]
    assert set(df["source"]) == {"builtin:guess"}
    assert report.rows_read == report.rows_kept == 5
    secrets = guess_secrets(GuessConfig(), "train")
    assert all(int(g) in secrets for g in df["gold"])  # golds are plain integers of the split's half
    assert resolve_kind("auto", df["gold"].to_list(), False) == "numeric"
    other, _ = load_problems(guess(n=3, low=-5, high=5, seed=2))
    assert other["question"][0] == "I am thinking of a whole number from -5 to 5. Guess it."
    assert other["prompt_id"][0] == "guess-2-train-0"


def test_the_secrets_are_partitioned_pair_by_pair():
    # 1..5: pairs (1, 2) and (3, 4) split one each way, the odd-sized range's last value (5) to train
    g = GuessConfig(low=1, high=5, n=10)
    train, test = guess_secrets(g, "train"), guess_secrets(g, "test")
    assert len(train) == 3 and len(test) == 2 and 5 in train
    assert sorted(train + test) == [1, 2, 3, 4, 5]
    assert len({1, 2} & set(test)) == 1 and len({3, 4} & set(test)) == 1
    # the default partition, pinned: a change here changes every guess data set (bump GUESS_VERSION)
    d = GuessConfig()
    assert guess_secrets(d, "train")[:6] == [2, 4, 5, 8, 9, 12]
    assert guess_secrets(d, "test")[:6] == [1, 3, 6, 7, 10, 11]
    assert len(guess_secrets(d, "train")) == len(guess_secrets(d, "test")) == 32


def test_train_and_test_share_no_secret_and_no_id():
    train, _ = load_problems(guess("train", n=300))
    test, _ = load_problems(guess("test", n=300))
    assert not set(train["gold"]) & set(test["gold"])
    assert not set(train["prompt_id"]) & set(test["prompt_id"])
    assert test["prompt_id"][0] == "guess-0-test-0"
    # 300 games over 32 secrets, taken in rounds: every secret of each half 9 or 10 times
    assert {int(g) for g in train["gold"]} == set(guess_secrets(GuessConfig(), "train"))
    assert {int(g) for g in test["gold"]} == set(guess_secrets(GuessConfig(), "test"))
    counts = test["gold"].value_counts()["count"]
    assert (counts.min(), counts.max(), (counts == 10).sum()) == (9, 10, 300 - 9 * 32)
    assert sorted(test["gold"][:32].cast(int)) == guess_secrets(GuessConfig(), "test")  # round 1


def test_games_are_deterministic_by_seed_and_extend_with_n():
    a = generate_guess(GuessConfig(n=40, seed=3))
    assert a == generate_guess(GuessConfig(n=40, seed=3))
    assert generate_guess(GuessConfig(n=60, seed=3))[:40] == a  # raising n extends the set
    assert generate_guess(GuessConfig(n=40, seed=4)) != a
    assert guess_secrets(GuessConfig(seed=4), "train") != guess_secrets(GuessConfig(seed=3), "train")


def test_bad_guess_settings_name_the_setting():
    from drift_core.errors import UserError
    from flows.config import load_config

    with pytest.raises(UserError, match=r"data\.guess: .*guess\.high \(1\) must be above guess\.low \(1\)"):
        load_config(None, ["data.source=builtin:guess", "data.guess.high=1"])
    with pytest.raises(UserError, match=r"data\.guess\.n: "):
        load_config(None, ["data.source=builtin:guess", "data.guess.n=0"])
    with pytest.raises(UserError, match=r"unknown key 'data\.guess\.size'"):
        load_config(None, ["data.source=builtin:guess", "data.guess.size=3"])
    with pytest.raises(IngestError, match=r"splits train, test, not 'validation' \(set eval\.data\.split\)"):
        load_problems(guess("validation"), context="eval.data")
    with pytest.raises(IngestError, match=r"builtin:arith, builtin:guess, builtin:gsm8k"):
        load_problems(DataConfig(source="builtin:guesses"))


def test_guess_settings_are_in_guess_keys_only():
    base = guess(n=10)
    assert ingest_key(guess(n=11)) != ingest_key(base)
    assert ingest_key(guess(n=10, seed=1)) != ingest_key(base)
    assert ingest_key(guess("test", n=10)) != ingest_key(base)
    assert source_identity(base)["guess"] == {"low": 1, "high": 64, "n": 10, "seed": 0}
    # other sources' dumps (cache keys, run params) are as they were before the section existed
    assert "guess" not in DataConfig(source="builtin:arith").model_dump()
    assert "guess" in DataConfig(source="builtin:guess").model_dump()


# --------------------------------------------------------------------------------------------
# The question-blind ceiling and its note
# --------------------------------------------------------------------------------------------


def _table(store, key: str, golds: list[str], source: str):
    n = len(golds)
    frame = pl.DataFrame(
        {
            "prompt_id": [str(i) for i in range(n)],
            "question": ["q"] * n,
            "gold": golds,
            "source": [source] * n,
        }
    )
    return store.write_parquet(frame, "ingest", key, "data.parquet")


def test_ceiling_of_a_guess_set_is_the_constant_sequence_and_its_note_says_so(tmp_path):
    from flows.cli import format_results
    from tasks.ceilings import suite_ceiling_notes, suite_ceilings
    from tasks.store import ArtifactStore

    store = ArtifactStore(str(tmp_path))
    golds = ["7"] * 3 + ["3"] * 2 + ["12", "5", "9"]  # 8 games, 5 secrets
    direction = ProtocolConfig(max_turns=2, feedback={"kind": "direction"})
    game = SimpleNamespace(
        name="guess", problems=_table(store, "g", golds, "builtin:guess"), protocol=direction
    )
    arith = SimpleNamespace(
        name="arith", problems=_table(store, "a", golds, "builtin:arith"), protocol=direction
    )
    # the game: 7 then 3 (5 of 8); the same golds as arithmetic: a binary search over 3 golds (6 of 8)
    assert suite_ceilings(store, [game, arith]) == {"guess": 5 / 8, "arith": 6 / 8}
    notes = suite_ceiling_notes(store, [game, arith])
    assert notes["guess"].startswith("blind@2 62.5%: a guessing game")
    assert "about 2/5" in notes["guess"]
    assert "binary search over the 3 most common secrets solves 75.0% by turn 2" in notes["guess"]
    assert notes["arith"].startswith("blind@2 75.0%: a binary search over the 3 most common golds")
    unary = SimpleNamespace(name="arith", problems=arith.problems, protocol=ProtocolConfig(max_turns=2))
    assert suite_ceiling_notes(store, [unary])["arith"].startswith(
        "blind@2 62.5%: the best constant sequence of 2 answers"
    )
    # the whole default test split: 300 games over 32 secrets, 6 turns
    test, _ = load_problems(guess("test", n=300))
    counts = sorted(test["gold"].value_counts()["count"].to_list(), reverse=True)
    real = SimpleNamespace(
        name="g300",
        problems=_table(store, "t", test["gold"].to_list(), "builtin:guess"),
        protocol=ProtocolConfig(max_turns=6, feedback={"kind": "direction"}),
    )
    assert sum(counts[:6]) == 60  # 6 of the 12 secrets drawn 10 times
    assert suite_ceilings(store, [real]) == {"g300": 0.2}
    # the results table prints each benchmark's note under it
    meta = {
        "n_problems": 8,
        "multi_at": [0.25, 0.5],
        "correction_rate": [None, 1 / 3],
        "mean_turns_used": 1.5,
    }
    summary = {"suite": {"guess": {"reference": meta}}, "ceilings": {"guess": 0.625}, "ceiling_notes": notes}
    lines = format_results(summary).splitlines()
    assert lines[-2] == f"guess: {notes['guess']}" and lines[-1] == f"arith: {notes['arith']}"


# --------------------------------------------------------------------------------------------
# Direction feedback on a game, and the counts of how guesses follow it
# --------------------------------------------------------------------------------------------


def test_direction_feedback_round_trip_on_a_game():
    df, _ = load_problems(guess(n=1))
    secret = int(df["gold"][0])
    cfg = ProtocolConfig(max_turns=6, feedback={"kind": "direction"})
    ep = Episode.start(df["prompt_id"][0], 0, df["question"][0], df["gold"][0], cfg)
    verifier = NumericVerifier(read="last_number")
    for guessed in (secret - 7, secret + 3, secret):
        content = f"<answer>{guessed}</answer>"
        ep.add_turn(content, grade_turn(content, df["gold"][0], cfg, verifier))
    feedback = [m["content"] for m in ep.messages if m["role"] == "user"][1:]
    assert feedback == ["Incorrect. The answer is larger.", "Incorrect. The answer is smaller."]
    record = ep.to_record(0.0)
    assert record.solved and record.n_turns == 3
    assert feedback_moves(record.normalized_answers, df["gold"][0]) == FeedbackMoves(
        moves=2, moves_told_way=2, guesses_after_feedback=2, consistent=2
    )


def test_feedback_moves_hand_computed():
    # gold 40: 32 (told larger), 48 (> 32: told way; consistent; told smaller), 36 (< 48, inside
    # (32, 48)), 40 (> 36, inside (36, 48)): 3 moves all the told way, 3 guesses all consistent
    assert feedback_moves(["32", "48", "36", "40"], "40") == FeedbackMoves(3, 3, 3, 3)
    # gold 10: 5 (larger); 5 again (a move, not the told way; not above 5); no answer (no move, no
    # direction); 20 (no move: nothing readable before; inside (5, ...)); 7 (a move the told way after
    # "smaller" from 20, inside (5, 20))
    assert feedback_moves(["5", "5", None, "20", "7"], "10") == FeedbackMoves(2, 1, 3, 2)
    # gold 10: 30 (smaller), 20 (told way, consistent), 40 (a move against "smaller"; outside < 20),
    # 25 (after "smaller" from 40: the told way; but above 20, told "smaller": inconsistent)
    assert feedback_moves(["30", "20", "40", "25"], "10") == FeedbackMoves(3, 2, 3, 1)
    # several actions are not one number; a right first guess has nothing to follow
    assert feedback_moves(["1 || 2", "3"], "5") == FeedbackMoves(0, 0, 0, 0)
    assert feedback_moves(["5"], "5") == FeedbackMoves(0, 0, 0, 0)
    assert feedback_moves([], "5") == FeedbackMoves(0, 0, 0, 0)
    with pytest.raises(ValueError, match="not a number"):
        feedback_moves(["1"], "five")


def test_the_probe_counts_a_budget_on_trajectories_cut_after_it():
    import importlib

    probe = importlib.import_module("benchmarks.probe_guess")

    def rec(pid, answers, gold):
        correct = [a == gold for a in answers]
        return SimpleNamespace(
            prompt_id=pid,
            turn_correct=correct,
            normalized_answers=answers,
            turn_valid=[a is not None for a in answers],
            gen_tokens=[3] * len(answers),
        )

    golds = {"a": "40", "b": "10"}
    records = [
        rec("a", ["32", "48", "36", "40"], "40"),  # solved at turn 4, every move the told way
        rec("a", ["40"], "40"),  # solved at turn 1
        rec("b", ["5", "5", None, "20", "7"], "10"),  # never solved
    ]
    at3 = probe.summarize(records, golds, 3)
    assert (at3["solved_by_turn_1"], at3["solved"], at3["solved_after_wrong_first"]) == (33.3, 33.3, 0)
    assert (at3["moves"], at3["moves_told_way_pct"]) == (3, 66.7)  # 32->48, 48->36 | 5->5
    assert (at3["guesses_after_feedback"], at3["consistent_pct"]) == (3, 66.7)
    assert at3["mean_turns_to_solve"] == 1.0 and at3["format_error_pct"] == round(100 / 7, 1)
    at5 = probe.summarize(records, golds, 5)
    assert (at5["solved"], at5["solved_after_wrong_first"], at5["solved_after_wrong_first_of_wrong_pct"]) == (
        66.7,
        1,
        50.0,
    )
    assert at5["groups_with_correction_pct"] == 50.0 and at5["mean_turns_to_solve"] == 2.5
    assert (at5["moves"], at5["moves_told_way_pct"], at5["consistent_pct"]) == (5, 80.0, 83.3)
    assert at5["generated_tokens"] == 3 * (4 + 1 + 5)
