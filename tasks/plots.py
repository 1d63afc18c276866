"""Plots logged to MLflow: cumulative accuracy by turn, and the weight histogram."""

from __future__ import annotations

from pathlib import Path


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
