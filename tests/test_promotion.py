"""The promotion gate's decision, the iterate loop's next round and its one-loop-at-a-time guard
(against a real sqlite-backed MLflow registry). The loop end to end: tests/test_iterate.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from drift_core.promotion import decide_promotion
from drift_core.schemas import DriftConfig

pytestmark = pytest.mark.timeout(300)


def test_gate_promotes_a_clear_gain_only():
    base = [False] * 20 + [True] * 12
    better = [True] * 12 + [False] * 8 + [True] * 12  # solves 12 more, loses none
    win = decide_promotion(better, base)
    assert win.promote and win.delta == pytest.approx(12 / 32) and win.ci_low > 0, win
    assert win.challenger_multi_at_t == pytest.approx(24 / 32) and win.baseline_multi_at_t == pytest.approx(
        12 / 32
    )

    tie = decide_promotion(base, base)
    assert not tie.promote and tie.delta == 0 and "not above 0" in tie.reason, tie

    noisy = decide_promotion([True] + base[1:], base)  # one problem more: the interval reaches 0
    assert not noisy.promote and noisy.delta > 0 and noisy.ci_low <= 0, noisy

    short = decide_promotion(better, base, min_delta=0.5)  # a real gain, but below the bar
    assert not short.promote and "promote.min_delta" in short.reason, short


def test_next_round_follows_the_gate_unless_told_to_go_on():
    from flows.iterate_flow import next_round_overrides

    summary = {"registered": {"name": "drift-x", "version": "4"}, "promotion": {"promoted": False}}
    gated = DriftConfig()
    assert next_round_overrides(gated, summary) is None  # not promoted: the loop stops
    expected = ["reference_model.path=models:/drift-x/4", "base_model.path=models:/drift-x/4"]
    promoted = {**summary, "promotion": {"promoted": True}}
    assert next_round_overrides(gated, promoted) == expected
    regardless = DriftConfig.model_validate({"iterate": {"stop_on_no_promotion": False}})
    assert next_round_overrides(regardless, summary) == expected  # the round's own model, the challenger
    with pytest.raises(ValueError, match="registered no model"):
        next_round_overrides(regardless, {"registered": None})


def test_rounds_are_bounded_and_need_the_registry():
    with pytest.raises(ValueError, match="exceeds iterate.max_rounds"):
        DriftConfig.model_validate({"iterate": {"rounds": 11}})
    with pytest.raises(ValueError, match="needs run.register_model"):
        DriftConfig.model_validate({"iterate": {"rounds": 2}, "run": {"register_model": False}})
    assert DriftConfig.model_validate({"run": {"name": "demo"}}).registered_model == "drift-demo"


def test_one_iterate_loop_per_registered_model(tmp_path):
    from flows.iterate_flow import LOCK_TAG, IterateInFlight, _one_iterate_at_a_time
    from tasks.register import registry_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = DriftConfig.model_validate({"run": {"tracking_uri": uri, "name": "loop"}})
    client = registry_client(uri)
    with _one_iterate_at_a_time(cfg):
        owner = json.loads(client.get_registered_model("drift-loop").tags[LOCK_TAG])
        with pytest.raises(IterateInFlight, match="already in flight"), _one_iterate_at_a_time(cfg):
            pass  # this process still runs the first loop
    assert LOCK_TAG not in client.get_registered_model("drift-loop").tags  # released at the end

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client.set_registered_model_tag("drift-loop", LOCK_TAG, json.dumps({**owner, "pid": dead.pid}))
    with _one_iterate_at_a_time(cfg):  # a killed loop's tag does not block the next one forever
        assert json.loads(client.get_registered_model("drift-loop").tags[LOCK_TAG])["pid"] == owner["pid"]
