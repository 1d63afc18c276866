"""The question-blind ceiling of each benchmark of an eval suite (drift_core.metrics), for the
results table: how much a model could solve without reading the questions, given the suite's turns
and feedback kind. A trained model near its benchmark's ceiling may have learned to guess."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import polars as pl

from drift_core.metrics import question_blind_ceiling
from drift_core.schemas import FeedbackConfig
from tasks.store import ArtifactStore


def suite_ceilings(store: ArtifactStore, suite: Iterable[Any]) -> dict[str, float]:
    """``{benchmark: ceiling}`` for every ``flows.evaluation.EvalSet`` of the suite (its problems'
    golds, its protocol's turns and feedback). Never fails the run: a benchmark whose golds cannot
    be read is left out (the table shows '-')."""
    out: dict[str, float] = {}
    for ev in suite:
        try:
            golds = pl.read_parquet(store.local_path(ev.problems), columns=["gold"])["gold"].to_list()
            fb = ev.protocol.feedback
            kind = "direction" if isinstance(fb, FeedbackConfig) and fb.kind == "direction" else "unary"
            out[ev.name] = question_blind_ceiling([str(g) for g in golds], ev.protocol.max_turns, kind)
        except Exception:  # noqa: BLE001 - a table cell must never fail an evaluation
            continue
    return out
