"""Weights stage: returns and importance weights for graded trajectories (DESIGN items 3-4)."""

from __future__ import annotations

from prefect import task

from drift_core.schemas import WeightsConfig
from tasks.store import ArtifactStore, Manifest
from tasks.weights_io import weigh_parquet


@task(name="weights")
def compute_weights(rollouts: Manifest, cfg: WeightsConfig, store_root: str, key: str) -> Manifest:
    """Add ``return`` and ``weight`` to the trajectories; diagnostics go into the manifest meta."""
    store = ArtifactStore(store_root)
    found = store.find("weights", key)
    if found is not None:
        return found
    if not store.verify(rollouts):
        raise RuntimeError(f"rollout artifact {rollouts.uri} is missing or corrupt")

    def write(tmp: str) -> tuple[int, dict]:
        # streamed in record batches: memory holds a few numbers per trajectory, never the text
        streamed = weigh_parquet(store.local_path(rollouts), tmp, cfg)
        meta = streamed.diagnostics.model_dump()
        meta["histogram"] = _histogram(streamed.weights)
        return streamed.rows, meta

    manifest = store.write_file("weights", key, write)
    diagnostics = {k: v for k, v in manifest.meta.items() if k != "histogram"}
    store.write_json(diagnostics, "weights", key, "diagnostics.json")
    return manifest


def _histogram(weights: list[float], bins: int = 20) -> dict[str, list[float]]:
    import numpy as np

    counts, edges = np.histogram(np.asarray(weights, dtype=float), bins=bins)
    return {"counts": counts.astype(float).tolist(), "edges": edges.tolist()}
