"""Fixed cost of a run: a cold run and fully cached re-runs of one config, side by side.

    nice -n 10 python benchmarks/bench_startup.py                          # tiny: cold + 2 cached
    nice -n 10 python benchmarks/bench_startup.py --server                 # + with a Prefect server
    nice -n 10 python benchmarks/bench_startup.py --config configs/demo.yaml \\
        --store .drift-bench/demo --cached-only --repeats 3                # demo, store filled before

The cold run starts from an empty artifact store and a new MLflow database (``--store``, default
``.drift-bench/startup``, removed first unless ``--cached-only``); each cached run re-runs the same
config against them, so every stage is served from cache. Each run is ``python -m flows.cli run`` in
a fresh interpreter, exactly as a user starts it. Wall time is what the issue's target is about; CPU
time (user + sys of the run and the processes it waited for, e.g. the temporary Prefect server) is
printed beside it because on a shared machine wall time moves with the load, shown as well.

Two ways a user runs drift, measured side by side with ``--server``: ``temporary`` (no Prefect API
configured: the CLI boots Prefect's temporary server for the run, the README's first command) and
``server`` (``PREFECT_API_URL`` names a running ``prefect server start``, as deployments and teams
run it: nothing is booted). The server is started here on 127.0.0.1 with its own PREFECT_HOME, once,
before its cold run, and stopped at the end; each mode has its own store.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def drift_run(config: str, store: Path, api_url: str | None = None) -> dict:
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
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
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


@contextlib.contextmanager
def prefect_server() -> Iterator[str]:
    """``prefect server start`` on a free port of 127.0.0.1 with its own home; yields its API URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = Path(tempfile.mkdtemp(prefix="drift-bench-prefect-"))
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/api"
    with (home / "server.log").open("w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None:
                    sys.exit(f"prefect server exited with {server.returncode}: see {home / 'server.log'}")
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(f"{url}/health", timeout=2) as response,
                ):
                    if response.status == 200:
                        break
                if time.monotonic() > deadline:
                    sys.exit(f"prefect server not healthy after 180 s: see {home / 'server.log'}")
                time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    shutil.rmtree(home, ignore_errors=True)


def measure(config: str, store: Path, repeats: int, cached_only: bool, api_url: str | None) -> dict:
    """One cold run (unless ``cached_only``) into an empty store, then ``repeats`` cached re-runs."""
    runs: dict[str, list[dict]] = {"cold": [], "cached": []}
    if not cached_only:
        shutil.rmtree(store, ignore_errors=True)
        runs["cold"].append(drift_run(config, store, api_url))
    for _ in range(repeats):
        rec = drift_run(config, store, api_url)
        if not rec["all_cached"]:
            sys.exit(f"a re-run was not fully cached: {rec}")
        runs["cached"].append(rec)
    summary: dict = {"runs": runs}
    if runs["cached"]:
        cached_wall = statistics.median(r["wall_s"] for r in runs["cached"])
        cached_cpu = statistics.median(r["cpu_s"] for r in runs["cached"])
        summary["cached_median"] = {"wall_s": cached_wall, "cpu_s": cached_cpu}
        if runs["cold"]:
            cold = runs["cold"][0]
            summary["cached_over_cold"] = {
                "wall": round(cached_wall / cold["wall_s"], 3),
                "cpu": round(cached_cpu / cold["cpu_s"], 3),
            }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument(
        "--store", default=".drift-bench/startup", help="artifact store + MLflow db directory"
    )
    parser.add_argument("--repeats", type=int, default=2, help="cached runs after the cold one")
    parser.add_argument("--cached-only", action="store_true", help="keep the store; no cold run")
    parser.add_argument(
        "--server", action="store_true", help="also measure with a running Prefect server (PREFECT_API_URL)"
    )
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    store = (ROOT / args.store).resolve()
    modes = {"temporary": measure(args.config, store, args.repeats, args.cached_only, None)}
    if args.server:
        with prefect_server() as url:
            # cached-only: the same store (stages are served from the artifact store, whichever
            # Prefect API runs them); otherwise a store of its own for its cold run
            server_store = store if args.cached_only else store / "server"
            modes["server"] = measure(args.config, server_store, args.repeats, args.cached_only, url)

    print(f"{args.config}  ({os.cpu_count()} CPUs; load = 1-min load average before/after each run)")
    print(f"{'Prefect API':<12} {'run':<8} {'wall s':>8} {'CPU s':>8} {'stages s':>9}  load")
    for mode, summary in modes.items():
        for label, recs in summary["runs"].items():
            for rec in recs:
                print(
                    f"{mode:<12} {label:<8} {rec['wall_s']:>8.1f} {rec['cpu_s']:>8.1f} {rec['stages_s']:>9.1f}  "
                    f"{rec['load_1min'][0]:.1f} -> {rec['load_1min'][1]:.1f}"
                )
    for mode, summary in modes.items():
        if "cached_median" in summary:
            med = summary["cached_median"]
            line = f"{mode}: cached (median of {len(summary['runs']['cached'])}) wall {med['wall_s']:.1f} s, CPU {med['cpu_s']:.1f} s"
            if "cached_over_cold" in summary:
                ratio = summary["cached_over_cold"]
                line += f"; cached / cold: wall {100 * ratio['wall']:.0f}%, CPU {100 * ratio['cpu']:.0f}% (target: wall <= 30%)"
            print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "modes": modes}, indent=2) + "\n")


if __name__ == "__main__":
    main()
