"""Do vLLM's two schedulers, and two runs of one scheduler, give the same tokens? (docs/reliability.md,
"5. Reproducible: what each engine promises").

Plays the demo-style protocol (sums of three one-digit numbers, the calculator prompt, 3 turns) with
SmolLM2 on vLLM four times in one engine: ``trajectory`` twice, then ``turn`` twice, and prints, after
each play, how many conversations each pair of plays shares word for word (and at turn 1)::

    VLLM_CPU_OMP_THREADS_BIND=1 .venv/bin/python benchmarks/probe_schedulers.py --dtype bfloat16 \
        --problems 8 --k 4

``--dtype bfloat16`` is vLLM's own ``auto`` for SmolLM2's float32 checkpoint (what the demo ran
before drift's ``auto`` became float32 on a CPU); ``--dtype auto`` (float32 on a CPU, the default
and the demo's) or ``float32`` the tests' dtype. ``--model tiny32``: the 2-layer random model with head size 32.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    from drift_core.schemas import (
        ArithConfig,
        DataConfig,
        EngineConfig,
        ModelConfig,
        ProtocolConfig,
        SamplingConfig,
        VerifierConfig,
    )
    from tasks.engines import compute_dtype
    from tasks.engines.vllm_engine import VLLMEngine
    from tasks.grade import grader_for
    from tasks.ingest import load_problems
    from tasks.models import materialize_smollm2, materialize_tiny
    from tasks.rollout import run_episodes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny32"])
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args()

    protocol = ProtocolConfig(
        prompt_mode="simple",
        answer_format="answer",
        max_turns=3,
        system_prompt="You are a calculator. Reply with only the final number, for example: <answer>7</answer>",
    )
    path = str(materialize_tiny(head_dim=32) if args.model == "tiny32" else materialize_smollm2())
    model_cfg, engine_cfg = (
        ModelConfig(path=path, dtype=args.dtype),
        EngineConfig(kind="vllm", batch_size=128),
    )
    started = time.time()
    engine = VLLMEngine(path, model_cfg, engine_cfg)
    served = str(engine.engine.model_config.dtype).removeprefix("torch.")
    print(
        f"start {time.time() - started:.1f} s, dtype {served} (keyed: {compute_dtype(path, model_cfg, engine_cfg)})"
    )
    arith = ArithConfig(n=args.problems, digits=1, n_operands=3, ops=["+"], seed=0)
    df, _ = load_problems(DataConfig(source="builtin:arith", arith=arith))
    problems = df.select("prompt_id", "question", "gold").to_dicts()
    sampling = SamplingConfig(temperature=args.temperature, top_p=1.0, max_new_tokens=args.max_new_tokens)

    def play(per_trajectory: bool) -> list[list[str]]:
        with grader_for(protocol, VerifierConfig(kind="numeric")) as grader:
            t = time.time()
            records = run_episodes(
                engine, engine.tokenizer, problems, protocol, sampling, args.k, 3, grader, seed=0,
                per_trajectory=per_trajectory,
            )  # fmt: skip
            print(f"play {'trajectory' if per_trajectory else 'turn'}: {time.time() - t:.1f} s", flush=True)
        return [[m.content for m in r.messages] for r in records]

    runs: dict[str, list[list[str]]] = {}
    try:
        for name, per_trajectory in (
            ("trajectory-1", True),
            ("trajectory-2", True),
            ("turn-1", False),
            ("turn-2", False),
        ):
            runs[name] = play(per_trajectory)
            for a in runs:
                b = name
                if a == b:
                    continue
                same = sum(x == y for x, y in zip(runs[a], runs[b], strict=True))
                first = sum(x[:3] == y[:3] for x, y in zip(runs[a], runs[b], strict=True))
                print(f"{a} vs {b}: {same} of {len(runs[a])} identical ({first} at turn 1)", flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
