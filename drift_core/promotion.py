"""The promotion gate as a pure decision: does a challenger beat a baseline on the same problems?

A challenger is promoted when its multi@T (share of problems solved within T turns) exceeds the
baseline's by at least ``min_delta`` AND the (1 - alpha) paired bootstrap interval of the difference
lies above 0. Pairing by problem removes the problems' own difficulty from the noise; requiring the
interval above 0 keeps a lucky draw on a small eval set from moving the champion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from drift_core.metrics import paired_bootstrap_ci

__all__ = ["PromotionDecision", "decide_promotion"]


class PromotionDecision(BaseModel):
    promote: bool
    reason: str
    n_problems: int
    challenger_multi_at_t: float
    baseline_multi_at_t: float
    delta: float
    ci_low: float
    ci_high: float
    min_delta: float
    alpha: float


def decide_promotion(
    challenger_solved: Sequence[bool],
    baseline_solved: Sequence[bool],
    min_delta: float = 0.0,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> PromotionDecision:
    """Compare per-problem solved-within-T outcomes of two systems, given in the same problem order."""
    a = np.asarray(challenger_solved, dtype=np.float64)
    b = np.asarray(baseline_solved, dtype=np.float64)
    delta, lo, hi = paired_bootstrap_ci(a, b, n_boot=n_boot, seed=seed, alpha=alpha)
    if delta < min_delta:
        reason = f"multi@T gain {delta:+.4f} is below promote.min_delta={min_delta:+.4f}"
    elif lo <= 0.0:
        reason = (
            f"the {100 * (1 - alpha):.0f}% paired bootstrap interval [{lo:+.4f}, {hi:+.4f}] is not above 0"
        )
    else:
        reason = f"multi@T gain {delta:+.4f} >= {min_delta:+.4f}, interval [{lo:+.4f}, {hi:+.4f}] above 0"
    return PromotionDecision(
        promote=delta >= min_delta and lo > 0.0,
        reason=reason,
        n_problems=int(a.shape[0]),
        challenger_multi_at_t=float(a.mean()),
        baseline_multi_at_t=float(b.mean()),
        delta=delta,
        ci_low=lo,
        ci_high=hi,
        min_delta=min_delta,
        alpha=alpha,
    )
