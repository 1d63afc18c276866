"""Grading throughput, and what a pathological answer costs:
``.venv/bin/python benchmarks/bench_grading.py [--n 2000] [--workers 2] [--timeout 1]``.

Grades ``--n`` assistant turns with the math verifier (math-verify) in drift's grading pool
(``tasks.grade.Grader``: a process pool with a time limit per answer) and prints answers/s:

1. a clean batch: integers, fractions written two ways (``\\frac{1}{2}`` vs ``0.5``), wrong answers,
   turns with no ``<answer>`` tag (format errors);
2. the same batch with pathological answers mixed in: ``9^{9^{9^{9}}}`` (sympy would compute for
   ever; math-verify's signal-based limit stops it after ``--timeout`` s) and a 1,000,000-digit
   number (stuck in a C call that no signal interrupts; the pool's outer limit, ``timeout x
   max_actions + 10`` s, kills and rebuilds the pool).

It checks that every ordinary answer gets the same verdict in both runs and that the pathological
ones are graded incorrect: one bad answer costs a bounded delay, never a hang or a crash.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drift_core.schemas import ProtocolConfig, VerifierConfig  # noqa: E402
from tasks.grade import Grader  # noqa: E402

PATHOLOGICAL = {
    "power tower 9^{9^{9^{9}}}": "<answer>9^{9^{9^{9}}}</answer>",
    "1,000,000-digit number": "<answer>" + "9" * 1_000_000 + "</answer>",
}


def ordinary_items(n: int) -> list[tuple[str, str, int]]:
    """(content, gold, n_tokens): a deterministic mix of what a rollout produces."""
    kinds = [
        lambda i: (f"<answer>{i}</answer>", str(i)),  # correct integer
        lambda i: (f"<answer>{i + 1}</answer>", str(i)),  # wrong integer
        lambda i: (f"<answer>\\frac{{{i}}}{{2}}</answer>", f"{i / 2}"),  # latex vs decimal
        lambda i: (f"<answer>{i}/4</answer>", f"\\frac{{{i}}}{{4}}"),  # plain vs latex
        lambda i: (f"The answer is {i}", str(i)),  # no tag: format error
    ]
    return [(*kinds[i % len(kinds)](i), 8) for i in range(n)]


def timed(grader: Grader, items: list) -> tuple[list, float]:
    start = time.perf_counter()
    results = grader.grade(items)
    return results, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="ordinary answers per run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1.0, help="verifier.timeout_s (per answer)")
    args = ap.parse_args()

    protocol = ProtocolConfig()
    grader = Grader(protocol, VerifierConfig(kind="math", workers=args.workers, timeout_s=args.timeout))
    outer = args.timeout * protocol.max_actions + 10.0
    try:
        _, warm = timed(grader, ordinary_items(4 * args.workers))  # spawn the pool, import math-verify
        items = ordinary_items(args.n)
        clean, clean_s = timed(grader, items)

        mixed_items = list(items)
        slots = {}
        for j, (name, content) in enumerate(PATHOLOGICAL.items()):
            pos = (j + 1) * len(items) // (len(PATHOLOGICAL) + 1)
            mixed_items.insert(pos + j, (content, "5", 512))
            slots[pos + j] = name
        before = grader.timeouts
        mixed, mixed_s = timed(grader, mixed_items)
        ordinary = [r for i, r in enumerate(mixed) if i not in slots]
        same = [(a.correct, a.valid) for a in clean] == [(b.correct, b.valid) for b in ordinary]
        bad_graded = {slots[i]: mixed[i].correct for i in slots}
        rebuilds = grader.timeouts - before
        alone = {}  # each on its own, in a variant the workers have not seen (sympy caches results)
        for name, content in PATHOLOGICAL.items():
            _, alone[name] = timed(grader, [(content.replace("9", "8"), "5", 512)])
    finally:
        grader.close()

    print(
        f"math verifier, {args.workers} worker processes, {args.timeout:g} s limit per answer "
        f"(outer limit {outer:g} s); pool start + warm-up {warm:.1f} s"
    )
    print(f"\n{'run':<48}{'answers':>8}{'seconds':>10}{'answers/s':>11}")
    print(f"{'clean batch':<48}{len(items):>8}{clean_s:>10.2f}{len(items) / clean_s:>11.0f}")
    label = f"same + {len(PATHOLOGICAL)} pathological answers"
    print(f"{label:<48}{len(mixed_items):>8}{mixed_s:>10.2f}{len(mixed_items) / mixed_s:>11.0f}")
    print()
    for name, seconds in alone.items():
        print(f"  {name:<30} alone: {seconds:5.1f} s, graded correct={bad_graded[name]}")
    print(f"  extra seconds the pathological answers cost the mixed run: {mixed_s - clean_s:.1f}")
    print(f"  pool rebuilds (outer limit or crashed worker) in the mixed run: {rebuilds}")
    print(f"  ordinary answers graded the same in both runs: {same}")
    correct = sum(r.correct for r in clean) / len(clean)
    invalid = sum(not r.valid for r in clean) / len(clean)
    print(f"  share correct / invalid in the clean batch: {correct:.2f} / {invalid:.2f}")
    if not same or any(bad_graded.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
