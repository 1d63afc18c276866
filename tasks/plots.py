"""Plots logged to MLflow: cumulative accuracy by turn, and the weight histogram.

:func:`plot_file` keeps each rendered PNG under a hash of the data it shows, so a cached re-run
logs the same picture without importing matplotlib (about a second of start-up on its own)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasks.atomic import atomic_path


@contextlib.contextmanager
def plot_file(
    cache_dir: Path | None, filename: str, render: Callable[[Path], Any], data: Any
) -> Iterator[Path]:
    """A PNG named ``filename`` showing ``data``, drawn by ``render(path)`` only when no earlier run
    drew the same data into ``cache_dir`` (``<cache_dir>/<hash of data>/<filename>``). Without a
    cache directory (a remote store) it is drawn into a temporary directory for the ``with`` block."""
    if cache_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / filename
            render(path)
            yield path
        return
    doc = json.dumps([filename, data], sort_keys=True, default=str)
    path = Path(cache_dir) / hashlib.sha256(doc.encode()).hexdigest()[:32] / filename
    if not path.exists():
        # whole or absent: a killed run never leaves half a PNG; a cache, so no fsync (tasks.atomic)
        with atomic_path(path, durable=False) as tmp:
            render(tmp)
    yield path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: workers have no display
    import matplotlib.pyplot as plt

    return plt


#: one colour per system in every plot (matplotlib's tab10 order); unknown systems get the rest
SYSTEM_COLOURS = {"reference": "#7f7f7f", "trained": "#1f77b4", "champion": "#ff7f0e", "model": "#2ca02c"}
_SPARE_COLOURS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def system_colour(name: str, index: int = 0) -> str:
    """The colour of system ``name`` (``reference``, ``trained``, ...), the same in every plot."""
    return SYSTEM_COLOURS.get(name, _SPARE_COLOURS[index % len(_SPARE_COLOURS)])


def wilson_interval(share: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a share of ``n`` problems (sensible at 0% and 100% too)."""
    if n <= 0:
        return (0.0, 1.0)
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (share * (1 - share) / n + z * z / (4 * n * n)) ** 0.5
    return (max(0.0, centre - half), min(1.0, centre + half))


def multi_at_title(benchmark: str | None, n: int | None) -> str:
    """``Cumulative accuracy by turn: arith, n = 300``."""
    what = ", ".join(p for p in (benchmark, f"n = {n}" if n else None) if p)
    return "Cumulative accuracy by turn" + (f": {what}" if what else "")


def plot_multi_at(
    curves: dict[str, list[float]],
    path: Path,
    title: str | None = None,
    intervals: dict[str, list[tuple[float, float]]] | None = None,
    benchmark: str | None = None,
    n: int | None = None,
) -> Path:
    """One line per system on one chart: multi@t (a fraction) for t = 1..T, drawn in percent on a
    0-100% axis with a tick per turn; ``intervals`` (same shape, fractions) are shaded bands."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    turns = max((len(v) for v in curves.values()), default=1)
    for i, (name, values) in enumerate(curves.items()):
        colour, xs = system_colour(name, i), range(1, len(values) + 1)
        ax.plot(xs, [100 * v for v in values], marker="o", label=name, color=colour)
        if intervals and intervals.get(name):
            lo, hi = zip(*intervals[name], strict=True)
            ax.fill_between(xs, [100 * v for v in lo], [100 * v for v in hi], color=colour, alpha=0.15)
    ax.set_xlabel("turn t")
    ax.set_ylabel("multi@t (% of problems)")
    ax.set_xticks(range(1, turns + 1))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.75, turns + 0.25)
    ax.set_ylim(0, 100)
    ax.set_title(title or multi_at_title(benchmark, n), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_weight_histogram(
    counts: list[float],
    edges: list[float],
    path: Path,
    beta: float | None = None,
    ess_overall: float | None = None,
    max_weight: float | None = None,
) -> Path:
    """Trajectories by weight; the count axis is symmetric-log (ticks 0, 1, 10, ...: one
    trajectory stays visible beside thousands), with beta, ESS and the largest weight in the title."""
    from matplotlib.ticker import FixedLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", edgecolor="black", linewidth=0.3)
    ax.set_xlabel("weight")
    ax.set_ylabel("trajectories")
    ax.set_yscale("symlog", linthresh=1)
    top = max(counts, default=1)
    decades = [10**e for e in range(0, len(str(int(max(top, 1)))) + 1)]
    ax.yaxis.set_major_locator(FixedLocator(decades))
    ax.yaxis.set_minor_locator(FixedLocator([]))
    ax.set_ylim(0, decades[-1])
    notes = [
        f"{k} = {v:.3g}"
        for k, v in (("beta", beta), ("ESS", ess_overall), ("max", max_weight))
        if v is not None
    ]
    ax.set_title("DRIFT weights" + (f" ({', '.join(notes)})" if notes else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
