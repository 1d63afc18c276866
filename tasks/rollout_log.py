"""The reference rollouts in MLflow, reachable from a registered version.

A version's lineage names the run that holds its rollouts (``drift.rollouts_run_id``); that run has
them under ``rollouts/``: the whole trajectories parquet, a table of the first trajectories that the
MLflow UI shows (question, turns, answers, verdicts, the conversation), and the manifest. The train
and rollout stage runs list them as a dataset input ("Datasets used"), named after the reference
model that made them and with the content hash as its digest.

Rollouts are copied into MLflow once per content hash: a later run that uses the same rollouts (a
cached re-run, a retrain) points at the run that logged them instead of copying them again.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tasks.store import ArtifactStore, Manifest
from tasks.tracking import Tracker, redact

__all__ = ["ROLLOUTS_DIR", "SHA_TAG", "log_rollouts", "rollouts_dataset_input"]

ROLLOUTS_DIR = "rollouts"
SHA_TAG = "drift.rollouts_sha256"  # on the run whose artifacts hold these rollouts
SAMPLE_ROWS = 200  # trajectories in the browsable table (the parquet holds them all)


def log_rollouts(
    tracker: Tracker, run_id: str, store: ArtifactStore, manifest: Manifest, reference_fp: str
) -> str:
    """The id of the run whose ``rollouts/`` artifacts hold ``manifest``'s trajectories: an earlier
    run that logged the same content, else ``run_id``, which logs them now."""
    client = tracker.client
    earlier = client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`{SHA_TAG}` = '{manifest.sha256}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if earlier:
        holder = earlier[0].info.run_id
    else:
        holder = run_id
        local = Path(store.local_path(manifest))
        files = sorted(local.rglob("*.parquet")) if local.is_dir() else [local]
        for file in files:
            client.log_artifact(holder, str(file), artifact_path=ROLLOUTS_DIR)
        if files:
            client.log_table(holder, data=_sample(files[0]), artifact_file=f"{ROLLOUTS_DIR}/sample.json")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "manifest.json"
            doc = {**manifest.model_dump(mode="json"), "reference_fingerprint": reference_fp}
            path.write_text(json.dumps(redact("", doc), indent=2, sort_keys=True))
            client.log_artifact(holder, str(path), artifact_path=ROLLOUTS_DIR)
        client.set_tag(holder, SHA_TAG, manifest.sha256)
    client.set_tag(run_id, "drift.rollouts_run_id", holder)
    return holder


def rollouts_dataset_input(manifest: Manifest, reference_fp: str, holder_run_id: str):
    """The rollouts as an MLflow dataset input: name ``rollouts-<reference>``, digest = content hash,
    source = the run artifacts that hold them, profile = rows and the reference fingerprint."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        name=f"rollouts-{reference_fp.split(':')[-1][:16]}",
        digest=manifest.sha256[:16],
        source_type="mlflow_run_artifacts",
        source=json.dumps({"uri": f"runs:/{holder_run_id}/{ROLLOUTS_DIR}"}),
        profile=json.dumps({"trajectories": manifest.rows, "reference_fingerprint": reference_fp}),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


def _sample(parquet: Path):
    """The first trajectories as a table MLflow renders: one row per trajectory, the conversation as
    text ("role: content" blocks)."""
    import polars as pl

    df = pl.read_parquet(parquet, n_rows=SAMPLE_ROWS)
    wanted = ["prompt_id", "traj_idx", "n_turns", "solved", "answers", "turn_correct"]
    out = df.select([c for c in wanted if c in df.columns])
    out = out.with_columns(
        pl.col(c).cast(pl.List(pl.String)).list.join(" | ")
        for c in ("answers", "turn_correct")
        if c in out.columns
    )
    if "messages" in df.columns:
        text = [
            "\n\n".join(f"{m['role']}: {m['content']}" for m in messages or [])
            for messages in df["messages"].to_list()
        ]
        out = out.with_columns(pl.Series("conversation", text))
    return out.to_pandas()
