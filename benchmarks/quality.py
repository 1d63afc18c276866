"""Quality experiment: DRIFT against its baselines on the demo task, through the pipeline itself.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality.py [--seeds 0 1] [--report-only]
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality.py --variants drift --seeds 0 --set weights.beta=0.5

Every variant is one ``drift run configs/demo.yaml --set ...`` into its own artifact store and
MLflow experiment (``.drift-quality/``, experiment ``drift-quality``). Ingest and rollout cache keys
do not depend on weights or training settings, so all variants train on the SAME reference rollouts
(generated once, by the first run), and the reference model's evaluation is cached after the first
run too. Variants: DRIFT terminal (weights.mode=drift, train.target=terminal), DRIFT all-turn
(train.target=all_turns), uniform (plain multi-turn SFT), success_only (rejection-sampling SFT),
each for every training seed. The first run is also timed as the demo (empty store), and re-run
once to time the all-cached case.

Per-run results are appended to ``benchmarks/results/quality_runs.jsonl`` as soon as a run ends
(nothing is lost if the sweep is cut short); the table (multi@t, correction rate, repeated-answer
share, mean over seeds; 95% paired bootstrap intervals over problems; weight ESS) is printed and
written to ``benchmarks/results/quality_table.md``.
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
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "quality_runs.jsonl"
STORE = ".drift-quality"
COMMON = [
    "run.experiment=drift-quality",
    f"run.artifact_store={STORE}/artifacts",
    f"run.tracking_uri=sqlite:///{STORE}/mlflow.db",
]
VARIANTS = {
    "drift": ["weights.mode=drift", "train.target=terminal"],
    "drift_all_turns": ["weights.mode=drift", "train.target=all_turns"],
    "uniform": ["weights.mode=uniform", "train.target=terminal"],
    "success_only": ["weights.mode=success_only", "train.target=terminal"],
}


def run_variant(config: str, name: str, seed: int, extra: list[str], tag: str) -> dict:
    sets = [*COMMON, *VARIANTS[name], f"train.seed={seed}", f"run.name=quality-{tag}", *extra]
    cmd = [str(ROOT / ".venv" / "bin" / "drift"), "run", config]
    for s in sets:
        cmd += ["--set", s]
    print(f"[quality] {tag}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"run {tag} failed (exit {proc.returncode})")
    out = proc.stdout
    run_id = re.search(r"MLflow run id: (\S+)", out).group(1)
    seconds = json.loads(re.search(r"stage seconds: (\{.*\})", out).group(1))
    states = json.loads(re.search(r"stage states: (\{.*\})", out).group(1))
    print(out[out.find("turn") :].split("stage states")[0], flush=True)
    return {
        "tag": tag,
        "variant": name,
        "seed": seed,
        "extra": extra,
        "run_id": run_id,
        "wall_s": round(wall, 1),
        "stage_seconds": seconds,
        "stage_states": states,
        "load_avg": os.getloadavg()[0],
    }


def eval_frames(run_id: str) -> dict:
    """Per-problem evaluation tables of one pipeline run (reference and trained), and its summary."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.store import ArtifactStore, Manifest

    mlflow.set_tracking_uri(f"sqlite:///{ROOT / STORE / 'mlflow.db'}")
    client = MlflowClient()
    store = ArtifactStore(str(ROOT / STORE / "artifacts"))
    parent = client.get_run(run_id)
    exp = parent.info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    out = {}
    for child in children:
        name = child.data.tags.get("mlflow.runName", "")
        if name in ("evaluate-reference", "evaluate-trained", "weights"):
            path = client.download_artifacts(child.info.run_id, "manifest.json")
            manifest = Manifest.model_validate_json(Path(path).read_text())
            if name == "weights":
                out["weights"] = {k: v for k, v in manifest.meta.items() if k != "histogram"}
            else:
                df = store.read_parquet(manifest).sort("prompt_id")
                out[name.split("-")[1]] = df
    return out


def per_problem_solved(df) -> np.ndarray:
    return np.array([any(c) for c in df["turn_correct"].to_list()], dtype=np.float64)


def problem_parts(df, T: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-problem numerator and denominator of multi@T, corr@T and the repeated-answer share (the
    metrics are pooled ratios of these; see drift_core.metrics.bootstrap_ratio_ci)."""
    solved, open_t, solved_t, rep, given = [], [], [], [], []
    for correct, answers in zip(
        df["turn_correct"].to_list(), df["normalized_answers"].to_list(), strict=True
    ):
        correct = list(correct)[:T]
        solved.append(float(any(correct)))
        still_open = not any(correct[: T - 1])
        open_t.append(float(still_open))
        solved_t.append(float(still_open and len(correct) >= T and bool(correct[T - 1])))
        seen, r, g = set(), 0, 0
        for a in answers:
            if a is None:
                continue
            g += 1
            r += a in seen
            seen.add(a)
        rep.append(float(r))
        given.append(float(g))
    ones = np.ones(len(solved))
    return {
        "multi@T": (np.array(solved), ones),
        "corr@T": (np.array(solved_t), np.array(open_t)),
        "repeated": (np.array(rep), np.array(given)),
    }


def interval_table(parts_by_system: dict[str, list[dict]], n_boot: int) -> list[str]:
    """One row per system: each metric with its 95% bootstrap interval over problems, seeds pooled
    per problem (a problem's seeds are resampled together)."""
    from drift_core.metrics import bootstrap_ratio_ci

    def fmt(r, lo, hi):
        return "-" if r is None else f"{100 * r:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"

    lines = ["| system | multi@T [95% CI] | corr@T [95% CI] | repeated [95% CI] |", "|---|---|---|---|"]
    for name, per_seed in parts_by_system.items():
        cells = []
        for metric in ("multi@T", "corr@T", "repeated"):
            num = np.sum([p[metric][0] for p in per_seed], axis=0)
            den = np.sum([p[metric][1] for p in per_seed], axis=0)
            cells.append(fmt(*bootstrap_ratio_ci(num, den, n_boot=n_boot)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def guess_diagnostics(ref_df, trained: dict, T: int) -> str:
    """Does a model compute, or guess? The question-blind baseline (the best T distinct answers given
    to every problem, chosen on the eval golds themselves: an upper bound for a constant guesser), and
    for each model the share of problems that got its single most common answer sequence."""
    from collections import Counter

    golds = [int(g) for g in ref_df.join(_golds(), on="prompt_id", how="left")["gold"].to_list()]
    freq = Counter(golds)
    best = [a for a, _ in freq.most_common(T)]
    blind = sum(freq[a] for a in best) / len(golds)
    lines = [
        f"Question-blind baseline: answering {best} to every problem solves {100 * blind:.1f}% by turn {T} "
        "(the best constant guess sequence, chosen on the eval golds).",
        "Most common answer sequence per model (share of problems):",
    ]
    for tag, df in {"reference": ref_df, **trained}.items():
        seqs = Counter(tuple(a) for a in df["answers"].to_list())
        top, count = seqs.most_common(1)[0]
        lines.append(
            f"- {tag}: {list(top)} on {100 * count / df.height:.1f}% of problems; {len(seqs)} distinct sequences"
        )
    return "\n".join(lines)


TASK: dict = {"config": "configs/demo.yaml", "sets": []}  # the task every run of this invocation uses


def _golds():
    import polars as pl

    from flows.config import load_config
    from tasks.ingest import load_problems

    cfg = load_config(str(ROOT / TASK["config"]), TASK["sets"])
    df, _ = load_problems(cfg.eval.data)
    return df.select("prompt_id", "gold").with_columns(pl.col("gold"))


def report(records: list[dict], n_boot: int = 2000) -> str:
    from drift_core.metrics import eval_metrics, paired_bootstrap_ci

    frames = {}
    for r in records:
        frames[r["tag"]] = eval_frames(r["run_id"])
    ref_df = next(iter(frames.values()))["reference"]
    T = max(len(x) for x in ref_df["turn_correct"].to_list())
    T = max(T, 3)
    solved = {"reference": [per_problem_solved(ref_df)]}
    parts = {"reference": [problem_parts(ref_df, T)]}
    metrics = {
        "reference": [
            eval_metrics(ref_df["turn_correct"].to_list(), ref_df["normalized_answers"].to_list(), T)
        ]
    }
    ess = {}
    for r in records:
        f = frames[r["tag"]]
        df = f["trained"]
        assert df["prompt_id"].to_list() == ref_df["prompt_id"].to_list()
        solved.setdefault(r["variant"], []).append(per_problem_solved(df))
        parts.setdefault(r["variant"], []).append(problem_parts(df, T))
        metrics.setdefault(r["variant"], []).append(
            eval_metrics(df["turn_correct"].to_list(), df["normalized_answers"].to_list(), T)
        )
        ess.setdefault(r["variant"], f.get("weights", {}))

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    head = (
        "| system | seeds | "
        + " | ".join(f"multi@{t}" for t in range(1, T + 1))
        + " | "
        + " | ".join(f"corr@{t}" for t in range(2, T + 1))
        + " | repeated | mean turns | multi@T − ref [95% CI] |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ref_solved = solved["reference"][0]
    for name, ms in metrics.items():
        multi = [np.mean([m.multi_at[t] for m in ms]) for t in range(T)]
        corr = []
        for t in range(1, T):
            vals = [m.correction_rate[t] for m in ms if m.correction_rate[t] is not None]
            corr.append(np.mean(vals) if vals else None)
        rep = np.mean([m.repeated_answer_share for m in ms])
        turns = np.mean([m.mean_turns_used for m in ms])
        if name == "reference":
            ci = "—"
        else:
            d, lo, hi = paired_bootstrap_ci(np.mean(solved[name], axis=0), ref_solved, n_boot=n_boot)
            ci = f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        lines.append(
            f"| {name} | {len(ms) if name != 'reference' else '—'} | "
            + " | ".join(pct(x) for x in multi)
            + " | "
            + " | ".join(pct(x) for x in corr)
            + f" | {pct(rep)} | {turns:.2f} | {ci} |"
        )
    lines.append("")
    lines.append(
        f"Each metric at T = {T} with its 95% bootstrap interval over problems ({n_boot} resamples):"
    )
    lines.append("")
    lines.extend(interval_table(parts, n_boot))
    lines.append("")
    lines.append("Paired differences in multi@T (per-problem solved, averaged over seeds), 95% bootstrap CI:")
    pairs = [("drift", "uniform"), ("drift", "success_only"), ("drift", "drift_all_turns")]
    pairs += [(name, "drift") for name in solved if name.startswith("drift[")]  # sweep points
    for a, b in pairs:
        if a in solved and b in solved:
            d, lo, hi = paired_bootstrap_ci(
                np.mean(solved[a], axis=0), np.mean(solved[b], axis=0), n_boot=n_boot
            )
            lines.append(f"- {a} − {b}: {100 * d:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    lines.append("")
    lines.append("Per run (seed): multi@T")
    for r in records:
        ms = eval_metrics(
            frames[r["tag"]]["trained"]["turn_correct"].to_list(),
            frames[r["tag"]]["trained"]["normalized_answers"].to_list(),
            T,
        )
        lines.append(f"- {r['tag']}: {pct(ms.multi_at[-1])} (run {r['run_id']})")
    lines.append("")
    lines.append(guess_diagnostics(ref_df, {r["tag"]: frames[r["tag"]]["trained"] for r in records}, T))
    lines.append("")
    lines.append("Weight diagnostics (weights stage, same rollouts for every seed):")
    for name, w in ess.items():
        keys = (
            "ess_overall",
            "ess_fraction",
            "ess_per_group_mean",
            "ess_per_group_min",
            "max_weight",
            "share_groups_no_success",
        )
        lines.append(
            f"- {name}: " + ", ".join(f"{k}={w[k]:.3g}" for k in keys if isinstance(w.get(k), int | float))
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--report-only", action="store_true", help="tabulate the runs already recorded")
    parser.add_argument(
        "--task",
        default=None,
        help="name of another task (own records/table: quality_runs_<task>.jsonl); define it with --task-set",
    )
    parser.add_argument(
        "--task-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override that defines the task (repeatable; not part of a system's name)",
    )
    parser.add_argument("--fresh", action="store_true", help="forget recorded runs (not the store)")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override for a sweep point (repeatable), e.g. --variants drift --set weights.beta=0.5; "
        "recorded as its own system, drift[weights.beta=0.5]",
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    global RUNS
    TASK.update(config=args.config, sets=args.task_set)
    if args.task:  # another task: its own records and table, same store and MLflow experiment
        RUNS = RESULTS / f"quality_runs_{args.task}.jsonl"
    table_file = RESULTS / (f"quality_table_{args.task}.md" if args.task else "quality_table.md")
    if args.fresh and RUNS.exists():
        RUNS.unlink()
    done = [json.loads(line) for line in RUNS.read_text().splitlines()] if RUNS.exists() else []
    if not args.report_only:
        for seed in args.seeds:
            for name in args.variants:
                system = f"{name}[{','.join(args.sets)}]" if args.sets else name
                tag = f"{system}-s{seed}"
                if any(r["tag"] == tag for r in done):
                    continue
                rec = run_variant(args.config, name, seed, [*args.task_set, *args.sets], tag)
                rec["variant"] = system
                done.append(rec)
                with RUNS.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                if (
                    len(done) == 1 and not args.task
                ):  # the first demo run, from an empty store: time it cached too
                    again = run_variant(args.config, name, seed, [], tag + "-cached")
                    with (RESULTS / "demo_timing.json").open("w") as f:
                        json.dump({"first": rec, "cached": again}, f, indent=2)
    runs = [r for r in done if not r["tag"].endswith("-cached")]
    table = report(runs)
    print(table)
    table_file.write_text(table + "\n")


if __name__ == "__main__":
    main()
