"""The grading pool (tasks/grade.py) under load: a pathological answer costs bounded time and no
wrong verdicts (docs/reliability.md, section 4)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
pytestmark = pytest.mark.timeout(900)


# ============================================================================================
# 4. Load: grading pool, weights in bounded memory
# ============================================================================================


def test_a_pathological_answer_costs_bounded_time_and_no_wrong_verdicts():
    """A million-digit number is stuck in a C call no signal interrupts: the pool's outer limit
    kills and rebuilds the pool; every other answer in the batch still gets its right verdict
    (including those graded by the rebuilt, fresh workers)."""
    from drift_core.schemas import ProtocolConfig, VerifierConfig
    from tasks.grade import Grader

    grader = Grader(ProtocolConfig(), VerifierConfig(kind="math", workers=2, timeout_s=1.0))
    ordinary = [
        ("<answer>\\frac{1}{2}</answer>", "0.5", True),
        ("<answer>7</answer>", "7", True),
        ("<answer>8</answer>", "7", False),
        ("<answer>\\sqrt{4}</answer>", "2", True),
        ("no answer tag", "3", False),
    ] * 4
    items = [(c, g, 8) for c, g, _ in ordinary]
    items.insert(7, ("<answer>" + "9" * 1_000_000 + "</answer>", "5", 512))
    items.insert(3, ("<answer>9^{9^{9^{9}}}</answer>", "5", 512))  # the signal-based limit stops this
    try:
        start = time.perf_counter()
        results = grader.grade(items)
        elapsed = time.perf_counter() - start
        again = grader.grade([(c, g, 8) for c, g, _ in ordinary])  # the rebuilt pool grades right
    finally:
        grader.close()
    assert results[3].correct is False and results[8].correct is False
    rest = [r.correct for i, r in enumerate(results) if i not in (3, 8)]
    assert rest == [want for _, _, want in ordinary]
    assert [r.correct for r in again] == [want for _, _, want in ordinary]
    assert grader.timeouts == 1
    outer = 1.0 * ProtocolConfig().max_actions + 10.0
    assert elapsed < outer + 60, elapsed  # the outer limit, a pool restart and 22 answers
