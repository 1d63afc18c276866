"""Rollouts of an earlier run, for ``drift run --rollouts-from`` and the ``retrain`` deployment: an
MLflow run id (its parent run's rollout manifest), a rollout manifest JSON file, or the reference
scripts' JSONL (imported once, cached by the file's content). Never generates rollouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from drift_core.errors import InputError
from flows.stages import StageRunner
from tasks.caching import stage_key
from tasks.reference_rollouts import import_reference_rollouts, is_reference_file
from tasks.store import ArtifactStore, Manifest, sha256_file
from tasks.tracking import Tracker

__all__ = ["reused_rollouts", "rollouts_fingerprint"]


def reused_rollouts(
    stages: StageRunner, rollouts_from: str, reference_fingerprint: str, base_dir: str, logger: Any
) -> tuple[Manifest, str]:
    """An earlier run's rollouts (``drift retrain``), with the fingerprint of the model that made
    them; a reference that has moved since is tagged, so the MLflow UI says so."""
    tracker = stages.tracker
    assert tracker is not None
    tracker.open_stage("rollout")
    if is_reference_file(rollouts_from):
        rollouts = _imported_rollouts(stages, rollouts_from, base_dir)
    else:
        rollouts = _find_rollouts(rollouts_from, stages.store, tracker)
    logger.info("re-using rollouts %s (%s rows); rollout not run", rollouts.uri, rollouts.rows)
    tracker.set_tags({"drift.rollouts_from": rollouts_from})
    rollouts_fp = rollouts_fingerprint(rollouts_from, rollouts, tracker) or "unknown"
    if rollouts_fp == "unknown":
        logger.warning(
            "rollouts_from=%r does not record the reference model that made it; "
            "tagging drift.reference_fingerprint=unknown",
            rollouts_from,
        )
    if rollouts_fp != reference_fingerprint:
        tracker.set_tags({"drift.reference_fingerprint_now": reference_fingerprint})
    return rollouts, rollouts_fp


def _imported_rollouts(stages: StageRunner, path: str, base_dir: str) -> Manifest:
    """Rollouts in the reference scripts' JSONL (tasks.reference_rollouts), cached by the file's
    content: the same file is imported once, and weights onwards are keyed by its hash."""
    file = Path(path) if Path(path).is_absolute() else Path(base_dir) / path
    if not file.is_file():
        raise InputError(f"rollouts_from={path!r}: no such reference rollout file")
    return stages.run(
        "rollout-import",
        import_reference_rollouts,
        path=str(file),
        store_root=stages.store.url,
        key=stage_key("rollout-import", file=sha256_file(file)),
    )


def rollouts_fingerprint(ref: str, rollouts: Manifest, runs: Tracker) -> str | None:
    """Fingerprint of the reference model that generated ``rollouts`` (None: not recorded).

    The manifest's meta first: it travels with the artifact. Else the MLflow run that rolled them
    out; a retrain run is followed to its own source, because retrain runs tagged before this was
    fixed carry the reference fingerprint of their day, not of their rollouts."""
    if fp := rollouts.meta.get("reference_fingerprint"):
        return str(fp)
    seen: set[str] = set()
    while ref not in seen and not ref.endswith(".json"):  # a bare manifest path: nothing to ask
        seen.add(ref)
        try:
            tags = runs.get_run(ref).data.tags
        except Exception:
            return None
        if "drift.rollouts_from" not in tags:
            fp = tags.get("drift.reference_fingerprint")
            return fp if fp and fp != "unknown" else None
        ref = tags["drift.rollouts_from"]
    return None


def _find_rollouts(ref: str, store: ArtifactStore, tracker: Tracker) -> Manifest:
    """Rollouts of an earlier run: a manifest JSON file, or an MLflow run id whose parent run
    recorded its rollout manifest. Fails clearly when they are missing or corrupt."""
    path = Path(ref)
    if path.suffix == ".json" and path.exists():
        manifest = Manifest.model_validate_json(path.read_text())
    else:
        try:
            tags = tracker.get_run(ref).data.tags
        except Exception as exc:
            raise InputError(
                f"rollouts_from={ref!r}: not a manifest file and not an MLflow run id ({exc})"
            ) from exc
        tag = tags.get("drift.rollout_manifest")
        if not tag:
            raise InputError(
                f"rollouts_from={ref!r}: MLflow run has no rollouts (tag drift.rollout_manifest)"
            )
        manifest = Manifest.model_validate(json.loads(tag))
    if manifest.stage != "rollout" or not store.verify(manifest):
        raise InputError(
            f"rollouts_from={ref!r}: the rollout artifact {manifest.uri} is missing or fails its hash check; "
            "run the full pipeline to regenerate it"
        )
    return manifest
