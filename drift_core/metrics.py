"""Evaluation metrics of the multi-turn protocol (docs/method.md#metrics).

One evaluated problem is one greedy trajectory: its ``turn_correct`` list stops at the first correct
turn or at ``max_turns``. With s_p the turn at which problem p is solved (None if never):

* open at t            = #{p : p not solved before t}            (= wrong at every turn before t)
* accuracy_at_turn[t]  = #{p : s_p = t} / open at t               (None when nothing is open)
* multi_at[t]          = #{p : s_p <= t} / n_problems             (multi@t; multi@T is the headline)
* correction_rate[t]   = #{p : s_p = t} / #{p wrong before t}     (t >= 2; t = 1 is None)
* repeated_answer_share = answers equal to an earlier answer of the same trajectory / answers given
  (None answers, i.e. unparseable turns, are not answers given)
* mean_turns_used       = mean length of the trajectories

Under direction feedback, :func:`feedback_moves` counts per trajectory how its guesses follow the
feedback ("larger"/"smaller"): moves in the told direction and guesses consistent with all of it.

Lists are indexed from turn 1: element 0 is turn 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

from drift_core.verify import parse_number

__all__ = [
    "EvalMetrics",
    "FeedbackMoves",
    "eval_metrics",
    "feedback_moves",
    "fixed_after_feedback",
    "paired_bootstrap_ci",
    "question_blind_ceiling",
]


class EvalMetrics(BaseModel):
    n_problems: int
    max_turns: int
    accuracy_at_turn: list[float | None]
    multi_at: list[float]
    correction_rate: list[float | None]
    repeated_answer_share: float
    mean_turns_used: float


def _solved_turn(i: int, correct: Sequence[bool], max_turns: int) -> int | None:
    """1-based turn of the first correct answer, or None; checks the trajectory's shape."""
    n = len(correct)
    if n == 0:
        raise ValueError(f"problem {i}: empty turn_correct (every trajectory has at least one turn)")
    if n > max_turns:
        raise ValueError(f"problem {i}: {n} turns, more than max_turns={max_turns}")
    for t, c in enumerate(correct):
        if c:
            if t != n - 1:
                raise ValueError(
                    f"problem {i}: correct at turn {t + 1} but the trajectory goes on to turn {n} "
                    "(an episode stops at the first correct answer)"
                )
            return t + 1
    return None


def eval_metrics(
    turn_correct: Sequence[Sequence[bool]],
    normalized_answers: Sequence[Sequence[str | None]],
    max_turns: int,
) -> EvalMetrics:
    """Metrics of one evaluation (docs/method.md#metrics); see the module docstring for the definitions."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    n = len(turn_correct)
    if n == 0:
        raise ValueError("no problems to evaluate")
    if len(normalized_answers) != n:
        raise ValueError(f"{n} turn_correct lists but {len(normalized_answers)} normalized_answers lists")

    solved_at = np.zeros(max_turns + 2, dtype=np.int64)  # solved_at[t] for t = 1..max_turns
    turns_used = 0
    repeats = 0
    given = 0
    for i, (correct, answers) in enumerate(zip(turn_correct, normalized_answers, strict=True)):
        s = _solved_turn(i, correct, max_turns)
        if s is not None:
            solved_at[s] += 1
        turns_used += len(correct)
        seen: set[str] = set()
        for a in answers:
            if a is None:
                continue
            given += 1
            if a in seen:
                repeats += 1
            seen.add(a)

    accuracy: list[float | None] = []
    multi: list[float] = []
    correction: list[float | None] = []
    solved_before = 0
    for t in range(1, max_turns + 1):
        open_t = n - solved_before
        rate = solved_at[t] / open_t if open_t > 0 else None
        accuracy.append(None if rate is None else float(rate))
        correction.append(None if t == 1 or rate is None else float(rate))
        solved_before += int(solved_at[t])
        multi.append(solved_before / n)

    return EvalMetrics(
        n_problems=n,
        max_turns=max_turns,
        accuracy_at_turn=accuracy,
        multi_at=multi,
        correction_rate=correction,
        repeated_answer_share=repeats / given if given else 0.0,
        mean_turns_used=turns_used / n,
    )


def _resamples(n: int, n_boot: int, seed: int):
    """``(slice of resample rows, [rows, n] indices)`` chunks of ``n_boot`` resamples of ``n``
    problems with replacement; bounded memory: at most ~4M resampled indices at a time."""
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // n)
    for lo in range(0, n_boot, chunk):
        hi = min(n_boot, lo + chunk)
        yield slice(lo, hi), rng.integers(0, n, size=(hi - lo, n))


def paired_bootstrap_ci(
    a: np.ndarray,
    b: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Paired bootstrap of mean(a - b) over problems: ``(mean_diff, lo, hi)``, a (1 - alpha) percentile
    interval. ``a`` and ``b`` are per-problem outcomes (0/1) of two systems on the same problems, in
    the same order; problems are resampled with replacement, keeping each pair together."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"a and b must be 1-D of the same length, got {x.shape} and {y.shape}")
    if x.shape[0] == 0:
        raise ValueError("no problems to compare")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    d = x - y
    means = np.empty(n_boot, dtype=np.float64)
    for rows, idx in _resamples(d.shape[0], n_boot, seed):
        means[rows] = d[idx].mean(axis=1)
    lo_q, hi_q = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(d.mean()), float(lo_q), float(hi_q)


def bootstrap_ratio_ci(
    numerator: np.ndarray,
    denominator: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float | None, float | None, float | None]:
    """``sum(numerator) / sum(denominator)`` over problems and a (1 - alpha) percentile interval from
    resampling problems with replacement: ``(ratio, lo, hi)``.

    Every metric of :func:`eval_metrics` is such a ratio of per-problem counts: multi@t (solved by t
    / 1), the correction rate at t (solved at t / still open at t), the repeated-answer share
    (repeats / answers given). Resampling problems, not answers, keeps a problem's turns together.
    Resamples whose denominator is 0 are left out; ``None`` when the data's own denominator is 0."""
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    if num.ndim != 1 or num.shape != den.shape:
        raise ValueError(
            f"numerator and denominator must be 1-D of the same length, got {num.shape}, {den.shape}"
        )
    if num.shape[0] == 0:
        raise ValueError("no problems")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    if den.sum() == 0:
        return None, None, None
    ratios = np.empty(n_boot, dtype=np.float64)
    for rows, idx in _resamples(num.shape[0], n_boot, seed):
        d = den[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios[rows] = np.where(d > 0, num[idx].sum(axis=1) / d, np.nan)
    lo_q, hi_q = np.nanquantile(ratios, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(num.sum() / den.sum()), float(lo_q), float(hi_q)


def fixed_after_feedback(multi_at: Sequence[float]) -> float:
    """multi@T - multi@1: the share of problems solved after at least one feedback message."""
    if not multi_at:
        raise ValueError("multi_at is empty")
    return float(multi_at[-1] - multi_at[0])


def question_blind_ceiling(golds: Sequence[str], turns: int, feedback: str = "unary") -> float:
    """The most a policy that never reads the question can solve within ``turns`` turns: an upper
    bound, since it picks its guesses on the golds themselves.

    unary feedback (the fixed text, or a callable whose content is unknown here): the best constant
    sequence of ``turns`` distinct answers, i.e. the share of the ``turns`` most common golds.
    direction feedback ("larger"/"smaller"): a binary search over any ``2**turns - 1`` values finds
    each of them within ``turns`` turns (a balanced search tree of that many keys has that depth),
    so the share of the ``2**turns - 1`` most common golds. Golds are compared as written (stripped)."""
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    if feedback not in ("unary", "direction"):
        raise ValueError(f"feedback must be 'unary' or 'direction', got {feedback!r}")
    if not golds:
        raise ValueError("no golds")
    from collections import Counter

    counts = sorted(Counter(g.strip() for g in golds).values(), reverse=True)
    keep = turns if feedback == "unary" else 2**turns - 1
    return sum(counts[:keep]) / len(golds)


@dataclass(frozen=True)
class FeedbackMoves:
    """How one trajectory's guesses follow direction feedback (:func:`feedback_moves`); counts, so
    shares over many trajectories are sums over sums."""

    moves: int  # a readable guess right after a "larger"/"smaller"
    moves_told_way: int  # of those, the ones that went the told way (above the guess before after "larger")
    guesses_after_feedback: int  # readable guesses with at least one "larger"/"smaller" before them
    consistent: int  # of those, the ones inside every bound the feedback so far set


def feedback_moves(answers: Sequence[str | None], gold: str) -> FeedbackMoves:
    """Count, for one trajectory's answers (turn order; the verifier's normal forms) and its numeric
    gold, how the guesses follow the direction feedback ``drift_core.feedback.direction_text`` gives.

    An answer is read as one number (``parse_number``; None, several ``||`` actions or text: no number,
    so no direction after it and no move into it). After a wrong number a, the feedback told "larger"
    (gold > a) or "smaller" (gold < a). A **move** is the next answer, when it is a number, after such a
    feedback; it went the told way when it is strictly above a after "larger", strictly below after
    "smaller" (repeating a is not). A guess **after feedback** is a number answered at a turn with at
    least one such feedback before it; it is **consistent** when it lies strictly inside every bound
    that feedback set (above every a told "larger", below every a told "smaller"). Turn-1 guesses
    have nothing to be consistent with and are not counted. A terminal correct guess is always
    consistent, by construction: that is what DRIFT's terminal-turn training imitates."""
    target = parse_number(gold)
    if target is None:
        raise ValueError(f"feedback_moves: gold {gold!r} is not a number")
    values = [parse_number(a) if a and "||" not in a else None for a in answers]
    told: list[tuple[float, bool]] = []  # (guess, True when the feedback said "larger") so far
    moves = told_way = after = consistent = 0
    for t, value in enumerate(values):
        if value is not None and told:
            after += 1
            consistent += all(value > a if larger else value < a for a, larger in told)
        if value is not None and t > 0 and values[t - 1] is not None and values[t - 1] != target:
            moves += 1
            before = values[t - 1]
            told_way += value > before if target > before else value < before
        if value is not None and value != target:
            told.append((value, target > value))
    return FeedbackMoves(moves, told_way, after, consistent)
