"""Weights stage: returns and importance weights for graded trajectories (docs/method.md#return, #weights)."""

from __future__ import annotations

import polars as pl
import pyarrow.parquet as pq
from prefect import task

from drift_core.schemas import WeightsConfig
from tasks.caching import served_from_store
from tasks.reference_rollouts import is_reference_frame, trainable_rows
from tasks.store import ArtifactStore, Manifest
from tasks.weights_io import compute_weight_table, weigh_parquet, write_parquet_atomic


@task(name="weights")  # the task name is what Prefect and the stage records show: kept stable
def weigh_rollouts(rollouts: Manifest, cfg: WeightsConfig, store_root: str, key: str) -> Manifest:
    """Add ``return`` and ``weight`` to the trajectories; diagnostics go into the manifest meta.
    (The weights themselves are :func:`drift_core.weights.compute_weights`.)"""
    store = ArtifactStore(store_root)
    if (hit := served_from_store(store, "weights", key)) is not None:
        return hit
    if not store.verify(rollouts):
        raise RuntimeError(f"rollout artifact {rollouts.uri} is missing or corrupt")

    source = store.local_path(rollouts)

    def write(tmp: str) -> tuple[int, dict]:
        if is_reference_frame(pq.ParquetFile(source).schema_arrow.names):
            rows, meta, weights = _weigh_reference(source, tmp, cfg)
        else:  # streamed in record batches: memory holds a few numbers per trajectory, never the text
            streamed = weigh_parquet(source, tmp, cfg)
            rows, meta, weights = streamed.rows, streamed.diagnostics.model_dump(), streamed.weights
        # before the manifest, which is the store's record that the stage is done (tasks.caching)
        store.write_json(meta, "weights", key, "diagnostics.json")
        meta["histogram"] = _histogram(weights)
        return rows, meta

    return store.write_file("weights", key, write)


def _weigh_reference(source: str, out: str, cfg: WeightsConfig) -> tuple[int, dict, list[float]]:
    """Rollouts imported from reference JSONL (tasks.reference_rollouts): weighted over every
    record, as weight_sft.py does, then the records it cannot train on are dropped."""
    table, diag = compute_weight_table(pl.read_parquet(source), cfg)
    kept = trainable_rows(table)
    write_parquet_atomic(kept, out)
    meta = diag.model_dump()
    meta["dropped_untrainable"] = table.height - kept.height
    return kept.height, meta, table["weight"].to_list()


def _histogram(weights: list[float], bins: int = 20) -> dict[str, list[float]]:
    import numpy as np

    counts, edges = np.histogram(np.asarray(weights, dtype=float), bins=bins)
    return {"counts": counts.astype(float).tolist(), "edges": edges.tolist()}
