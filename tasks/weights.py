"""Weights stage: returns and importance weights for graded trajectories (DESIGN items 3-4)."""

from __future__ import annotations

from prefect import task

from drift_core.schemas import WeightsConfig
from tasks.store import ArtifactStore, Manifest
from tasks.weights_io import compute_weight_table, load_weight_inputs


@task(name="weights")
def compute_weights(rollouts: Manifest, cfg: WeightsConfig, store_root: str, key: str) -> Manifest:
    """Add ``return`` and ``weight`` to the trajectories; diagnostics go into the manifest meta."""
    store = ArtifactStore(store_root)
    found = store.find("weights", key)
    if found is not None:
        return found
    if not store.verify(rollouts):
        raise RuntimeError(f"rollout artifact {rollouts.uri} is missing or corrupt")
    df = load_weight_inputs(store.local_path(rollouts))
    weighted, diag = compute_weight_table(df, cfg)
    meta = diag.model_dump()
    meta["histogram"] = _histogram(weighted["weight"].to_list())
    manifest = store.write_parquet(weighted, "weights", key, meta=meta)
    store.write_json(diag.model_dump(), "weights", key, "diagnostics.json")
    return manifest


def _histogram(weights: list[float], bins: int = 20) -> dict[str, list[float]]:
    import numpy as np

    counts, edges = np.histogram(np.asarray(weights, dtype=float), bins=bins)
    return {"counts": counts.astype(float).tolist(), "edges": edges.tolist()}
