"""Evaluation: the same multi-turn protocol with greedy decoding, one trajectory per problem.

Problems are split into shards (cached one by one, like rollouts); ``summarize_eval`` joins them
and computes the metrics of docs/method.md#metrics, writing per-problem trajectories, metrics.json and a
plot of cumulative accuracy by turn.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl
from prefect import task

from drift_core.metrics import eval_metrics
from drift_core.schemas import SamplingConfig
from tasks.caching import served_from_store
from tasks.plots import plot_multi_at
from tasks.store import ArtifactStore, Manifest


def greedy(max_new_tokens: int) -> SamplingConfig:
    return SamplingConfig(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)


@task(name="summarize-eval")
def summarize_eval(shards: list[Manifest], label: str, max_turns: int, store_root: str, key: str) -> Manifest:
    store = ArtifactStore(store_root)
    if (hit := served_from_store(store, "evaluate", key)) is not None:
        return hit
    df = pl.concat([store.read_parquet(m) for m in shards], how="vertical")
    metrics = eval_metrics(df["turn_correct"].to_list(), df["normalized_answers"].to_list(), max_turns)
    meta = {"label": label, **metrics.model_dump()}
    store.write_json(meta, "evaluate", key, "metrics.json")
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_multi_at({label: metrics.multi_at}, Path(tmp) / "multi_at.png")
        store.write_bytes(png.read_bytes(), "evaluate", key, "multi_at.png")
    # the manifest last: it is the store's record that the stage is done (tasks.caching)
    return store.write_parquet(df, "evaluate", key, meta=meta)
