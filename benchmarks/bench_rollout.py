"""Rollout engine benchmark: drift's TransformersEngine against one trajectory at a time.

Same model (SmolLM2-135M-Instruct, the demo's reference), same rendered prompts (the demo's
protocol: chat template + ``<answer>`` pre-fill), same sampling (temperature 1.0, top_p 1.0):

* **drift**: ``TransformersEngine.generate`` -- all ``prompts x n`` sequences sorted by length,
  left-padded batches, each sequence stops at ``</answer>`` or end of turn;
* **naive**: a Python loop, one sequence per ``model.generate`` call, always to ``max_new_tokens``
  (no stop string), the answer cut afterwards.

Both produce the same number of completions. Reported: wall seconds, generated tokens/s (every
token each side actually generated), and *useful* tokens/s (tokens up to and including
``</answer>``, i.e. what the protocol keeps), and the ratios. The headline is the useful-token
ratio, which is the wall-time ratio for producing the same set of answers.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_rollout.py [--prompts 16 --n 4 --max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    from drift_core.protocol import generation_prefill, initial_messages, stop_strings
    from drift_core.schemas import ArithConfig, DataConfig, EngineConfig, ModelConfig, ProtocolConfig
    from tasks.engines.base import SamplingParams, cut_at_stop
    from tasks.engines.transformers_engine import TransformersEngine
    from tasks.engines.transformers_engine import eos_ids as _eos_ids
    from tasks.ingest import load_problems
    from tasks.models import resolve_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    model_cfg = ModelConfig(path=args.model)
    path = resolve_model(model_cfg)
    engine = TransformersEngine(path, model_cfg, EngineConfig(batch_size=args.batch_size, device="cpu"))
    tok, model = engine.tokenizer, engine.model
    protocol = ProtocolConfig()
    problems, _ = load_problems(
        DataConfig(source="builtin:arith", arith=ArithConfig(n=args.prompts, digits=1, n_operands=2))
    )
    prefill = generation_prefill(protocol)
    prompts = [
        tok.apply_chat_template(initial_messages(q, protocol), tokenize=False, add_generation_prompt=True)
        + prefill
        for q in problems["question"].to_list()
    ]
    stop = stop_strings(protocol)
    params = SamplingParams(
        n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, stop=stop, seed=0
    )

    # warm-up (first-call overheads on both paths)
    engine.generate(prompts[:2], params.model_copy(update={"n": 1, "max_new_tokens": 4}))

    start = time.perf_counter()
    out = engine.generate(prompts, params)
    drift_s = time.perf_counter() - start
    drift_useful = sum(c.n_tokens for per in out for c in per)
    drift_generated = drift_useful  # the engine stops each sequence at its stop: all it keeps

    eos = _eos_ids(model, tok)
    naive_generated = naive_useful = 0
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            for _ in range(args.n):
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=1.0,
                    top_p=1.0,
                    top_k=0,
                    max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.max_new_tokens,  # to max_tokens: no early end-of-turn either
                    pad_token_id=tok.pad_token_id,
                )
                new = gen[0, ids.shape[1] :].tolist()
                naive_generated += len(new)
                cut = next((k for k, t in enumerate(new) if t in eos), len(new))
                text, stopped = cut_at_stop(tok.decode(new[:cut], skip_special_tokens=True), stop)
                naive_useful += (
                    len(tok(text, add_special_tokens=False)["input_ids"])
                    if stopped
                    else min(cut + 1, len(new))
                )
    naive_s = time.perf_counter() - start

    fig = {
        "model": args.model,
        "completions": len(prompts) * args.n,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "drift_seconds": round(drift_s, 2),
        "naive_seconds": round(naive_s, 2),
        "drift_generated_tok_s": round(drift_generated / drift_s, 1),
        "naive_generated_tok_s": round(naive_generated / naive_s, 1),
        "drift_useful_tok_s": round(drift_useful / drift_s, 1),
        "naive_useful_tok_s": round(naive_useful / naive_s, 1),
        "useful_tok_s_ratio": round((drift_useful / drift_s) / (naive_useful / naive_s), 2),
        "generated_tok_s_ratio": round((drift_generated / drift_s) / (naive_generated / naive_s), 2),
        "wall_time_ratio": round(naive_s / drift_s, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(f"drift engine : {fig['drift_seconds']:7.2f} s  {fig['drift_useful_tok_s']:8.1f} useful tok/s")
    print(
        f"naive loop   : {fig['naive_seconds']:7.2f} s  {fig['naive_useful_tok_s']:8.1f} useful tok/s  "
        f"({fig['naive_generated_tok_s']:.1f} generated tok/s incl. past </answer>)"
    )
    print(
        f"ratio        : x{fig['useful_tok_s_ratio']} useful tokens/s (= wall time x{fig['wall_time_ratio']}), "
        f"x{fig['generated_tok_s_ratio']} raw generated tokens/s"
    )
    print(json.dumps(fig))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2)


if __name__ == "__main__":
    main()
