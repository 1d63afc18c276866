"""The artifact store: where every stage's output lives, and the manifests that point at it.

Layout: ``<root>/<stage>/<cache key>/<file>``. The cache key is a hash of everything the stage's
output depends on (see ``tasks.caching``), so the same inputs always land at the same place, and a
manifest records the sha256 of what was written there. On reuse the content hash is checked: a
partial, corrupt or hand-edited artifact is never used, it is recomputed.

Writes go to a temporary name in the same directory and are renamed into place
(:mod:`tasks.atomic`), so a crash (even SIGKILL) leaves either the old state or the complete new
artifact, never half a file.

The root is a local directory by default; any fsspec URL (``s3://bucket/drift``, ``gs://...``)
works for a store shared by several workers. Remote writes upload the finished local temp file in
one PUT, which object stores make atomic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, Field

from drift_core.errors import UserError
from tasks.atomic import atomic_path

MANIFEST_NAME = "manifest.json"


class StoreError(UserError, RuntimeError):
    """The artifact store cannot be used (unwritable root, missing or corrupt artifact)."""


class Manifest(BaseModel):
    """What a task returns: small, JSON-serialisable, enough to find and trust the artifact."""

    stage: str
    key: str
    uri: str = Field(description="artifact location: a file or a directory")
    sha256: str = Field(description="content hash of the file, or of the directory's files")
    rows: int | None = None
    meta: dict[str, Any] = Field(default_factory=dict, description="small facts: metrics, diagnostics")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_dir(path: str | Path) -> str:
    """sha256 over (relative path, content) of every file of a directory, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel == MANIFEST_NAME:
            continue
        h.update(rel.encode() + b"\0" + sha256_file(file).encode())
    return h.hexdigest()


class ArtifactStore:
    """A content-checked artifact store on a local directory or an fsspec URL."""

    def __init__(self, root: str):
        import fsspec

        self.url = root
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.is_local = self.fs.protocol in ("file", "local") or "file" in tuple(self.fs.protocol)
        if self.is_local:
            self.root = str(Path(self.root).expanduser().resolve())
        self._check_writable()

    def _check_writable(self) -> None:
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            probe = f"{self.root}/.write-probe-{uuid.uuid4().hex}"
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except (OSError, PermissionError) as exc:
            raise StoreError(
                f"artifact store {self.url!r} is not writable ({exc.__class__.__name__}: {exc}); "
                "set run.artifact_store to a directory or URL you can write to"
            ) from exc

    # ---------------------------------------------------------------- locations

    def dir_for(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    def uri_for(self, stage: str, key: str, name: str) -> str:
        return f"{self.dir_for(stage, key)}/{name}"

    # ---------------------------------------------------------------- writing

    @contextlib.contextmanager
    def _staged_file(self, dest: str) -> Iterator[str]:
        """A local temporary file that becomes ``dest`` when the block ends without error: renamed
        into place when local (:func:`tasks.atomic.atomic_path`), uploaded in one PUT when remote."""
        if self.is_local:
            with atomic_path(dest) as tmp:
                yield str(tmp)
            return
        fd, tmp = tempfile.mkstemp(suffix=".tmp")
        os.close(fd)
        try:
            yield tmp
            self.fs.put_file(tmp, dest)
        finally:
            os.unlink(tmp)

    def write_parquet(
        self, df: pl.DataFrame, stage: str, key: str, name: str = "data.parquet", meta: dict | None = None
    ) -> Manifest:
        def write(tmp: str) -> tuple[int, dict]:
            df.write_parquet(tmp, compression="zstd", statistics=True)
            return df.height, meta or {}

        return self.write_file(stage, key, write, name)

    def write_file(
        self,
        stage: str,
        key: str,
        write: Callable[[str], tuple[int | None, dict]],
        name: str = "data.parquet",
    ) -> Manifest:
        """Publish a file artifact that ``write(tmp_path)`` produces (e.g. streamed batch by batch, too
        large for one frame) and that returns ``(rows, meta)``: hashed, renamed into place, manifested."""
        dest = self.uri_for(stage, key, name)
        with self._staged_file(dest) as tmp:
            rows, meta = write(tmp)
            digest = sha256_file(tmp)
        manifest = Manifest(stage=stage, key=key, uri=dest, sha256=digest, rows=rows, meta=meta)
        self._write_manifest(manifest)
        return manifest

    def write_json(self, obj: Any, stage: str, key: str, name: str) -> str:
        return self.write_bytes(
            json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), stage, key, name
        )

    def write_bytes(self, data: bytes, stage: str, key: str, name: str) -> str:
        dest = self.uri_for(stage, key, name)
        with self._staged_file(dest) as tmp:
            Path(tmp).write_bytes(data)
        return dest

    def staging_dir(self, stage: str, key: str) -> Path:
        """A fresh local directory to build a directory artifact in (see ``publish_dir``)."""
        if self.is_local:
            parent = Path(self.dir_for(stage, key)).parent
            parent.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=f".{key}.", dir=parent))
        return Path(tempfile.mkdtemp(prefix=f"drift-{stage}-"))

    def publish_dir(
        self, local_dir: Path, stage: str, key: str, rows: int | None = None, meta: dict | None = None
    ) -> Manifest:
        """Move a finished directory into place as one artifact (atomic rename when local)."""
        dest = self.dir_for(stage, key)
        digest = sha256_dir(local_dir)
        if self.is_local:
            if Path(dest).exists():
                trash = f"{dest}.old-{uuid.uuid4().hex[:8]}"
                os.replace(dest, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(local_dir, dest)
        else:
            self.fs.put(str(local_dir), dest, recursive=True)
            shutil.rmtree(local_dir, ignore_errors=True)
        manifest = Manifest(stage=stage, key=key, uri=dest, sha256=digest, rows=rows, meta=meta or {})
        self._write_manifest(manifest)
        return manifest

    def _write_manifest(self, manifest: Manifest) -> None:
        data = manifest.model_dump_json(indent=2).encode()
        self.write_bytes(data, manifest.stage, manifest.key, MANIFEST_NAME)

    # ---------------------------------------------------------------- reading

    def verify(self, manifest: Manifest) -> bool:
        """True when the artifact exists and its content hash matches the manifest."""
        try:
            if not self.fs.exists(manifest.uri):
                return False
            if self.fs.isdir(manifest.uri):
                return sha256_dir(self.local_path(manifest)) == manifest.sha256
            return sha256_file(self.local_path(manifest)) == manifest.sha256
        except OSError:
            return False

    def find(self, stage: str, key: str) -> Manifest | None:
        """The verified manifest stored for (stage, key), or None when absent or corrupt."""
        path = self.uri_for(stage, key, MANIFEST_NAME)
        try:
            if not self.fs.exists(path):
                return None
            with self.fs.open(path, "rb") as f:
                manifest = Manifest.model_validate_json(f.read())
        except (OSError, ValueError):
            return None
        return manifest if self.verify(manifest) else None

    def local_path(self, manifest: Manifest) -> str:
        """A local filesystem path for the artifact (downloaded into a cache when remote)."""
        if self.is_local:
            return manifest.uri
        cache = Path(tempfile.gettempdir()) / "drift-store-cache" / manifest.sha256
        if not cache.exists():
            tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=cache.parent if cache.parent.exists() else None))
            self.fs.get(manifest.uri, str(tmp / "x"), recursive=True)
            cache.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / "x", cache)
        return str(cache)

    def read_parquet(self, manifest: Manifest) -> pl.DataFrame:
        if not self.verify(manifest):
            raise StoreError(
                f"artifact {manifest.uri} is missing or does not match its manifest hash "
                f"{manifest.sha256[:12]}: it will be recomputed on the next run"
            )
        return pl.read_parquet(self.local_path(manifest))
