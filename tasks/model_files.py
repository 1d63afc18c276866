"""Where drift keeps model files it makes or downloads, and the one error type for bad model references.

Shared by ``tasks.models`` (builtins, local directories, hub ids) and ``tasks.registry`` (MLflow
registered models); it imports neither, so model references have one direction of use:
``tasks.models`` -> ``tasks.registry`` -> this module.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

from drift_core.errors import UserError

__all__ = ["ModelError", "atomic_dir", "default_cache_root", "model_lock"]

model_lock = threading.RLock()  # re-entrant: builders call other builders


class ModelError(UserError, ValueError):
    """A model reference that cannot be used (missing path, no chat template, unsafe format)."""


def default_cache_root() -> Path:
    return Path(os.environ.get("DRIFT_MODEL_CACHE", Path.home() / ".cache" / "drift" / "models"))


def atomic_dir(target: Path, build) -> Path:
    """Build a directory under a temporary name next to ``target`` and rename it into place."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
