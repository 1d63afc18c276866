"""Which verifier reads a problem table's golds, checked before any generation.

``verifier.kind: auto`` is decided here from the ingested golds (``drift_core.verify.resolve_kind``),
and every gold is then checked against the verifier that will grade it. A gold the verifier cannot
read would otherwise fail (or grade every answer wrong) minutes into generation; here it stops the
run in seconds, naming the config key, the file and the row.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from drift_core.schemas import DataConfig, DriftConfig, VerifierConfig
from drift_core.verify import resolve_kind, unreadable_gold
from tasks.ingest import IngestError, load_problems, problem_origins
from tasks.store import ArtifactStore, Manifest

__all__ = ["GoldError", "check_eval_suite", "check_golds", "checked_verifier"]

_MAX_EXAMPLES = 3


class GoldError(IngestError):
    """A gold answer that the configured verifier cannot read."""


def checked_verifier(
    store: ArtifactStore,
    problems: Manifest,
    data: DataConfig,
    verifier: VerifierConfig,
    context: str,
    base_dir: str | Path | None = None,
    label: str | None = None,
) -> VerifierConfig:
    """``verifier`` with ``auto`` resolved against ``problems``' golds, after checking that it can
    read every one of them. ``context`` is the config key whose ``verifier`` and ``data`` are meant
    (``eval.suite[1]``, ``eval``, or ``""`` for the top level); ``label`` names the benchmark."""
    golds = store.read_parquet(problems).select("prompt_id", "gold")
    return check_golds(golds, data, verifier, context, base_dir, label)


def check_eval_suite(cfg: DriftConfig, base_dir: str | Path | None = None) -> dict[str, str]:
    """Read every benchmark of ``cfg``'s eval suite and check its golds (no store, no Prefect): the
    CLI runs this before starting a flow, so a mismatch fails in seconds. Returns name -> kind."""
    kinds = {}
    for key, entry in cfg.eval.entries():
        df, _ = load_problems(entry.data, Path(base_dir) if base_dir is not None else None, f"{key}.data")
        kinds[entry.name] = check_golds(
            df, entry.data, cfg.eval_verifier(entry), key, base_dir, entry.name
        ).kind
    return kinds


def check_training_data(cfg: DriftConfig, base_dir: str | Path | None = None) -> str:
    """Read the training data (``data``) and check its golds against ``verifier``, like
    :func:`check_eval_suite`: a malformed file or an unreadable gold fails before any server
    starts or any model is made. Returns the verifier kind (``auto`` resolved)."""
    df, _ = load_problems(cfg.data, Path(base_dir) if base_dir is not None else None, "data")
    return check_golds(df, cfg.data, cfg.verifier, "", base_dir).kind


def check_golds(
    golds: pl.DataFrame,
    data: DataConfig,
    verifier: VerifierConfig,
    context: str,
    base_dir: str | Path | None = None,
    label: str | None = None,
) -> VerifierConfig:
    """The check behind ``checked_verifier`` on a table with ``prompt_id`` and ``gold`` columns."""
    kind = resolve_kind(verifier.kind, golds["gold"].to_list(), data.multiple_choice)
    bad = [
        (pid, gold, why)
        for pid, gold in golds.select("prompt_id", "gold").iter_rows()
        if (why := unreadable_gold(kind, gold)) is not None
    ]
    if bad:
        data_key = f"{context}.data" if context else "data"
        verifier_key = f"{context}.verifier.kind" if context else "verifier.kind"
        origins = problem_origins(data, Path(base_dir) if base_dir is not None else None, data_key)
        shown = "; ".join(
            f"{origins.get(pid, data.source)} (prompt id {pid!r}): gold {gold!r} is {why}"
            for pid, gold, why in bad[:_MAX_EXAMPLES]
        )
        more = f"; and {len(bad) - _MAX_EXAMPLES} more" if len(bad) > _MAX_EXAMPLES else ""
        auto = resolve_kind("auto", golds["gold"].to_list(), data.multiple_choice)
        hint = f"Set {verifier_key}: {auto} (what auto picks for these golds)" if auto != kind else ""
        hint = hint or f"Fix these golds or set {verifier_key}"
        name = f"{context} {label!r}" if label and context else (context or "data")
        raise GoldError(
            f"{name}: {len(bad)} of {golds.height} golds cannot be read by the {kind} verifier"
            + (" (auto)" if verifier.kind == "auto" else "")
            + f": {shown}{more}. {hint}. Stopped before any generation."
        )
    return verifier.model_copy(update={"kind": kind})
