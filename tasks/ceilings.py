"""The question-blind ceiling of each benchmark of an eval suite (drift_core.metrics), for the
results table: how much a model could solve without reading the questions, given the suite's turns
and feedback kind. A trained model near its benchmark's ceiling may have learned to guess.

A guessing game (``builtin:guess``) is the exception: its question says nothing about the answer, so
every policy is question-blind and a search steered by the direction feedback is the skill being
measured, not a way around it. Its ceiling is the constant sequence that ignores the feedback too
(the T most common secrets: about T over the number of secrets), whatever the feedback kind; the
note printed under the table (:func:`suite_ceiling_notes`) says so, with the search's share beside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import polars as pl

from drift_core.metrics import question_blind_ceiling
from drift_core.schemas import FeedbackConfig
from tasks.store import ArtifactStore

GUESS_SOURCE = "builtin:guess"


def _feedback_kind(protocol) -> str:
    fb = protocol.feedback
    return "direction" if isinstance(fb, FeedbackConfig) and fb.kind == "direction" else "unary"


def _golds_and_game(store: ArtifactStore, ev: Any) -> tuple[list[str], bool]:
    """The benchmark's golds, and whether it is a guessing game (by the problem table's source)."""
    df = pl.read_parquet(store.local_path(ev.problems))
    golds = [str(g) for g in df["gold"].to_list()]
    game = "source" in df.columns and df.height > 0 and set(df["source"].to_list()) == {GUESS_SOURCE}
    return golds, game


def ceiling(golds: list[str], turns: int, feedback: str, game: bool) -> float:
    """The question-blind ceiling the results table shows: :func:`question_blind_ceiling` with the
    benchmark's feedback kind, or, for a guessing game, the constant sequence (``unary``)."""
    return question_blind_ceiling(golds, turns, "unary" if game else feedback)


def ceiling_note(golds: list[str], turns: int, feedback: str, game: bool) -> str:
    """One sentence saying what blind@T means for this benchmark (it differs for a guessing game)."""
    value = 100 * ceiling(golds, turns, feedback, game)
    if game:
        secrets = len({g.strip() for g in golds})
        search = 100 * question_blind_ceiling(golds, turns, "direction")
        return (
            f"blind@{turns} {value:.1f}%: a guessing game, whose question says nothing about the secret; "
            f"the best constant sequence of {turns} guesses, ignoring the feedback and chosen on these "
            f"games' {secrets} secrets (about {turns}/{secrets}). A search steered by direction feedback "
            f"(a binary search over the {min(2**turns - 1, secrets)} most common secrets solves {search:.1f}% "
            f"by turn {turns}) is the skill measured here, not a way around it."
        )
    if feedback == "direction":
        return (
            f"blind@{turns} {value:.1f}%: a binary search over the {2**turns - 1} most common golds, "
            "steered by the direction feedback without reading the questions; a model near it may have "
            "learned to search, not to solve."
        )
    return (
        f"blind@{turns} {value:.1f}%: the best constant sequence of {turns} answers, chosen on these golds, "
        "without reading the questions; a model near it may have learned to guess, not to solve."
    )


def suite_ceilings(store: ArtifactStore, suite: Iterable[Any]) -> dict[str, float]:
    """``{benchmark: ceiling}`` for every ``flows.evaluation.EvalSet`` of the suite (its problems'
    golds, its protocol's turns and feedback). Never fails the run: a benchmark whose golds cannot
    be read is left out (the table shows '-')."""
    out: dict[str, float] = {}
    for ev in suite:
        try:
            golds, game = _golds_and_game(store, ev)
            out[ev.name] = ceiling(golds, ev.protocol.max_turns, _feedback_kind(ev.protocol), game)
        except Exception:  # noqa: BLE001 - a table cell must never fail an evaluation
            continue
    return out


def suite_ceiling_notes(store: ArtifactStore, suite: Iterable[Any]) -> dict[str, str]:
    """``{benchmark: what its blind@T means}`` (:func:`ceiling_note`), printed under the results
    table; left out, like the ceiling, where the golds cannot be read."""
    out: dict[str, str] = {}
    for ev in suite:
        try:
            golds, game = _golds_and_game(store, ev)
            out[ev.name] = ceiling_note(golds, ev.protocol.max_turns, _feedback_kind(ev.protocol), game)
        except Exception:  # noqa: BLE001 - a note must never fail an evaluation
            continue
    return out
