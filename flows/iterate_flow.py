"""The ``drift-iterate`` flow: iterated DRIFT, R rounds of the ``drift`` flow in one command.

Round 1 runs the config as given. Round r+1 takes round r's trained model, as registered in the
MLflow registry (``models:/NAME/<version>``, pinned, so an alias moved meanwhile by another run
cannot change it), as both its reference model (new rollouts) and its base model (SFT starts from
it). Each round is one ``drift`` subflow run with its own MLflow parent run, registered version
and promotion decision.

Guards: ``iterate.rounds <= iterate.max_rounds``; one iterate run per registered model at a time
(a tag on the registered model names the owner; a dead owner on this host is taken over); with
``iterate.stop_on_no_promotion`` (the default) the loop stops after a round whose model the gate
did not promote. Set it to false for experiments that report every round whatever the gate says:
the next round then starts from the round's own model (the ``challenger``).

``drift run CONFIG --rounds R`` calls this flow; prefect.yaml deploys it as ``drift-iterate/iterate``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from prefect import flow, get_run_logger

from drift_core.errors import UserError
from drift_core.schemas import DriftConfig
from flows.config import ConfigError, load_config
from flows.drift_flow import drift
from flows.story import default_run_name

__all__ = ["IterateInFlight", "iterate", "next_round_overrides"]

LOCK_TAG = "drift.iterate.owner"


class IterateInFlight(UserError, RuntimeError):
    """Another iterate run of the same registered model is still running."""


def next_round_overrides(cfg: DriftConfig, summary: dict[str, Any]) -> list[str] | None:
    """Overrides that make the model of the round in ``summary`` the reference and base model of
    the next round; None when the loop stops here (the gate did not promote and
    ``iterate.stop_on_no_promotion`` is on)."""
    registered = summary.get("registered")
    if not registered:
        raise ConfigError("iterate: the round registered no model (run.register_model is off)")
    promotion = summary.get("promotion")
    promoted = bool(promotion and promotion.get("promoted"))
    if cfg.iterate.stop_on_no_promotion and not promoted:
        return None
    uri = f"models:/{registered['name']}/{registered['version']}"
    return [f"reference_model.path={uri}", f"base_model.path={uri}"]


@flow(name="drift-iterate", log_prints=True, persist_result=False)
def iterate(
    config_path: str = "configs/demo.yaml",
    overrides: list[str] | None = None,
    rounds: int | None = None,
) -> dict[str, Any]:
    """Run ``rounds`` (default ``iterate.rounds``) rounds of DRIFT, each from the last one's model."""
    overrides = list(overrides or [])
    if rounds is not None:
        overrides.append(f"iterate.rounds={rounds}")
    cfg = load_config(config_path, overrides)
    logger = get_run_logger()
    total = cfg.iterate.rounds
    summaries: list[dict[str, Any]] = []
    stopped = f"ran all {total} rounds"
    with _one_iterate_at_a_time(cfg):
        round_overrides: list[str] = []
        for r in range(1, total + 1):
            logger.info("round %d/%d of %s", r, total, cfg.registered_model)
            name = default_run_name(cfg, f"round{r}")
            summary = drift.with_options(flow_run_name=name)(
                config_path=config_path, overrides=[*overrides, *round_overrides], run_name=name
            )
            summary["round"] = r
            summaries.append(summary)
            if r == total:
                break
            nxt = next_round_overrides(cfg, summary)
            if nxt is None:
                stopped = (
                    f"stopped after round {r}: its model was not promoted (iterate.stop_on_no_promotion)"
                )
                break
            round_overrides = nxt
    logger.info("iterate %s: %s", cfg.registered_model, stopped)
    return {"rounds": summaries, "stopped": stopped, "registered_model": cfg.registered_model}


@contextlib.contextmanager
def _one_iterate_at_a_time(cfg: DriftConfig) -> Iterator[None]:
    """Hold the registered model's iterate tag for the loop's duration; refuse when a live owner
    holds it. On this host a dead owner (its pid gone) is taken over; another host's owner is
    trusted (its processes cannot be seen from here): delete the tag if that run is gone."""
    from tasks.registry import ensure_registered_model, registry_client
    from tasks.tracking import process_alive

    client = registry_client(cfg.run.tracking_uri)
    name = cfg.registered_model
    ensure_registered_model(client, name)
    held = client.get_registered_model(name).tags.get(LOCK_TAG)
    if held:
        owner = json.loads(held)
        live = owner.get("host") != socket.gethostname() or process_alive(int(owner.get("pid", 0)))
        if live:
            raise IterateInFlight(
                f"an iterate run of {name} is already in flight ({held}); wait for it, or if it is gone "
                f"delete the registered model tag {LOCK_TAG!r} of {name} in MLflow"
            )
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run

        me["flow_run_id"] = str(flow_run.id) if flow_run.id else None
    client.set_registered_model_tag(name, LOCK_TAG, json.dumps(me, sort_keys=True))
    try:
        yield
    finally:
        client.delete_registered_model_tag(name, LOCK_TAG)
