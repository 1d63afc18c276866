"""Benchmark of the weights stage: ``.venv/bin/python benchmarks/bench_weights.py [--n 1000000]``.

1. Writes an n-trajectory trajectories parquet (groups of 16, 1-5 turns, TrajectoryRecord columns
   without ``messages``) to a temp dir.
2. In a fresh child process (so its peak RSS is the weights path alone) times drift's path:
   read + normalise, returns, weights, diagnostics, atomic parquet write.
3. Times a naive baseline on a subset (rows -> Python dicts, ``trajectory_return`` per row, a dict of
   groups, a ``math.exp`` loop per group; no write) and scales it up to n.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drift_core.returns import trajectory_return  # noqa: E402
from drift_core.schemas import WeightsConfig  # noqa: E402

K = 16
MAX_TURNS = 5


def make_parquet(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_prompts = n // K
    pid = np.repeat(np.arange(n_prompts), K)
    traj_idx = np.tile(np.arange(K), n_prompts)
    p_solve = rng.uniform(0.0, 0.6, size=n_prompts)[pid]  # per-prompt difficulty
    # turn at which each trajectory is solved (1..5), or not solved -> 5 turns, all wrong
    first = rng.geometric(np.clip(p_solve, 1e-3, 1.0))
    solved = first <= MAX_TURNS
    n_turns = np.where(solved, first, MAX_TURNS).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_turns)]).astype(np.int32)
    total = int(offsets[-1])
    pos = np.arange(total) - np.repeat(offsets[:-1], n_turns)
    correct = (pos == np.repeat(n_turns - 1, n_turns)) & np.repeat(solved, n_turns)
    valid = rng.random(total) > 0.05
    answers = np.where(correct, "42", rng.integers(0, 12, size=total).astype(str))
    answers_arr = pa.array(answers.astype(object), mask=~valid, type=pa.string())
    fp = -0.1 * np.bincount(np.repeat(np.arange(n), n_turns), weights=~valid, minlength=n)

    def lst(values: pa.Array) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(offsets), values)

    table = pa.table(
        {
            "prompt_id": pa.array(np.char.add("math-", pid.astype(str)).astype(object), type=pa.string()),
            "traj_idx": traj_idx,
            "turn_correct": lst(pa.array(correct)),
            "turn_valid": lst(pa.array(valid)),
            "normalized_answers": lst(answers_arr),
            "format_penalty": fp,
            "n_turns": n_turns,
            "solved": solved,
            "gen_seconds": rng.uniform(0.1, 2.0, size=n),
        }
    )
    pl.from_arrow(table).write_parquet(path)


def _peak_rss_mib() -> float:
    """VmHWM of this process (Linux; starts afresh at exec, unlike ru_maxrss, which a forked child
    inherits from its parent), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(inp: str, out: str) -> None:
    """drift's path, one stage at a time; prints JSON timings."""
    from tasks.weights_io import compute_weight_table, read_weight_inputs, write_parquet_atomic

    cfg = WeightsConfig()
    t0 = time.perf_counter()
    df, _ = read_weight_inputs(inp)
    t1 = time.perf_counter()
    table, diag = compute_weight_table(df, cfg)
    t2 = time.perf_counter()
    write_parquet_atomic(table, out)
    t3 = time.perf_counter()
    rss_mib = _peak_rss_mib()
    print(
        json.dumps(
            {
                "read": t1 - t0,
                "compute": t2 - t1,
                "write": t3 - t2,
                "total": t3 - t0,
                "rows": table.height,
                "peak_rss_mib": rss_mib,
                "ess_fraction": diag.ess_fraction,
            }
        )
    )


def naive_baseline(inp: Path, m: int, cfg: WeightsConfig) -> float:
    """Per-row / per-group Python loops on the first m rows; seconds."""
    t0 = time.perf_counter()
    rows = pl.read_parquet(inp, n_rows=m).to_dicts()
    groups: dict[str, list[int]] = {}
    returns = []
    for i, row in enumerate(rows):
        r = trajectory_return(
            [1.0 if c else 0.0 for c in row["turn_correct"]],
            row["format_penalty"],
            row["normalized_answers"],
            cfg.gamma,
            cfg.repetition_lambda,
        )
        returns.append(r)
        groups.setdefault(row["prompt_id"], []).append(i)
    weights = [0.0] * len(rows)
    for idx in groups.values():
        mx = max(returns[i] for i in idx)
        e = [math.exp((returns[i] - mx) / cfg.beta) for i in idx]
        mean = sum(e) / len(e)
        for i, v in zip(idx, e, strict=True):
            weights[i] = v / mean
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--baseline-rows", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of drift's path; the best is reported")
    ap.add_argument("--child", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    cfg = WeightsConfig()
    with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp:
        inp, out = Path(tmp) / "trajectories.parquet", Path(tmp) / "weighted.parquet"
        t = time.perf_counter()
        make_parquet(inp, args.n)
        print(
            f"generated {args.n:,} trajectories ({inp.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t:.1f} s"
        )

        runs = []
        for _ in range(args.repeat):
            res = subprocess.run(
                [sys.executable, __file__, "--child", str(inp), str(out)],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["total"])
        peak = max(r["peak_rss_mib"] for r in runs)

        m = min(args.baseline_rows, args.n)
        base = naive_baseline(inp, m, cfg) * (args.n / m)

    n = best["rows"]
    print(f"\ndrift weights path, {n:,} trajectories (best of {args.repeat}, fresh process each):")
    for key in ("read", "compute", "write", "total"):
        print(f"  {key:<8} {best[key]:7.3f} s")
    print(f"  rows/s   {n / best['total']:,.0f}")
    print(f"  peak RSS {peak:,.0f} MiB")
    print(f"\n{'':<34}{'seconds':>10}{'rows/s':>14}")
    print(f"{'drift (read+compute+write)':<34}{best['total']:>10.3f}{n / best['total']:>14,.0f}")
    print(f"{f'naive loop ({m:,} rows, scaled)':<34}{base:>10.3f}{n / base:>14,.0f}")
    print(f"speed-up: {base / best['total']:.1f}x   target < 2 s: {'met' if best['total'] < 2 else 'MISSED'}")


if __name__ == "__main__":
    main()
