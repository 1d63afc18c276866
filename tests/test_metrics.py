"""Evaluation metrics (docs/method.md#metrics) on hand examples, and the bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_core.metrics import eval_metrics, paired_bootstrap_ci


def test_four_problem_hand_example():
    # P1 solved at turn 1; P2 at turn 2; P3 never (3 wrong turns); P4 at turn 3.
    turn_correct = [[True], [False, True], [False, False, False], [False, False, True]]
    answers = [["5"], ["3", "4"], ["1", "1", None], ["2", "2", "7"]]
    m = eval_metrics(turn_correct, answers, max_turns=3)
    assert m.n_problems == 4 and m.max_turns == 3
    # open at t: 4, 3, 2; solved at t: 1, 1, 1 -> 1/4, 1/3, 1/2
    assert m.accuracy_at_turn == pytest.approx([0.25, 1 / 3, 0.5])
    # cumulative solved by t: 1, 2, 3 of 4
    assert m.multi_at == pytest.approx([0.25, 0.5, 0.75])
    # correction at t >= 2: solved at t / wrong before t = 1/3, 1/2
    assert m.correction_rate[0] is None
    assert m.correction_rate[1:] == pytest.approx([1 / 3, 0.5])
    # answers given: 1 + 2 + 2 (None not counted) + 3 = 8; repeats: "1" again in P3, "2" again in P4 = 2
    assert m.repeated_answer_share == pytest.approx(2 / 8)
    # turns used: (1 + 2 + 3 + 3) / 4
    assert m.mean_turns_used == pytest.approx(2.25)


def test_nothing_open_gives_none():
    # both solved at turn 1: nothing is open at turn 2
    m = eval_metrics([[True], [True]], [["1"], ["2"]], max_turns=2)
    assert m.accuracy_at_turn == [1.0, None]
    assert m.correction_rate == [None, None]
    assert m.multi_at == [1.0, 1.0]
    assert m.repeated_answer_share == 0.0


def test_no_answers_at_all():
    m = eval_metrics([[False]], [[None]], max_turns=1)
    assert m.repeated_answer_share == 0.0 and m.multi_at == [0.0]


@pytest.mark.parametrize(
    ("turns", "msg"),
    [
        ([[True, False]], "goes on"),
        ([[False, False, False]], "more than max_turns"),
        ([[]], "empty"),
    ],
)
def test_bad_trajectories_rejected(turns, msg):
    with pytest.raises(ValueError, match=msg):
        eval_metrics(turns, [[None] * len(t) for t in turns], max_turns=2)


def test_mismatched_lengths_rejected():
    with pytest.raises(ValueError, match="normalized_answers"):
        eval_metrics([[True]], [], max_turns=1)
    with pytest.raises(ValueError, match="no problems"):
        eval_metrics([], [], max_turns=1)


def test_paired_bootstrap():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1] * 10)
    b = np.array([1, 0, 0, 1, 0, 0, 1, 0, 1, 0] * 10)
    d, lo, hi = paired_bootstrap_ci(a, b, n_boot=1000, seed=0)
    assert d == pytest.approx(0.3)  # 3 more correct per 10
    assert lo < d < hi and lo > 0
    assert paired_bootstrap_ci(a, b, n_boot=1000, seed=0) == (d, lo, hi)  # seeded
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap_ci(a, b[:5])


def _correlated_systems(n: int = 400, gains: int = 12, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Two systems that agree on every problem (half of them solved) except ``gains`` problems
    only the challenger solves: a real gain of gains / n, small next to either system's spread."""
    rng = np.random.default_rng(seed)
    baseline = rng.integers(0, 2, size=n)
    challenger = baseline.copy()
    challenger[np.flatnonzero(baseline == 0)[:gains]] = 1
    return challenger, baseline


def test_paired_bootstrap_keeps_each_problems_pair_together():
    """Resampling problems, each with both systems' outcomes on it, sees only the 12 problems where
    they differ: every resampled difference is >= 0 and the interval is about +-0.017 wide. Resampling
    the two systems' problems independently would see each system's own spread (sd of a 0/1 mean of
    400: 0.025 each), an interval about 0.14 wide reaching below 0."""
    challenger, baseline = _correlated_systems()
    d, lo, hi = paired_bootstrap_ci(challenger, baseline, n_boot=2000, seed=0)
    assert d == pytest.approx(12 / 400)
    assert 0.0 < lo < d < hi and hi - lo < 0.06, (lo, hi)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60), st.integers(0, 3))
def test_paired_bootstrap_depends_only_on_the_per_problem_difference(pairs, seed):
    """The definition: a bootstrap of mean(a - b) over problems. Any two systems with the same
    per-problem differences get the same interval, bit for bit (here: against a system that solves
    nothing, and against one that solves everything)."""
    a = np.array([x for x, _ in pairs], dtype=float)
    b = np.array([y for _, y in pairs], dtype=float)
    got = paired_bootstrap_ci(a, b, n_boot=300, seed=seed)
    assert got == paired_bootstrap_ci(a - b, np.zeros_like(a), n_boot=300, seed=seed)
    assert got == paired_bootstrap_ci(a - b + 1.0, np.ones_like(a), n_boot=300, seed=seed)


def test_the_gate_promotes_a_small_gain_made_on_the_same_problems():
    """The promotion gate on the correlated systems: a 3-point gain on 400 problems, made without
    losing any problem, is promoted (its paired interval lies above 0); the same gain with the
    systems' roles swapped is a loss and is not."""
    from drift_core.promotion import decide_promotion

    challenger, baseline = _correlated_systems()
    won = decide_promotion(challenger.astype(bool), baseline.astype(bool), min_delta=0.01)
    assert won.promote and won.ci_low > 0, won.reason
    lost = decide_promotion(baseline.astype(bool), challenger.astype(bool), min_delta=0.01)
    assert not lost.promote and lost.ci_high < 0


def test_wilson_interval_textbook_values():
    """The bands of the multi@t plot (tasks.plots.wilson_interval): the 95% Wilson score interval,
    checked against values computed by hand from its formula."""
    from tasks.plots import wilson_interval

    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(1.0, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0.2, 50) == pytest.approx((0.1124, 0.3304), abs=1e-4)
    assert wilson_interval(0.3, 0) == (0.0, 1.0)  # no problems: nothing known


def test_bootstrap_ratio_ci_hand_cases():
    from drift_core.metrics import bootstrap_ratio_ci

    # constant per-problem outcome: every resample gives the same ratio
    assert bootstrap_ratio_ci(np.ones(5), np.ones(5)) == (1.0, 1.0, 1.0)
    assert bootstrap_ratio_ci(np.array([1.0, 2.0]), np.array([2.0, 4.0])) == (0.5, 0.5, 0.5)
    # the estimate is the pooled ratio sum/sum, not the mean of per-problem ratios (1/2 + 3/4) / 2
    r, lo, hi = bootstrap_ratio_ci(np.array([1.0, 3.0]), np.array([2.0, 4.0]), n_boot=500)
    assert r == 4.0 / 6.0 and 0.5 <= lo <= r <= hi <= 0.75
    # nothing to divide by: no estimate
    assert bootstrap_ratio_ci(np.zeros(3), np.zeros(3)) == (None, None, None)
    with pytest.raises(ValueError, match="same length"):
        bootstrap_ratio_ci(np.ones(2), np.ones(3))


@settings(max_examples=40, deadline=None, derandomize=True)  # the same 40 examples every run
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3)), min_size=1, max_size=30))
def test_bootstrap_ratio_ci_brackets_the_estimate(pairs):
    from drift_core.metrics import bootstrap_ratio_ci

    num = np.array([min(a, b) for a, b in pairs], dtype=float)
    den = np.array([b for _, b in pairs], dtype=float)
    r, lo, hi = bootstrap_ratio_ci(num, den, n_boot=200)
    assert r == pytest.approx(num.sum() / den.sum())
    assert 0.0 <= lo <= r <= hi <= 1.0


def test_bootstrap_ratio_ci_covers_a_known_ratio_about_95_percent():
    """Coverage: 200 data sets of 100 problems drawn with a known ratio (per problem 1-3 turns open,
    each solved with probability 0.3, so sum/sum estimates 0.3); the 95% interval must contain 0.3
    in roughly 95% of them. Seeds are fixed, so the count is the same every run (measured: 186 of
    200); the bounds leave room for a percentile interval's small-sample undercoverage, and fail an
    interval that is too narrow (e.g. 50%: ~100 of 200) or too wide (always covers, 200 of 200)."""
    from drift_core.metrics import bootstrap_ratio_ci

    true_ratio, covered, seeds = 0.3, 0, range(200)
    for seed in seeds:
        rng = np.random.default_rng(10_000 + seed)
        den = rng.integers(1, 4, size=100).astype(float)
        num = rng.binomial(den.astype(int), true_ratio).astype(float)
        _, lo, hi = bootstrap_ratio_ci(num, den, n_boot=500, seed=seed)
        covered += lo <= true_ratio <= hi
    assert 180 <= covered <= 198, f"the 95% interval covered the true ratio in {covered} of 200 data sets"


def test_fixed_after_feedback_is_multi_at_t_minus_multi_at_1():
    from drift_core.metrics import fixed_after_feedback

    assert fixed_after_feedback([0.25, 0.5, 0.625]) == 0.375


def test_question_blind_ceiling_unary_and_direction():
    from drift_core.metrics import question_blind_ceiling

    # counts: 7 x4, 3 x3, 12 x2, 5 x1 (10 golds)
    golds = ["7", "7", "7", "7", "3", " 3", "3", "12", "12", "5"]
    assert question_blind_ceiling(golds, 1) == 0.4  # always 7
    assert question_blind_ceiling(golds, 2) == 0.7  # 7 then 3
    # direction: 2 turns search 3 values (guess the middle one, then the side the feedback names)
    assert question_blind_ceiling(golds, 2, "direction") == 0.9
    assert question_blind_ceiling(golds, 3, "direction") == 1.0
    with pytest.raises(ValueError, match="feedback must be 'unary' or 'direction'"):
        question_blind_ceiling(golds, 2, "hint")


def test_suite_ceilings_read_each_benchmarks_golds_turns_and_feedback(tmp_path):
    from types import SimpleNamespace

    import polars as pl

    from drift_core.schemas import ProtocolConfig
    from tasks.ceilings import suite_ceilings
    from tasks.store import ArtifactStore

    store = ArtifactStore(str(tmp_path))
    golds = pl.DataFrame(
        {"prompt_id": [str(i) for i in range(10)], "gold": ["7"] * 4 + ["3"] * 3 + ["12"] * 2 + ["5"]}
    )
    problems = store.write_parquet(golds, "ingest", "k1", "data.parquet")
    unary = SimpleNamespace(name="a", problems=problems, protocol=ProtocolConfig(max_turns=2))
    direction = SimpleNamespace(
        name="b", problems=problems, protocol=ProtocolConfig(max_turns=2, feedback={"kind": "direction"})
    )
    assert suite_ceilings(store, [unary, direction]) == {"a": 0.7, "b": 0.9}
