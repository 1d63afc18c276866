"""DRIFT's importance weights within each prompt's group (docs/method.md#weights).

    w_i = exp(R_i / beta) / mean_j exp(R_j / beta)        (j over the K trajectories of i's prompt)

so every group's weights average 1. It is computed stably: exp((R_i - max_j R_j) / beta), whose
largest term is exactly 1, so nothing overflows for any beta > 0 and any finite returns, and the
group sum is >= 1. Ties at the maximum share the weight as beta -> 0; beta -> inf gives all ones.

Everything here is vectorised over many groups at once: each row gets a group slot (integer codes
used directly, or ``np.unique(return_inverse=True)``), and per-group reductions are
``np.maximum.at`` / ``np.bincount``. There is no Python loop over groups or rows.

Weighting modes (``WeightsConfig.mode``): ``drift`` (the formula above), ``uniform`` (all 1: plain
multi-turn SFT on every trajectory), ``success_only`` (1 for solved trajectories, 0 otherwise:
rejection-sampling SFT). ``WeightsConfig.unsolved_groups: drop`` (an ablation, not the paper) then
zeroes every group in which no trajectory is solved, leaving the other groups' weights as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

from drift_core.schemas import WeightsConfig

__all__ = [
    "GroupIndex",
    "WeightDiagnostics",
    "compute_weights",
    "diagnostics",
    "group_ess",
    "group_index",
    "group_weights",
    "weight_warnings",
]


@dataclass(frozen=True)
class GroupIndex:
    """Rows grouped by id. ``inverse[i]`` is row i's group slot (0..n_slots-1, slots in sorted id
    order); ``sizes[k]`` is the number of rows in slot k. Slots may be empty (size 0) when integer ids
    are used directly as slots; every reduction ignores empty slots."""

    inverse: np.ndarray
    sizes: np.ndarray

    @property
    def n_slots(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def n_groups(self) -> int:
        return int(np.count_nonzero(self.sizes))


def group_index(group_ids: np.ndarray) -> GroupIndex:
    """Group rows by id (ints, strings or any sortable 1-D array), without a Python loop.

    Integer ids spanning a range not much larger than n (e.g. dense codes from a categorical) are used
    as slots directly (O(n), no sort); anything else goes through ``np.unique(return_inverse=True)``.
    """
    g = np.asarray(group_ids)
    if g.ndim != 1:
        raise ValueError(f"group_ids must be 1-D, got shape {g.shape}")
    n = g.shape[0]
    if n == 0:
        return GroupIndex(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    if g.dtype.kind in "iu":
        lo, hi = int(g.min()), int(g.max())
        if hi - lo < 4 * n + 1024:
            inverse = g.astype(np.int64) - lo
            return GroupIndex(inverse, np.bincount(inverse, minlength=hi - lo + 1))
    _, inverse = np.unique(g, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64, copy=False)
    return GroupIndex(inverse, np.bincount(inverse))


def _as_returns(returns: np.ndarray) -> np.ndarray:
    r = np.asarray(returns, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"returns must be 1-D, got shape {r.shape}")
    bad = ~np.isfinite(r)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"return at index {i} is not finite: {r[i]!r} ({int(bad.sum())} non-finite in all)")
    return r


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not beta > 0.0:  # also rejects NaN
        raise ValueError(f"beta must be > 0, got {beta!r}")
    return beta


def _drift_weights(r: np.ndarray, gi: GroupIndex, beta: float) -> np.ndarray:
    """The stable group softmax scaled to mean 1, for already validated inputs."""
    if r.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    if math.isinf(beta):
        return np.ones_like(r)
    group_max = np.full(gi.n_slots, -np.inf)
    np.maximum.at(group_max, gi.inverse, r)
    # R_i - max <= 0; may round to -inf for returns near +-1.8e308, and exp(-inf) = 0 is correct.
    with np.errstate(over="ignore"):
        z = (r - group_max[gi.inverse]) / beta
    e = np.exp(z)  # in [0, 1], exactly 1 at each group's maximum
    sums = np.bincount(gi.inverse, weights=e, minlength=gi.n_slots)  # >= 1 where the slot is used
    with np.errstate(divide="ignore", invalid="ignore"):  # empty slots: 0 / 0, never read
        scale = gi.sizes / sums  # 1 / mean_j exp(...)
    return e * scale[gi.inverse]


def group_weights(returns: np.ndarray, beta: float) -> np.ndarray:
    """DRIFT weights of ONE group (docs/method.md#weights): w_i = exp(R_i/beta) / mean_j exp(R_j/beta).

    Stable (max subtracted), float64; a group of one gets 1.0, equal returns all get 1.0, beta -> 0
    puts all mass on the maximum (ties share it equally). Non-finite returns raise ValueError naming
    the index.
    """
    r = _as_returns(returns)
    beta = _check_beta(beta)
    return _drift_weights(r, group_index(np.zeros(r.shape[0], dtype=np.int64)), beta)


def compute_weights(
    returns: np.ndarray,
    group_ids: np.ndarray,
    solved: np.ndarray | None,
    cfg: WeightsConfig,
) -> np.ndarray:
    """Weights of many groups at once, in input order (float64 ``[n]``).

    ``group_ids`` is any sortable 1-D array (ints or strings; typically the prompt id). Modes:
    ``drift`` = :func:`group_weights` applied within each group (vectorised, no loop over groups),
    ``uniform`` = all 1, ``success_only`` = 1 where ``solved`` else 0 (``solved`` required).
    ``cfg.unsolved_groups == "drop"`` (``solved`` required) then sets to 0 the weights of every
    group with no solved trajectory.
    """
    r = _as_returns(returns)
    g = np.asarray(group_ids)
    if g.shape != r.shape:
        raise ValueError(f"group_ids has shape {g.shape}, returns {r.shape}")
    drop = cfg.unsolved_groups == "drop"
    s = None
    if cfg.mode == "success_only" or drop:
        if solved is None:
            needs = "mode 'success_only'" if cfg.mode == "success_only" else "unsolved_groups 'drop'"
            raise ValueError(f"{needs} needs the solved flags")
        s = np.asarray(solved, dtype=bool)
        if s.shape != r.shape:
            raise ValueError(f"solved has shape {s.shape}, returns {r.shape}")
    gi = group_index(g) if cfg.mode == "drift" or drop else None
    if cfg.mode == "uniform":
        w = np.ones_like(r)
    elif cfg.mode == "success_only":
        w = s.astype(np.float64)
    elif cfg.mode == "drift":
        w = _drift_weights(r, gi, _check_beta(cfg.beta))
    else:
        raise ValueError(f"unknown weighting mode {cfg.mode!r}")
    if drop:  # groups in which nothing is solved get 0; the others keep their weights
        solved_in_group = np.bincount(gi.inverse, weights=s.astype(np.float64), minlength=gi.n_slots) > 0
        w = np.where(solved_in_group[gi.inverse], w, 0.0)
    return w


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


class WeightDiagnostics(BaseModel):
    """How much the weights concentrate; logged to MLflow by the weights stage.

    ESS (effective sample size) = (sum w)^2 / sum w^2: n for equal weights, 1 when one trajectory
    holds all the weight. A group whose weights are all 0 (success_only, nothing solved) has ESS 0.
    """

    n_trajectories: int
    n_groups: int
    ess_overall: float
    ess_per_group_mean: float
    ess_per_group_min: float
    ess_fraction: float
    max_weight: float
    share_groups_no_success: float
    share_weight_no_success: float = 0.0
    max_group_size: int = 0
    mean_return: float


def _ess(sum_w: np.ndarray, sum_w2: np.ndarray) -> np.ndarray:
    return np.divide(sum_w * sum_w, sum_w2, out=np.zeros_like(sum_w), where=sum_w2 > 0)


def group_ess(weights: np.ndarray, group_ids: np.ndarray, index: GroupIndex | None = None) -> np.ndarray:
    """ESS of each group, ``[n_groups]`` in sorted group-id order (0 for an all-zero group)."""
    w = np.asarray(weights, dtype=np.float64)
    gi = index if index is not None else group_index(np.asarray(group_ids))
    used = gi.sizes > 0
    sw = np.bincount(gi.inverse, weights=w, minlength=gi.n_slots)[used]
    sw2 = np.bincount(gi.inverse, weights=w * w, minlength=gi.n_slots)[used]
    return _ess(sw, sw2)


def diagnostics(
    weights: np.ndarray,
    group_ids: np.ndarray,
    solved: np.ndarray,
    returns: np.ndarray,
) -> WeightDiagnostics:
    """Summary of a weight vector over its groups (vectorised). Empty input gives all zeros."""
    w = np.asarray(weights, dtype=np.float64)
    g = np.asarray(group_ids)
    s = np.asarray(solved, dtype=bool)
    r = np.asarray(returns, dtype=np.float64)
    n = w.shape[0]
    if not (g.shape == s.shape == r.shape == (n,)):
        raise ValueError(
            f"shape mismatch: weights {w.shape}, group_ids {g.shape}, solved {s.shape}, returns {r.shape}"
        )
    if n == 0:
        return WeightDiagnostics(
            n_trajectories=0,
            n_groups=0,
            ess_overall=0.0,
            ess_per_group_mean=0.0,
            ess_per_group_min=0.0,
            ess_fraction=0.0,
            max_weight=0.0,
            share_groups_no_success=0.0,
            share_weight_no_success=0.0,
            mean_return=0.0,
        )
    gi = group_index(g)
    per_group = group_ess(w, g, gi)
    ess_all = float(_ess(np.array([w.sum()]), np.array([np.dot(w, w)]))[0])
    solved_per_group = np.bincount(gi.inverse, weights=s.astype(np.float64), minlength=gi.n_slots)
    unsolved_rows = solved_per_group[gi.inverse] == 0  # before the empty slots are dropped
    solved_per_group = solved_per_group[gi.sizes > 0]
    total = float(w.sum())
    return WeightDiagnostics(
        n_trajectories=n,
        n_groups=gi.n_groups,
        ess_overall=ess_all,
        ess_per_group_mean=float(per_group.mean()),
        ess_per_group_min=float(per_group.min()),
        ess_fraction=ess_all / n,
        max_weight=float(w.max()),
        share_groups_no_success=float((solved_per_group == 0).mean()),
        share_weight_no_success=float(w[unsolved_rows].sum()) / total if total > 0 else 0.0,
        max_group_size=int(gi.sizes.max()),
        mean_return=float(r.mean()),
    )


# Past these, a training run is likely to teach little or the wrong thing (docs/method.md#weight-diagnostics).
MAX_SHARE_WEIGHT_NO_SUCCESS = 0.25
MIN_ESS_FRACTION = 0.1


def weight_warnings(d: WeightDiagnostics) -> list[str]:
    """What to fix before spending a training run on these weights (empty: nothing)."""
    largest_group = d.max_group_size  # K: the most one weight can be (group weights average 1)
    out: list[str] = []
    if d.share_weight_no_success > MAX_SHARE_WEIGHT_NO_SUCCESS:
        out.append(
            f"{d.share_weight_no_success:.0%} of the weight is on groups in which no trajectory is solved "
            f"({d.share_groups_no_success:.0%} of the groups; threshold {MAX_SHARE_WEIGHT_NO_SUCCESS:.0%}): "
            "there the weights only rank failures, and training imitates them. Raise rollout.k or the "
            "rollout temperature (rollout.sampling.feedback_temperature for the retries), use a feedback "
            "the reference can act on (protocol.feedback: {kind: direction}), easier prompts, or "
            "weights.unsolved_groups: drop"
        )
    if d.n_trajectories and d.ess_fraction < MIN_ESS_FRACTION:
        out.append(
            f"ESS {d.ess_overall:.1f} of {d.n_trajectories} trajectories ({d.ess_fraction:.1%}; threshold "
            f"{MIN_ESS_FRACTION:.0%}): a few trajectories carry the weight. Raise weights.beta or rollout.k"
        )
    if largest_group > 1 and d.max_weight >= 0.9 * largest_group:
        out.append(
            f"max weight {d.max_weight:.2f} of a possible {largest_group}: one trajectory holds its whole "
            "group's weight (weights.beta is small against the return gaps). Raise weights.beta"
        )
    return out
