"""Importance-weighted SFT with accelerate: the training loop of the train stage (docs/method.md#loss).
No Prefect and no artifact store here: this module is what every process of
a multi-process run imports (``python -m tasks.trainer`` under torchrun or ``accelerate launch``), so
it stays light; :mod:`tasks.train` is the Prefect task that calls or launches it.

Read top to bottom, ``train_weighted_sft`` is the whole recipe:

1. seed everything; build the ``Accelerator`` (bf16 autocast on a GPU when ``precision`` is
   ``auto``/``bf16``, fp32 on the CPU; a gloo group of CPU processes under ``torchrun``);
2. drop zero-weight rows (``success_only`` weighting makes them), tokenise every trajectory with
   :func:`drift_core.batching.tokenize_trajectory` (terminal message, or every assistant message);
3. plan the whole run up front: length-grouped *global* micro-batches of ``batch_size`` samples,
   ``grad_accum`` of them per optimizer step, a fresh shuffle per epoch (seed + epoch);
4. model (fp32 master weights, safetensors only) + optional LoRA + optional gradient checkpointing;
   AdamW (no decay on 1-d params) and a linear schedule with warmup;
5. resume from the latest complete checkpoint of the *same* run, if any;
6. the loop: forward/backward every micro-batch of the step (gradients synchronised on the last one
   only), clip, step; log the loss; checkpoint every ``checkpoint_every`` steps;
7. save a plain model directory (LoRA merged into the base weights), the tokenizer and
   ``training_log.json``.

Data sharding (manual, by design). Every process builds the same plan from the same seed, and rank
``r`` of ``W`` takes the ``r``-th contiguous slice of each global micro-batch (``np.array_split``).
The global batch is therefore the same whatever the number of processes: a 2-process run optimises
exactly the single-process objective, resuming needs nothing but the step index (no sampler state),
and a batch that does not divide by ``W`` is handled exactly (below). A ``DataLoader`` prepared by
accelerate would instead make ``batch_size`` per process and pad short batches with repeated samples.

Why the process count does not change the gradient. DDP *averages* gradients over the ``W`` ranks.
For one global micro-batch ``B`` (``n = |B|`` samples, rank ``r`` holding ``m_r`` of them):

* ``normalize="mean"``: the objective is ``(1/n) sum_B l_i w_i``; rank ``r``'s loss is
  ``(1/m_r) sum_r l_i w_i``; scaled by ``m_r W / n`` it averages over the ranks to the objective. With
  equal slices (``m_r = n / W``) the scale is 1: plain DDP averaging of per-rank means of
  ``l_i w_i`` is the single-process mean. The scale makes uneven slices (a short last batch) exact.
* ``normalize="weight_sum"``: the objective is ``sum_B l_i w_i / sum_B w_i``. The denominator is
  global: the ranks' weight sums are all-reduced (``accelerator.reduce(..., "sum")``) and passed to
  the loss as ``global_weight_sum``, so rank ``r``'s loss is its share of the global numerator over
  the global denominator; DDP's averaging divides by ``W``, which the scale ``W`` undoes.

A rank whose slice would be empty (a global batch smaller than ``W``) gets one zero-weight sample, so
it still joins the collective; it adds nothing to the gradient. Gradient accumulation is done by hand
(``accelerator.no_sync`` on all but the last micro-batch, losses divided by the number of
micro-batches *in that step*) rather than with ``Accelerator(gradient_accumulation_steps=...)``,
which always divides by the configured count: the plan's last step of an epoch may be shorter.

Checkpoints (``checkpoint_every`` optimizer steps): ``accelerator.save_state`` (model, optimizer,
scheduler, RNG states of every process) plus ``drift_checkpoint.json`` (step, seed, run fingerprint,
plan digest, loss history) are written to ``.tmp-step-N`` and renamed to ``step-N``; older ones are
then removed. A kill at any moment leaves either the previous complete checkpoint or the new one. On
start, the newest checkpoint whose fingerprint matches (same data, model, settings, process count)
is loaded and the steps it covers are skipped; the plan is rebuilt from the seed, so the data order
is the same. With several nodes, ``checkpoint_dir`` must be on a filesystem they share.

Multi-GPU / multi-process: ``python -m tasks.trainer`` (see ``main``) under ``torchrun`` (DDP) or
``accelerate launch --config_file`` (FSDP, DeepSpeed: ``configs/accelerate/``); the Prefect task
launches it (:func:`tasks.train.launch_command`). Under FSDP and DeepSpeed ZeRO-3 the parameters are
sharded, so the final model is gathered with ``accelerator.get_state_dict`` on every rank and loaded
into a fresh model on the main process before saving. DeepSpeed owns its optimizer step: the loop
marks the last micro-batch of each step as the accumulation boundary, and gradient clipping comes
from ``max_grad_norm`` through the DeepSpeed config.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel

from drift_core.batching import (
    TokenizedExample,
    collate,
    collate_packed,
    length_grouped_batches,
    tokenize_trajectory,
    unsupervised_token_ids,
)
from drift_core.errors import InputError
from drift_core.loss import liger_available, weighted_sft_loss
from drift_core.schemas import ModelConfig, TrainConfig
from tasks.models import load_model, load_tokenizer, pick_device, resolve_model, torch_dtype

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger(__name__)


class _TiedWeightsNotice(logging.Filter):
    """Drops accelerate's "Removed shared tensor {'model.lm_head.weight'} while saving" warning: a
    model with tied input and output embeddings (SmolLM2, Qwen2.5's small models) stores the shared
    matrix once, which is what it should do; the warning reads like a fault on every checkpoint."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNotice())

__all__ = ["TRAINING_LOG", "TrainResult", "main", "read_training_data", "train_weighted_sft"]

CHECKPOINT_INFO = "drift_checkpoint.json"
TRAINING_LOG = "training_log.json"

Plan = list[list[list[int]]]  # optimizer steps -> global micro-batches -> example indices


class TrainResult(BaseModel):
    """What a training run did. ``steps``/``samples``/``tokens`` cover the whole run (resumed steps
    included); ``seconds``/``tokens_per_s`` cover the steps this invocation ran."""

    steps: int
    samples: int
    tokens: int
    final_loss: float | None
    loss_history: list[tuple[int, float, float]]  # (optimizer step, loss, learning rate)
    seconds: float
    tokens_per_s: float
    resumed_from_step: int | None = None
    examples: int = 0  # training sequences after dropping zero-weight / over-long rows
    dropped_zero_weight: int = 0
    dropped_too_long: int = 0
    # (rank, pid, its parent's command: "-m torch.distributed.run", "-m accelerate.commands.launch")
    # of every process that trained, gathered over the process group itself: what ran, not what was
    # asked for
    ranks: list[tuple[int, int, str]] = []


# ---------------------------------------------------------------------------------------- data


TRAINING_COLUMNS = ("prompt_id", "traj_idx", "messages", "weight")


def read_training_data(path: str | Path) -> list[dict[str, Any]]:
    """Weighted trajectories from a drift parquet artifact or a JSONL file (one object per line with
    prompt_id, traj_idx, messages, weight: e.g. ``drift weights --output X.jsonl``)."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from None
        return rows
    import polars as pl  # only where parquet is read: the trainer itself does not need polars

    return pl.read_parquet(path, columns=list(TRAINING_COLUMNS)).to_dicts()


def _valid_weight(w: object) -> bool:
    return isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w >= 0


def prepare_examples(
    data: pl.DataFrame | Iterable[Mapping[str, Any]], tokenizer, cfg: TrainConfig
) -> tuple[list[TokenizedExample], list[float], dict[str, int]]:
    """Tokenised examples and their weights, in (prompt_id, traj_idx) order; zero-weight rows dropped."""
    rows = data.to_dicts() if hasattr(data, "to_dicts") else list(data)
    for i, row in enumerate(rows):
        missing = set(TRAINING_COLUMNS) - set(row)
        if missing:
            raise ValueError(f"weighted trajectories lack column(s) {sorted(missing)} (row {i})")
    bad = [r for r in rows if not _valid_weight(r["weight"])]
    if bad:
        first = {k: bad[0][k] for k in ("prompt_id", "traj_idx", "weight")}
        raise ValueError(f"{len(bad)} row(s) have a null, NaN or negative weight (first: {first})")
    kept = sorted((r for r in rows if r["weight"] > 0), key=lambda r: (r["prompt_id"], r["traj_idx"]))
    examples: list[TokenizedExample] = []
    weights: list[float] = []
    too_long = 0
    masked = unsupervised_token_ids(tokenizer, cfg.supervise_eot)
    for row in kept:
        try:
            ex = tokenize_trajectory(tokenizer, row["messages"], cfg.target, cfg.max_seq_len, masked)
        except ValueError as exc:  # the supervised response alone exceeds max_seq_len
            if "max_seq_len" not in str(exc):
                raise
            too_long += 1
            continue
        if ex.n_supervised == 0:
            too_long += 1
            continue
        examples.append(ex)
        weights.append(float(row["weight"]))
    stats = {"dropped_zero_weight": len(rows) - len(kept), "dropped_too_long": too_long}
    if not examples:
        raise InputError(
            f"no training examples left ({stats}, {len(rows)} rows in): every weight is zero, or every "
            "example is longer than train.max_seq_len"
        )
    if too_long:
        log.warning(
            "dropped %d trajectories whose response does not fit max_seq_len=%d", too_long, cfg.max_seq_len
        )
    return examples, weights, stats


def plan_steps(lengths: list[int], cfg: TrainConfig) -> Plan:
    """The whole run's data order: optimizer steps of up to ``grad_accum`` global micro-batches.

    Epoch ``e`` is a length-grouped shuffle with seed ``cfg.seed + e``. The run is ``max_steps``
    steps when set (epochs repeat as needed), else ``ceil(epochs * steps_per_epoch)``."""
    steps: Plan = []
    target = cfg.max_steps
    epoch = 0
    while True:
        batches = length_grouped_batches(lengths, cfg.batch_size, seed=cfg.seed + epoch, shuffle=True)
        epoch_steps = [batches[k : k + cfg.grad_accum] for k in range(0, len(batches), cfg.grad_accum)]
        if target is None:
            target = max(1, math.ceil(cfg.epochs * len(epoch_steps)))
        steps.extend(epoch_steps)
        epoch += 1
        if len(steps) >= target:
            return steps[:target]


def shard(global_batch: list[int], rank: int, world: int) -> tuple[list[int], list[bool]]:
    """Rank ``rank``'s contiguous slice of a global batch, and which entries are real samples.
    An empty slice becomes one placeholder sample (weight 0) so that the rank joins the collectives."""
    local = [int(i) for i in np.array_split(np.asarray(global_batch), world)[rank]]
    if not local:
        return [int(global_batch[0])], [False]
    return local, [True] * len(local)


def run_fingerprint(
    examples: list[TokenizedExample],
    weights: list[float],
    model_path: str,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    world: int,
) -> str:
    """Identity of a run for resuming: data, model, settings that change the result, process count."""
    h = hashlib.sha256()
    from tasks.caching import TRAIN_RESUME_IGNORES

    settings = cfg.model_dump(mode="json", exclude=set(TRAIN_RESUME_IGNORES))
    h.update(
        json.dumps([settings, model_path, model_cfg.model_dump(mode="json"), world], sort_keys=True).encode()
    )
    for ex, w in zip(examples, weights, strict=True):
        h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(ex.labels, dtype=np.int64).tobytes())
        h.update(np.float64(w).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- model


class _LossModule(torch.nn.Module):
    """The model with the loss inside ``forward``, so DDP (and accelerate's autocast) wrap the whole
    loss computation, whichever submodules ``weighted_sft_loss`` calls."""

    def __init__(self, model: torch.nn.Module, normalize: str, method: str = "auto"):
        super().__init__()
        self.model = model
        self.normalize = normalize
        self.method = method  # weighted_sft_loss's method: "auto", or "liger" (resolve_loss_method)
        # FSDP's auto-wrap policy reads the transformer block classes from here (the root module)
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, batch: dict[str, torch.Tensor], global_weight_sum: torch.Tensor | None = None):
        out = weighted_sft_loss(
            self.model,
            batch,
            normalize=self.normalize,
            global_weight_sum=global_weight_sum,
            method=self.method,
        )
        return out.loss, out.n_tokens


def _build_model(model_path: str, model_cfg: ModelConfig, cfg: TrainConfig, compile_layers: bool = True):
    # fp32 master weights; bf16 compute comes from the accelerator's autocast.
    model = load_model(model_path, model_cfg.model_copy(update={"dtype": "float32"}), device="cpu")
    model.config.use_cache = False
    if cfg.compile and compile_layers:
        _compile_layers(model)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model = get_peft_model(
            model,
            PeftLoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    return model


def _compile_layers(model: torch.nn.Module) -> None:
    """``torch.compile`` every decoder layer in place (regional compilation: one graph per layer
    shape, compiled once and reused by all layers; parameter names, checkpoints and the saved model
    are unchanged). A model without a ``layers`` list is compiled whole, also in place."""
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if layers is None:
        log.info("train.compile: no decoder layer list found; compiling the whole model")
        model.compile()
        return
    for layer in layers:
        layer.compile()


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # norms, biases
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate)


def linear_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, decay: bool = True
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over ``warmup`` steps, then linear decay to 0 at ``total`` (the formula of
    transformers' ``get_linear_schedule_with_warmup``, whose import would pull in peft and the Trainer);
    ``decay=False`` holds the rate after the warmup (``get_constant_schedule_with_warmup``)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if not decay:
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _configure_deepspeed(accelerator, cfg: TrainConfig) -> None:
    """Fill the DeepSpeed settings that this loop owns. There is no prepared DataLoader for accelerate
    to read a micro-batch size from, and accumulation is done here (a variable number of micro-batches
    per step), so DeepSpeed accumulates 1 and steps wherever the loop marks the boundary."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = max(1, cfg.batch_size // accelerator.num_processes)
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * accelerator.num_processes
    ds["gradient_clipping"] = cfg.max_grad_norm


# ---------------------------------------------------------------------------------------- checkpoints


def _find_checkpoint(checkpoint_dir: Path, fingerprint: str) -> tuple[Path, dict] | None:
    """The newest complete checkpoint of this run (``step-N`` dirs exist only once complete)."""
    for path in sorted(checkpoint_dir.glob("step-*"), reverse=True):
        try:
            info = json.loads((path / CHECKPOINT_INFO).read_text())
        except (OSError, ValueError):
            continue
        if info.get("fingerprint") == fingerprint:
            return path, info
        log.warning("ignoring checkpoint %s: it belongs to another run (different data or settings)", path)
    return None


def _save_checkpoint(accelerator, checkpoint_dir: Path, step: int, info: dict) -> None:
    """``save_state`` into a temp dir, then rename it into place and drop older checkpoints."""
    final = checkpoint_dir / f"step-{step:08d}"
    tmp = checkpoint_dir / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CHECKPOINT_INFO).write_text(json.dumps(info))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in checkpoint_dir.iterdir():
            if old != final and old.name.startswith(("step-", ".tmp-step-")):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------- training


def train_weighted_sft(
    data: pl.DataFrame | Iterable[Mapping[str, Any]],
    model_path: str,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    output_dir: Path,
    checkpoint_dir: Path,
    progress: bool = True,
    on_step: Callable[[int, float, float], None] | None = None,
) -> TrainResult:
    """Weighted SFT of ``model_path`` on ``data`` (a DataFrame or rows with prompt_id, traj_idx,
    messages, weight).

    Writes the trained model (safetensors), tokenizer and ``training_log.json`` to ``output_dir`` and
    checkpoints to ``checkpoint_dir``; resumes from a checkpoint of the same run. ``on_step(step,
    loss, lr)`` is called on every process after each optimizer step (and its checkpoint)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    output_dir, checkpoint_dir = Path(output_dir), Path(checkpoint_dir)

    # 1. seed, accelerator
    set_seed(cfg.seed)
    accelerator, strategy, bf16 = _make_accelerator(cfg)
    world = accelerator.num_processes

    # 2. data
    tokenizer = load_tokenizer(model_path, model_cfg)
    examples, weights, drop_stats = prepare_examples(data, tokenizer, cfg)
    lengths = [len(e) for e in examples]

    # 3. the plan: every step's global micro-batches, identical on every rank
    plan = plan_steps(lengths, cfg)
    n_steps = len(plan)
    plan_digest = hashlib.sha256(json.dumps(plan).encode()).hexdigest()
    fingerprint = run_fingerprint(examples, weights, model_path, model_cfg, cfg, world)

    # 4. model, optimizer, schedule
    model = _build_model(model_path, model_cfg, cfg)
    optimizer = _optimizer(model, cfg)
    warmup = math.ceil(cfg.warmup_ratio * n_steps)
    scheduler = linear_schedule(optimizer, warmup, n_steps, decay=cfg.lr_schedule == "linear")
    # The scheduler is stepped once per optimizer step by us (a prepared scheduler would step W
    # times), and registered so that save_state/load_state carry it.
    method = resolve_loss_method(cfg, accelerator.is_main_process)
    loss_module, optimizer = accelerator.prepare(_LossModule(model, cfg.normalize, method), optimizer)
    accelerator.register_for_checkpointing(scheduler)

    # 5. resume
    start_step, history = _resume(accelerator, checkpoint_dir, fingerprint, n_steps)
    resumed_from = start_step or None

    # 6. the loop
    step_fn = _StepRunner(accelerator, loss_module, strategy, cfg, examples, weights, tokenizer.pad_token_id)
    log_every = max(1, n_steps // 20)
    bar = tqdm(
        total=n_steps,
        initial=start_step,
        desc="train",
        disable=not (progress and accelerator.is_main_process),
    )
    loss_module.train()
    tokens_this_run = 0
    t0 = time.perf_counter()
    for step in range(start_step, n_steps):
        lr = scheduler.get_last_lr()[0]
        loss_value = step_fn(plan[step])
        tokens_this_run += sum(lengths[i] for b in plan[step] for i in b)
        accelerator.clip_grad_norm_(loss_module.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append((step + 1, loss_value, lr))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if bar.disable and accelerator.is_main_process and (step + 1) % log_every == 0:
            log.info("step %d/%d loss %.4f lr %.3g", step + 1, n_steps, loss_value, lr)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < n_steps:
            info = {"step": step + 1, "n_steps": n_steps, "seed": cfg.seed, "fingerprint": fingerprint}
            info.update(plan_sha256=plan_digest, loss_history=history)
            _save_checkpoint(accelerator, checkpoint_dir, step + 1, info)
        if on_step is not None:
            on_step(step + 1, loss_value, lr)
    bar.close()
    seconds = time.perf_counter() - t0

    # 7. save
    result = TrainResult(
        ranks=_members(),
        steps=n_steps,
        samples=sum(len(b) for s in plan for b in s),
        tokens=sum(lengths[i] for s in plan for b in s for i in b),
        final_loss=history[-1][1] if history else None,
        loss_history=history,
        seconds=seconds,
        tokens_per_s=tokens_this_run / seconds if seconds > 0 else 0.0,
        resumed_from_step=resumed_from,
        examples=len(examples),
        **drop_stats,
    )
    _save_model(
        accelerator, loss_module, strategy, bf16, model_path, model_cfg, cfg, tokenizer, output_dir, result
    )
    return result


def _members() -> list[tuple[int, int, str]]:
    """(rank, pid, the command that started it) of every process in the process group, gathered
    through the group itself (a collective: every rank calls it): which ranks ran and under which
    launcher, as opposed to what the launch asked for."""
    import psutil
    import torch.distributed as dist

    try:
        parent = " ".join(psutil.Process(os.getppid()).cmdline()[1:3])
    except psutil.Error:
        parent = ""
    if not (dist.is_available() and dist.is_initialized()):
        return [(0, os.getpid(), parent)]
    me = (dist.get_rank(), os.getpid(), parent)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, me)
    return [(int(r), int(p), str(c)) for r, p, c in gathered]


def _make_accelerator(cfg: TrainConfig):
    """The ``Accelerator`` (bf16 autocast on a GPU unless fp32 is asked for), its strategy name
    ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED") and whether it computes in bf16."""
    from accelerate import Accelerator

    on_gpu = pick_device("auto") != "cpu"
    bf16 = on_gpu and cfg.precision in ("auto", "bf16")
    if cfg.precision == "bf16" and not on_gpu:
        log.info("precision=bf16 requested without a GPU: training in fp32 on the CPU")
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision="bf16" if bf16 else "no")
    strategy = accelerator.distributed_type.value
    if strategy == "DEEPSPEED":
        _configure_deepspeed(accelerator, cfg)
    requested = "FSDP" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else None
    if requested and strategy != requested and accelerator.is_main_process:
        log.warning(
            "the accelerate config asks for %s, but accelerate applies it to GPU process groups only: "
            "training with %s on %d process(es) instead",
            requested,
            strategy,
            accelerator.num_processes,
        )
    if strategy in ("FSDP", "DEEPSPEED") and accelerator.is_main_process:
        log.info("training with %s on %d process(es)", strategy, accelerator.num_processes)
    return accelerator, strategy, bf16


def resolve_loss_method(cfg: TrainConfig, say: bool = True) -> str:
    """The loss path for ``cfg.loss_kernel``: ``liger`` where it can run, else the default (and why)."""
    if cfg.loss_kernel == "liger":
        why_not = liger_available()
        if why_not is None:
            return "liger"
        if say:
            log.warning(
                "train.loss_kernel=liger: %s; using the torch loss (logits at supervised rows)", why_not
            )
    return "auto"


def _resume(accelerator, checkpoint_dir: Path, fingerprint: str, n_steps: int) -> tuple[int, list]:
    """Load the newest checkpoint of this run, if any: (steps already done, their loss history)."""
    found = _find_checkpoint(checkpoint_dir, fingerprint) if checkpoint_dir.exists() else None
    start_step, history = 0, []
    if found is not None:
        path, info = found
        accelerator.load_state(str(path))
        start_step, history = info["step"], [tuple(h) for h in info["loss_history"]]
        if accelerator.is_main_process:
            log.info("resuming from %s (step %d of %d)", path, start_step, n_steps)
    accelerator.wait_for_everyone()
    return start_step, history


class _StepRunner:
    """Forward and backward of one optimizer step's micro-batches on this rank (see the module
    docstring for the per-rank scaling); returns the step's loss averaged over the ranks."""

    def __init__(self, accelerator, loss_module, strategy: str, cfg: TrainConfig, examples, weights, pad_id):
        self.accelerator, self.loss_module, self.strategy, self.cfg = accelerator, loss_module, strategy, cfg
        self.examples, self.weights, self.pad_id = examples, weights, pad_id

    def batch(self, global_batch: list[int]) -> tuple[dict[str, torch.Tensor], int]:
        """This rank's slice of a global micro-batch, collated (padded or packed), on the device."""
        acc = self.accelerator
        local, real = shard(global_batch, acc.process_index, acc.num_processes)
        chosen = [self.examples[i] for i in local]
        weights = [self.weights[i] if r else 0.0 for i, r in zip(local, real, strict=True)]
        batch = collate_packed(chosen, weights) if self.cfg.packing else collate(chosen, weights, self.pad_id)
        return {k: v.to(acc.device) for k, v in batch.items()}, len(local)

    def __call__(self, micro_batches: list[list[int]]) -> float:
        acc, world = self.accelerator, self.accelerator.num_processes
        step_loss = torch.zeros((), device=acc.device)
        for j, global_batch in enumerate(micro_batches):
            batch, n_local = self.batch(global_batch)
            if self.cfg.normalize == "weight_sum":
                global_weight_sum = acc.reduce(batch["weights"].sum(), reduction="sum")
                scale = world
            else:
                global_weight_sum = None
                scale = n_local * world / len(global_batch)
            last = j == len(micro_batches) - 1
            if self.strategy == "DEEPSPEED":  # DeepSpeed steps inside backward() at the boundary only
                acc.gradient_state._set_sync_gradients(last)
            with contextlib.nullcontext() if last else acc.no_sync(self.loss_module):
                loss, _ = self.loss_module(batch, global_weight_sum)
                loss = loss * (scale / len(micro_batches))
                acc.backward(loss)
            step_loss += loss.detach().float()
        # the ranks' scaled losses average to the global objective (see the module docstring)
        return acc.reduce(step_loss, reduction="mean").item()


def _save_model(
    accelerator, loss_module, strategy, bf16, model_path, model_cfg, cfg, tokenizer, output_dir, result
) -> None:
    """A plain model directory (safetensors, LoRA merged), the tokenizer and ``training_log.json``."""
    accelerator.wait_for_everyone()
    # FSDP / ZeRO-3 shard the parameters: gather the full state dict (a collective: every rank).
    full_state = accelerator.get_state_dict(loss_module) if strategy in ("FSDP", "DEEPSPEED") else None
    if accelerator.is_main_process:
        if full_state is None:
            trained = accelerator.unwrap_model(loss_module).model
        else:
            trained = _build_model(model_path, model_cfg, cfg, compile_layers=False)
            prefix = "model."
            trained.load_state_dict(
                {k[len(prefix) :]: v for k, v in full_state.items() if k.startswith(prefix)}
            )
        if cfg.lora.enabled:
            trained = trained.merge_and_unload()  # a plain model: the adapter folded into the weights
        if cfg.gradient_checkpointing:
            getattr(trained, "activation_checkpointing_disable", trained.gradient_checkpointing_disable)()
        trained.config.use_cache = True
        save_dtype = torch_dtype(model_cfg.dtype, "cuda" if bf16 else "cpu")
        output_dir.mkdir(parents=True, exist_ok=True)
        trained.to(save_dtype).save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        log_doc = {
            **result.model_dump(mode="json"),
            "config": cfg.model_dump(mode="json"),
            "processes": accelerator.num_processes,
        }
        (output_dir / TRAINING_LOG).write_text(json.dumps(log_doc, indent=2))
    accelerator.wait_for_everyone()
    accelerator.free_memory()


# ---------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.trainer --data X.parquet --model DIR --config train.json --output OUT
    --checkpoints CK``; run it under ``torchrun --nproc_per_node N`` (DDP) or ``accelerate launch
    --config_file configs/accelerate/fsdp.yaml --num_processes N -m tasks.trainer ...``."""
    p = argparse.ArgumentParser(prog="python -m tasks.trainer", description=main.__doc__)
    p.add_argument("--data", required=True, help="weighted trajectories: parquet, or JSONL")
    p.add_argument("--model", required=True, help="model directory (or any ModelConfig.path)")
    p.add_argument("--config", required=True, help="TrainConfig as JSON")
    p.add_argument("--output", required=True, help="output model directory")
    p.add_argument("--checkpoints", required=True, help="checkpoint directory (resumed from when it matches)")
    p.add_argument("--model-config", help="ModelConfig as JSON (dtype, trust_remote_code); path is --model")
    p.add_argument("--result", help="write the TrainResult JSON here (main process)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("--kill-after-step", type=int, help=argparse.SUPPRESS)  # tests: SIGKILL itself there
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    model_cfg = (
        ModelConfig.model_validate_json(Path(args.model_config).read_text())
        if args.model_config
        else ModelConfig()
    )
    model_cfg = model_cfg.model_copy(update={"path": args.model})
    cfg = TrainConfig.model_validate_json(Path(args.config).read_text())

    on_step = None
    if args.kill_after_step is not None:
        import signal

        def on_step(step: int, loss: float, lr: float) -> None:
            if step == args.kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)

    result = train_weighted_sft(
        read_training_data(args.data),
        resolve_model(model_cfg),
        model_cfg,
        cfg,
        Path(args.output),
        Path(args.checkpoints),
        progress=not args.no_progress,
        on_step=on_step,
    )
    if args.result and int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(result.model_dump_json())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # The DDP wrapper's C++ Reducer holds the process group: collected after the group is
        # destroyed, it would destroy it holding the GIL while a gloo thread may need the GIL
        # (a deadlock, seen in the DDP test of tests/test_loss.py). Collect it while the group lives.
        gc.collect()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
