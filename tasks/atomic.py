"""Atomic file writes: readers find the old file or the complete new one, never half a file.

Every file drift publishes (store artifacts and manifests, weight tables, plots, the online run's
logs and result) goes through :func:`atomic_path`. The policy, stated once here:

1. The new content is written to a temporary name in the target's own directory
   (``.<name>.tmp-<random><suffix>``: hidden, unique per writer, ending in the target's suffix so
   writers that pick a format from it, like matplotlib, still do). Same directory means same filesystem, so the
   final ``os.replace`` is one atomic rename, never a copy.
2. Before the rename the temporary file is ``fsync``-ed: a rename that reaches the disk before the
   data would otherwise leave, after a power loss, an empty file under the final name.
3. After the rename the directory is ``fsync``-ed, so the new name itself survives a power loss.
4. ``durable=False`` skips both syncs for files that are only a cache and are redrawn when lost
   (plots). A crashed process still never leaves half a file: that comes from the rename alone.
5. On any error (or ``KeyboardInterrupt``) the temporary file is removed and the target is untouched.

Files are created with mode ``0o666`` less the umask, as a plain ``open`` would create them.
Directories built under a temporary name and renamed (model downloads, checkpoints, directory
artifacts) are not files and keep their own code.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield an empty temporary file beside ``target`` for the caller to write; when the block ends
    without error it replaces ``target`` (see the module docstring for the fsync policy). The
    target's directory is created if missing."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}{target.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # another writer drew the same name: draw again
            continue
    try:
        yield tmp
        if durable:
            _fsync_path(tmp, os.O_RDONLY)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
            _fsync_path(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def write_bytes_atomic(target: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``target`` atomically (:func:`atomic_path`)."""
    with atomic_path(target, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text_atomic(target: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically (:func:`atomic_path`)."""
    return write_bytes_atomic(target, text.encode("utf-8"), durable=durable)
