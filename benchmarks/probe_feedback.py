"""Feedback probe for Evidence v2b: which rollout setting puts corrections into the reference's
rollouts ("wrong at turn 1, feedback, right later"), the examples DRIFT's weights exist to find?

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/probe_feedback.py \
        [--config configs/evidence.yaml] [--k 8] [--feedback-temperatures 0.5 1.0 1.5]

Evidence v2's rollouts (K = 8, temperature 0.5 every turn) held none: 10.4% of the 384
trajectories were right at turn 1 and still 10.4% by turn 3. For each feedback temperature (turn 2
on; turn 1 stays at the config's temperature, so turn-1 accuracy is the reference's own) this plays
the config's protocol on its training prompts through the rollout stage's own code
(``tasks.rollout.run_episodes``, the config's engine and verifier) and counts what DRIFT would get:
solved by turn t, corrected trajectories, groups holding a success, groups holding a correction.
Rows are appended to ``benchmarks/results/probe_feedback.jsonl`` as each setting finishes
(resumable: finished settings are skipped); the table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "benchmarks" / "results" / "probe_feedback.jsonl"


def summarize(records, k: int, max_turns: int) -> dict:
    """What the rollouts hold for the weights stage, in percent of trajectories / groups (accuracy by
    turn and format errors as the rollout stage reports them, ``tasks.rollout.rollout_stats``)."""
    from tasks.rollout import records_to_frame, rollout_stats

    stats = rollout_stats(records_to_frame(records), max_turns)
    n = len(records)
    groups: dict[str, list] = {}
    for r in records:
        groups.setdefault(r.prompt_id, []).append(r)
    corrected = [r for r in records if r.solved and r.n_turns > 1]
    return {
        **{
            f"solved_by_turn_{t}": round(100 * stats[f"solved_by_turn_{t}"], 1)
            for t in range(1, max_turns + 1)
        },
        "corrected": len(corrected),
        "corrected_pct": round(100 * len(corrected) / n, 1),
        "groups_with_success_pct": round(
            100 * sum(any(r.solved for r in g) for g in groups.values()) / len(groups), 1
        ),
        "groups_with_correction_pct": round(
            100 * sum(any(r.solved and r.n_turns > 1 for r in g) for g in groups.values()) / len(groups), 1
        ),
        "format_error_pct": round(100 * stats["format_error_rate"], 1),
        "repeated_answer_pct": round(
            100
            * sum(len(r.normalized_answers) - len(set(r.normalized_answers)) for r in records)
            / max(1, sum(len(r.normalized_answers) for r in records)),
            1,
        ),
        "generated_tokens": int(stats["generated_tokens"]),
        "trajectories": n,
        "k": k,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/evidence.yaml")
    parser.add_argument("--k", type=int, default=None, help="trajectories per prompt (default: the config's)")
    parser.add_argument("--feedback-temperatures", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, as `drift run --set` (e.g. 'protocol.feedback={kind: direction}')",
    )
    args = parser.parse_args()

    from flows.config import load_config
    from tasks.engines import get_engine
    from tasks.grade import grader_for
    from tasks.ingest import load_problems
    from tasks.models import load_tokenizer, resolve_model
    from tasks.rollout import run_episodes

    cfg = load_config(ROOT / args.config, args.overrides)
    k = args.k or cfg.rollout.k
    overrides = sorted(args.overrides)
    done = set()
    if ROWS.exists():
        done = {
            (r["config"], r["k"], r["temperature"], r["feedback_temperature"], tuple(r.get("overrides", [])))
            for r in map(json.loads, ROWS.open())
        }
    todo = [
        t
        for t in args.feedback_temperatures
        if (args.config, k, cfg.rollout.sampling.temperature, t, tuple(overrides)) not in done
    ]
    if todo:
        df, _ = load_problems(cfg.data, ROOT)
        problems = df.select("prompt_id", "question", "gold").to_dicts()
        model_path = resolve_model(cfg.reference_model)
        engine = get_engine(model_path, cfg.reference_model, cfg.engine)
        tokenizer = getattr(engine, "tokenizer", None) or load_tokenizer(model_path, cfg.reference_model)
        ROWS.parent.mkdir(parents=True, exist_ok=True)
        for feedback in todo:
            sampling = cfg.rollout.sampling.model_copy(update={"feedback_temperature": feedback})
            start = time.perf_counter()
            with grader_for(cfg.protocol, cfg.verifier) as grader:
                records = run_episodes(
                    engine,
                    tokenizer,
                    problems,
                    cfg.protocol,
                    sampling,
                    k,
                    cfg.protocol.max_turns,
                    grader,
                    seed=0,
                )
            row = {
                "config": args.config,
                "overrides": overrides,
                "feedback": cfg.protocol.feedback
                if isinstance(cfg.protocol.feedback, str)
                else cfg.protocol.feedback.kind,
                "temperature": sampling.temperature,
                "feedback_temperature": feedback,
                "prompts": len(problems),
                **summarize(records, k, cfg.protocol.max_turns),
                "seconds": round(time.perf_counter() - start, 1),
            }
            with ROWS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)

    rows = [
        r
        for r in map(json.loads, ROWS.open())
        if r["config"] == args.config and r.get("overrides", []) == overrides
    ]
    turns = cfg.protocol.max_turns
    head = ["K", "turn-1 T", "feedback T"] + [f"solved by {t}" for t in range(1, turns + 1)]
    head += ["corrected", "groups w/ success", "groups w/ correction", "format errors", "repeated", "tokens"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in sorted(rows, key=lambda r: (r["k"], r["feedback_temperature"])):
        cells = [r["k"], r["temperature"], r["feedback_temperature"]]
        cells += [r[f"solved_by_turn_{t}"] for t in range(1, turns + 1)]
        cells += [
            f"{r['corrected']} ({r['corrected_pct']}%)",
            r["groups_with_success_pct"],
            r["groups_with_correction_pct"],
            r["format_error_pct"],
            r["repeated_answer_pct"],
            f"{r['generated_tokens']:,}",
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
