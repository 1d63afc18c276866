"""Task probe for the evidence experiment: which task gives SmolLM2-135M-Instruct something to
improve (turn-1 accuracy 5-50% at the rollout temperature) while a question-blind answer sequence
cannot win (<= 5% by turn T)?

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/probe_task.py [--n 64] [--k 4]

For each (task, prompt, temperature) it samples K turn-1 completions per problem once, with the
largest token budget, and scores every budget by truncating the same samples (the first m tokens of
a sample drawn with budget M > m are a sample drawn with budget m: sampling is left to right).
Each completion is read two ways: ``strict`` (drift's protocol: a closed ``<answer>`` block whose
content is a number) and ``last_number`` (a closed block, the last number in it: "48 + 69 = 117").
Also greedy (one completion per problem). Rows are appended to
``benchmarks/results/probe_task.jsonl`` as each setting finishes (resumable: finished settings are
skipped); the table is printed at the end and written to ``benchmarks/results/probe_task.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from drift_core.protocol import generation_prefill, initial_messages, parse_answers
from drift_core.schemas import ArithConfig, EngineConfig, ModelConfig, ProtocolConfig
from drift_core.verify import last_number, parse_number
from tasks.engines.base import SamplingParams
from tasks.ingest import generate_arith

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ROWS = RESULTS / "probe_task.jsonl"
BUDGETS = (8, 12, 16, 24)
TURNS = 3

TASKS = {
    "a+b (2-digit)": ArithConfig(n=300, digits=2, n_operands=2, ops=["+"], seed=0),
    "a±b (2-digit)": ArithConfig(n=300, digits=2, n_operands=2, ops=["+", "-"], seed=0),
    "a+b+c (1-digit)": ArithConfig(n=300, digits=1, n_operands=3, ops=["+"], seed=0),
    "a+b (3-digit)": ArithConfig(n=300, digits=3, n_operands=2, ops=["+"], seed=0),
}
PROMPTS = {
    "calculator": "You are a calculator. Reply with only the final number, for example: <answer>7</answer>",
    "calculator-example": (
        "You are a calculator. Answer with the number only.\nExample: What is 31 + 57?\n<answer>88</answer>"
    ),
}


def blind_ceiling(golds: list[str], turns: int) -> tuple[float, list[str]]:
    """Best question-blind answer sequence: the T most frequent golds, chosen on these golds."""
    freq = Counter(golds)
    best = [g for g, _ in freq.most_common(turns)]
    return sum(freq[g] for g in best) / len(golds), best


def problems(task: str, n: int) -> list[tuple[str, str]]:
    return generate_arith(TASKS[task], "test")[:n]


def score(texts: list[str], golds: list[str], cfg: ProtocolConfig) -> dict[str, float]:
    strict = lenient = closed = 0
    for text, gold in zip(texts, golds, strict=True):
        actions = parse_answers(text, cfg)
        if not actions:
            continue
        closed += 1
        target = float(gold)
        value = parse_number(actions[0])
        strict += value is not None and abs(value - target) < 1e-9
        value = last_number(actions[0])
        lenient += value is not None and abs(float(value) - target) < 1e-9
    n = len(texts)
    return {"strict": 100 * strict / n, "last_number": 100 * lenient / n, "closed": 100 * closed / n}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    args = parser.parse_args()

    from tasks.engines.transformers_engine import TransformersEngine
    from tasks.models import load_tokenizer, materialize_smollm2

    model_dir = str(materialize_smollm2())
    tok = load_tokenizer(model_dir)
    engine = TransformersEngine(model_dir, ModelConfig(path=model_dir), EngineConfig(batch_size=128))
    RESULTS.mkdir(parents=True, exist_ok=True)
    done = set()
    if ROWS.exists():
        done = {(r["task"], r["prompt"], r["temperature"]) for r in map(json.loads, ROWS.open())}

    for task in args.tasks:
        probs = problems(task, args.n)
        golds = [g for _, g in probs]
        all_golds = [g for _, g in problems(task, 300)]  # the eval set: 300 held-out problems
        ceiling, best = blind_ceiling(all_golds, TURNS)
        for prompt in args.prompts:
            cfg = ProtocolConfig(system_prompt=PROMPTS[prompt], max_turns=TURNS)
            rendered = [
                tok.apply_chat_template(initial_messages(q, cfg), tokenize=False, add_generation_prompt=True)
                + generation_prefill(cfg)
                for q, _ in probs
            ]
            for temperature in [0.0, *args.temperatures]:
                if (task, prompt, temperature) in done:
                    continue
                k = 1 if temperature == 0 else args.k
                start = time.perf_counter()
                params = SamplingParams(
                    n=k, temperature=temperature, max_new_tokens=max(BUDGETS), stop=["</answer>"], seed=0
                )
                outs = engine.generate(rendered, params)
                seconds = time.perf_counter() - start
                row = {
                    "task": task,
                    "prompt": prompt,
                    "temperature": temperature,
                    "k": k,
                    "n": len(probs),
                    "blind_ceiling": round(100 * ceiling, 1),
                    "blind_best": best,
                    "seconds": round(seconds, 1),
                    "examples": [c.text for c in outs[0][:2]] + [outs[1][0].text],
                }
                for budget in BUDGETS:
                    texts, gold_rep = [], []
                    for comps, gold in zip(outs, golds, strict=True):
                        for c in comps:
                            ids = tok(c.text, add_special_tokens=False)["input_ids"][:budget]
                            texts.append(generation_prefill(cfg) + tok.decode(ids))
                            gold_rep.append(gold)
                    row[f"tok{budget}"] = score(texts, gold_rep, cfg)
                with ROWS.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)

    rows = [json.loads(line) for line in ROWS.open()]
    lines = [
        "| task | system prompt | temp | K | budget | turn-1 strict % | turn-1 last-number % | closed % | blind ceiling @3 % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for budget in BUDGETS:
            s = r[f"tok{budget}"]
            lines.append(
                f"| {r['task']} | {r['prompt']} | {r['temperature']} | {r['k']} | {budget} | "
                f"{s['strict']:.1f} | {s['last_number']:.1f} | {s['closed']:.1f} | {r['blind_ceiling']} |"
            )
    table = "\n".join(lines)
    (RESULTS / "probe_task.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
