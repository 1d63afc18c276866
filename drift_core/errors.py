"""Errors that are the user's to fix, told apart from drift's own bugs.

The ``drift`` command (``flows.cli``) reports an exception in one of two ways. A ``UserError``
(a config, a data file, a model reference, the artifact store, a flag combination, an engine that
cannot run here) is something the user can fix from the message alone: one paragraph naming the
file, key or value, exit code 2, no traceback. Anything else is a bug in drift (or in a library it
calls the wrong way): the traceback and a request to report it, exit code 1.

Deciding by class, not by where an exception was raised or whether it is a ``ValueError``, is
what keeps an internal ``ValueError`` from numpy, polars or drift itself from being reported as
the user's mistake. So every error meant for the user derives from ``UserError``; the concrete
classes keep their historical base too (``class ConfigError(UserError, ValueError)``), so callers
that catch ``ValueError`` or ``RuntimeError`` keep working. Exceptions keep their class through
Prefect: a ``UserError`` raised in a task reaches the CLI as itself.

This module is at the bottom layer (no imports), so ``drift_core``, ``tasks`` and ``flows`` can
all raise these.
"""

from __future__ import annotations

__all__ = ["EngineError", "InputError", "MissingFileError", "UserError"]


class UserError(Exception):
    """An error in what the user gave or chose; its message says what to change."""


class InputError(UserError, ValueError):
    """A setting, flag combination or file given by the user that cannot be used, where no
    narrower class (``ConfigError``, ``IngestError``, ``ModelError``, ...) applies."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named (in a config key or a flag) does not exist."""


class EngineError(UserError, RuntimeError):
    """The chosen generation engine cannot run here: its extra is not installed, or it cannot
    run this model on this machine (vLLM's CPU attention and a model's head size)."""
