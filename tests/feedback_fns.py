"""Feedback functions for tests/test_protocol.py (``protocol.feedback: {kind: callable, ...}``)."""

from __future__ import annotations


def off_by(answer: str | None, gold: str, turn: int) -> str:
    """Says how far off the answer is, and which turn this is."""
    if answer is None:
        return f"turn {turn}: no answer"
    return f"turn {turn}: off by {int(gold) - int(answer)}"


def silent(answer: str | None, gold: str, turn: int) -> str:
    return ""


def two_args(answer: str | None, gold: str) -> str:
    return "never called"


NOT_CALLABLE = "text"
