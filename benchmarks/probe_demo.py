"""Demo probe (issue 36, item 2): which task and settings let ``make demo`` show a trained model
above its reference, on a task a question-blind guesser cannot win, in at most 10 minutes on 2
cores?

    nice .venv/bin/python benchmarks/probe_demo.py --tag A --config configs/demo.yaml \
        --store /tmp/probe-demo [--validation] [--set key=value ...]
    .venv/bin/python benchmarks/probe_demo.py --report          # the table of every probe so far

Each probe is one real ``drift run`` (timed, stdout kept under ``--store``/logs), then reads the
run's per-problem evaluation frames back from its store and records, in
``benchmarks/results/probe_demo.jsonl``: wall seconds and the load average around the run, the
stage seconds, the rollouts' solved-by-turn shares and the weights diagnostics, and for the
evaluation set: the question-blind ceiling at T (``drift_core.metrics.question_blind_ceiling``),
reference and trained multi@1..T, the paired trained - reference difference in multi@T with its 95%
bootstrap interval, and "fixed after feedback" (solved by T but not at turn 1) of the trained model,
and its difference from the reference's, each with an interval.

``--validation`` evaluates on a **validation set drawn from the training split**, never the test
set: ``builtin:arith`` train-split problems ``[offset, offset + limit)`` (default 50..299). The
training prompts are the train split's first ``data.arith.n`` (at most 50 here), and the test split
excludes the train split's first ``eval.data.arith.n`` (300 in the demo), so these problems are
disjoint from both. Settings are chosen on these runs; the test set is only run by the final demo.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "benchmarks" / "results" / "probe_demo.jsonl"
_RUN_ID = re.compile(r"MLflow run id: ([0-9a-f]{32})")
_STAGE_SECONDS = re.compile(r"stage seconds: (\{.*\})")
_PROMOTION = re.compile(r"^promotion: .*$", re.M)


def validation_sets(offset: int, limit: int, n_train_stream: int) -> list[str]:
    """Overrides that point the evaluation at train-split problems [offset, offset + limit)."""
    if offset + limit > n_train_stream:
        raise SystemExit(f"offset + limit = {offset + limit} > {n_train_stream} (the test split's exclusion)")
    return [
        "eval.data.split=train",
        f"eval.data.arith.n={n_train_stream}",
        f"eval.data.offset={offset}",
        f"eval.data.limit={limit}",
    ]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_drift(config: str, sets: list[str], store: Path, tag: str) -> tuple[str, float, dict]:
    cmd = [str(ROOT / ".venv" / "bin" / "drift"), "run", config]
    for s in [
        f"run.artifact_store={store}/artifacts",
        f"run.tracking_uri=sqlite:///{store}/mlflow.db",
        *sets,
    ]:
        cmd += ["--set", s]
    logs = store / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[probe_demo] {tag}: {' '.join(cmd)}", flush=True)
    before = load()
    start = time.perf_counter()
    # PYTHONPATH: this checkout's code, also when the venv's editable install points at another
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = load()
    (logs / f"{tag}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr[-30000:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"[probe_demo] {tag} failed (exit {proc.returncode}); log: {logs / tag}.log")
    return proc.stdout, wall, {"load_before": before, "load_after": after}


def frames(store: Path, run_id: str) -> tuple[dict, object, object]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import evidence

    evidence.STORE = store  # its readers take the store from this module global
    m = evidence.stage_manifests(run_id)
    return m, evidence._eval_frame(m, "reference"), evidence._eval_frame(m, "trained")


def solved_by(df, t: int) -> np.ndarray:
    return np.array([float(any(list(c)[:t])) for c in df["turn_correct"].to_list()])


def boot(x: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    means = x[idx].mean(axis=1)
    return [
        round(100 * float(np.percentile(means, 2.5)), 1),
        round(100 * float(np.percentile(means, 97.5)), 1),
    ]


def measure(store: Path, run_id: str, turns: int, cfg) -> dict:
    from drift_core.metrics import question_blind_ceiling
    from tasks.ingest import load_problems

    m, ref, trained = frames(store, run_id)
    if ref["prompt_id"].to_list() != trained["prompt_id"].to_list():
        raise SystemExit("reference and trained frames hold different problems")
    out: dict = {"n_problems": ref.height}
    problems, _ = load_problems(cfg.eval.data)
    by_id = dict(zip(problems["prompt_id"].to_list(), problems["gold"].to_list(), strict=True))
    golds = [str(by_id[p]) for p in ref["prompt_id"].to_list()]
    if golds:
        out["blind_ceiling"] = round(100 * question_blind_ceiling(golds, turns, "unary"), 1)
        out["blind_ceiling_direction"] = round(100 * question_blind_ceiling(golds, turns, "direction"), 1)
    for name, df in (("reference", ref), ("trained", trained)):
        out[name] = {
            f"multi@{t}": round(100 * float(solved_by(df, t).mean()), 1) for t in range(1, turns + 1)
        }
    r, tr = solved_by(ref, turns), solved_by(trained, turns)
    out["delta"] = round(100 * float((tr - r).mean()), 1)
    out["delta_ci"] = boot(tr - r)
    fixed_t = solved_by(trained, turns) - solved_by(trained, 1)
    fixed_r = solved_by(ref, turns) - solved_by(ref, 1)
    out["fixed_trained"] = round(100 * float(fixed_t.mean()), 1)
    out["fixed_trained_ci"] = boot(fixed_t)
    out["fixed_reference"] = round(100 * float(fixed_r.mean()), 1)
    out["fixed_delta_ci"] = boot(fixed_t - fixed_r)
    answers = [tuple(a) for a in trained["normalized_answers"].to_list()]
    from collections import Counter

    top, count = Counter(answers).most_common(1)[0]
    out["trained_top_sequence"] = [list(top), round(100 * count / len(answers), 1)]
    out["trained_distinct_sequences"] = round(100 * len(set(answers)) / len(answers), 1)
    rollout, weights, train = m.get("rollout"), m.get("weights"), m.get("train")
    if rollout is not None:
        out["rollout"] = {
            k: round(float(v), 4)
            for k, v in rollout.meta.items()
            if k.startswith("solved_by_turn_")
            or k in ("format_error_rate", "generated_tokens", "wall_seconds")
        }
    if weights is not None:
        keys = ("ess_overall", "max_weight", "share_groups_no_success", "share_weight_no_success")
        out["weights"] = {k: round(float(weights.meta[k]), 4) for k in keys if k in weights.meta}
    if train is not None:
        out["optimizer_steps"] = int(train.meta.get("steps", 0))
    return out


def report() -> str:
    rows = (
        [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()] if ROWS.exists() else []
    )
    head = (
        "| tag | eval set | n | blind@T | ref multi@T | trained multi@1 / @T | trained − ref [95% CI] "
        "| fixed (trained) [95% CI] | rollouts solved @1 / @T | wall s (load) | stage s |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        T = r["turns"]
        lines.append(
            f"| {r['tag']} | {r['eval_set']} | {r['n_problems']} | {r.get('blind_ceiling', '-')} "
            f"| {r['reference'][f'multi@{T}']} | {r['trained']['multi@1']} / {r['trained'][f'multi@{T}']} "
            f"| {r['delta']:+.1f} [{r['delta_ci'][0]:+.1f}, {r['delta_ci'][1]:+.1f}] "
            f"| {r['fixed_trained']} [{r['fixed_trained_ci'][0]}, {r['fixed_trained_ci'][1]}] "
            f"| {100 * r.get('rollout', {}).get('solved_by_turn_1', float('nan')):.1f} / "
            f"{100 * r.get('rollout', {}).get(f'solved_by_turn_{T}', float('nan')):.1f} "
            f"| {r['wall_s']:.0f} ({r['load_before']}) | {json.dumps(r.get('stage_seconds', {}))} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--store", type=Path, default=Path("/tmp/probe-demo"))
    p.add_argument("--validation", action="store_true", help="evaluate on train-split problems, not test")
    p.add_argument("--val-offset", type=int, default=50)
    p.add_argument("--val-limit", type=int, default=250)
    p.add_argument("--val-stream", type=int, default=300, help="the test split's exclusion (eval n)")
    p.add_argument("--set", action="append", default=[], dest="sets")
    p.add_argument("--note", default="")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    if args.report:
        print(report())
        return
    sys.path.insert(0, str(ROOT))
    from flows.config import load_config

    sets = list(args.sets)
    if args.validation:
        sets += validation_sets(args.val_offset, args.val_limit, args.val_stream)
    cfg = load_config(args.config, sets)
    if args.validation and cfg.data.arith.n > args.val_offset:
        raise SystemExit(
            f"data.arith.n = {cfg.data.arith.n} overlaps the validation offset {args.val_offset}"
        )
    stdout, wall, loads = run_drift(args.config, sets, args.store, args.tag)
    run_id = _RUN_ID.findall(stdout)[-1]
    stage = _STAGE_SECONDS.findall(stdout)
    promo = _PROMOTION.findall(stdout)
    turns = cfg.eval.max_turns or cfg.protocol.max_turns
    row = {
        "tag": args.tag,
        "note": args.note,
        "config": args.config,
        "sets": args.sets,
        "eval_set": (
            f"validation: train[{args.val_offset}:{args.val_offset + args.val_limit}]"
            if args.validation
            else "test"
        ),
        "store": str(args.store),
        "run_id": run_id,
        "wall_s": round(wall, 1),
        **loads,
        "cpus": os.cpu_count(),
        "turns": turns,
        "stage_seconds": json.loads(stage[-1]) if stage else {},
        "promotion": promo[-1] if promo else None,
        **measure(args.store, run_id, turns, cfg),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    ROWS.parent.mkdir(parents=True, exist_ok=True)
    with ROWS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(stdout[-4000:])
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
