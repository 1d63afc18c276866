"""Peak memory of the weights computation on a realistic trajectories table:
``.venv/bin/python benchmarks/bench_weights_memory.py [--n 1000000] [--chars 150]``.

A real trajectories parquet carries a ``messages`` column (every conversation's text), which the
numbers in ``bench_weights.py`` leave out. This adds one (4 messages a row, ``--chars`` characters
each, drawn from a pool so the file stays small on disk while the text in memory is full size) to
``bench_weights.make_parquet``'s table, then runs each path in a fresh child process and reports
its time and peak RSS (VmHWM):

* ``in-memory``: ``read_weight_inputs`` + ``compute_weight_table`` + ``write_parquet_atomic``, what
  a stage that loads the whole table does (every column, text included, is resident at once);
* ``streaming``: ``tasks.weights_io.weigh_parquet``, two passes over record batches: only the
  columns the return needs are read to compute the weights, then every column is streamed through.

With ``--no-messages`` the table is the one of ``bench_weights.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_weights import _peak_rss_mib, make_parquet  # noqa: E402

MESSAGES_PER_ROW = 4


def add_messages(path: Path, chars: int, seed: int = 0) -> None:
    """Rewrite ``path`` with a ``messages`` column: list<struct<role, content>>, 4 per row."""
    table = pq.read_table(path)
    n = table.num_rows
    rng = np.random.default_rng(seed)
    pool = pa.array(
        ["".join(rng.choice(list("abcdefghij +-=0123456789"), size=chars)) for _ in range(256)],
        type=pa.string(),
    )
    contents = pool.take(pa.array(rng.integers(0, len(pool), size=n * MESSAGES_PER_ROW)))
    roles = pa.array(np.tile(["system", "user", "assistant", "user"], n).astype(object), type=pa.string())
    structs = pa.StructArray.from_arrays([roles, contents], names=["role", "content"])
    offsets = pa.array(np.arange(0, n * MESSAGES_PER_ROW + 1, MESSAGES_PER_ROW, dtype=np.int32))
    messages = pa.ListArray.from_arrays(offsets, structs)
    pq.write_table(table.append_column("messages", messages), path, row_group_size=100_000)


def child(mode: str, inp: str, out: str) -> None:
    from drift_core.schemas import WeightsConfig
    from tasks.weights_io import compute_weight_table, read_weight_inputs, weigh_parquet, write_parquet_atomic

    cfg = WeightsConfig()
    t0 = time.perf_counter()
    if mode == "in-memory":
        df, _ = read_weight_inputs(inp)
        table, _ = compute_weight_table(df, cfg)
        write_parquet_atomic(table, out)
        rows = table.height
    else:
        rows = weigh_parquet(inp, out, cfg).rows
    seconds = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "rows": rows, "seconds": seconds, "peak_rss_mib": _peak_rss_mib()}))


def run_child(mode: str, inp: Path, out: Path) -> dict:
    res = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(inp), str(out)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def baseline_rss() -> float:
    """Peak RSS of a child that only imports the weights path (the interpreter + libraries)."""
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "import tasks.weights_io\nfrom bench_weights import _peak_rss_mib\nprint(_peak_rss_mib())"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(ROOT / "benchmarks")],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(res.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--chars", type=int, default=150, help="characters per message")
    ap.add_argument("--no-messages", action="store_true")
    ap.add_argument("--modes", default="streaming,in-memory")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    with tempfile.TemporaryDirectory(prefix="drift-bench-mem-") as tmp:
        inp = Path(tmp) / "trajectories.parquet"
        t = time.perf_counter()
        make_parquet(inp, args.n)
        text_mib = 0.0
        if not args.no_messages:
            add_messages(inp, args.chars)
            text_mib = args.n * MESSAGES_PER_ROW * args.chars / 2**20
        print(
            f"{args.n:,} trajectories, {inp.stat().st_size / 2**20:.0f} MiB parquet, "
            f"{text_mib:,.0f} MiB of message text, generated in {time.perf_counter() - t:.1f} s"
        )
        print(f"interpreter + libraries alone: {baseline_rss():.0f} MiB peak RSS")
        print(f"\n{'path':<12}{'seconds':>10}{'peak RSS MiB':>15}")
        outputs = {}
        for mode in args.modes.split(","):
            out = Path(tmp) / f"{mode}.parquet"
            r = run_child(mode, inp, out)
            outputs[mode] = out
            print(f"{mode:<12}{r['seconds']:>10.2f}{r['peak_rss_mib']:>15,.0f}")
        if len(outputs) == 2:
            a, b = (pq.read_table(p, columns=["return", "weight"]) for p in outputs.values())
            print(f"\nsame return and weight columns: {a.equals(b)}")


if __name__ == "__main__":
    main()
