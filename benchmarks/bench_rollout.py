"""Rollout engines side by side: drift's transformers engine and its vLLM engine, and vLLM's two
schedulers, on the same prompts in one run.

Workloads (SmolLM2-135M-Instruct, fp32, the demo's protocol: calculator system prompt, chat template,
``<answer>`` pre-fill, stop at ``</answer>``):

* **sampled**: one turn, ``--prompts`` prompts x n=``--n``, temperature 0.7 (a rollout's first turn);
* **greedy-3turn**: ``--problems`` GSM8K test problems (bundled), 3 turns of the protocol, greedy,
  ``--eval-tokens`` new tokens a turn (an evaluation);
* **sampled-3turn**: the same problems, K=``--k`` trajectories each, temperature 0.7 (a rollout).

Every multi-turn workload runs through ``tasks.rollout.run_episodes``, the loop drift runs; vLLM
runs it under both schedulers (``turn``: every trajectory's turn finishes before the next turn
starts; ``trajectory``: a trajectory's next turn is submitted as soon as its own turn is graded).
Reported per row: wall seconds, generated tokens, tokens/s, and the engine's load seconds; then the
ratios. Greedy rows also report whether the completions are identical across schedulers.

Resumable: each finished row is written to ``--out`` (JSON) at once, and rows already there are
skipped on the next run (delete the file to measure again).

    nice .venv/bin/python benchmarks/bench_rollout.py [--prompts 64 --n 8 --problems 64 --k 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

PROTOCOL_SYSTEM = "You are a calculator. Reply with only the final number, for example: <answer>7</answer>"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--eval-tokens", type=int, default=64)
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--out", default="benchmarks/results/rollout_engines.json")
    args = parser.parse_args()

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    results["args"] = vars(args)

    def record(name: str, row: dict) -> None:
        results["rows"][name] = row
        tmp = out.with_suffix(".tmp")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(results, indent=2, sort_keys=True))
        tmp.replace(out)
        print(f"{name:<34} {_fmt(row)}", flush=True)

    for kind in args.engines.split(","):
        wanted = [f"{kind}/{w}" for w in _workloads(kind)]
        if all(w in results["rows"] for w in wanted):
            continue
        engine, load_s = _engine(kind)
        record(f"{kind}/load", {"load_s": load_s})
        for workload in _workloads(kind):
            name = f"{kind}/{workload}"
            if name not in results["rows"]:
                record(name, _run(engine, workload, args))
        engine.close()
    _report(results)


def _workloads(kind: str) -> list[str]:
    multi = ["greedy-3turn", "sampled-3turn"]
    if kind == "vllm":
        return ["sampled", *[f"{m}/turn" for m in multi], *[f"{m}/trajectory" for m in multi]]
    return ["sampled", *[f"{m}/turn" for m in multi]]


def _engine(kind: str):
    from drift_core.schemas import EngineConfig, ModelConfig
    from tasks.engines import get_engine
    from tasks.models import materialize_smollm2

    path = str(materialize_smollm2())
    started = time.perf_counter()
    engine = get_engine(
        path, ModelConfig(path=path, dtype="float32"), EngineConfig(kind=kind, batch_size=128)
    )
    return engine, time.perf_counter() - started


def _protocol():
    from drift_core.schemas import ProtocolConfig

    return ProtocolConfig(prompt_mode="simple", max_turns=3, system_prompt=PROTOCOL_SYSTEM)


def _run(engine, workload: str, args) -> dict:
    if workload == "sampled":
        return _sampled(engine, args)
    name, scheduling = workload.split("/")
    return _multi_turn(
        engine, greedy=name.startswith("greedy"), per_trajectory=scheduling == "trajectory", args=args
    )


def _sampled(engine, args) -> dict:
    from drift_core.protocol import generation_prefill, initial_messages, stop_strings
    from tasks.engines.base import SamplingParams

    protocol = _protocol()
    tok = engine.tokenizer
    prompts = [
        tok.apply_chat_template(
            initial_messages(f"What is {i} + {3 * i % 17 + 2}?", protocol),
            tokenize=False,
            add_generation_prompt=True,
        )
        + generation_prefill(protocol)
        for i in range(args.prompts)
    ]
    params = SamplingParams(
        n=args.n, temperature=0.7, max_new_tokens=args.max_new_tokens, stop=stop_strings(protocol), seed=0
    )
    started = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - started
    tokens = sum(c.n_tokens for o in outs for c in o)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tok_per_s": tokens / wall,
        "completions": args.prompts * args.n,
    }


def _multi_turn(engine, greedy: bool, per_trajectory: bool, args) -> dict:
    from drift_core.schemas import DataConfig, SamplingConfig, VerifierConfig
    from tasks.grade import grader_for
    from tasks.ingest import load_problems
    from tasks.rollout import run_episodes

    df, _ = load_problems(DataConfig(source="builtin:gsm8k", split="test", limit=args.problems))
    problems = df.select("prompt_id", "question", "gold").to_dicts()
    protocol = _protocol()
    sampling = SamplingConfig(temperature=0.0 if greedy else 0.7, top_p=1.0, max_new_tokens=args.eval_tokens)
    k = 1 if greedy else args.k
    with grader_for(protocol, VerifierConfig(kind="numeric")) as grader:
        started = time.perf_counter()
        records = run_episodes(
            engine,
            engine.tokenizer,
            problems,
            protocol,
            sampling,
            k,
            3,
            grader,
            seed=0,
            per_trajectory=per_trajectory,
        )
        wall = time.perf_counter() - started
    tokens = sum(sum(r.gen_tokens) for r in records)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tok_per_s": tokens / wall,
        "trajectories": len(records),
        "turns": sum(r.n_turns for r in records),
        "solved": sum(r.solved for r in records) / len(records),
        "multi_at": [sum(any(r.turn_correct[:t]) for r in records) / len(records) for t in (1, 2, 3)],
        "completions_sha": _digest([r.messages for r in records]),
        "replies": [[m.content for m in r.messages if m.role == "assistant"] for r in records]
        if greedy
        else None,
    }


def _pct(values: list[float]) -> str:
    return " / ".join(f"{v:.1%}" for v in values)


def _digest(messages) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([[m.model_dump() for m in ms] for ms in messages]).encode()).hexdigest()[
        :16
    ]


def _fmt(row: dict) -> str:
    if "load_s" in row:
        return f"load {row['load_s']:.1f} s"
    extra = f", solved {row['solved']:.1%}" if "solved" in row else ""
    return f"{row['wall_s']:.1f} s, {row['tokens']} tokens, {row['tok_per_s']:.1f} tok/s{extra}"


def _report(results: dict) -> None:
    rows = results["rows"]
    print("\nratios (same workload, same run):")
    pairs = [
        ("vllm/sampled", "transformers/sampled", "sampled, vLLM / transformers (tok/s)"),
        (
            "vllm/greedy-3turn/turn",
            "transformers/greedy-3turn/turn",
            "greedy 3-turn, vLLM / transformers (wall)",
        ),
        (
            "vllm/sampled-3turn/turn",
            "transformers/sampled-3turn/turn",
            "sampled 3-turn, vLLM / transformers (wall)",
        ),
        (
            "vllm/greedy-3turn/trajectory",
            "vllm/greedy-3turn/turn",
            "greedy 3-turn, per-trajectory / turn (wall)",
        ),
        (
            "vllm/sampled-3turn/trajectory",
            "vllm/sampled-3turn/turn",
            "sampled 3-turn, per-trajectory / turn (wall)",
        ),
    ]
    for a, b, label in pairs:
        if a in rows and b in rows:
            if "tok/s" in label:
                ratio = rows[a]["tok_per_s"] / rows[b]["tok_per_s"]
                print(f"  {label}: x{ratio:.2f}")
            else:  # speed-up: the slower wall over the faster
                print(f"  {label}: x{rows[b]['wall_s'] / rows[a]['wall_s']:.2f} faster")
    a, b = rows.get("vllm/greedy-3turn/turn"), rows.get("transformers/greedy-3turn/turn")
    if a and b and a.get("replies") and b.get("replies"):
        same = total = 0
        for va, vb in zip(a["replies"], b["replies"], strict=True):
            for ra, rb in zip(va, vb, strict=False):  # turns both played, up to where they part
                total += 1
                same += ra == rb
                if ra != rb:
                    break
        print(f"  greedy 3-turn, vLLM vs transformers: {same}/{total} turns identical ({same / total:.1%})")
        print(f"  multi@1..3: vLLM {_pct(a['multi_at'])}, transformers {_pct(b['multi_at'])}")
    for name in ("greedy-3turn", "sampled-3turn"):
        a, b = rows.get(f"vllm/{name}/trajectory"), rows.get(f"vllm/{name}/turn")
        if a and b:
            print(
                f"  {name}: same completions under both schedulers: {a['completions_sha'] == b['completions_sha']}"
            )


if __name__ == "__main__":
    main()
