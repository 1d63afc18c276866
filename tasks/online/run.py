"""``drift online``'s run: GRPO settings from drift's config, one run directory per training
setting (resumed from its last complete checkpoint, or its finished result returned), the cost
figures and MLflow records.

Cost figures, the comparison's other half: generated tokens (every token the policy sampled),
optimizer steps and wall seconds; they survive a resume through a file in each checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from drift_core.errors import InputError
from drift_core.protocol import initial_messages
from drift_core.schemas import DriftConfig, SamplingConfig
from tasks.atomic import write_text_atomic
from tasks.online.rollout_func import (
    TRL_VERSION_TESTED,
    Problem,
    ProtocolRollout,
    drift_return,
    problem_index,
)

if TYPE_CHECKING:
    from trl import GRPOConfig

log = logging.getLogger("tasks.online_rl")

COSTS_FILE = "drift_online_costs.json"
RESULT_FILE = "result.json"
MODEL_DIR = "model"
ROLLOUTS_DIR = "rollouts"


class OnlineResult(BaseModel):
    """What ``drift online`` prints last (one JSON line) and writes to ``result.json``."""

    model_dir: str
    generated_tokens: int
    optimizer_steps: int
    wall_s: float
    mlflow_run_id: str
    output_dir: str
    resumed_from: str | None = None
    cached: bool = False


@dataclass
class Costs:
    """Cumulative over attempts: the figures restored from the checkpoint a run resumed from."""

    rollout: ProtocolRollout
    prior_wall_s: float
    started: float

    def wall_s(self) -> float:
        return self.prior_wall_s + (time.perf_counter() - self.started)

    def as_dict(self, step: int) -> dict[str, float]:
        return {"generated_tokens": self.rollout.generated_tokens, "wall_s": self.wall_s(), "step": step}


def _callback(tracker, costs: Costs):
    from transformers import TrainerCallback

    class TrackAndCheckpointCosts(TrainerCallback):
        """TRL's per-step logs and the cost figures to MLflow; the costs into each checkpoint."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            metrics = {k: v for k, v in (logs or {}).items() if isinstance(v, int | float)}
            metrics.update(generated_tokens=costs.rollout.generated_tokens, wall_s=costs.wall_s())
            tracker.log_metrics(tracker.run_id, metrics, step=int(state.global_step))

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():  # written last: marks the checkpoint complete
                write_text_atomic(folder / COSTS_FILE, json.dumps(costs.as_dict(int(state.global_step))))

    return TrackAndCheckpointCosts()


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` holding the costs file (a kill during a save leaves none)."""
    if not output_dir.is_dir():
        return None
    found = []
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and (path / COSTS_FILE).exists():
            found.append((int(suffix), path))
    return max(found)[1] if found else None


def run_dir(cfg: DriftConfig, fingerprint: str) -> Path:
    """One directory per training setting, so a re-run of the same command resumes or reuses it."""
    from tasks.caching import result_fields, stage_key

    key = stage_key(
        "online",
        model=fingerprint,
        data=cfg.data.model_dump(mode="json"),
        protocol=cfg.protocol.model_dump(mode="json"),
        verifier=result_fields(cfg.verifier),  # speed-only fields out (tasks.caching.SPEED_ONLY)
        sampling=cfg.rollout.sampling.model_dump(mode="json"),
        reward={"gamma": cfg.weights.gamma, "repetition_lambda": cfg.weights.repetition_lambda},
        online=result_fields(cfg.online),
        batch_size=cfg.engine.batch_size,
        turn_history="episode-messages",  # later turns conditioned on the episode's history, not raw tokens
    )
    return Path(cfg.online.output_dir).expanduser().resolve() / f"{cfg.run.name}-{key[:12]}"


def _save_model(model, tokenizer, target: Path) -> None:
    """safetensors + tokenizer under a temporary name, then renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_sampling(sampling: SamplingConfig) -> None:
    """Online RL samples every turn of an episode at one temperature > 0: TRL scores the completion
    tokens under ``GRPOConfig.temperature``, so any other sampling would make its ratios wrong."""
    if sampling.temperature <= 0:
        raise InputError("online RL samples its trajectories: rollout.sampling.temperature must be > 0")
    feedback = sampling.feedback_temperature
    if feedback is not None and feedback != sampling.temperature:
        raise InputError(
            f"online RL samples every turn at one temperature (TRL scores the completion tokens under "
            f"GRPOConfig.temperature): rollout.sampling.feedback_temperature={feedback} differs from "
            f"rollout.sampling.temperature={sampling.temperature}; unset it for `drift online`"
        )


def train_online(
    cfg: DriftConfig, base_dir: str | Path | None = None, callbacks: list | None = None
) -> OnlineResult:
    """Train ``cfg.train_model`` with GRPO on drift's protocol; resume a killed run of the same
    config from its last complete checkpoint; return the cached result of a finished one.
    ``callbacks``: extra ``transformers.TrainerCallback`` objects (tests interrupt a run with one)."""
    started = time.perf_counter()
    check_sampling(cfg.rollout.sampling)
    try:
        import trl
    except ImportError as exc:
        raise InputError(
            f"drift online needs TRL: pip install -e '.[online]' (trl=={TRL_VERSION_TESTED}); {exc}"
        ) from exc

    if trl.__version__ != TRL_VERSION_TESTED:
        log.warning("drift online is tested with trl==%s, found %s", TRL_VERSION_TESTED, trl.__version__)
    from tasks.models import resolved_model

    model = resolved_model(cfg.train_model, cfg.run.tracking_uri)
    model_cfg, model_path, fingerprint = model.cfg, model.path, model.fingerprint
    out = run_dir(cfg, fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / RESULT_FILE
    if result_file.exists() and (out / MODEL_DIR / "config.json").exists():
        return OnlineResult.model_validate_json(result_file.read_text()).model_copy(update={"cached": True})
    return _train(cfg, model_cfg, model_path, fingerprint, out, started, base_dir, callbacks or [])


def grpo_config(cfg: DriftConfig, out: Path, device: str, max_turns: int) -> GRPOConfig:
    """TRL's settings from drift's: the ``online`` section, plus the sampling of ``rollout.sampling``
    (TRL scores the completion tokens under this temperature)."""
    import torch
    from trl import GRPOConfig

    online, sampling = cfg.online, cfg.rollout.sampling
    bf16 = device == "cuda" and cfg.train.precision != "fp32" and torch.cuda.is_bf16_supported()
    total = online.prompts_per_step * online.num_generations
    return GRPOConfig(
        output_dir=str(out),
        max_steps=online.max_steps,
        per_device_train_batch_size=online.micro_batch_size,
        gradient_accumulation_steps=total // online.micro_batch_size,
        num_generations=online.num_generations,
        learning_rate=online.learning_rate,
        lr_scheduler_type="constant_with_warmup"
        if online.lr_scheduler == "constant"
        else online.lr_scheduler,
        warmup_steps=online.warmup_ratio,  # a float in [0, 1): a share of max_steps
        weight_decay=online.weight_decay,
        max_grad_norm=online.max_grad_norm,
        beta=online.beta,
        epsilon=online.epsilon,
        num_iterations=online.num_iterations,
        loss_type=online.loss_type,
        scale_rewards=online.scale_rewards,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_completion_length=max_turns * (sampling.max_new_tokens + 32),
        logging_steps=1,
        save_strategy="steps",
        save_steps=online.save_steps,
        save_total_limit=2,
        seed=online.seed,
        report_to="none",
        use_cpu=device == "cpu",
        bf16=bf16,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **({"gradient_checkpointing": True} if online.gradient_checkpointing else {}),
    )


def _training_prompts(cfg: DriftConfig, base: Path):
    """The training problems (golds checked against the verifier before any generation), the
    verifier they resolved to, and TRL's dataset of first-turn prompts."""
    from datasets import Dataset

    from tasks.golds import check_golds
    from tasks.ingest import load_problems

    df, _ = load_problems(cfg.data, base)
    verifier = check_golds(df.select("prompt_id", "gold"), cfg.data, cfg.verifier, "", base)  # resolves auto
    problems = [Problem(r["prompt_id"], r["question"], r["gold"]) for r in df.iter_rows(named=True)]
    dataset = Dataset.from_list(
        [{"prompt": initial_messages(p.question, cfg.protocol), "prompt_id": p.prompt_id} for p in problems]
    )
    return problems, verifier, dataset


def _record_result(tracker, result: OnlineResult, out: Path) -> None:
    """The finished run's costs, model directory and episode logs to MLflow; ``result.json`` (which
    marks the run finished) last; then the checkpoints go (the finished model replaces them)."""
    final = {"generated_tokens": result.generated_tokens, "optimizer_steps": result.optimizer_steps}
    tracker.log_metrics(tracker.run_id, {**final, "wall_s": result.wall_s}, step=result.optimizer_steps)
    tracker.set_tags({"drift.model_dir": result.model_dir})
    tracker.log_dict(tracker.run_id, result.model_dump(mode="json"), RESULT_FILE)
    if (out / ROLLOUTS_DIR).is_dir():
        tracker.log_artifacts(tracker.run_id, out / ROLLOUTS_DIR, artifact_path=ROLLOUTS_DIR)
    write_text_atomic(out / RESULT_FILE, result.model_dump_json())
    for checkpoint in out.glob("checkpoint-*"):  # GBs each
        shutil.rmtree(checkpoint, ignore_errors=True)


def _train(cfg, model_cfg, model_path, fingerprint, out, started, base_dir, callbacks) -> OnlineResult:
    import trl
    from trl import GRPOTrainer

    from tasks.grade import Grader
    from tasks.models import load_model, load_tokenizer, pick_device
    from tasks.tracking import Tracker

    online, protocol = cfg.online, cfg.protocol
    max_turns = online.max_turns or protocol.max_turns
    problems, verifier, dataset = _training_prompts(
        cfg, Path(base_dir) if base_dir is not None else Path.cwd()
    )
    resume = last_complete_checkpoint(out)
    prior = json.loads((resume / COSTS_FILE).read_text()) if resume else {}

    device = pick_device(cfg.engine.device)
    tokenizer = load_tokenizer(model_path, model_cfg)
    model = load_model(model_path, model_cfg, device="cpu", dtype="float32")
    args = grpo_config(cfg, out, device, max_turns)
    grader = Grader(protocol, verifier)  # its processes end with the run (the `with` below)
    rollout = ProtocolRollout(
        tokenizer,
        problem_index(problems, protocol),
        protocol,
        cfg.rollout.sampling,
        cfg.weights,
        max_turns,
        online.num_generations,
        grader,
        cfg.engine.batch_size,
        online.seed,
        log_dir=out / ROLLOUTS_DIR,
    )
    rollout.generated_tokens = int(prior.get("generated_tokens", 0))
    costs = Costs(rollout, float(prior.get("wall_s", 0.0)), started)

    tracker = Tracker(cfg, run_name=f"{cfg.run.name}-online", tags={"drift.flow": "drift-online"})
    tracker.log_params(
        tracker.run_id,
        {
            "online.trl_version": trl.__version__,
            "online.run_dir": str(out),
            "online.model_fingerprint": fingerprint,
            "online.resumed_from": str(resume) if resume else "",
        },
    )
    status = "FAILED"
    try:
        with grader:
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=[drift_return],
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[_callback(tracker, costs), *callbacks],
                rollout_func=rollout,
            )
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        target = out / MODEL_DIR
        _save_model(trainer.accelerator.unwrap_model(trainer.model), tokenizer, target)
        result = OnlineResult(
            model_dir=str(target),
            generated_tokens=rollout.generated_tokens,
            optimizer_steps=int(trainer.state.global_step),
            wall_s=round(costs.wall_s(), 3),
            mlflow_run_id=tracker.run_id,
            output_dir=str(out),
            resumed_from=str(resume) if resume else None,
        )
        _record_result(tracker, result, out)
        status = "FINISHED"
        return result
    finally:
        tracker.finish(status)
