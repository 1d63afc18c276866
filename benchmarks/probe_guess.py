"""Guessing-game probe (issue 40, item 2): do the reference's rollouts of ``builtin:guess`` hold games
won by following the direction feedback, the examples DRIFT's weights exist to find, and at which
retry temperature and turn budget?

    OMP_NUM_THREADS=2 nice -n 19 .venv/bin/python benchmarks/probe_guess.py \
        [--config configs/guess.yaml] [--model builtin:smollm2-135m-instruct] [--prompts 48] [--k 8] \
        [--feedback-temperatures 0.5 1.0 1.3] [--turns 6 8] [--set key=value ...]
    .venv/bin/python benchmarks/probe_guess.py --report      # the table of every probe so far

Training split only (the config's ``data``, which must be ``split: train``): settings are picked
here, never on the evaluation games. For each retry temperature (turn 2 on; turn 1 stays at the
config's temperature, so turn 1 is the reference's own guess) it plays the config's protocol with
its direction feedback through the rollout stage's own code (``tasks.rollout.run_episodes``, the
config's engine and verifier), once, at the largest turn budget; a smaller budget T reads the same
trajectories cut after turn T (in simple mode nothing the model sees depends on the budget, and turn
t's sampling seed is the same in both, so this is what a T-turn run plays). Per (temperature, T) it
records: solved by turn 1 and by T, trajectories solved after a wrong first turn (of all, and of
those wrong at turn 1), groups holding such a trajectory, the share of moves in the told direction
and of guesses consistent with all feedback so far (``drift_core.metrics.feedback_moves``: a move
is the next guess after "larger"/"smaller"; turn-1 guesses are not counted as consistent), mean
turns to solve (solved trajectories), format errors, repeated answers and generated tokens. Rows
are appended to ``benchmarks/results/probe_guess.jsonl`` (``--rows``) as each temperature finishes;
finished settings are skipped (resumable).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "benchmarks" / "results" / "probe_guess.jsonl"


def _pct(num: float, den: float) -> float | None:
    return round(100 * num / den, 1) if den else None


def summarize(records, golds: dict[str, str], turns: int) -> dict:
    """What the rollouts, cut after turn ``turns``, hold for the weights stage (percent of
    trajectories, groups, moves or guesses; see the module docstring)."""
    from drift_core.metrics import feedback_moves

    n = len(records)
    solved1 = solved = corrected = wrong1 = turns_to_solve = 0
    moves = told_way = after = consistent = 0
    answers_given = repeats = format_errors = turns_played = tokens = 0
    groups: dict[str, bool] = {}
    for r in records:
        correct = list(r.turn_correct)[:turns]
        answers = list(r.normalized_answers)[:turns]
        valid = list(r.turn_valid)[:turns]
        win = any(correct)
        solved += win
        solved1 += bool(correct[0])
        wrong1 += not correct[0]
        fixed = win and not correct[0]
        corrected += fixed
        groups[r.prompt_id] = groups.get(r.prompt_id, False) or fixed
        if win:
            turns_to_solve += correct.index(True) + 1
        m = feedback_moves(answers, golds[r.prompt_id])
        moves, told_way = moves + m.moves, told_way + m.moves_told_way
        after, consistent = after + m.guesses_after_feedback, consistent + m.consistent
        given = [a for a in answers if a]
        answers_given += len(given)
        repeats += len(given) - len(set(given))
        format_errors += sum(not v for v in valid)
        turns_played += len(correct)
        tokens += sum(list(r.gen_tokens)[:turns])
    return {
        "turns": turns,
        "trajectories": n,
        "solved_by_turn_1": _pct(solved1, n),
        "solved": _pct(solved, n),
        "solved_after_wrong_first": corrected,
        "solved_after_wrong_first_pct": _pct(corrected, n),
        "solved_after_wrong_first_of_wrong_pct": _pct(corrected, wrong1),
        "groups_with_correction_pct": _pct(sum(groups.values()), len(groups)),
        "moves": moves,
        "moves_told_way_pct": _pct(told_way, moves),
        "guesses_after_feedback": after,
        "consistent_pct": _pct(consistent, after),
        "mean_turns_to_solve": round(turns_to_solve / solved, 2) if solved else None,
        "format_error_pct": _pct(format_errors, turns_played),
        "repeated_answer_pct": _pct(repeats, answers_given),
        "generated_tokens": tokens,
    }


def _key(r: dict) -> tuple:
    return (
        r["config"],
        r["model"],
        r["prompts"],
        r["k"],
        r["temperature"],
        r["feedback_temperature"],
        r["turns"],
        tuple(r.get("overrides", [])),
        r.get("seed", 0),
    )


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(rows: list[dict]) -> str:
    head = [
        "model",
        "prompts x K",
        "turn-1 T",
        "retry T",
        "turns",
        "solved @1",
        "solved @T",
        "solved after a wrong turn 1 (of all / of wrong @1)",
        "groups w/ one",
        "moves the told way",
        "consistent guesses",
        "mean turns to solve",
        "format errors",
        "repeated",
        "tokens",
        "s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(rows, key=lambda r: (r["model"], r["config"], r["feedback_temperature"], r["turns"]))
    for r in order:
        cells = [
            r["model"] + (f" {' '.join(r['overrides'])}" if r.get("overrides") else ""),
            f"{r['prompts']} x {r['k']}",
            r["temperature"],
            r["feedback_temperature"],
            r["turns"],
            r["solved_by_turn_1"],
            r["solved"],
            f"{r['solved_after_wrong_first']} ({r['solved_after_wrong_first_pct']}% / "
            f"{r['solved_after_wrong_first_of_wrong_pct']}%)",
            r["groups_with_correction_pct"],
            f"{r['moves_told_way_pct']} (of {r['moves']})",
            f"{r['consistent_pct']} (of {r['guesses_after_feedback']})",
            r["mean_turns_to_solve"],
            r["format_error_pct"],
            r["repeated_answer_pct"],
            f"{r['generated_tokens']:,}",
            r["seconds"],
        ]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/guess.yaml")
    parser.add_argument("--model", default=None, help="reference model (default: the config's)")
    parser.add_argument("--prompts", type=int, default=None, help="the first N training games (default: all)")
    parser.add_argument("--k", type=int, default=None, help="trajectories per game (default: the config's)")
    parser.add_argument("--feedback-temperatures", type=float, nargs="+", default=[0.5, 1.0, 1.3])
    parser.add_argument("--turns", type=int, nargs="+", default=[6, 8], help="turn budgets")
    parser.add_argument("--seed", type=int, default=0, help="the rollouts' sampling seed")
    parser.add_argument("--rows", type=Path, default=ROWS, help="results JSONL (appended, resumable)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, as `drift run --set` (e.g. engine.kind=vllm)",
    )
    parser.add_argument("--report", action="store_true", help="print the table of --rows and exit")
    args = parser.parse_args()
    if args.report:
        print(report(read_rows(args.rows)))
        return

    sys.path.insert(0, str(ROOT))
    from flows.config import load_config

    overrides = sorted(args.overrides)
    model_set = [f"reference_model.path={args.model}"] if args.model else []
    cfg = load_config(ROOT / args.config, [*overrides, *model_set])
    if cfg.data.split != "train":
        raise SystemExit(
            f"the probe reads the training split only; {args.config} has data.split={cfg.data.split}"
        )
    fb = cfg.protocol.feedback
    if isinstance(fb, str) or fb.kind != "direction":
        raise SystemExit("the probe counts moves the feedback told: set protocol.feedback: {kind: direction}")
    k = args.k or cfg.rollout.k
    budgets = sorted(set(args.turns))
    data = cfg.data.model_copy(update={"limit": args.prompts}) if args.prompts else cfg.data
    from tasks.ingest import load_problems

    df, _ = load_problems(data, ROOT)
    problems = df.select("prompt_id", "question", "gold").to_dicts()
    golds = {p["prompt_id"]: p["gold"] for p in problems}
    base = {
        "config": args.config,
        "model": cfg.reference_model.path,
        "overrides": overrides,
        "prompts": len(problems),
        "k": k,
        "temperature": cfg.rollout.sampling.temperature,
        "seed": args.seed,
    }
    done = {_key(r) for r in read_rows(args.rows)}
    todo = [
        t
        for t in args.feedback_temperatures
        if any(_key({**base, "feedback_temperature": t, "turns": b}) not in done for b in budgets)
    ]
    if todo:
        from tasks.engines import get_engine
        from tasks.grade import grader_for
        from tasks.models import load_tokenizer, resolve_model
        from tasks.rollout import run_episodes

        model_path = resolve_model(cfg.reference_model)
        engine = get_engine(model_path, cfg.reference_model, cfg.engine)
        tokenizer = getattr(engine, "tokenizer", None) or load_tokenizer(model_path, cfg.reference_model)
        protocol = cfg.protocol.model_copy(update={"max_turns": budgets[-1]})
        args.rows.parent.mkdir(parents=True, exist_ok=True)
        try:
            for feedback in todo:
                sampling = cfg.rollout.sampling.model_copy(update={"feedback_temperature": feedback})
                start = time.perf_counter()
                with grader_for(protocol, cfg.verifier) as grader:
                    records = run_episodes(
                        engine,
                        tokenizer,
                        problems,
                        protocol,
                        sampling,
                        k,
                        budgets[-1],
                        grader,
                        seed=args.seed,
                    )
                seconds = round(time.perf_counter() - start, 1)
                with args.rows.open("a") as f:
                    for b in budgets:
                        row = {
                            **base,
                            "feedback_temperature": feedback,
                            **summarize(records, golds, b),
                            "seconds": seconds,
                            "played_turns": budgets[-1],
                            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                        }
                        if _key(row) not in done:
                            f.write(json.dumps(row) + "\n")
                            print(json.dumps(row), flush=True)
        finally:
            if hasattr(engine, "close"):
                engine.close()
    same = ("config", "model", "overrides", "prompts", "k", "temperature", "seed")
    print(report([r for r in read_rows(args.rows) if all(r.get(f) == base[f] for f in same)]))


if __name__ == "__main__":  # vLLM spawns its engine process: nothing may run on import
    main()
