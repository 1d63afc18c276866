"""GPU speed check (one GPU, a few minutes, no network): rollout engine decoding paths and the
weighted-SFT step's training techniques, each beside the current path, written as one JSON.

    python benchmarks/gpu_speed.py --json $OUT/gpu_speed.json            # on the GPU machine
    python benchmarks/gpu_speed.py --smoke                               # this script, tiny, on a CPU

1. Engine (``tasks.engines.transformers_engine``), bf16, randomly initialised models built from a
   config (no hub): the SmolLM2-135M shape (tokenizer carried in ``benchmarks/assets``) and the
   Qwen2.5-0.5B shape (same tokenizer; its vocabulary is what matters for speed, so the Qwen2.5
   vocabulary size is kept in the model and prompts use the SmolLM2 ids). 1,024 completions x 256
   new tokens (128 demo prompts x n=8) at batch 256, for ``engine.decoding`` = ``standard`` and
   ``static`` (sampled, temperature 1, as rollouts are) and ``continuous`` (greedy: it serves greedy
   decoding only). A random model never emits ``</answer>``, so every sequence runs to 256 tokens.
   Before timing, each path's greedy completions on 16 prompts are compared with ``standard``'s.
2. Training step on the Qwen2.5-0.5B shape, bf16, AdamW: 8 sequences of random lengths 512..2,048
   (seeded; the last 1/8 of each supervised), for the current step (right-padded batch, logits only
   at supervised rows), ``packing`` (one row, position ids restarting), ``liger`` (fused linear
   cross-entropy), ``compile`` (regional ``torch.compile`` of the decoder layers) and all three
   together. Tokens/s counts real (unpadded) tokens; MFU = 6 * N * tokens/s / peak (bf16 dense peak
   of the GPU: 989e12 for H100 SXM, the same for H200). The first step's loss of every variant is
   compared with the current step's (bf16 tolerance: 2e-2 relative).

Each measurement is guarded: one that fails (a missing package, out of memory) is recorded with its
error and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
ASSETS = ROOT / "benchmarks" / "assets" / "smollm2-tokenizer"
BF16_PEAK = 989e12  # H100/H200 SXM dense bf16
DEVICE = "cuda"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def guarded(label: str, fn, *args, **kwargs) -> dict:
    try:
        out = fn(*args, **kwargs)
    except Exception as exc:  # recorded, not fatal: the other measurements still run
        traceback.print_exc()
        out = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    shown = {k: v for k, v in out.items() if not k.startswith("_")}
    print(f"[{label}] {json.dumps(shown)}", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------- models


def qwen05b_config(smoke: bool):
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=64 if smoke else 896,
        num_hidden_layers=2 if smoke else 24,
        num_attention_heads=4 if smoke else 14,
        num_key_value_heads=2,
        intermediate_size=128 if smoke else 4864,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
    )


def model_dir(shape: str, smoke: bool) -> Path:
    """A model directory with random weights of ``shape`` and the carried SmolLM2 tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix=f"drift-{shape}-"))
    for f in ASSETS.iterdir():
        shutil.copy(f, tmp / f.name)
    if shape == "smollm2-135m":
        cfg = AutoConfig.from_pretrained(tmp)
        if smoke:
            cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = 2, 64, 128
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 16
    else:
        cfg = qwen05b_config(smoke)
        ref = AutoConfig.from_pretrained(tmp)
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (
            ref.bos_token_id,
            ref.eos_token_id,
            ref.pad_token_id,
        )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp)
    return tmp


# ------------------------------------------------------------------------------------- engine


def demo_prompts(tokenizer, count: int) -> list[str]:
    import random

    from drift_core.protocol import generation_prefill, initial_messages
    from drift_core.schemas import ProtocolConfig

    protocol = ProtocolConfig()
    rng = random.Random(0)
    questions = [
        f"What is {rng.randint(0, 9)} + {rng.randint(0, 9)} + {rng.randint(0, 9)}?" for _ in range(count)
    ]
    return [
        tokenizer.apply_chat_template(
            initial_messages(q, protocol), tokenize=False, add_generation_prompt=True
        )
        + generation_prefill(protocol)
        for q in questions
    ]


def engine_path(path: Path, decoding: str, args, reference: list | None) -> dict:
    from drift_core.protocol import stop_strings
    from drift_core.schemas import EngineConfig, ModelConfig, ProtocolConfig
    from tasks.engines.base import SamplingParams
    from tasks.engines.transformers_engine import TransformersEngine

    cfg = EngineConfig(device=DEVICE, batch_size=args.engine_batch, decoding=decoding)
    engine = TransformersEngine(str(path), ModelConfig(path=str(path), dtype="bfloat16"), cfg)
    try:
        prompts = demo_prompts(engine.tokenizer, args.prompts)
        stop = stop_strings(ProtocolConfig())
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=args.check_tokens, stop=stop)
        check = engine.generate(prompts[: args.check_prompts], greedy)  # also a first warm-up
        texts = [c[0].text for c in check]
        res: dict = {"decoding": decoding}
        if reference is not None:
            res["greedy_equal_to_standard"] = (
                f"{sum(a == b for a, b in zip(texts, reference, strict=True))}/{len(texts)}"
            )
        sampled = decoding != "continuous"
        params = SamplingParams(
            n=args.n,
            temperature=1.0 if sampled else 0.0,
            max_new_tokens=args.max_new_tokens,
            stop=stop,
            seed=0,
        )
        res["sampling"] = "temperature 1.0" if sampled else "greedy"
        # warm-up on one full batch: the timed batches' shape, so static decoding compiles it here
        engine.generate(prompts[: max(1, args.engine_batch // args.n)], params)
        sync()
        start = time.perf_counter()
        out = engine.generate(prompts, params)
        sync()
        secs = time.perf_counter() - start
        tokens = sum(c.n_tokens for per in out for c in per)
        res.update(
            completions=len(prompts) * args.n,
            tokens=tokens,
            seconds=round(secs, 2),
            tokens_per_s=round(tokens / secs, 1),
        )
        res["_texts"] = texts
        return res
    finally:
        engine.close()


def engine_bench(args, shapes: list[str]) -> dict:
    results: dict = {}
    for shape in shapes:
        path = model_dir(shape, args.smoke)
        try:
            rows: dict = {}
            reference = None
            for decoding in args.decodings:
                row = guarded(f"engine {shape} {decoding}", engine_path, path, decoding, args, reference)
                texts = row.pop("_texts", None)
                if decoding == "standard" and texts is not None:
                    reference = texts
                rows[decoding] = row
            base = rows.get("standard", {}).get("tokens_per_s")
            for row in rows.values():
                if base and "tokens_per_s" in row:
                    row["x_standard"] = round(row["tokens_per_s"] / base, 2)
            results[shape] = rows
        finally:
            shutil.rmtree(path, ignore_errors=True)
    return results


# ------------------------------------------------------------------------------------- training


def sft_batch(args, vocab: int):
    """8 sequences of seeded random lengths, the last 1/8 of each supervised (examples + weights)."""
    from drift_core.batching import TokenizedExample

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_len, args.seq + 1, (args.batch,), generator=gen).tolist()
    examples = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        labels = [-100] * (n - n // 8) + ids[n - n // 8 :]
        examples.append(TokenizedExample(input_ids=ids, labels=labels, n_supervised=n // 8))
    weights = (torch.rand(args.batch, generator=gen) * 2).tolist()
    return examples, weights


def train_variant(args, name: str, packing: bool, liger: bool, compiled: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from drift_core.batching import collate, collate_packed
    from drift_core.loss import liger_available, weighted_sft_loss
    from tasks.trainer import _compile_layers

    if liger and (why := liger_available()):
        raise RuntimeError(f"liger unavailable: {why}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen05b_config(args.smoke)).to(
        device=DEVICE, dtype=torch.bfloat16
    )
    model.config.use_cache = False
    if compiled:
        _compile_layers(model)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEVICE == "cuda")
    examples, weights = sft_batch(args, model.config.vocab_size)
    batch = collate_packed(examples, weights) if packing else collate(examples, weights, 0)
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    real_tokens = sum(len(e.input_ids) for e in examples)
    method = "liger" if liger else "auto"
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, first_loss = [], None
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        loss = weighted_sft_loss(model, batch, method=method).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i == 0:
            first_loss = float(loss)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    tps = real_tokens / step
    out = {
        "variant": name,
        "first_step_loss": round(first_loss, 5),
        "step_s": round(step, 4),
        "real_tokens": real_tokens,
        "padded_tokens": int(batch["input_ids"].numel()),
        "tokens_per_s": round(tps),
        "mfu": round(6 * n_params * tps / BF16_PEAK, 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None,
    }
    del model, opt
    return out


VARIANTS = {  # name: (packing, liger, compile)
    "current": (False, False, False),
    "packing": (True, False, False),
    "liger": (False, True, False),
    "compile": (False, False, True),
    "all": (True, True, True),
}


def train_bench(args) -> dict:
    rows = {
        name: guarded(f"train {name}", train_variant, args, name, *VARIANTS[name]) for name in args.variants
    }
    base = rows.get("current", {})
    for row in rows.values():
        if "tokens_per_s" in row and "tokens_per_s" in base:
            row["x_current"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
            rel = abs(row["first_step_loss"] - base["first_step_loss"]) / abs(base["first_step_loss"])
            row["loss_rel_diff"] = round(rel, 5)
            row["loss_equal_bf16"] = rel <= 2e-2
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: test this script")
    parser.add_argument("--only", choices=["engine", "train"], default=None)
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    parser.add_argument("--decodings", nargs="+", default=["standard", "static", "continuous"])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--engine-batch", type=int, default=256)
    parser.add_argument("--check-prompts", type=int, default=16)
    parser.add_argument("--check-tokens", type=int, default=256)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--min-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
        args.prompts, args.n, args.max_new_tokens, args.engine_batch = 4, 2, 8, 4
        args.check_prompts, args.check_tokens = 2, 6
        args.batch, args.seq, args.min_len, args.steps, args.warmup = 3, 48, 16, 1, 0
        args.shapes = args.shapes[:1]
        args.decodings = [d for d in args.decodings if d != "continuous"]  # slow on a CPU
        args.variants = [v for v in args.variants if not VARIANTS[v][2]]  # compiling is slow on a CPU
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_speed: no CUDA device")
    info: dict = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
    }
    import transformers

    info["transformers"] = transformers.__version__
    start = time.perf_counter()

    def save() -> None:  # after every section: a run stopped at its time limit keeps what it measured
        info["seconds"] = round(time.perf_counter() - start, 1)
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=2))

    # the 135M engine first (the headline), then training, then the larger engine shape
    if args.only in (None, "engine"):
        info["engine"] = engine_bench(args, args.shapes[:1])
        save()
    if args.only in (None, "train"):
        info["train"] = train_bench(args)
        save()
    if args.only in (None, "engine") and args.shapes[1:]:
        info["engine"].update(engine_bench(args, args.shapes[1:]))
        save()
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
