"""Weights stage: returns and importance weights for graded trajectories (docs/method.md#return, #weights)."""

from __future__ import annotations

import polars as pl
import pyarrow.parquet as pq
from prefect import task

from drift_core.schemas import WeightsConfig
from drift_core.weights import WeightDiagnostics, weight_warnings
from tasks.caching import served_from_store
from tasks.reference_rollouts import is_reference_frame, trainable_rows
from tasks.store import ArtifactStore, Manifest, StoreError
from tasks.weights_io import compute_weight_table, weigh_parquet, write_parquet_atomic


@task(name="weights")  # the task name is what Prefect and the stage records show: kept stable
def weigh_rollouts(rollouts: Manifest, cfg: WeightsConfig, store_root: str, key: str) -> Manifest:
    """Add ``return`` and ``weight`` to the trajectories; diagnostics go into the manifest meta.
    (The weights themselves are :func:`drift_core.weights.compute_weights`.)"""
    store = ArtifactStore(store_root)
    if (hit := served_from_store(store, "weights", key)) is not None:
        return hit
    if not store.verify(rollouts):
        raise StoreError(f"rollout artifact {rollouts.uri} is missing or corrupt")

    source = store.local_path(rollouts)

    def write(tmp: str) -> tuple[int, dict]:
        if is_reference_frame(pq.ParquetFile(source).schema_arrow.names):
            rows, meta, weights = _weigh_reference(source, tmp, cfg)
        else:  # streamed in record batches: memory holds a few numbers per trajectory, never the text
            streamed = weigh_parquet(source, tmp, cfg)
            rows, meta, weights = streamed.rows, streamed.diagnostics.model_dump(), streamed.weights
        meta["warnings"] = weight_warnings(WeightDiagnostics.model_validate(meta))
        # before the manifest, which is the store's record that the stage is done (tasks.caching)
        store.write_json(meta, "weights", key, "diagnostics.json")
        report_weights(meta)
        meta["histogram"] = _histogram(weights)
        return rows, meta

    return store.write_file("weights", key, write)


def diagnostics_text(meta: dict) -> str:
    """The diagnostics a user reads before spending a training run, and the warnings with what to do."""
    lines = [
        f"weights: {meta['n_trajectories']} trajectories in {meta['n_groups']} groups",
        f"  weight on groups with no success  {meta['share_weight_no_success']:.1%}"
        f" ({meta['share_groups_no_success']:.1%} of the groups)",
        f"  ESS                               {meta['ess_overall']:.1f} of {meta['n_trajectories']}"
        f" ({meta['ess_fraction']:.1%})",
        f"  max weight                        {meta['max_weight']:.3g} (group size {meta['max_group_size']})",
    ]
    lines += [f"WARNING: {w}" for w in meta.get("warnings", [])]
    return "\n".join(lines)


def report_weights(meta: dict) -> None:
    """Print the diagnostics and keep them as a Prefect markdown artifact (MLflow gets the numbers
    as the stage's metrics from the manifest). Never fails the stage."""
    text = diagnostics_text(meta)
    print(text, flush=True)
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is not None:
            create_markdown_artifact(
                key="weights-diagnostics",
                markdown="```\n" + text + "\n```",
                description="weight diagnostics: share of weight on unsolved groups, ESS, max weight",
            )
    except Exception as exc:  # pragma: no cover - an artifact must never fail the stage
        print(f"could not create the weights-diagnostics artifact: {exc}", flush=True)


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
