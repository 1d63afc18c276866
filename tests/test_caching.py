"""One record of "stage done": the artifact store. Prefect's cache record is written after the task
body returns, the store's manifest inside it, so a kill between the two leaves them disagreeing.
These tests build each disagreement on purpose (no kill timing involved) and check that the store
decides: a verified artifact is a cache hit (state ``Cached``) with or without Prefect's record, and
a Prefect record whose artifact is gone is recomputed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from drift_core.schemas import ArithConfig, DataConfig

pytestmark = pytest.mark.timeout(300)  # a flow run against the session's Prefect server


def _ingest_twice(store_root: Path, between=None) -> list[list[str]]:
    """Run the ingest stage in a flow, call ``between`` (with the manifest), run it again; the
    StageRunner's state names of each run."""
    from prefect import flow

    from flows.stages import StageRunner
    from tasks.ingest import ingest, ingest_key
    from tasks.store import ArtifactStore

    cfg = DataConfig(source="builtin:arith", arith=ArithConfig(n=4, digits=1, seed=7))
    key = ingest_key(cfg)

    @flow(name="caching-test", persist_result=False)
    def one_run() -> tuple[list[str], object]:
        stages = StageRunner(ArtifactStore(str(store_root)))
        manifest = stages.run("ingest", ingest, cfg=cfg, store_root=str(store_root), key=key)
        return stages.states["ingest"], manifest

    first, manifest = one_run()
    if between is not None:
        between(manifest)
    second, again = one_run()
    assert again == manifest or again.sha256 == manifest.sha256
    assert ArtifactStore(str(store_root)).verify(again)
    return [first, second]


def test_artifact_in_the_store_without_prefect_record_is_cached(prefect_api, tmp_path):
    """The SIGKILL case: the manifest is published, the process dies before Prefect writes its
    record. The next run must report the stage Cached, not run it again."""
    from tasks.ingest import ingest, ingest_key

    store = tmp_path / "store"
    cfg = DataConfig(source="builtin:arith", arith=ArithConfig(n=4, digits=1, seed=7))
    ingest.fn(cfg, str(store), key=ingest_key(cfg))  # the task body alone: store written, no record
    assert not (store / "prefect-results").exists()
    first, second = _ingest_twice(store)
    assert first == ["Cached"] and second == ["Cached"]
    # Prefect wrote its own record on the way, keyed like the artifact
    assert [p.name for p in (store / "prefect-results").iterdir()] == [f"ingest-{ingest_key(cfg)}"]


def test_prefect_record_removed_later_is_still_cached(prefect_api, tmp_path):
    store = tmp_path / "store"

    def drop_record(manifest) -> None:
        shutil.rmtree(store / "prefect-results")

    assert _ingest_twice(store, drop_record) == [["Completed"], ["Cached"]]


def test_prefect_record_whose_artifact_is_gone_is_recomputed(prefect_api, tmp_path):
    store = tmp_path / "store"

    def drop_artifact(manifest) -> None:
        Path(manifest.uri).unlink()

    assert _ingest_twice(store, drop_artifact) == [["Completed"], ["Completed"]]


def test_task_called_directly_returns_the_manifest(tmp_path):
    """Outside a Prefect task run (``task.fn``) a store hit is the manifest, not a state."""
    from tasks.ingest import ingest
    from tasks.store import Manifest

    cfg = DataConfig(source="builtin:arith", arith=ArithConfig(n=4, digits=1, seed=7))
    first = ingest.fn(cfg, str(tmp_path))
    files = sorted(Path(first.uri).parent.iterdir())
    assert [f.name for f in files] == ["data.parquet", "manifest.json"], files
    written = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}
    again = ingest.fn(cfg, str(tmp_path))
    assert isinstance(again, Manifest) and again == first
    # served, not recomputed: ingest is deterministic, so only the files show it. A recompute
    # writes each file under a temporary name and renames it into place: a new inode.
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files} == written
