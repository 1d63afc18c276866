"""The transformers engine's two start-up and prefill savings, each against what it replaced, in one run.

    nice -n 10 python benchmarks/bench_transformers_engine.py            # SmolLM2-135M, one core

1. **Stop strings.** transformers' ``StopStringCriteria`` (what ``generate(stop_strings=...)``
   builds, once per ``generate`` call) walks the whole vocabulary to make its tables; drift's
   ``StopOnStrings`` decodes the last few generated tokens each step. Timed: building each for
   ``</answer>`` (three times: the cost is paid again by every call, i.e. every batch), and one
   greedy ``generate`` of 64 first-turn prompts with each.
2. **Shared prefix.** The greedy equivalence test's play (tests/test_vllm.py: 64 arithmetic problems x
   3 turns of the protocol, greedy, batch 64) with the batch's shared prefix prefilled once
   (default) and with every prompt prefilled whole (``MIN_SHARED_PREFIX`` out of reach); the
   conversations must be identical.

Results go to ``benchmarks/results/transformers_engine.json`` after each section (resumable: a
section already there is skipped unless ``--fresh``). One thread (``torch.set_num_threads(1)``), as
a test worker computes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
OUT = ROOT / "benchmarks" / "results" / "transformers_engine.json"


def save(results: dict) -> None:
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(OUT)


def stop_strings(engine, prompts) -> dict:
    from transformers import StopStringCriteria

    import tasks.engines.transformers_engine as te
    from tasks.engines.base import SamplingParams

    tok = engine.tokenizer
    theirs_build, ours_build = [], []
    for _ in range(3):
        start = time.perf_counter()
        StopStringCriteria(tok, ["</answer>"])
        theirs_build.append(round(time.perf_counter() - start, 3))
        start = time.perf_counter()
        te.StopOnStrings(tok, ["</answer>"], prompt_width=0)
        ours_build.append(round(time.perf_counter() - start, 5))

    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=12, stop=["</answer>"])
    start = time.perf_counter()
    ours = engine.generate(prompts, params)
    ours_gen = time.perf_counter() - start
    real = te.StopOnStrings
    te.StopOnStrings = lambda tokenizer, stop, prompt_width: StopStringCriteria(tokenizer, stop)
    try:
        start = time.perf_counter()
        theirs = engine.generate(prompts, params)
        theirs_gen = time.perf_counter() - start
    finally:
        te.StopOnStrings = real
    return {
        "build_s": {
            "transformers_StopStringCriteria": theirs_build,
            "drift_StopOnStrings": ours_build,
        },
        "generate_64_prompts_s": {
            "transformers_StopStringCriteria": round(theirs_gen, 2),
            "drift_StopOnStrings": round(ours_gen, 2),
        },
        "same_completions": ours == theirs,
    }


def shared_prefix(engine) -> dict:
    from test_vllm import PROTOCOL, _problems

    import tasks.engines.transformers_engine as te
    from drift_core.schemas import SamplingConfig, VerifierConfig
    from tasks.grade import grader_for
    from tasks.rollout import run_episodes

    problems = _problems(64)
    sampling = SamplingConfig(temperature=0.0, top_p=1.0, max_new_tokens=12)
    default = te.MIN_SHARED_PREFIX
    out, seconds = {}, {}
    for label, minimum in (("whole_prompts", 10**9), ("shared_prefix", default)):
        te.MIN_SHARED_PREFIX = minimum
        with grader_for(PROTOCOL, VerifierConfig(kind="numeric")) as grader:
            start = time.perf_counter()
            played = run_episodes(
                engine, engine.tokenizer, problems, PROTOCOL, sampling, 1, 3, grader, seed=0
            )
            seconds[label] = round(time.perf_counter() - start, 1)
        out[label] = [[m.content for m in r.messages] for r in played]
    te.MIN_SHARED_PREFIX = default
    first = engine.tokenizer(
        engine.tokenizer.apply_chat_template(
            [{"role": "system", "content": PROTOCOL.system_prompt}], tokenize=False
        ),
        add_special_tokens=False,
    )["input_ids"]
    return {
        "play_64x3_s": seconds,
        "speed_up": round(seconds["whole_prompts"] / seconds["shared_prefix"], 2),
        "identical_conversations": sum(
            a == b for a, b in zip(out["whole_prompts"], out["shared_prefix"], strict=True)
        ),
        "conversations": len(problems),
        "system_turn_tokens": len(first),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fresh", action="store_true", help="re-measure sections already in the results")
    args = parser.parse_args()

    import torch
    from test_vllm import _prompts

    from drift_core.schemas import EngineConfig, ModelConfig
    from tasks.engines.transformers_engine import TransformersEngine
    from tasks.models import materialize_smollm2

    torch.set_num_threads(1)
    results = {} if args.fresh or not OUT.exists() else json.loads(OUT.read_text())
    model = str(materialize_smollm2())
    engine = TransformersEngine(
        model, ModelConfig(path=model, dtype="float32"), EngineConfig(device="cpu", batch_size=64)
    )
    results["setup"] = {"model": "SmolLM2-135M-Instruct (float32)", "threads": 1, "device": "cpu"}
    for name, section in (
        ("stop_strings", lambda: stop_strings(engine, _prompts(engine.tokenizer, 64))),
        ("shared_prefix", lambda: shared_prefix(engine)),
    ):
        if name in results:
            print(f"{name}: kept from {OUT.name}")
        else:
            results[name] = section()
            save(results)
        print(name, json.dumps(results[name]))


if __name__ == "__main__":
    main()
