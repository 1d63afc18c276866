"""The trajectory return (docs/method.md#return): hand values, the vectorised form against the scalar one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_core.returns import (
    answer_counts,
    discounted_sums,
    repetition_counts,
    repetition_penalty,
    returns_from_arrays,
    trajectory_return,
)


def test_hand_example_from_the_brief():
    # r = [0, 0, 1], gamma 0.9: 0.9^2 * 1 = 0.81; penalty -0.1;
    # answers 3, 3, 5: 2 distinct of 3 given -> 0.5 * (1 - 2/3) = 1/6
    # R = 0.81 - 0.1 - 1/6 = 0.5433333...
    r = trajectory_return([0, 0, 1], -0.1, ["3", "3", "5"], gamma=0.9, repetition_lambda=0.5)
    assert r == pytest.approx(0.81 - 0.1 - 0.5 * (1 - 2 / 3), abs=1e-15)
    assert r == pytest.approx(0.5433333333333333, abs=1e-15)


def test_first_turn_correct_is_one():
    # 0.9^0 * 1 = 1, no penalty, one distinct of one -> no repetition penalty
    assert trajectory_return([1], 0.0, ["7"], 0.9, 0.5) == 1.0


def test_no_answers_no_repetition_penalty():
    # drift's trajectories: two unparseable turns: format penalty -0.2, 0 answers given -> no term
    assert trajectory_return([0, 0], -0.2, [None, None], 0.9, 0.5, "answers_given") == pytest.approx(-0.2)
    assert repetition_penalty(0, 0, 0.5) == 0.0


def test_none_answers_are_not_counted_in_drift_trajectories():
    # answers None, "4", "4": 1 distinct of 2 given -> 0.5 * (1 - 1/2) = 0.25; r = [0, 0, 0]
    got = trajectory_return([0, 0, 0], -0.1, [None, "4", "4"], 0.9, 0.5, "answers_given")
    assert got == pytest.approx(-0.1 - 0.25)


# The reference weight_sft.py rule: n = len(answer_norms), distinct = distinct non-empty entries.


def test_reference_empty_strings_count_in_the_denominator_only():
    # ["", "", "5"], turn 3 correct, penalty -0.2, gamma 0.9: 0.81 - 0.2 - 0.5 * (1 - 1/3)
    # = 0.81 - 0.2 - 0.333333... = 0.276666...
    got = trajectory_return([0, 0, 1], -0.2, ["", "", "5"], 0.9, 0.5)
    assert got == pytest.approx(0.2766666666666667, rel=1e-12)


def test_reference_nulls_count_in_the_denominator_only():
    # [null, "5"], no turn correct, penalty -0.1: 0 - 0.1 - 0.5 * (1 - 1/2) = -0.35
    assert trajectory_return([0, 0], -0.1, [None, "5"], 0.9, 0.5) == pytest.approx(-0.35, rel=1e-12)
    # all entries empty or null: 0 distinct of 3 -> the whole lambda: 0 - 0.5 = -0.5
    assert trajectory_return([0, 0, 0], 0.0, [None, "", None], 0.9, 0.5) == pytest.approx(-0.5)


def test_reference_no_list_no_penalty():
    # absent (None), not a list, or empty: no repetition term; r = 1 at turn 1
    for answers in (None, "5", 5, {"a": 1}, []):
        assert repetition_counts(answers) == (0, 0)
        assert trajectory_return([1], 0.0, answers, 0.9, 0.5) == 1.0


def test_repetition_rules_differ_only_on_missing_and_empty_entries():
    assert repetition_counts(["3", "3", "5"]) == repetition_counts(["3", "3", "5"], "answers_given") == (2, 3)
    assert repetition_counts([None, "", "x"]) == (1, 3)
    assert repetition_counts([None, "", "x"], "answers_given") == (2, 2)
    with pytest.raises(ValueError, match="unknown repetition rule"):
        repetition_counts([], "other")  # type: ignore[arg-type]


def test_gamma_one_and_lambda_zero():
    # gamma 1: 0 + 1 = 1; lambda 0 removes the repetition term
    assert trajectory_return([0, 1], 0.0, ["a", "a"], 1.0, 0.0) == 1.0


def test_non_finite_reward_rejected():
    with pytest.raises(ValueError, match="turn reward 2"):
        trajectory_return([0, math.nan], 0.0, [], 0.9, 0.5)
    with pytest.raises(ValueError, match="trajectory 1"):
        returns_from_arrays(
            np.array([0.0, 1.0, np.inf]),
            np.zeros(2),
            np.ones(2),
            np.ones(2),
            0.9,
            0.5,
            lengths=np.array([1, 2]),
        )


def test_padded_and_ragged_discounted_sums_agree():
    # rows: [1] -> 1; [0, 1] -> 0.9; [0, 0, 1] -> 0.81
    padded = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(discounted_sums(padded, 0.9), [1.0, 0.9, 0.81])
    flat, lengths = np.array([1.0, 0, 1, 0, 0, 1]), np.array([1, 2, 3])
    np.testing.assert_allclose(discounted_sums(flat, 0.9, lengths), [1.0, 0.9, 0.81])


def test_answer_counts():
    # codes: [3, 3, 5] -> 2 distinct of 3; [-1, -1] -> 0 of 0; [] -> 0 of 0; [1, -1, 2, 1] -> 2 of 3
    codes = np.array([3, 3, 5, -1, -1, 1, -1, 2, 1])
    d, a = answer_counts(codes, np.array([3, 2, 0, 4]))
    assert d.tolist() == [2, 0, 0, 2]
    assert a.tolist() == [3, 0, 0, 3]


trajectories = st.lists(
    st.tuples(
        st.lists(st.sampled_from([0.0, 1.0, 0.5]), min_size=1, max_size=6),
        st.floats(-1.0, 0.0),
        st.lists(st.one_of(st.none(), st.sampled_from(["1", "2", "3", "x"])), max_size=6),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(trajs=trajectories, gamma=st.floats(0.05, 1.0), lam=st.floats(0.0, 2.0))
def test_vectorised_equals_scalar(trajs, gamma, lam):
    expected = [trajectory_return(r, p, a, gamma, lam, "answers_given") for r, p, a in trajs]
    lengths = np.array([len(r) for r, _, _ in trajs])
    flat = np.concatenate([r for r, _, _ in trajs])
    penalty = np.array([p for _, p, _ in trajs])
    vocab = {"1": 0, "2": 1, "3": 2, "x": 3}
    codes = np.array([-1 if x is None else vocab[x] for _, _, a in trajs for x in a], dtype=np.int64)
    n_distinct, n_answered = answer_counts(codes, np.array([len(a) for _, _, a in trajs]))
    ragged = returns_from_arrays(flat, penalty, n_distinct, n_answered, gamma, lam, lengths=lengths)
    np.testing.assert_allclose(ragged, expected, rtol=1e-12, atol=1e-12)
    padded = np.zeros((len(trajs), int(lengths.max())))
    for i, (r, _, _) in enumerate(trajs):
        padded[i, : len(r)] = r
    np.testing.assert_allclose(
        returns_from_arrays(padded, penalty, n_distinct, n_answered, gamma, lam),
        expected,
        rtol=1e-12,
        atol=1e-12,
    )


@settings(max_examples=40, deadline=None)
@given(trajs=trajectories, gamma=st.floats(0.05, 1.0), lam=st.floats(0.0, 2.0))
def test_vectorised_equals_scalar_reference_rule(trajs, gamma, lam):
    # the reference rule through answer_counts: None and "" get negative codes, n = list length
    trajs = [(r, p, [("" if x == "x" else x) for x in a]) for r, p, a in trajs]
    expected = [trajectory_return(r, p, a, gamma, lam) for r, p, a in trajs]
    lengths = np.array([len(r) for r, _, _ in trajs])
    flat = np.concatenate([r for r, _, _ in trajs])
    penalty = np.array([p for _, p, _ in trajs])
    vocab = {"1": 0, "2": 1, "3": 2}
    codes = np.array([vocab.get(x, -1) for _, _, a in trajs for x in a], dtype=np.int64)
    n_entries = np.array([len(a) for _, _, a in trajs])
    n_distinct, _ = answer_counts(codes, n_entries)
    got = returns_from_arrays(flat, penalty, n_distinct, n_entries, gamma, lam, lengths=lengths)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
