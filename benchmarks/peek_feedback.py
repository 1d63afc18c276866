"""What SmolLM2 writes after direction feedback: a few rollout conversations, printed whole.

    PYTHONPATH=. .venv/bin/python benchmarks/peek_feedback.py 2>/dev/null \
        | grep -E "^----|^  \[" > benchmarks/results/peek_feedback.txt

The evidence config with ``protocol.feedback: {kind: direction}`` on vLLM's CPU build: the first 12
training prompts, 3 sampled trajectories each, seed 0 (the rollout stage's own loop,
``tasks.rollout.run_episodes``). The examples docs/results.md quotes (Evidence v3) come from here.
"""

from __future__ import annotations

import sys

OVERRIDES = ["protocol.feedback={kind: direction}", "engine.kind=vllm"]


def main() -> None:
    from flows.config import load_config
    from tasks.engines import get_engine
    from tasks.grade import grader_for
    from tasks.ingest import load_problems
    from tasks.models import resolve_model
    from tasks.rollout import run_episodes

    cfg = load_config("configs/evidence.yaml", [*OVERRIDES, *sys.argv[1:]])
    df, _ = load_problems(cfg.data)
    problems = df.select("prompt_id", "question", "gold").to_dicts()[:12]
    engine = get_engine(resolve_model(cfg.reference_model), cfg.reference_model, cfg.engine)
    try:
        with grader_for(cfg.protocol, cfg.verifier) as grader:
            records = run_episodes(
                engine, engine.tokenizer, problems, cfg.protocol, cfg.rollout.sampling, 3, 3, grader, seed=0
            )
    finally:
        engine.close()
    gold = {p["prompt_id"]: p["gold"] for p in problems}
    for r in records:
        print(f"---- {r.prompt_id} gold {gold[r.prompt_id]} correct by turn {r.turn_correct}")
        for m in r.messages[2:]:
            print(f"  [{m.role}] {m.content!r}")


if __name__ == "__main__":  # vLLM spawns its engine process: nothing may run on import
    main()
