"""vLLM's CPU build on a small machine: its own thread binding against drift's.

vLLM binds its OpenMP threads to every core but one, keeping that one for its scheduler process;
on a 2-core machine the model then computes on one core. drift binds every core the process may
use there (``tasks.engines.vllm_engine.cpu_thread_binding``). This starts SmolLM2-135M-Instruct
(the bundled model, fp32) once with each binding and times the same seeded generations: 64
calculator prompts, 16 new tokens, n = 1 and n = 4. Figures and the ratio print side by side.

    .venv/bin/python benchmarks/bench_vllm_threads.py

Results: docs/benchmarks.md, "vLLM's threads on a small machine".
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYSTEM = "You are a calculator. Answer with the number only.\nExample: What is 31 + 57?\n<answer>88</answer>"


def measure(binding: str | None) -> dict:
    """Start an engine with ``binding`` (None: drift's choice) and time the two generations."""
    from drift_core.protocol import generation_prefill, initial_messages, stop_strings
    from drift_core.schemas import EngineConfig, ModelConfig, ProtocolConfig
    from tasks.engines.base import SamplingParams
    from tasks.engines.vllm_engine import VLLMEngine, cpu_thread_binding
    from tasks.models import materialize_smollm2

    if binding is None:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        shown = f"drift's ({cpu_thread_binding(EngineConfig(kind='vllm'), os.environ, sorted(os.sched_getaffinity(0)))})"
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
        shown = f"vLLM's ({binding})"
    model = str(materialize_smollm2())
    started = time.perf_counter()
    engine = VLLMEngine(model, ModelConfig(path=model), EngineConfig(kind="vllm"))
    result = {"binding": shown, "start_s": time.perf_counter() - started}
    protocol = ProtocolConfig(system_prompt=SYSTEM)
    tok = engine.tokenizer
    prompts = [
        tok.apply_chat_template(
            initial_messages(f"What is {10 + i} + {3 * i % 50 + 11}?", protocol),
            tokenize=False,
            add_generation_prompt=True,
        )
        + generation_prefill(protocol)
        for i in range(64)
    ]
    try:
        for n in (1, 4):
            params = SamplingParams(
                n=n, temperature=1.0, max_new_tokens=16, stop=stop_strings(protocol), seed=1
            )
            started = time.perf_counter()
            outs = engine.generate(prompts, params)
            seconds = time.perf_counter() - started
            tokens = sum(c.n_tokens for o in outs for c in o)
            result[f"n{n}"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
            result[f"n{n}_texts"] = [c.text for o in outs for c in o]
    finally:
        engine.close()
    return result


def main() -> None:
    vllm_own, drifts = measure("auto"), measure(None)
    same = {n: vllm_own[f"n{n}_texts"] == drifts[f"n{n}_texts"] for n in (1, 4)}
    print(f"{'':28} {'start s':>8} {'n=1 tok/s':>10} {'n=4 tok/s':>10}")
    for r in (vllm_own, drifts):
        print(
            f"{r['binding']:28} {r['start_s']:8.1f} {r['n1']['tokens_per_s']:10.1f} {r['n4']['tokens_per_s']:10.1f}"
        )
    ratios = {n: drifts[f"n{n}"]["tokens_per_s"] / vllm_own[f"n{n}"]["tokens_per_s"] for n in (1, 4)}
    print(f"{'ratio (drift / vLLM)':28} {'':8} {ratios[1]:10.2f} {ratios[4]:10.2f}")
    print(f"same completions: n=1 {same[1]}, n=4 {same[4]}")
    print(json.dumps({"ratios": ratios, "same": same, "cpus": len(os.sched_getaffinity(0))}))


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    main()
