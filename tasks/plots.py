"""Plots logged to MLflow: cumulative accuracy by turn, and the weight histogram.

:func:`plot_file` keeps each rendered PNG under a hash of the data it shows, so a cached re-run
logs the same picture without importing matplotlib (about a second of start-up on its own)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{os.getpid()}-{threading.get_ident()}-{filename}")
        try:
            render(tmp)
            os.replace(tmp, path)  # whole or absent: a killed run never leaves half a PNG
        finally:
            tmp.unlink(missing_ok=True)
    yield path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: workers have no display
    import matplotlib.pyplot as plt

    return plt


def plot_multi_at(
    curves: dict[str, list[float]], path: Path, title: str = "Cumulative accuracy by turn"
) -> Path:
    """One line per system: multi@t for t = 1..T."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), [100 * v for v in values], marker="o", label=name)
    ax.set_xlabel("turn t")
    ax.set_ylabel("multi@t (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_weight_histogram(counts: list[float], edges: list[float], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", edgecolor="black", linewidth=0.3)
    ax.set_xlabel("weight")
    ax.set_ylabel("trajectories")
    ax.set_yscale("symlog")
    ax.set_title("DRIFT weights")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
