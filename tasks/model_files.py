"""Where drift keeps model files it makes or downloads, and the one error type for bad model references.

Shared by ``tasks.models`` (builtins, local directories, hub ids) and ``tasks.registry`` (MLflow
registered models); it imports neither, so model references have one direction of use:
``tasks.models`` -> ``tasks.registry`` -> this module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from drift_core.errors import UserError

__all__ = ["ModelError", "atomic_dir", "default_cache_root", "model_lock", "quiet_build"]

model_lock = threading.RLock()  # re-entrant: builders call other builders


class ModelError(UserError, ValueError):
    """A model reference that cannot be used (missing path, no chat template, unsafe format)."""


def default_cache_root() -> Path:
    return Path(os.environ.get("DRIFT_MODEL_CACHE", Path.home() / ".cache" / "drift" / "models"))


def atomic_dir(target: Path, build) -> Path:
    """Build a directory under a temporary name next to ``target`` and rename it into place.

    Processes that need the same directory at once (two test workers, a run and an eval started
    together on a fresh machine) wait on a file lock beside it, so it is built once, not once per
    process; the rename keeps a crashed build from ever being found."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if target.exists():  # built by another process while this one waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing), released on exit or process death."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def quiet_build(what: str, target: Path) -> Iterator[None]:
    """One line on stderr saying what drift is making and where, then transformers' and the hub's
    progress bars and info logs silenced while it does: a first run shows drift's line, not
    "Loading weights" and "Writing model shards" bars that look like an error preceding one."""
    from transformers.utils import logging as hf_logging

    # not print(): inside a Prefect task with log_prints it would become an INFO log record
    sys.stderr.write(f"drift: {what} into {target} (once; later runs reuse it)\n")
    sys.stderr.flush()
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
