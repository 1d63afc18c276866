"""Promote stage: move the registry aliases after evaluation.

``challenger`` always points at the newest trained version; ``champion`` moves to it only when
:func:`drift_core.promotion.decide_promotion` says so, comparing per-problem outcomes of the two
evaluations on the same eval problems (paired by ``prompt_id``). The decision, with its numbers, is
returned for the flow to log on its own parent run and print.

The version's ``drift.promotion*`` tags say why it is (or is not) champion, so they are written once,
by the run that decided: the first decision on a version, or a later run that moved ``champion`` to
it. A cached re-run of the same model (its version already champion, nothing compared) or a run that
merely repeats a verdict never overwrites them; it records its own outcome on its own parent run.
"""

from __future__ import annotations

import polars as pl
from prefect import get_run_logger, task

from drift_core.promotion import PromotionDecision, decide_promotion
from drift_core.schemas import PromoteConfig
from tasks.registry import registry_client
from tasks.store import ArtifactStore, Manifest
from tasks.tracking import Tracker

__all__ = ["CHALLENGER", "CHAMPION", "current_champion", "log_promotion", "promote", "solved_within"]

CHAMPION = "champion"
CHALLENGER = "challenger"
ALREADY_CHAMPION = "already champion"  # the outcome of a run that compared nothing: no decision
TAG = "drift.promotion"  # on the version: "promoted" | "not promoted"; on a parent run: its outcome


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


@task(name="promote", task_run_name="promote")
def promote(
    name: str,
    version: str,
    challenger: Manifest,
    baseline: Manifest | None,
    baseline_label: str,
    cfg: PromoteConfig,
    store_root: str,
    tracking_uri: str,
    run_id: str = "",
) -> dict:
    """Set ``challenger`` on ``version``; move ``champion`` to it when it beats ``baseline``.
    ``baseline`` None: ``version`` already is the champion (a cached re-run), nothing to compare.
    ``run_id``: the MLflow parent run deciding, named on the version when it writes the verdict."""
    logger = get_run_logger()
    client = registry_client(tracking_uri)
    client.set_registered_model_alias(name, CHALLENGER, version)
    tags = client.get_model_version(name, version).tags
    if baseline is None:
        result = {
            "promoted": False,
            "outcome": ALREADY_CHAMPION,
            "champion": version,
            "reason": f"version {version} already is the champion"
            + (f" (promoted by run {tags[TAG + '.run_id']})" if tags.get(TAG + ".run_id") else ""),
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
        outcome = "promoted" if decision.promote else "not promoted"
        result = {
            "promoted": decision.promote,
            "outcome": outcome,
            "champion": champion,
            **decision.model_dump(),
        }
    result.update(name=name, version=version, baseline=baseline_label)
    decided = result["outcome"] != ALREADY_CHAMPION
    if decided and (TAG not in tags or result["promoted"]):  # the first verdict, or the alias moved
        for key, value in version_tags(result, run_id).items():
            client.set_model_version_tag(name, version, key, value)
    elif decided and tags.get(TAG + ".run_id"):
        result["reason"] += f" (version tags keep the verdict of run {tags[TAG + '.run_id']})"
    logger.info("%s version %s: %s (%s)", name, version, result["outcome"].upper(), result["reason"])
    return result


def version_tags(result: dict, run_id: str) -> dict[str, str]:
    """The verdict as the version's ``drift.promotion*`` tags: outcome, reason, baseline, the gain
    and its interval in points, and the run that decided."""
    tags = {
        TAG: result["outcome"],
        f"{TAG}.reason": result["reason"],
        f"{TAG}.baseline": result["baseline"],
        f"{TAG}.run_id": run_id,
    }
    if "delta" in result:
        level = 100 * (1 - result["alpha"])
        tags[f"{TAG}.delta_points"] = f"{100 * result['delta']:+.1f}"
        tags[f"{TAG}.interval_points"] = (
            f"{level:.0f}% [{100 * result['ci_low']:+.1f}, {100 * result['ci_high']:+.1f}]"
        )
        tags[f"{TAG}.multi_at_t"] = (
            f"{100 * result['challenger_multi_at_t']:.1f}% vs {100 * result['baseline_multi_at_t']:.1f}% "
            f"on {result['n_problems']} problems"
        )
    return tags


def promotion_table(result: dict) -> pl.DataFrame:
    """The decision as a one-row-per-quantity table (logged as an MLflow table artifact)."""
    keys = [
        "name", "version", "baseline", "outcome", "promoted", "champion", "challenger_multi_at_t",
        "baseline_multi_at_t", "delta", "ci_low", "ci_high", "min_delta", "alpha", "n_problems", "reason",
    ]  # fmt: skip
    return pl.DataFrame(
        {"quantity": [k for k in keys if k in result], "value": [str(result[k]) for k in keys if k in result]}
    )


def log_promotion(tracker: Tracker, result: dict) -> None:
    """This run's promotion outcome on its parent run: a tag, a table artifact, and as metrics
    ``promote.is_champion`` (every run) and, only when this run compared, ``promote.promoted`` and
    the gain with its interval; a cached re-run's version already is the champion, it compared
    nothing, and logs no 0 that would read like a failed promotion."""
    tracker.set_tags({"drift.promotion": f"{result['outcome']}: {result['reason']}"})
    metrics = {"promote.is_champion": float(result.get("champion") == result["version"])}
    if result["outcome"] != ALREADY_CHAMPION:
        metrics["promote.promoted"] = float(result["promoted"])
        metrics |= {f"promote.{k}": result[k] for k in ("delta", "ci_low", "ci_high") if k in result}
    tracker.log_metrics(tracker.run_id, metrics)
    tracker.log_table(tracker.run_id, promotion_table(result).to_pandas(), "promotion.json")
