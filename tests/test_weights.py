"""DRIFT weights (docs/method.md#weights): hand values, stability, properties, modes and diagnostics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_core.schemas import WeightsConfig
from drift_core.weights import compute_weights, diagnostics, group_ess, group_weights, weight_warnings

DRIFT = WeightsConfig(mode="drift", beta=0.1)


def cfg(beta: float, mode: str = "drift") -> WeightsConfig:
    return WeightsConfig(mode=mode, beta=beta)


# --- hand values -----------------------------------------------------------------------------


def test_group_1000_beta_01():
    # returns [1, 0, 0, 0], beta 0.1: exp(R/beta) = [e^10, 1, 1, 1], mean = (e^10 + 3) / 4
    # w0 = 4 e^10 / (e^10 + 3) = 88105.863179 / 22029.465795 = 3.999455...; others 4 / (e^10 + 3)
    e10 = math.exp(10.0)
    w = group_weights(np.array([1.0, 0.0, 0.0, 0.0]), 0.1)
    np.testing.assert_allclose(w, [4 * e10 / (e10 + 3)] + [4 / (e10 + 3)] * 3, rtol=1e-14)
    assert w[0] == pytest.approx(3.9994553, abs=1e-7)
    assert w.mean() == pytest.approx(1.0, abs=1e-15)


def test_group_1000_beta_1():
    # beta 1: [e, 1, 1, 1], mean (e + 3) / 4; w0 = 4e / (e + 3) = 10.873127 / 5.718282 = 1.9014675...
    # others 4 / (e + 3) = 0.6995108...
    e = math.e
    w = group_weights(np.array([1.0, 0.0, 0.0, 0.0]), 1.0)
    np.testing.assert_allclose(w, [4 * e / (e + 3), 4 / (e + 3), 4 / (e + 3), 4 / (e + 3)], rtol=1e-14)
    assert w[0] == pytest.approx(1.9014675, abs=1e-7)
    assert w[1] == pytest.approx(0.6995108, abs=1e-7)


def test_edge_groups():
    assert group_weights(np.array([3.7]), 0.1).tolist() == [1.0]
    assert group_weights(np.array([0.5, 0.5, 0.5]), 0.1).tolist() == [1.0, 1.0, 1.0]
    assert group_weights(np.array([]), 0.1).shape == (0,)
    assert group_weights(np.array([0.0, 1.0]), 0.1).dtype == np.float64


def test_beta_to_zero_ties_share():
    # two maxima share all the weight: each n / 2 = 2
    w = group_weights(np.array([1.0, 0.3, 1.0, -2.0]), 1e-12)
    np.testing.assert_array_equal(w, [2.0, 0.0, 2.0, 0.0])


def test_no_overflow_for_extreme_values():
    for r in ([1e300, -1e300, 0.0], [-1e300, -1e300 + 1e290, 5e299], [1.7e308, -1.7e308]):
        with np.errstate(all="raise"):  # not even a warning escapes
            w = group_weights(np.array(r), 1e-12)
        assert np.isfinite(w).all()
        assert w.mean() == pytest.approx(1.0)
        assert w[int(np.argmax(r))] == pytest.approx(len(r))
    np.testing.assert_allclose(
        group_weights(np.array([1e300, -1e300]), 1e300), [2 / (1 + math.exp(-2)), 2 / (math.e**2 + 1)]
    )


def test_non_finite_returns_rejected_with_index():
    with pytest.raises(ValueError, match="index 2"):
        group_weights(np.array([0.0, 1.0, np.nan]), 0.1)
    with pytest.raises(ValueError, match="index 1"):
        compute_weights(np.array([0.0, np.inf]), np.array([0, 0]), None, DRIFT)
    with pytest.raises(ValueError, match="beta"):
        group_weights(np.array([0.0]), 0.0)


def test_modes():
    r = np.array([1.0, 0.0, 0.2, 0.1])
    g = np.array(["a", "a", "b", "b"])
    solved = np.array([True, False, False, False])
    assert compute_weights(r, g, solved, cfg(0.1, "uniform")).tolist() == [1.0] * 4
    assert compute_weights(r, g, solved, cfg(0.1, "success_only")).tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="solved"):
        compute_weights(r, g, None, cfg(0.1, "success_only"))


def test_group_id_kinds_agree():
    rng = np.random.default_rng(1)
    r = rng.normal(size=200)
    ints = rng.integers(0, 30, size=200)
    sparse = ints * 10**12 - 7  # not dense: the np.unique path
    strings = np.array([f"p{i}" for i in ints])
    objects = strings.astype(object)
    ref = compute_weights(r, ints, None, DRIFT)
    for ids in (sparse, strings, objects, ints.astype(np.uint32)):
        np.testing.assert_allclose(compute_weights(r, ids, None, DRIFT), ref, rtol=1e-15)


# --- properties --------------------------------------------------------------------------------

returns_st = st.lists(st.floats(-5.0, 5.0, allow_nan=False), min_size=1, max_size=20)
beta_st = st.floats(0.01, 10.0)


@settings(max_examples=100, deadline=None)
@given(r=returns_st, beta=beta_st)
def test_group_mean_is_one(r, beta):
    w = group_weights(np.array(r), beta)
    assert w.mean() == pytest.approx(1.0, rel=1e-12)
    assert (w >= 0).all()


@settings(max_examples=100, deadline=None)
@given(r=returns_st, beta=beta_st, c=st.floats(-100.0, 100.0))
def test_shift_invariance(r, beta, c):
    a = np.array(r)
    np.testing.assert_allclose(group_weights(a + c, beta), group_weights(a, beta), rtol=1e-9, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(r=returns_st)
def test_beta_to_infinity_is_uniform(r):
    np.testing.assert_allclose(group_weights(np.array(r), 1e12), 1.0, rtol=1e-10)
    np.testing.assert_array_equal(group_weights(np.array(r), math.inf), 1.0)


@settings(max_examples=100, deadline=None)
@given(r=st.lists(st.integers(-20, 20), min_size=1, max_size=20))
def test_beta_to_zero_concentrates_on_best(r):
    a = np.array(r, dtype=np.float64) / 10.0  # distinct values are >= 0.1 apart
    w = group_weights(a, 1e-6)
    best = a == a.max()
    np.testing.assert_allclose(w[best], len(a) / best.sum(), rtol=1e-12)
    assert (w[~best] == 0).all()


@settings(max_examples=100, deadline=None)
@given(r=returns_st, beta=beta_st, data=st.data())
def test_permutation_equivariance(r, beta, data):
    a = np.array(r)
    perm = np.array(data.draw(st.permutations(range(len(a)))))
    np.testing.assert_allclose(group_weights(a[perm], beta), group_weights(a, beta)[perm], rtol=1e-12)


groups_st = st.lists(
    st.tuples(st.integers(0, 6), st.floats(-3.0, 3.0, allow_nan=False)), min_size=1, max_size=60
)


@settings(max_examples=100, deadline=None)
@given(rows=groups_st, beta=beta_st, shift=st.floats(-50.0, 50.0))
def test_vectorised_equals_per_group(rows, beta, shift):
    g = np.array([gid for gid, _ in rows])
    r = np.array([x for _, x in rows])
    w = compute_weights(r, g, None, cfg(beta))
    for gid in np.unique(g):
        m = g == gid
        np.testing.assert_allclose(w[m], group_weights(r[m], beta), rtol=1e-12)
    # adding a constant to ONE group's returns changes nothing
    target = int(g[0])
    r2 = np.where(g == target, r + shift, r)
    np.testing.assert_allclose(compute_weights(r2, g, None, cfg(beta)), w, rtol=1e-9, atol=1e-12)
    # permuting rows permutes the weights (string ids too)
    perm = np.random.default_rng(len(rows)).permutation(len(rows))
    ws = compute_weights(r[perm], np.array([f"g{x}" for x in g[perm]]), None, cfg(beta))
    np.testing.assert_allclose(ws, w[perm], rtol=1e-12)


# --- diagnostics -----------------------------------------------------------------------------


def test_diagnostics_hand_values():
    # group a: w = [2, 0] -> ESS (2)^2 / 4 = 1; group b: w = [1, 1] -> ESS 4 / 2 = 2
    # overall: (sum w)^2 / sum w^2 = 16 / 6; n = 4 -> fraction 16/24
    w = np.array([2.0, 0.0, 1.0, 1.0])
    g = np.array(["a", "a", "b", "b"])
    solved = np.array([True, False, False, False])
    r = np.array([1.0, 0.0, -0.1, -0.3])
    d = diagnostics(w, g, solved, r)
    assert (d.n_trajectories, d.n_groups) == (4, 2)
    assert d.ess_overall == pytest.approx(16 / 6)
    assert d.ess_fraction == pytest.approx(16 / 24)
    assert d.ess_per_group_mean == pytest.approx(1.5)
    assert d.ess_per_group_min == pytest.approx(1.0)
    assert d.max_weight == 2.0
    assert d.share_groups_no_success == 0.5
    assert d.share_weight_no_success == pytest.approx(2 / 4)  # group b holds 1 + 1 of 4
    assert d.max_group_size == 2
    assert d.mean_return == pytest.approx(0.15)
    np.testing.assert_allclose(group_ess(w, g), [1.0, 2.0])


def test_diagnostics_zero_weight_group_and_empty():
    # success_only, group b solved nothing: its weights are 0 -> ESS 0
    w = np.array([1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(group_ess(w, np.array([5, 5, 9, 9])), [1.0, 0.0])
    d = diagnostics(np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool), np.zeros(0))
    assert d.n_trajectories == 0 and d.ess_overall == 0.0


def test_unsolved_groups_drop_zeroes_groups_without_a_success():
    """Group A (one solved) keeps the paper's weights; group B (none solved) gets 0 in every mode."""
    returns = np.array([1.0, 0.0, 0.5, 0.2])
    groups = np.array(["A", "A", "B", "B"])
    solved = np.array([True, False, False, False])
    a = [2 / (1 + math.exp(-10)), 2 * math.exp(-10) / (1 + math.exp(-10))]  # exp(R/0.1) / group mean
    b = [2 / (1 + math.exp(-3)), 2 * math.exp(-3) / (1 + math.exp(-3))]
    drift = compute_weights(returns, groups, solved, WeightsConfig(beta=0.1))
    np.testing.assert_allclose(drift, [*a, *b], rtol=1e-12)
    dropped = compute_weights(returns, groups, solved, WeightsConfig(beta=0.1, unsolved_groups="drop"))
    np.testing.assert_allclose(dropped, [*a, 0.0, 0.0], rtol=1e-12)
    uniform = WeightsConfig(mode="uniform", unsolved_groups="drop")
    assert compute_weights(returns, groups, solved, uniform).tolist() == [1.0, 1.0, 0.0, 0.0]
    success = WeightsConfig(mode="success_only", unsolved_groups="drop")
    assert compute_weights(returns, groups, solved, success).tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="unsolved_groups 'drop' needs the solved flags"):
        compute_weights(returns, groups, None, WeightsConfig(unsolved_groups="drop"))


def test_unsolved_groups_at_its_default_leaves_dumps_and_cache_keys_as_they_were():
    from tasks.caching import stage_key  # imports Prefect: only this test needs it

    before = {
        "mode": "drift",
        "gamma": 0.9,
        "beta": 0.1,
        "repetition_lambda": 0.5,
    }  # the dump before the field
    assert WeightsConfig().model_dump() == before
    assert WeightsConfig(unsolved_groups="drop").model_dump()["unsolved_groups"] == "drop"
    key_before = stage_key("weights", rollouts="r", weights=before)
    assert stage_key("weights", rollouts="r", weights=WeightsConfig()) == key_before
    assert stage_key("weights", rollouts="r", weights=WeightsConfig(unsolved_groups="drop")) != key_before
    with pytest.raises(ValueError):
        WeightsConfig(unsolved_groups="keep")


def test_weight_on_unsolved_groups_counts_weight_not_groups():
    # groups a (3 rows, solved), b (1 row, unsolved), c (2 rows, unsolved); weights as given
    w = np.array([3.0, 0.0, 0.0, 1.0, 1.5, 0.5])
    g = np.array(["a", "a", "a", "b", "c", "c"])
    solved = np.array([True, False, False, False, False, False])
    d = diagnostics(w, g, solved, np.zeros(6))
    assert d.share_groups_no_success == pytest.approx(2 / 3)
    assert d.share_weight_no_success == pytest.approx(3 / 6)
    assert d.max_group_size == 3


def test_weight_warnings_past_each_threshold_say_what_to_do():
    # 4 groups of 4; the unsolved groups c, d hold 8 of 16 weight (50% > 25%); one weight 3.9 of 4
    w = np.array([3.9, 0.1, 0, 0, 1, 1, 1, 1, 4, 0, 0, 0, 2, 2, 0, 0])
    g = np.repeat(np.array(["a", "b", "c", "d"]), 4)
    solved = np.array([1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    d = diagnostics(w, g, solved, np.zeros(16))
    assert d.share_weight_no_success == pytest.approx(0.5)
    warnings = weight_warnings(d)
    assert len(warnings) == 2
    assert warnings[0].startswith(
        "50% of the weight is on groups in which no trajectory is solved (50% of the groups"
    )
    assert "weights.unsolved_groups: drop" in warnings[0] and "{kind: direction}" in warnings[0]
    assert warnings[1].startswith("max weight 4.00 of a possible 4: one trajectory holds its whole group")
    # ESS: (16)^2 / (3.9^2 + 0.1^2 + 4 + 16 + 8) = 256 / 43.22 = 5.92 of 16 (37%): no ESS warning
    assert d.ess_fraction == pytest.approx(256 / 43.22 / 16)
    uniform = diagnostics(np.ones(16), g, np.ones(16, dtype=bool), np.zeros(16))
    assert weight_warnings(uniform) == []


def test_low_ess_warns():
    # 20 groups of 1 trajectory weighted 1 and one of 20 with all weight on one: ESS (40)^2 / (20 + 400) = 3.8
    w = np.concatenate([np.ones(20), [20.0], np.zeros(19)])
    g = np.concatenate([np.arange(20), np.full(20, 99)])
    d = diagnostics(w, g, np.ones(40, dtype=bool), np.zeros(40))
    assert d.ess_overall == pytest.approx(1600 / 420)
    assert weight_warnings(d)[0].startswith("ESS 3.8 of 40 trajectories (9.5%; threshold 10%)")


def test_weights_stage_prints_the_diagnostics_and_warnings(capsys):
    from tasks.weights import report_weights

    meta = {
        "n_trajectories": 384,
        "n_groups": 48,
        "share_weight_no_success": 0.5625,
        "share_groups_no_success": 0.5,
        "ess_overall": 104.0,
        "ess_fraction": 104 / 384,
        "max_weight": 7.5,
        "max_group_size": 8,
        "warnings": ["56% of the weight ..."],
    }
    report_weights(meta)  # outside a task run: printed, no Prefect artifact
    assert capsys.readouterr().out == (
        "weights: 384 trajectories in 48 groups\n"
        "  weight on groups with no success  56.2% (50.0% of the groups)\n"
        "  ESS                               104.0 of 384 (27.1%)\n"
        "  max weight                        7.5 (group size 8)\n"
        "WARNING: 56% of the weight ...\n"
    )


@pytest.mark.timeout(900)  # as in tests/test_robustness.py, where it was
def test_non_finite_values_never_reach_the_weights():
    from drift_core.returns import returns_from_arrays
    from drift_core.schemas import WeightsConfig
    from drift_core.weights import compute_weights

    with pytest.raises(ValueError, match=r"turn reward 2 of trajectory 1 is not finite: .*nan"):
        returns_from_arrays(
            np.array([1.0, 0.0, np.nan]), np.zeros(2), np.ones(2), np.ones(2), 0.9, 0.5, np.array([1, 2])
        )
    with pytest.raises(ValueError, match=r"return at index 1 is not finite: .*inf"):
        compute_weights(np.array([0.0, np.inf]), np.array([0, 0]), None, WeightsConfig())
