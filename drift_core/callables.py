"""User functions named ``module:function`` in a config (``protocol.feedback``'s callable kind):
loading one, and its identity for cache keys.

At the bottom of drift_core (it imports nothing of drift's): ``drift_core.schemas`` checks a
function loads when the config is validated and puts its identity in dumps, and
``drift_core.feedback`` calls it.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable
from functools import lru_cache

__all__ = ["FeedbackFunction", "function_identity", "load_function"]

FeedbackFunction = Callable[[str | None, str, int], str]


@lru_cache(maxsize=64)
def load_function(spec: str) -> FeedbackFunction:
    """The function named ``module:function``; ValueError saying what is wrong otherwise.

    Checked when the config is validated, so a typo fails before any model is loaded."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function' (e.g. 'mypkg.feedback:hint'), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or an error raised while the module runs
        raise ValueError(f"cannot import module {module_name!r} of {spec!r}: {exc}") from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} ({spec!r})")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable (got {type(fn).__name__})")
    try:
        inspect.signature(fn).bind(None, "", 1)
    except TypeError as exc:
        raise ValueError(f"{spec!r} must accept (answer, gold, turn): {exc}") from exc
    except ValueError:  # a builtin without a signature: accepted, checked when called
        pass
    return fn


def function_identity(spec: str) -> str:
    """sha256 of the function's source (of its module when the source is not available): part of
    the cache key, so editing the function re-runs what depends on its feedback."""
    fn = load_function(spec)
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        try:
            source = inspect.getsource(inspect.getmodule(fn))  # type: ignore[arg-type]
        except (OSError, TypeError):
            source = spec
    return hashlib.sha256(source.encode()).hexdigest()
