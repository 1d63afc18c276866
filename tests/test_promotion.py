"""The promotion gate's decision, the iterate loop's next round and its one-loop-at-a-time guard
(against a real sqlite-backed MLflow registry). The loop end to end: tests/test_iterate.py."""

from __future__ import annotations

import json
import math
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


def test_a_gain_exactly_at_min_delta_is_promoted():
    """The bar is inclusive: a gain of exactly ``min_delta`` promotes, the next float above it does
    not. 12 of 32 more solved: the gain is 12/32 = 0.375, exact in binary floating point."""
    base = [False] * 20 + [True] * 12
    better = [True] * 12 + [False] * 8 + [True] * 12
    assert (sum(better) - sum(base)) / 32 == 0.375  # by hand
    at = decide_promotion(better, base, min_delta=0.375)
    assert at.delta == 0.375 and at.ci_low > 0, at
    assert at.promote and "below" not in at.reason, at
    above = decide_promotion(better, base, min_delta=math.nextafter(0.375, 1.0))
    assert not above.promote and "below promote.min_delta" in above.reason, above


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
    # the bound is inclusive: max_rounds rounds are allowed, one more is not (default max_rounds 10)
    assert DriftConfig.model_validate({"iterate": {"rounds": 10}}).iterate.rounds == 10
    with pytest.raises(ValueError, match="iterate.rounds=11 exceeds iterate.max_rounds=10"):
        DriftConfig.model_validate({"iterate": {"rounds": 11}})
    assert DriftConfig.model_validate({"iterate": {"rounds": 3, "max_rounds": 3}}).iterate.rounds == 3
    with pytest.raises(ValueError, match="iterate.rounds=4 exceeds iterate.max_rounds=3"):
        DriftConfig.model_validate({"iterate": {"rounds": 4, "max_rounds": 3}})
    with pytest.raises(ValueError, match="rounds"):
        DriftConfig.model_validate({"iterate": {"rounds": 0}})
    # one round needs no registry; two do
    assert DriftConfig.model_validate({"run": {"register_model": False}}).iterate.rounds == 1
    with pytest.raises(ValueError, match="needs run.register_model"):
        DriftConfig.model_validate({"iterate": {"rounds": 2}, "run": {"register_model": False}})
    assert DriftConfig.model_validate({"run": {"name": "demo"}}).registered_model == "drift-demo"


def test_one_iterate_loop_per_registered_model(tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.iterate_flow import LOCK_TAG, IterateInFlight, _one_iterate_at_a_time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = DriftConfig.model_validate({"run": {"tracking_uri": uri, "name": "loop"}})
    client = MlflowClient(uri, registry_uri=uri)
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


def _eval_manifest(store, key: str, solved: list[bool]):
    """An evaluation artifact as the evaluate stage writes it: one row per problem, its verdicts."""
    import polars as pl

    df = pl.DataFrame(
        {"prompt_id": [f"p{i:02d}" for i in range(len(solved))], "turn_correct": [[False, s] for s in solved]}
    )
    return store.write_parquet(df, "evaluate", key)


def test_promote_moves_champion_only_on_a_win_and_challenger_always(tmp_path, prefect_api):
    """The promote task against a real sqlite registry: version 2 beats the champion (version 1)
    clearly, so both aliases move to it; version 3 is no better than version 2, so only
    ``challenger`` moves and ``champion`` stays on 2."""
    from mlflow.tracking import MlflowClient
    from prefect import flow

    from drift_core.schemas import PromoteConfig
    from tasks.promote import promote
    from tasks.store import ArtifactStore

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    name = "drift-gate"
    client.create_registered_model(name)
    (tmp_path / "model").mkdir()
    for _ in range(3):
        client.create_model_version(name, source=str(tmp_path / "model"))
    client.set_registered_model_alias(name, "champion", "1")
    store = ArtifactStore(str(tmp_path / "store"))
    base = [False] * 20 + [True] * 12
    better = [True] * 12 + [False] * 8 + [True] * 12  # 12 more of 32 solved, none lost
    champion_eval = _eval_manifest(store, "v1", base)
    v2_eval = _eval_manifest(store, "v2", better)
    v3_eval = _eval_manifest(store, "v3", better)

    @flow(name="promotion-test", persist_result=False)
    def gate(version: str, challenger, baseline) -> dict:
        return promote(name, version, challenger, baseline, "champion", PromoteConfig(), store.url, uri)

    def aliases() -> dict[str, str]:
        return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}

    won = gate("2", v2_eval, champion_eval)
    assert won["promoted"] is True and won["champion"] == "2" and won["delta"] == 0.375, won
    assert aliases() == {"champion": "2", "challenger": "2"}
    assert client.get_model_version(name, "2").tags["drift.promotion"] == "promoted"

    tied = gate("3", v3_eval, v2_eval)
    assert tied["promoted"] is False and tied["champion"] == "2" and tied["delta"] == 0.0, tied
    assert aliases() == {"champion": "2", "challenger": "3"}
    assert client.get_model_version(name, "3").tags["drift.promotion"] == "not promoted"
