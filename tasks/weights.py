"""Weights stage: returns and importance weights for graded trajectories (docs/method.md#return, #weights)."""

from __future__ import annotations

from prefect import task

from drift_core.schemas import WeightsConfig
from tasks.caching import served_from_store
from tasks.store import ArtifactStore, Manifest
from tasks.weights_io import weigh_parquet


@task(name="weights")  # the task name is what Prefect and the stage records show: kept stable
def weigh_rollouts(rollouts: Manifest, cfg: WeightsConfig, store_root: str, key: str) -> Manifest:
    """Add ``return`` and ``weight`` to the trajectories; diagnostics go into the manifest meta.
    (The weights themselves are :func:`drift_core.weights.compute_weights`.)"""
    store = ArtifactStore(store_root)
    if (hit := served_from_store(store, "weights", key)) is not None:
        return hit
    if not store.verify(rollouts):
        raise RuntimeError(f"rollout artifact {rollouts.uri} is missing or corrupt")

    def write(tmp: str) -> tuple[int, dict]:
        # streamed in record batches: memory holds a few numbers per trajectory, never the text
        streamed = weigh_parquet(store.local_path(rollouts), tmp, cfg)
        meta = streamed.diagnostics.model_dump()
        # before the manifest, which is the store's record that the stage is done (tasks.caching)
        store.write_json(meta, "weights", key, "diagnostics.json")
        meta["histogram"] = _histogram(streamed.weights)
        return streamed.rows, meta

    return store.write_file("weights", key, write)


def _histogram(weights: list[float], bins: int = 20) -> dict[str, list[float]]:
    import numpy as np

    counts, edges = np.histogram(np.asarray(weights, dtype=float), bins=bins)
    return {"counts": counts.astype(float).tolist(), "edges": edges.tolist()}
