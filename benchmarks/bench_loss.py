"""Benchmark: drift's loss (logits only at supervised positions) vs the full-logits reference.

    .venv/bin/python benchmarks/bench_loss.py                         # CPU, fp32 (defaults below)
    .venv/bin/python benchmarks/bench_loss.py --device cuda --dtype bf16

Same model, same batch for every method: the SmolLM2-135M architecture built from its config with a
seeded random init (nothing is downloaded; ``--real-weights`` loads the cached de-quantised
SmolLM2-135M-Instruct instead), and a batch of multi-turn conversations tokenised by drift's own
``tokenize_trajectory`` (terminal target) whose histories are ~8x longer than the terminal response.

A step is forward + backward (no optimizer), timed after warm-up; the median is reported. Tokens/s
counts every real (non-pad) input token. Peak memory is measured per method in a fresh subprocess:
on the CPU the peak RSS (``ru_maxrss``) minus the RSS once the model and batch are ready (so it is
what the steps add: activations, logits, gradients); on CUDA ``max_memory_allocated`` minus the
allocation before the first step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = {
    "drift": "weighted_sft_loss (auto: logits_to_keep mask)",
    "drift-decoder": "weighted_sft_loss (method=decoder)",
    "full": "full_logits_loss ([B,T,V] logits)",
}

# SmolLM2-135M(-Instruct)'s architecture (config.json of HuggingFaceTB/SmolLM2-135M-Instruct).
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)

WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "for",
    "that",
    "on",
    "with",
    "as",
    "it",
    "by",
    "this",
    "be",
    "are",
    "from",
    "at",
    "or",
    "an",
    "was",
    "which",
    "we",
    "if",
    "number",
    "sum",
    "product",
    "value",
    "equation",
    "solve",
    "answer",
    "step",
    "first",
    "then",
    "next",
    "therefore",
    "thus",
    "hence",
    "total",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "hundred",
    "prime",
    "square",
    "root",
    "divide",
    "multiply",
    "add",
    "subtract",
    "remainder",
    "fraction",
    "integer",
    "real",
    "positive",
    "negative",
    "greater",
    "less",
    "equal",
    "let",
    "find",
    "compute",
    "because",
    "since",
    "given",
    "problem",
    "question",
    "check",
    "again",
    "result",
    "correct",
    "error",
    "mistake",
    "consider",
    "case",
]


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _text(tokenizer, rng: random.Random, n_tokens: int) -> str:
    """About ``n_tokens`` tokens of seeded word salad (cut at a token boundary, decoded back)."""
    words = " ".join(rng.choice(WORDS) for _ in range(n_tokens * 2))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids).strip()


def build_conversations(tokenizer, n: int, history: int, response: int, turns: int, seed: int):
    """n trajectories of ``turns`` assistant turns; ~``history`` tokens before the terminal response."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        h = int(history * rng.uniform(0.8, 1.2))
        r = int(response * rng.uniform(0.8, 1.2))
        earlier = [int(response * rng.uniform(0.8, 1.2)) for _ in range(turns - 1)]
        question = max(16, h - 40 - sum(e + 20 for e in earlier))  # ~40 template/system, ~20 feedback
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": _text(tokenizer, rng, question) + " Answer in <answer>...</answer>."},
        ]
        for e in earlier:
            messages.append(
                {"role": "assistant", "content": _text(tokenizer, rng, e) + " <answer>7</answer>"}
            )
            messages.append({"role": "user", "content": "Incorrect. Please think again."})
        messages.append({"role": "assistant", "content": _text(tokenizer, rng, r) + " <answer>8</answer>"})
        convs.append(messages)
    return convs


def setup(args: argparse.Namespace):
    """(model, batch, device): the same for every method, given the same arguments."""
    import torch

    from drift_core.batching import collate, tokenize_trajectory
    from tasks.models import load_tokenizer, materialize_smollm2, materialize_tiny

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    # the real SmolLM2 tokenizer (saved next to the cached tiny model; nothing is downloaded)
    model_dir = materialize_smollm2() if args.real_weights else materialize_tiny()
    tokenizer = load_tokenizer(str(model_dir))
    convs = build_conversations(
        tokenizer, args.batch_size, args.history, args.response, args.turns, args.seed
    )
    examples = [tokenize_trajectory(tokenizer, m, "terminal", max_seq_len=8192) for m in convs]
    rng = random.Random(args.seed)
    weights = [rng.uniform(0.0, 3.0) for _ in examples]
    batch = collate(examples, weights, pad_token_id=tokenizer.pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}

    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(args.seed)
    if args.real_weights:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    else:
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M), dtype=dtype)
    if args.grad_checkpointing:
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()
    model.to(device).train()
    return model, batch, device


def make_step(method: str, model, batch, device):
    """One forward + backward of ``method``; returns (seconds, loss, supervised tokens)."""
    import torch

    from drift_core.loss import full_logits_loss, weighted_sft_loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        if method == "full":
            out = full_logits_loss(model, batch)
        else:
            out = weighted_sft_loss(model, batch, method="decoder" if method == "drift-decoder" else "auto")
        out.loss.backward()
        sync()
        return time.perf_counter() - t0, out.loss.detach().item(), out.n_tokens

    return step


def worker_memory(args: argparse.Namespace) -> dict:
    """Peak memory of one method, in a process that runs nothing else (warm-up step + one step)."""
    import torch

    model, batch, device = setup(args)
    step = make_step(args.method, model, batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_kib() * 1024
    for _ in range(2):
        _, loss, n_sup = step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {
        "method": args.method,
        "peak_mem_bytes": int(peak),
        "loss": loss,
        "tokens": int(batch["attention_mask"].sum()),
        "padded_tokens": int(batch["input_ids"].numel()),
        "supervised_tokens": n_sup,
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


def worker_timing(args: argparse.Namespace) -> dict:
    """Step times of all methods, interleaved (A B B A ...) so load changes on a shared machine hit
    every method alike."""
    model, batch, device = setup(args)
    methods = args.methods_list
    steps = {m: make_step(m, model, batch, device) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.warmup + args.steps):
        for m in methods if r % 2 == 0 else reversed(methods):
            dt, _, _ = steps[m]()
            print(f"  round {r + 1}/{args.warmup + args.steps} {m}: {dt:.3f}s", file=sys.stderr)
            if r >= args.warmup:
                times[m].append(dt)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--history", type=int, default=400, help="~tokens before the terminal response")
    p.add_argument("--response", type=int, default=50, help="~tokens of the terminal response")
    p.add_argument("--turns", type=int, default=3, help="assistant turns per conversation")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--real-weights", action="store_true", help="cached SmolLM2-135M-Instruct weights")
    p.add_argument("--methods", default="drift,full", help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument(
        "--grad-checkpointing", action="store_true", help="activation checkpointing (both methods)"
    )
    p.add_argument("--worker", choices=["memory", "timing"], help=argparse.SUPPRESS)
    p.add_argument("--method", choices=list(METHODS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; expected {list(METHODS)}")
    args.methods_list = methods
    if args.worker == "memory":
        print(json.dumps(worker_memory(args)))
        return 0
    if args.worker == "timing":
        print(json.dumps(worker_timing(args)))
        return 0

    passthrough = list(argv if argv is not None else sys.argv[1:])

    def run_worker(*extra: str) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, *extra]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ})
        if proc.returncode != 0:
            raise SystemExit(f"worker {extra} failed with exit code {proc.returncode}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # a fresh process per method for an honest peak memory; timing interleaves the methods
    results = {m: run_worker("--worker", "memory", "--method", m) for m in methods}
    for m, times in run_worker("--worker", "timing").items():
        med = statistics.median(times)
        results[m].update(step_s=times, step_s_median=med, tokens_per_s=results[m]["tokens"] / med)

    first = next(iter(results.values()))
    print(
        f"\ndevice={args.device} ({first['device_name']}) dtype={args.dtype} threads={first['threads']} "
        f"batch={args.batch_size} turns={args.turns} history~{args.history} response~{args.response} "
        f"tokens={first['tokens']} (padded {first['padded_tokens']}) supervised={first['supervised_tokens']} "
        f"warmup={args.warmup} steps={args.steps} weights={'real' if args.real_weights else 'random init'} "
        f"grad_checkpointing={args.grad_checkpointing}"
    )
    mem_unit = "peak GPU alloc" if args.device == "cuda" else "peak RSS increase"
    print(
        f"{'method':<14} {'step s (median)':>16} {'tokens/s':>10} {mem_unit + ' MiB':>22} {'loss':>10}  what"
    )
    for m, r in results.items():
        print(
            f"{m:<14} {r['step_s_median']:>16.3f} {r['tokens_per_s']:>10.1f} "
            f"{r['peak_mem_bytes'] / 2**20:>22.0f} {r['loss']:>10.5f}  {METHODS[m]}"
        )
    if "full" in results:
        base = results["full"]
        for m, r in results.items():
            if m == "full":
                continue
            speed = r["tokens_per_s"] / base["tokens_per_s"]
            mem = r["peak_mem_bytes"] / max(base["peak_mem_bytes"], 1)
            print(
                f"{m} vs full: tokens/s x{speed:.2f} (target >= 1.2: {'met' if speed >= 1.2 else 'NOT met'}), "
                f"peak memory x{mem:.2f} (target <= 0.7: {'met' if mem <= 0.7 else 'NOT met'}), "
                f"|loss diff| {abs(r['loss'] - base['loss']):.2e}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
