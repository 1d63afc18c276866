"""configs/paper.yaml holds the reference run scripts' values (docs/paper_recipe.md), and the
constant schedule the training script uses."""

from __future__ import annotations

import pytest
import torch

from flows.config import load_config
from tests.helpers import ROOT


def test_paper_yaml_is_the_reference_scripts() -> None:
    cfg = load_config(str(ROOT / "configs" / "paper.yaml"))
    # run_generate_data.sh (and the generation script's defaults)
    assert (cfg.reference_model.path, cfg.data.source, cfg.data.split) == (
        "Qwen/Qwen2.5-3B-Instruct",
        "hf:meta-math/MetaMathQA",
        "train",
    )
    assert (cfg.data.filter_field, cfg.data.filter_value, cfg.data.limit) == ("type", "MATH_*", 1800)
    assert (cfg.rollout.k, cfg.rollout.seed) == (16, 42)
    s = cfg.rollout.sampling
    assert (s.temperature, s.top_p, s.max_new_tokens, s.feedback_temperature) == (1.0, 1.0, 512, None)
    p = cfg.protocol
    assert (p.prompt_mode, p.answer_format, p.max_turns, p.max_actions, p.max_actions_per_traj) == (
        "full",
        "think",
        5,
        1,
        5,
    )
    assert (p.instruction_max_tokens, p.format_penalty, p.feedback, p.system_prompt, p.prefill) == (
        400,
        -0.1,
        "Incorrect. Please think again.",
        "You're a helpful assistant. ",
        True,
    )
    assert (p.task_instruction, p.answer_parse, p.history) == (None, "reference", "canonical")
    assert (cfg.verifier.kind, cfg.verifier.reference_dataset) == ("reference", "metamathqa")
    # run_weight_sft.sh
    w = cfg.weights
    assert (w.mode, w.gamma, w.beta, w.repetition_lambda, w.unsolved_groups) == (
        "drift",
        0.9,
        0.1,
        0.5,
        "weight",
    )
    t = cfg.train
    assert (t.learning_rate, t.lr_schedule, t.warmup_ratio, t.weight_decay, t.max_grad_norm) == (
        5e-6,
        "constant",
        0.1,
        0.1,
        1.0,
    )
    assert (t.epochs, t.batch_size * t.grad_accum, t.max_seq_len, t.seed) == (1, 2 * 16 * 4, 8192 + 512, 42)
    assert (t.target, t.normalize, t.supervise_eot, t.precision, t.gradient_checkpointing) == (
        "terminal",
        "mean",
        "reference",
        "bf16",
        True,
    )
    # run_all_benchmark.sh
    assert (cfg.eval_max_turns, cfg.eval.max_new_tokens, cfg.eval.answer_format) == (5, 1024, "think")
    checks = {
        e.name: (cfg.eval_verifier(e).kind, cfg.eval_verifier(e).reference_dataset)
        for _, e in cfg.eval.entries()
    }
    assert checks == {
        "math500": ("reference", "math500"),
        "theoremqa": ("reference", "theoremqa"),
        "gpqa-diamond": ("reference", "gpqa"),
        "mmlu-redux": ("reference", "mmlu-redux"),
        "math": ("reference", "hendrycks_math"),
        "mmlu-pro": ("reference", "mmlu_pro"),
    }


@pytest.mark.parametrize(
    ("decay", "expected"),
    [(True, [0.0, 0.5, 1.0, 2 / 3, 1 / 3, 0.0]), (False, [0.0, 0.5, 1.0, 1.0, 1.0, 1.0])],
)
def test_schedule_after_warmup(decay: bool, expected: list[float]) -> None:
    """2 warmup steps of 5: linear decay to 0 (drift's default) or constant (constant_with_warmup)."""
    from tasks.trainer import linear_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, warmup=2, total=5, decay=decay)
    seen = []
    for _ in range(6):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx(expected)


def test_lr_schedule_stays_out_of_dumps_at_its_default() -> None:
    """Train cache keys written before the setting existed still match."""
    from drift_core.schemas import TrainConfig

    assert "lr_schedule" not in TrainConfig().model_dump()
    assert TrainConfig(lr_schedule="constant").model_dump()["lr_schedule"] == "constant"
