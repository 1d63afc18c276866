"""GPU check (one H100, about 10 minutes, no network): weighted-SFT step and rollout engine speed.

    python benchmarks/gpu_check.py [--steps 20 --batch 8 --seq 2048] [--json OUT]

1. Weighted-SFT step in bf16 on a randomly initialised model of Qwen2.5-0.5B's shape (built by hand:
   hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936, tied embeddings),
   drift's ``weighted_sft_loss`` (logits only at the supervised positions: the last 1/8 of each
   sequence, the history being ~8x the response) and the full-logits reference, forward + backward +
   AdamW step. Reports tokens/s (every input token) and MFU = 6 * N * tokens/s / 989e12 (H100 SXM
   bf16 dense peak; N = all parameters, embeddings counted once; attention FLOPs not counted).
2. drift's ``TransformersEngine`` on the GPU (bf16): a randomly initialised SmolLM2-135M-shaped model
   with the SmolLM2 tokenizer carried in ``benchmarks/assets/smollm2-tokenizer`` (the machine has no
   hub access), demo prompts, n samples per prompt; a random model never emits ``</answer>``, so every
   sequence runs to max_new_tokens: generated tokens/s, against one sequence at a time with plain
   ``model.generate`` on a subset.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
ASSETS = ROOT / "benchmarks" / "assets" / "smollm2-tokenizer"
H100_BF16_PEAK = 989e12
DEVICE = "cuda"


def qwen05b_config(smoke: bool = False):
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


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sft_bench(args) -> dict:
    from transformers import AutoModelForCausalLM

    from drift_core.loss import full_logits_loss, weighted_sft_loss

    device = DEVICE
    torch.manual_seed(0)
    # from_config then .to(): works on transformers 4.x (torch_dtype=) and 5.x (dtype=) alike
    model = AutoModelForCausalLM.from_config(qwen05b_config(args.smoke)).to(
        device=device, dtype=torch.bfloat16
    )
    model.config.use_cache = False
    if args.grad_ckpt:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    b, t = args.batch, args.seq
    input_ids = torch.randint(0, 151936, (b, t), device=device)
    labels = torch.full_like(input_ids, -100)
    labels[:, t - t // 8 :] = input_ids[:, t - t // 8 :]
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "weights": torch.rand(b, device=device) * 2,
    }
    out = {"params": n_params, "batch": b, "seq": t}
    for name, fn in (("drift", weighted_sft_loss), ("full", full_logits_loss)):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        try:
            for i in range(args.warmup + args.steps):
                sync()
                s = time.perf_counter()
                loss = fn(model, batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
                if i >= args.warmup:
                    times.append(time.perf_counter() - s)
        except torch.cuda.OutOfMemoryError:
            out[name] = {"error": "CUDA out of memory"}
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        step = statistics.median(times)
        tps = b * t / step
        out[name] = {
            "step_s": round(step, 4),
            "tokens_per_s": round(tps),
            "mfu": round(6 * n_params * tps / H100_BF16_PEAK, 4),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else 1.0,
        }
        print(f"[sft] {name}: {out[name]}", flush=True)
    if "tokens_per_s" in out.get("drift", {}) and "tokens_per_s" in out.get("full", {}):
        out["tokens_per_s_ratio"] = round(out["drift"]["tokens_per_s"] / out["full"]["tokens_per_s"], 3)
        out["peak_mem_ratio"] = round(out["drift"]["peak_mem_gib"] / out["full"]["peak_mem_gib"], 3)
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def engine_bench(args) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from drift_core.protocol import generation_prefill, initial_messages, stop_strings
    from drift_core.schemas import EngineConfig, ModelConfig, ProtocolConfig
    from tasks.engines.base import SamplingParams
    from tasks.engines.transformers_engine import TransformersEngine

    tmp = Path(tempfile.mkdtemp(prefix="drift-gpu-model-"))
    try:
        for f in ASSETS.iterdir():
            shutil.copy(f, tmp / f.name)
        cfg = AutoConfig.from_pretrained(tmp)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp)
        mcfg = ModelConfig(path=str(tmp), dtype="bfloat16")
        engine = TransformersEngine(str(tmp), mcfg, EngineConfig(device=DEVICE, batch_size=args.engine_batch))
        protocol = ProtocolConfig()
        import random

        rng = random.Random(0)  # demo-like questions without tasks.ingest (no prefect/polars needed)
        questions = [
            f"What is {rng.randint(0, 9)} + {rng.randint(0, 9)} + {rng.randint(0, 9)}?"
            for _ in range(args.prompts)
        ]
        tok = engine.tokenizer
        prompts = [
            tok.apply_chat_template(initial_messages(q, protocol), tokenize=False, add_generation_prompt=True)
            + generation_prefill(protocol)
            for q in questions
        ]
        params = SamplingParams(
            n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, stop=stop_strings(protocol)
        )
        engine.generate(prompts[:4], params.model_copy(update={"n": 1, "max_new_tokens": 8}))  # warm-up
        sync()
        s = time.perf_counter()
        out = engine.generate(prompts, params)
        sync()
        secs = time.perf_counter() - s
        toks = sum(c.n_tokens for per in out for c in per)
        res = {
            "completions": len(prompts) * args.n,
            "max_new_tokens": args.max_new_tokens,
            "engine_seconds": round(secs, 2),
            "engine_tokens_per_s": round(toks / secs, 1),
        }
        # naive: one sequence at a time, plain generate, to max_new_tokens, on a subset
        model = engine.model
        subset = prompts[: args.naive_prompts]
        ntoks = 0
        sync()
        s = time.perf_counter()
        with torch.inference_mode():
            for p in subset:
                ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"].to(DEVICE)
                g = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    top_k=0,
                    max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                )
                ntoks += g.shape[1] - ids.shape[1]
        sync()
        nsecs = time.perf_counter() - s
        res.update(
            naive_sequences=len(subset),
            naive_seconds=round(nsecs, 2),
            naive_tokens_per_s=round(ntoks / nsecs, 1),
        )
        res["tokens_per_s_ratio"] = round(res["engine_tokens_per_s"] / res["naive_tokens_per_s"], 2)
        print(f"[engine] {res}", flush=True)
        engine.close()
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--engine-batch", type=int, default=256)
    parser.add_argument("--naive-prompts", type=int, default=8)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: test this script")
    args = parser.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
        args.steps, args.warmup, args.batch, args.seq = 1, 0, 2, 64
        args.prompts, args.n, args.max_new_tokens, args.naive_prompts = 4, 2, 8, 2
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    info = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "sft": sft_bench(args),
        "engine": engine_bench(args),
    }
    print(json.dumps(info, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
