"""Fixed cost of a run: a cold run and fully cached re-runs of one config, side by side.

    nice -n 10 python benchmarks/bench_startup.py                          # tiny: cold + 2 cached
    nice -n 10 python benchmarks/bench_startup.py --config configs/demo.yaml \\
        --store .drift-bench/demo --cached-only --repeats 3                # demo, store filled before

The cold run starts from an empty artifact store and a new MLflow database (``--store``, default
``.drift-bench/startup``, removed first unless ``--cached-only``); each cached run re-runs the same
config against them, so every stage is served from cache. Each run is ``python -m flows.cli run`` in
a fresh interpreter, exactly as a user starts it. Wall time is what the issue's target is about; CPU
time (user + sys of the run and the processes it waited for, e.g. the temporary Prefect server) is
printed beside it because on a shared machine wall time moves with the load, shown as well.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def drift_run(config: str, store: Path) -> dict:
    """One ``drift run`` in a fresh interpreter: wall and CPU seconds, stage seconds, states."""
    cmd = [
        sys.executable, "-m", "flows.cli", "run", config,
        "--set", f"run.artifact_store={store}/artifacts",
        "--set", f"run.tracking_uri=sqlite:///{store}/mlflow.db",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    load_before = os.getloadavg()[0]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"drift run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    stage_seconds = json.loads(re.search(r"stage seconds: (\{.*\})", proc.stdout).group(1))
    states = json.loads(re.search(r"stage states: (\{.*\})", proc.stdout).group(1))
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime, 2),
        "stages_s": round(sum(stage_seconds.values()), 2),
        "all_cached": all(s == "Cached" for v in states.values() for s in v),
        "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument(
        "--store", default=".drift-bench/startup", help="artifact store + MLflow db directory"
    )
    parser.add_argument("--repeats", type=int, default=2, help="cached runs after the cold one")
    parser.add_argument("--cached-only", action="store_true", help="keep the store; no cold run")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    store = (ROOT / args.store).resolve()
    runs: dict[str, list[dict]] = {"cold": [], "cached": []}
    if not args.cached_only:
        shutil.rmtree(store, ignore_errors=True)
        runs["cold"].append(drift_run(args.config, store))
    for _ in range(args.repeats):
        rec = drift_run(args.config, store)
        if not rec["all_cached"]:
            sys.exit(f"a re-run was not fully cached: {rec}")
        runs["cached"].append(rec)

    print(f"{args.config}  ({os.cpu_count()} CPUs; load = 1-min load average before/after each run)")
    print(f"{'run':<10} {'wall s':>8} {'CPU s':>8} {'stages s':>9}  load")
    for label, recs in runs.items():
        for rec in recs:
            print(
                f"{label:<10} {rec['wall_s']:>8.1f} {rec['cpu_s']:>8.1f} {rec['stages_s']:>9.1f}  "
                f"{rec['load_1min'][0]:.1f} -> {rec['load_1min'][1]:.1f}"
            )
    summary = {"config": args.config, "runs": runs}
    if runs["cached"]:
        cached_wall = statistics.median(r["wall_s"] for r in runs["cached"])
        cached_cpu = statistics.median(r["cpu_s"] for r in runs["cached"])
        summary["cached_median"] = {"wall_s": cached_wall, "cpu_s": cached_cpu}
        print(f"cached (median of {len(runs['cached'])}): wall {cached_wall:.1f} s, CPU {cached_cpu:.1f} s")
        if runs["cold"]:
            cold = runs["cold"][0]
            ratios = {"wall": cached_wall / cold["wall_s"], "cpu": cached_cpu / cold["cpu_s"]}
            summary["cached_over_cold"] = {k: round(v, 3) for k, v in ratios.items()}
            print(
                f"cached / cold: wall {100 * ratios['wall']:.0f}%  CPU {100 * ratios['cpu']:.0f}%  "
                "(target: wall <= 30%)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
