"""The trajectory return of DRIFT (docs/method.md#return).

    R = sum_t gamma^(t-1) r_t  +  (sum of format penalties)  -  lambda * (1 - distinct / n)

r_t is the reward of turn t (1 if turn t is correct, else 0 in the paper), the format penalty is the
trajectory's summed penalty (<= 0), and the last term is the repetition penalty over the
trajectory's list of normalised answers. How ``distinct`` and ``n`` are counted depends on who wrote
the list (:data:`RepetitionRule`):

* ``"reference"``: exactly the paper's ``weight_sft.py``: ``n`` is the length of the list,
  ``distinct`` the number of distinct non-empty entries; empty strings and nulls count in ``n``
  only. No list (or an empty one) gives no penalty. The reference rollout script appends one entry
  per parseable answer, so on its own files ``n`` is "answers given".
* ``"answers_given"``: drift's own trajectories, whose list has one entry per turn with None where no
  answer could be parsed: ``n`` counts the non-None entries and ``distinct`` the distinct values
  among them (an answer that normalises to "" is an answer). This equals ``"reference"`` on the
  list of answers given, which is what the reference rollout script would have written.

Two entry points compute the same formula: :func:`trajectory_return` for one trajectory (readable, the
reference), and :func:`returns_from_arrays` for millions at once (numpy, no Python loop per row).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = [
    "RepetitionRule",
    "answer_counts",
    "discounted_sums",
    "repetition_counts",
    "repetition_penalty",
    "returns_from_arrays",
    "trajectory_return",
]

RepetitionRule = Literal["reference", "answers_given"]


def repetition_penalty(n_distinct: float, n: float, repetition_lambda: float) -> float:
    """lambda * (1 - distinct / n); 0 when n is 0 (docs/method.md#return)."""
    if n <= 0:
        return 0.0
    return repetition_lambda * (1.0 - n_distinct / n)


def repetition_counts(answers: object, rule: RepetitionRule = "reference") -> tuple[int, int]:
    """(distinct, n) of one trajectory's answer list under ``rule`` (see the module docstring).

    >>> repetition_counts(["", "", "5"]), repetition_counts([None, "5"]), repetition_counts("5")
    ((1, 3), (1, 2), (0, 0))
    >>> repetition_counts([None, "5", ""], "answers_given")
    (2, 2)
    """
    if rule == "reference":
        if not isinstance(answers, list | tuple):
            return 0, 0
        return len({a for a in answers if a is not None and a != ""}), len(answers)
    if rule == "answers_given":
        given = [a for a in (answers or []) if a is not None]
        return len(set(given)), len(given)
    raise ValueError(f"unknown repetition rule {rule!r}; expected 'reference' or 'answers_given'")


def trajectory_return(
    turn_rewards: Sequence[float],
    format_penalty: float,
    normalized_answers: Sequence[str | None] | None,
    gamma: float,
    repetition_lambda: float,
    rule: RepetitionRule = "reference",
) -> float:
    """Return R of one trajectory (docs/method.md#return).

    R = sum_t gamma^(t-1) r_t + format_penalty - lambda * (1 - distinct / n), with ``distinct`` and
    ``n`` counted by :func:`repetition_counts` under ``rule``.

    >>> round(trajectory_return([0, 0, 1], -0.1, ["3", "3", "5"], 0.9, 0.5), 12)  # 0.81 - 0.1 - 0.5/3
    0.543333333333
    >>> round(trajectory_return([0, 0, 1], -0.2, ["", "", "5"], 0.9, 0.5), 12)  # 0.81 - 0.2 - 0.5*2/3
    0.276666666667
    """
    rewards = [float(r) for r in turn_rewards]
    for t, r in enumerate(rewards):
        if not math.isfinite(r):
            raise ValueError(f"turn reward {t + 1} is not finite: {r!r}")
    if not math.isfinite(format_penalty):
        raise ValueError(f"format_penalty is not finite: {format_penalty!r}")
    discounted = sum(gamma**t * r for t, r in enumerate(rewards))
    n_distinct, n = repetition_counts(normalized_answers, rule)
    return discounted + float(format_penalty) - repetition_penalty(n_distinct, n, repetition_lambda)


def discounted_sums(turn_rewards: np.ndarray, gamma: float, lengths: np.ndarray | None = None) -> np.ndarray:
    """sum_t gamma^(t-1) r_t for many trajectories at once.

    ``turn_rewards`` is either a 2-D array ``[n, max_turns]`` padded with zeros (``lengths`` None), or
    the 1-D concatenation of all trajectories' rewards with ``lengths[i]`` turns for trajectory i (the
    layout of an Arrow/polars list column).
    """
    rewards = np.asarray(turn_rewards, dtype=np.float64)
    if lengths is None:
        if rewards.ndim != 2:
            raise ValueError(
                f"turn_rewards must be 2-D [n, max_turns] when lengths is None, got {rewards.ndim}-D"
            )
        powers = gamma ** np.arange(rewards.shape[1], dtype=np.float64)
        return rewards @ powers
    lengths = np.asarray(lengths, dtype=np.int64)
    if rewards.ndim != 1:
        raise ValueError("turn_rewards must be 1-D (concatenated) when lengths is given")
    if lengths.ndim != 1 or (lengths < 0).any() or int(lengths.sum()) != rewards.shape[0]:
        raise ValueError(
            f"lengths must be non-negative and sum to len(turn_rewards)={rewards.shape[0]}, "
            f"got sum {int(lengths.sum())}"
        )
    n = lengths.shape[0]
    if rewards.shape[0] == 0:
        return np.zeros(n, dtype=np.float64)
    starts = np.cumsum(lengths) - lengths
    # position of each flat element inside its own trajectory: 0, 1, ..., len-1
    pos = np.arange(rewards.shape[0], dtype=np.int64) - np.repeat(starts, lengths)
    max_len = int(lengths.max())
    powers = gamma ** np.arange(max_len, dtype=np.float64)
    row = np.repeat(np.arange(n, dtype=np.int64), lengths)
    return np.bincount(row, weights=rewards * powers[pos], minlength=n)


def answer_counts(codes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n_distinct, n_answered) per trajectory from integer answer codes.

    ``codes`` is the 1-D concatenation of every trajectory's answers encoded as integers (equal
    answers -> equal codes, e.g. a dense rank of the normalised strings), with a negative code for an
    entry that is no answer; ``lengths[i]`` is the number of entries of trajectory i. Rule
    ``"answers_given"``: negative for None, n = n_answered. Rule ``"reference"``: negative for None
    and "", n = lengths.
    """
    codes = np.asarray(codes, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    n = lengths.shape[0]
    if int(lengths.sum()) != codes.shape[0]:
        raise ValueError(f"lengths sum to {int(lengths.sum())}, but there are {codes.shape[0]} codes")
    row = np.repeat(np.arange(n, dtype=np.int64), lengths)
    given = codes >= 0
    row, codes = row[given], codes[given]
    n_answered = np.bincount(row, minlength=n)
    if row.shape[0] == 0:
        return np.zeros(n, dtype=np.int64), n_answered
    order = np.lexsort((codes, row))
    r, c = row[order], codes[order]
    first = np.ones(r.shape[0], dtype=bool)
    first[1:] = (r[1:] != r[:-1]) | (c[1:] != c[:-1])
    n_distinct = np.bincount(r[first], minlength=n)
    return n_distinct, n_answered


def returns_from_arrays(
    turn_rewards: np.ndarray,
    format_penalty: np.ndarray,
    n_distinct: np.ndarray,
    n_answered: np.ndarray,
    gamma: float,
    repetition_lambda: float,
    lengths: np.ndarray | None = None,
) -> np.ndarray:
    """Vectorised :func:`trajectory_return` (docs/method.md#return) for n trajectories, float64 ``[n]``.

    ``turn_rewards``: 2-D ``[n, max_turns]`` zero-padded, or 1-D concatenated with ``lengths`` (see
    :func:`discounted_sums`). ``format_penalty``, ``n_distinct``, ``n_answered``: ``[n]``, where
    ``n_answered`` is the denominator ``n`` of the repetition term under the rule in use (see
    :func:`repetition_counts`). Rows with ``n_answered == 0`` get no repetition penalty. Non-finite rewards or penalties raise ValueError
    naming the first offending trajectory.
    """
    rewards = np.asarray(turn_rewards, dtype=np.float64)
    penalty = np.asarray(format_penalty, dtype=np.float64)
    n_distinct = np.asarray(n_distinct, dtype=np.float64)
    n_answered = np.asarray(n_answered, dtype=np.float64)
    _check_finite_rewards(rewards, lengths)
    bad = ~np.isfinite(penalty)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"format_penalty of trajectory {i} is not finite: {penalty[i]!r}")
    discounted = discounted_sums(rewards, gamma, lengths)
    if not (discounted.shape == penalty.shape == n_distinct.shape == n_answered.shape):
        raise ValueError(
            "shape mismatch: "
            f"rewards give {discounted.shape}, format_penalty {penalty.shape}, "
            f"n_distinct {n_distinct.shape}, n_answered {n_answered.shape}"
        )
    ratio = np.divide(n_distinct, n_answered, out=np.ones_like(n_distinct), where=n_answered > 0)
    return discounted + penalty - repetition_lambda * (1.0 - ratio)


def _check_finite_rewards(rewards: np.ndarray, lengths: np.ndarray | None) -> None:
    bad = ~np.isfinite(rewards)
    if not bad.any():
        return
    if lengths is None:
        i, t = (int(v) for v in np.argwhere(bad)[0])
        value = rewards[i, t]
    else:
        k = int(np.flatnonzero(bad)[0])
        ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
        i = int(np.searchsorted(ends, k, side="right"))
        t = k - (int(ends[i - 1]) if i > 0 else 0)
        value = rewards[k]
    raise ValueError(f"turn reward {t + 1} of trajectory {i} is not finite: {value!r}")
