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

Pure code: the callable is imported by its ``module:function`` name (``drift_core.callables``),
nothing else is read.
"""

from __future__ import annotations

from drift_core.callables import load_function
from drift_core.verify import parse_number

UNARY_FEEDBACK = "Incorrect. Please think again."
LARGER = "Incorrect. The answer is larger."
SMALLER = "Incorrect. The answer is smaller."


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
