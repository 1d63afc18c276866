"""Feedback kinds: the user message that follows a wrong answer.

Three kinds (``protocol.feedback``):

* fixed text (a string; the paper's unary feedback "Incorrect. Please think again.", the default);
* ``{kind: direction}``: for numeric golds, says which way the answer is off ("Incorrect. The
  answer is larger." when the gold is larger than the answer, "... smaller." when it is smaller).
  A small model cannot learn anything from unary feedback it cannot use (docs/results.md); a
  direction is feedback it can act on. An answer that cannot be read as one number (a format error,
  several actions, text) gets the kind's fallback text;
* ``{kind: callable, function: "module:function"}``: ``function(answer, gold, turn) -> str``, with
  ``answer`` the parsed answer (actions joined by ``||``; None when the turn had no readable
  answer), ``gold`` the gold answer and ``turn`` the 1-based number of the turn just graded.

Pure code: the callable is imported by its ``module:function`` name, nothing else is read.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable
from functools import lru_cache

from drift_core.verify import parse_number

UNARY_FEEDBACK = "Incorrect. Please think again."
LARGER = "Incorrect. The answer is larger."
SMALLER = "Incorrect. The answer is smaller."

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


def direction_text(answer: str | None, normalized: str | None, gold: str, fallback: str) -> str:
    """ "larger"/"smaller" from the one number the turn answered, else ``fallback``.

    The number is read from the verifier's normal form of the answer first (which already applied
    ``verifier.read``, e.g. the last number of "48 + 69 = 117"), then from the answer itself."""
    target = parse_number(gold)
    if target is None:
        raise ValueError(f"direction feedback: gold {gold!r} is not a number")
    value = None
    for text in (normalized, answer):
        if text and "||" not in text:
            value = parse_number(text)
            if value is not None:
                break
    if value is None or value == target:
        return fallback
    return LARGER if target > value else SMALLER


def call_function(spec: str, answer: str | None, gold: str, turn: int) -> str:
    text = load_function(spec)(answer, gold, turn)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"protocol.feedback function {spec!r} returned {text!r} for answer {answer!r}, gold "
            f"{gold!r}, turn {turn}; it must return a non-empty string"
        )
    return text
