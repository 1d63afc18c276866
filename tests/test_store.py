"""The artifact store (tasks/store.py): a SIGKILL mid-write leaves no partial file at an artifact's
name, and a killed rewrite leaves the previous artifact intact (docs/reliability.md, section 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
pytestmark = pytest.mark.timeout(900)


# ============================================================================================
# 2. Crash safety: atomic writes
# ============================================================================================

CRASH_WRITE = """
import os, signal, sys
import polars as pl
from tasks.store import ArtifactStore

store = ArtifactStore(sys.argv[1])
if sys.argv[2] == "complete":
    store.write_parquet(pl.DataFrame({"x": [1, 2, 3]}), "stage", "key")
    sys.exit(0)
real = pl.DataFrame.write_parquet

def dies_mid_write(self, path, *args, **kwargs):
    real(self, path, *args, **kwargs)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)  # half the bytes are on disk ...
    os.kill(os.getpid(), signal.SIGKILL)  # ... when the process dies

pl.DataFrame.write_parquet = dies_mid_write
store.write_parquet(pl.DataFrame({"x": list(range(100_000))}), "stage", "key")
"""


def _crash_write(store: Path, mode: str) -> int:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH_WRITE), str(store), mode],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=120,
    ).returncode


def test_sigkill_mid_write_leaves_no_partial_artifact(tmp_path):
    from tasks.store import ArtifactStore

    # a first write killed half-way: nothing at the artifact's name, nothing found
    fresh = tmp_path / "fresh"
    assert _crash_write(fresh, "crash") == -signal.SIGKILL
    key_dir = fresh / "stage" / "key"
    assert not (key_dir / "data.parquet").exists() and not (key_dir / "manifest.json").exists()
    assert [p.name for p in key_dir.iterdir()][0].startswith(".data.parquet.")  # the temp name only
    assert ArtifactStore(str(fresh)).find("stage", "key") is None

    # a rewrite killed half-way: the previous complete artifact is untouched and still verifies
    store = tmp_path / "store"
    assert _crash_write(store, "complete") == 0
    before = (store / "stage" / "key" / "data.parquet").read_bytes()
    assert _crash_write(store, "crash") == -signal.SIGKILL
    assert (store / "stage" / "key" / "data.parquet").read_bytes() == before
    s = ArtifactStore(str(store))
    manifest = s.find("stage", "key")
    assert manifest is not None and s.read_parquet(manifest)["x"].to_list() == [1, 2, 3]
