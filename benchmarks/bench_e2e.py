"""End to end: the demo's wall time by stage, and the share spent in rollout, training, evaluation.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_e2e.py            # run the demo twice in a fresh store
    .venv/bin/python benchmarks/bench_e2e.py --from benchmarks/results/demo_timing.json

The first run starts from an empty artifact store (``.drift-bench/``, its own MLflow database), the
second re-runs the same config (every stage cached). ``--from`` tabulates the timing recorded by
``benchmarks/quality.py`` instead (its first run is the demo config from an empty store).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORE = ".drift-bench"
GROUPS = {
    "rollout": ("ingest", "rollout"),
    "train": ("weights", "train"),
    "evaluate": ("ingest-eval", "evaluate-reference", "evaluate-trained"),
}


def run_demo(config: str) -> dict:
    cmd = [
        str(ROOT / ".venv" / "bin" / "drift"), "run", config,
        "--set", f"run.artifact_store={STORE}/artifacts",
        "--set", f"run.tracking_uri=sqlite:///{STORE}/mlflow.db",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    seconds = json.loads(re.search(r"stage seconds: (\{.*\})", proc.stdout).group(1))
    return {"wall_s": round(wall, 1), "stage_seconds": seconds}


def table(rec: dict, label: str) -> str:
    st = rec["stage_seconds"]
    wall = rec["wall_s"]
    staged = sum(st.values())
    lines = [f"{label}: wall {wall:.1f} s (stages {staged:.1f} s, start-up/tracking {wall - staged:.1f} s)"]
    for name, secs in st.items():
        lines.append(f"  {name:<20} {secs:8.1f} s  {100 * secs / wall:5.1f}%")
    for group, names in GROUPS.items():
        secs = sum(st.get(n, 0.0) for n in names)
        lines.append(f"  = {group:<18} {secs:8.1f} s  {100 * secs / wall:5.1f}% of wall")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--from", dest="source", default=None, help="demo_timing.json from quality.py")
    args = parser.parse_args()
    if args.source:
        rec = json.loads(Path(args.source).read_text())
        first, cached = rec["first"], rec["cached"]
    else:
        shutil.rmtree(ROOT / STORE, ignore_errors=True)
        first = run_demo(args.config)
        cached = run_demo(args.config)
    print(table(first, "demo, empty store"))
    print(table(cached, "demo, second run (all cached)"))
    print(f"ratio first/cached wall: x{first['wall_s'] / cached['wall_s']:.1f}")


if __name__ == "__main__":
    main()
