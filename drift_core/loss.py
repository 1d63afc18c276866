"""DRIFT's weighted SFT loss (docs/method.md#loss).

    loss_i = mean over i's supervised tokens of CE(next-token logits, label)     (0 if it has none)
    "mean":       L = mean_i (w_i * loss_i)                 (over the B samples of the local batch)
    "weight_sum": L = sum_i (w_i * loss_i) / W              (W = sum of weights over ALL ranks;
                                                            defaults to the local sum)

Logits are computed only at supervised positions. The history is long and the terminal response is
short, so a ``[B, T, V]`` logits tensor (and its float32 copy, softmax and gradient) would be mostly
wasted time and most of the memory. Two ways to get those rows, same result:

* ``method="logits_to_keep"`` (the default where the model supports it: transformers >= 5 causal
  LMs): call the model itself with ``logits_to_keep=<bool [B, T] mask>``; the model applies its
  output head to the kept hidden states only and returns ``[N, V]``. The forward runs through
  whatever wraps the model (DDP, PEFT, accelerate, FSDP), so DDP's gradient all-reduce fires and
  model-specific logit processing (soft-capping, scaling) is kept. A transformers without boolean
  masks (before ``slice_logits_to_keep``; 5.19, which vLLM's CPU build pins, is one) takes the
  positions instead: ``logits_to_keep=<the sorted positions supervised in any row>`` gives
  ``[B, K, V]``, and the supervised rows are gathered from it (more rows than needed where rows
  differ, never the whole ``[B, T, V]`` for a short terminal response; same loss).
* ``method="decoder"``: run the base transformer (``get_decoder()``), gather the hidden states at
  the supervised positions and apply ``get_output_embeddings()`` to those rows. Works on older
  transformers, but it bypasses the wrapper's ``forward``: a DistributedDataParallel model would
  silently skip the gradient all-reduce, so a DDP-wrapped model is rejected on this path. It also
  skips any logit post-processing that a model does in its own ``forward``.

* ``method="liger"``: the decoder path, with Liger's fused linear cross-entropy
  (``liger-kernel``, Triton, CUDA only) applied to the supervised hidden states: the output head and
  the cross-entropy run chunk by chunk, so not even the ``[N, V]`` logits exist at once. Same
  caveats as ``decoder`` (called on the bare model, as drift's trainer does inside its own
  DDP-wrapped loss module).

Cross-entropy is computed in float32 (the selected logits are upcast).

A *packed* batch (``batching.collate_packed``: one row of concatenated examples, ``position_ids``
restarting per example, ``sample_index`` naming each token's example, no attention mask) gives the
same loss as the padded batch of the same examples.

Distributed note: DDP averages gradients over ranks. With ``"mean"`` and equal local batch sizes that
is the mean over the global batch. With ``"weight_sum"``, pass ``global_weight_sum`` = the all-reduced
sum of weights and multiply the loss by the world size (or pass ``global_sum / world_size``) so the
averaged gradient is that of ``sum_i w_i loss_i / W``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from drift_core.batching import IGNORE_INDEX

__all__ = ["LossOutput", "full_logits_loss", "liger_available", "unwrap_model", "weighted_sft_loss"]

Normalize = Literal["mean", "weight_sum"]
Method = Literal["auto", "logits_to_keep", "decoder", "liger"]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    per_sample_loss: torch.Tensor  # [B], detached, float32: mean token CE per sample (0 if none)
    n_tokens: int  # supervised tokens in the batch
    tokens_per_sample: torch.Tensor  # [B], long


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face ``PreTrainedModel`` inside DDP/DataParallel (``.module``), ``torch.compile``
    (``._orig_mod``) and PEFT (``.get_base_model()``) wrappers, in any nesting."""
    seen = 0
    while seen < 16:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)) and model.get_base_model() is not model:
            model = model.get_base_model()
        else:
            break
    return model


def _shifted(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep [B, T] bool: positions whose NEXT token is supervised, targets [N], sample index [N])."""
    labels = batch["labels"]
    nxt = labels[:, 1:]
    sup = nxt != IGNORE_INDEX
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = sup
    targets = nxt[sup]
    if "sample_index" in batch:  # packed: a row holds several examples
        rows = batch["sample_index"][:, 1:].to(labels.device)[sup]
    else:
        rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(nxt)[sup]
    return keep, targets, rows


def _n_samples(batch: dict[str, torch.Tensor]) -> int:
    return batch["weights"].shape[0] if "sample_index" in batch else batch["labels"].shape[0]


def _combine(
    token_ce: torch.Tensor,
    rows: torch.Tensor,
    batch: dict[str, torch.Tensor],
    normalize: Normalize,
    global_weight_sum: float | None,
    anchor: torch.Tensor,
) -> LossOutput:
    """Per-sample mean of the token CEs, then the weighted batch reduction."""
    b = _n_samples(batch)
    device = token_ce.device
    counts = torch.zeros(b, dtype=torch.long, device=device).index_add_(0, rows, torch.ones_like(rows))
    sums = torch.zeros(b, dtype=torch.float32, device=device).index_add(0, rows, token_ce)
    per_sample = sums / counts.clamp(min=1).to(torch.float32)
    w = batch["weights"].to(device=device, dtype=torch.float32)
    if w.shape != (b,):
        raise ValueError(f"weights has shape {tuple(w.shape)}, expected ({b},)")
    weighted = per_sample * w
    if normalize == "mean":
        loss = weighted.mean()
    elif normalize == "weight_sum":
        denom = float(w.sum()) if global_weight_sum is None else float(global_weight_sum)
        if denom < 0:
            raise ValueError(f"the sum of weights must be >= 0, got {denom}")
        loss = weighted.sum() / denom if denom > 0 else weighted.sum() * 0.0
    else:
        raise ValueError(f"normalize={normalize!r}: expected 'mean' or 'weight_sum'")
    # Keep every parameter in the graph even when the batch has no supervised token (a zero
    # gradient, not a missing one: DDP expects every parameter to get a gradient each step).
    if token_ce.numel() == 0:
        loss = loss + 0.0 * anchor.sum()
    return LossOutput(
        loss=loss,
        per_sample_loss=per_sample.detach(),
        n_tokens=int(counts.sum()),
        tokens_per_sample=counts,
    )


def _accepts_logits_to_keep(base: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def logits_to_keep_takes_masks() -> bool:
    """Whether this transformers' causal LMs accept a boolean ``[B, T]`` ``logits_to_keep`` (support
    arrived with ``modeling_utils.slice_logits_to_keep``); else they take a 1-D tensor of positions."""
    try:
        import transformers.modeling_utils as mu
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return hasattr(mu, "slice_logits_to_keep")


def weighted_sft_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    normalize: Normalize = "mean",
    global_weight_sum: float | None = None,
    *,
    method: Method = "auto",
    unwrapped: nn.Module | None = None,
) -> LossOutput:
    """DRIFT's weighted SFT loss with logits only at supervised positions.

    ``model``: a Hugging Face causal LM, possibly wrapped (DDP, PEFT, ``accelerator.prepare``).
    ``batch``: ``collate``'s output (``input_ids``, ``attention_mask``, ``labels``, ``weights``).
    ``unwrapped``: the bare ``PreTrainedModel`` (e.g. ``accelerator.unwrap_model(model)``; with PEFT,
    its ``get_base_model()``), used for attribute access only; found by ``unwrap_model`` if omitted.
    ``method``: see the module docstring; ``"auto"`` picks ``logits_to_keep`` when supported.
    """
    base = unwrapped if unwrapped is not None else unwrap_model(model)
    if method == "auto":
        method = "logits_to_keep" if _accepts_logits_to_keep(base) else "decoder"
    keep, targets, rows = _shifted(batch)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    if "position_ids" in batch:  # packed: positions restart per example
        inputs["position_ids"] = batch["position_ids"]

    if method == "logits_to_keep":
        if logits_to_keep_takes_masks():
            out = model(**inputs, logits_to_keep=keep, use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]
        else:  # positions supervised in any row, ascending: [B, K, V], then the supervised rows
            positions = keep.any(dim=0).nonzero().squeeze(1)
            out = model(**inputs, logits_to_keep=positions, use_cache=False)
            logits = (out.logits if hasattr(out, "logits") else out[0])[keep[:, positions]]
        if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
            raise RuntimeError(
                f"model returned logits of shape {tuple(logits.shape)} for a boolean logits_to_keep "
                f"mask with {targets.shape[0]} positions; this model/transformers version does not "
                "support it: use method='decoder'"
            )
    elif method in ("decoder", "liger"):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                f"method={method!r} bypasses DistributedDataParallel.forward, so gradients would not be "
                "all-reduced; use method='logits_to_keep' (transformers >= 5) for a DDP model"
            )
        decoder = base.get_decoder()
        head = base.get_output_embeddings()
        if decoder is base or head is None:
            raise ValueError(f"{type(base).__name__}: cannot find the decoder and output head of a causal LM")
        hidden = decoder(**inputs, use_cache=False)
        hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
        if method == "liger":
            token_ce = _liger_token_ce(head, hidden[keep], targets)
            anchor = hidden if token_ce.numel() else torch.stack([hidden.sum(), head.weight.sum()])
            return _combine(token_ce, rows, batch, normalize, global_weight_sum, anchor=anchor)
        logits = head(hidden[keep])  # [N, V]: only the supervised rows reach the output head
    else:
        raise ValueError(f"method={method!r}: expected 'auto', 'logits_to_keep', 'decoder' or 'liger'")

    token_ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return _combine(token_ce, rows, batch, normalize, global_weight_sum, anchor=logits)


def liger_available() -> str | None:
    """None when Liger's fused linear cross-entropy can run here, else why not."""
    if not torch.cuda.is_available():
        return "Liger's kernels are Triton kernels for CUDA and there is no CUDA device"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as exc:
        return f"liger-kernel is not installed ({exc}); pip install liger-kernel"
    return None


def _liger_token_ce(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of ``head(hidden)`` against ``targets``, fused: Liger computes the
    output head and the loss chunk by chunk (and their gradients), never the ``[N, V]`` logits."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if targets.numel() == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    fused = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return fused(head.weight, hidden, targets, getattr(head, "bias", None)).float()


def full_logits_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    normalize: Normalize = "mean",
    global_weight_sum: float | None = None,
) -> LossOutput:
    """The straightforward reference: full ``[B, T, V]`` logits, then masked float32 CE. For tests and
    benchmarks; same result as ``weighted_sft_loss``."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    logits = (out.logits if hasattr(out, "logits") else out[0]).float()
    labels = batch["labels"]
    b, t, v = logits.shape
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(b, t - 1)
    mask = labels[:, 1:] != IGNORE_INDEX
    rows = torch.arange(b, device=labels.device).unsqueeze(1).expand_as(mask)[mask]
    return _combine(ce[mask], rows, batch, normalize, global_weight_sum, anchor=logits)
