"""Promote stage: move the registry aliases after evaluation.

``challenger`` always points at the newest trained version; ``champion`` moves to it only when
:func:`drift_core.promotion.decide_promotion` says so, comparing per-problem outcomes of the two
evaluations on the same eval problems (paired by ``prompt_id``). The decision, with its numbers, is
written on the version as ``drift.promotion*`` tags and returned for the flow to log and print.
"""

from __future__ import annotations

import polars as pl
from prefect import get_run_logger, task

from drift_core.promotion import PromotionDecision, decide_promotion
from drift_core.schemas import PromoteConfig
from tasks.register import registry_client
from tasks.store import ArtifactStore, Manifest

__all__ = ["CHALLENGER", "CHAMPION", "current_champion", "promote", "solved_within"]

CHAMPION = "champion"
CHALLENGER = "challenger"


def current_champion(tracking_uri: str, name: str) -> str | None:
    """The version alias ``champion`` of ``name`` points at, or None (no alias, no model)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(registry_client(tracking_uri).get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def solved_within(store: ArtifactStore, manifest: Manifest) -> dict[str, bool]:
    """prompt_id -> solved within the evaluation's turns (an episode stops at its first correct turn)."""
    df = store.read_parquet(manifest).select("prompt_id", "turn_correct")
    return {
        pid: any(tc) for pid, tc in zip(df["prompt_id"].to_list(), df["turn_correct"].to_list(), strict=True)
    }


def _paired(
    challenger: dict[str, bool], baseline: dict[str, bool], what: str
) -> tuple[list[bool], list[bool]]:
    if set(challenger) != set(baseline):
        missing = sorted(set(challenger) ^ set(baseline))[:5]
        raise ValueError(
            f"promotion: the challenger and {what} were evaluated on different problems "
            f"(e.g. prompt_id {missing}); the gate compares the same eval set only"
        )
    ids = sorted(challenger)
    return [challenger[i] for i in ids], [baseline[i] for i in ids]


@task(name="promote")
def promote(
    name: str,
    version: str,
    challenger: Manifest,
    baseline: Manifest | None,
    baseline_label: str,
    cfg: PromoteConfig,
    store_root: str,
    tracking_uri: str,
) -> dict:
    """Set ``challenger`` on ``version``; move ``champion`` to it when it beats ``baseline``.
    ``baseline`` None: ``version`` already is the champion (a cached re-run), nothing to compare."""
    logger = get_run_logger()
    client = registry_client(tracking_uri)
    client.set_registered_model_alias(name, CHALLENGER, version)
    if baseline is None:
        result = {
            "promoted": False,
            "champion": version,
            "reason": f"version {version} already is the champion",
        }
    else:
        store = ArtifactStore(store_root)
        a, b = _paired(solved_within(store, challenger), solved_within(store, baseline), baseline_label)
        decision: PromotionDecision = decide_promotion(
            a, b, min_delta=cfg.min_delta, n_boot=cfg.n_boot, alpha=cfg.alpha, seed=cfg.seed
        )
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, version)
        champion = version if decision.promote else current_champion(tracking_uri, name)
        result = {"promoted": decision.promote, "champion": champion, **decision.model_dump()}
    result.update(name=name, version=version, baseline=baseline_label)
    client.set_model_version_tag(
        name, version, "drift.promotion", "promoted" if result["promoted"] else "not promoted"
    )
    client.set_model_version_tag(name, version, "drift.promotion.reason", result["reason"])
    client.set_model_version_tag(name, version, "drift.promotion.baseline", baseline_label)
    logger.info(
        "%s version %s: %s (%s)",
        name,
        version,
        "PROMOTED to champion" if result["promoted"] else "not promoted",
        result["reason"],
    )
    return result


def promotion_table(result: dict) -> pl.DataFrame:
    """The decision as a one-row-per-quantity table (logged as an MLflow table artifact)."""
    keys = [
        "name", "version", "baseline", "promoted", "champion", "challenger_multi_at_t",
        "baseline_multi_at_t", "delta", "ci_low", "ci_high", "min_delta", "alpha", "n_problems", "reason",
    ]  # fmt: skip
    return pl.DataFrame(
        {"quantity": [k for k in keys if k in result], "value": [str(result[k]) for k in keys if k in result]}
    )
