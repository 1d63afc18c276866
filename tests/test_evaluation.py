"""flows/evaluation.py: the protocol a benchmark is evaluated with, and what names its metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from drift_core.schemas import DriftConfig, ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def test_eval_prompt_mode_overrides_the_rollouts_mode_for_evaluation_only():
    """The reference's eval script runs the simple prompt mode whatever mode generated the data:
    ``eval.prompt_mode`` sets the evaluation's mode; the rollouts keep the protocol's."""
    from flows.evaluation import entry_protocol

    cfg = DriftConfig.model_validate({"protocol": {"prompt_mode": "full"}, "eval": {"prompt_mode": "simple"}})
    [(_, entry)] = cfg.eval.entries()
    assert entry_protocol(cfg, entry).prompt_mode == "simple"
    assert cfg.protocol.prompt_mode == "full"
    unset = DriftConfig.model_validate({"protocol": {"prompt_mode": "full"}})
    assert entry_protocol(unset, unset.eval.entries()[0][1]).prompt_mode == "full"


def test_unset_eval_prompt_mode_is_absent_from_dumps_so_nothing_changes():
    """Unset, the new field is in no dump: a run's params and every key made from the eval
    section stay as they were before it existed; set, it is there."""
    from drift_core.schemas import flatten
    from flows.evaluation import entry_protocol
    from tasks.caching import stage_key

    cfg = DriftConfig()
    assert "prompt_mode" not in cfg.eval.model_dump(mode="json")
    assert "eval.prompt_mode" not in flatten(cfg)
    # the protocol an evaluation is keyed on is the same object as without the field
    entry = cfg.eval.entries()[0][1]
    key = stage_key("evaluate", protocol=entry_protocol(cfg, entry))
    same = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"prompt_mode": "simple"})})
    assert stage_key("evaluate", protocol=entry_protocol(same, entry)) == key  # simple is the default
    full = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"prompt_mode": "full"})})
    assert stage_key("evaluate", protocol=entry_protocol(full, entry)) != key
    assert flatten(full)["eval.prompt_mode"] == "full"


def test_paper_yaml_rolls_out_in_full_mode_and_evaluates_in_simple_mode():
    """configs/paper.yaml as the reference's scripts run: run_generate_data.sh in full mode,
    run_all_benchmark.sh with PROMPT_MODE=simple."""
    from flows.evaluation import entry_protocol

    cfg = DriftConfig.model_validate(yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text()))
    assert cfg.protocol.prompt_mode == "full"
    assert cfg.eval.prompt_mode == "simple"
    for _, entry in cfg.eval.entries():
        assert entry_protocol(cfg, entry).prompt_mode == "simple"


@pytest.mark.parametrize(("named", "prefix"), [(True, "math500.trained"), (False, "math500")])
def test_system_metrics_are_named_by_benchmark_and_system(named, prefix):
    from flows.evaluation import EvalSet, System, eval_label

    cfg = DriftConfig()
    ev = EvalSet("math500", "eval", None, cfg.verifier, "auto", cfg.protocol, 64)  # type: ignore[arg-type]
    system = System("trained", "/m", "sha256:x", ModelConfig(path="/m"), named_metrics=named)
    assert system.prefix(ev) == prefix
    assert eval_label("trained", ev, [ev]) == "evaluate-trained"
    assert eval_label("trained", ev, [ev, ev]) == "evaluate-trained-math500"


def test_system_of_a_resolved_model_records_its_fingerprint():
    from flows.evaluation import System
    from tasks.models import ResolvedModel

    model = ResolvedModel(ModelConfig(path="models:/m/3"), "/cache/m3", "mlflow:m/3", "3")
    system = System.of("champion", model)
    assert (system.path, system.fingerprint, system.model_cfg.path) == (
        "/cache/m3",
        "mlflow:m/3",
        "models:/m/3",
    )
    assert system.params == {"system": "champion", "model_fingerprint": "mlflow:m/3"}
