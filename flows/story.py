"""What a run tells the people who open it: its name, URLs into the MLflow and Prefect UIs, the parent
run's description, its cache tags, one log line per stage, and the Prefect artifacts (a link to the
MLflow run, the summary).

MLflow 3's UI opens an experiment on its GenAI pages unless told otherwise; the switch is a global
"GenAI | Model training" setting the UI keeps in the browser and takes from a ``workflowType`` URL
parameter, so every URL drift prints carries ``workflowType=machine_learning`` and lands on runs.
A local store (``sqlite:///...``) has no web address of its own: its URLs assume ``mlflow ui`` on
``$DRIFT_MLFLOW_UI_URL`` (default ``http://127.0.0.1:5000``, ``mlflow ui``'s own default).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from drift_core.schemas import DriftConfig
from tasks.store import Manifest
from tasks.tracking import UI_ENV, Tracker, mlflow_ui_base, redact, run_url

if TYPE_CHECKING:
    from flows.stages import StageRunner
    from tasks.registry import RegisteredVersion

__all__ = [
    "UI_ENV",
    "artifact_key",
    "cache_tags",
    "default_run_name",
    "describe_run",
    "link_mlflow_run",
    "mlflow_ui_base",
    "per_turn_markdown",
    "prefect_flow_run_url",
    "publish_summary",
    "run_tags",
    "run_url",
    "tell_the_story",
    "ui_command",
]


def ui_command(tracking_uri: str) -> str | None:
    """How to start the UI for a local store (None for a server, which has its own)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    base = mlflow_ui_base(tracking_uri)
    port = base.rsplit(":", 1)[-1] if base.count(":") == 2 else "5000"
    return f"mlflow ui --backend-store-uri {redact('uri', tracking_uri)} --host 127.0.0.1 --port {port}"


def prefect_flow_run_url(flow_run_id: str | None) -> str | None:
    """The flow run's page in the Prefect UI, when one is configured (``PREFECT_UI_URL``, or
    derived from ``PREFECT_API_URL``); the CLI's temporary server has none worth linking."""
    if not flow_run_id:
        return None
    from flows import prefect_server

    server = prefect_server._server  # the CLI's temporary server: gone when the command ends
    if server is not None and server.proc is not None:
        return None
    try:
        from prefect.utilities.urls import url_for

        return url_for("flow-run", obj_id=flow_run_id)
    except Exception:
        return None


def _pct(value: Any) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def per_turn_markdown(results: dict[str, Manifest]) -> str:
    """The per-turn table (multi@t of each system) as markdown: ``| turn | reference | trained |``."""
    systems = list(results)
    turns = max((len(m.meta.get("multi_at", [])) for m in results.values()), default=0)
    n = max((int(m.meta.get("n_problems") or 0) for m in results.values()), default=0)
    lines = [
        "| turn | " + " | ".join(f"{s} multi@t" for s in systems) + " |",
        "|---:|" + "---:|" * len(systems),
    ]
    for t in range(turns):
        cells = []
        for s in systems:
            curve = results[s].meta.get("multi_at", [])
            cells.append(_pct(curve[t]) if t < len(curve) else "")
        lines.append(f"| {t + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\n{n} problems, greedy, cumulative accuracy within t turns." if n else "")


def cache_tags(states: dict[str, list[str]]) -> dict[str, str]:
    """``drift.cached_stages`` / ``drift.computed_stages`` (comma-separated stage labels) and
    ``drift.cache``: ``all cached``, ``none cached`` or ``3 of 11 stages cached``."""
    cached = [label for label, ss in states.items() if ss and all(s == "Cached" for s in ss)]
    computed = [label for label in states if label not in cached]
    if not computed:
        summary = "all cached"
    elif not cached:
        summary = "none cached"
    else:
        summary = f"{len(cached)} of {len(states)} stages cached"
    return {
        "drift.cache": summary,
        "drift.cached_stages": ", ".join(cached) or "-",
        "drift.computed_stages": ", ".join(computed) or "-",
    }


def describe_run(
    title: str,
    results: dict[str, Manifest],
    benchmark: str,
    states: dict[str, list[str]],
    seconds: dict[str, float],
    links: dict[str, str | None],
) -> str:
    """The parent run's description (markdown, the run page's "Description"): what the run is, its
    cache status, the per-turn table of the primary benchmark, and links."""
    tags = cache_tags(states)
    parts = [
        f"**{title}**: {tags['drift.cache']} (computed: {tags['drift.computed_stages']}).",
        "",
        f"**{benchmark}**",
        "",
        per_turn_markdown(results),
        "",
    ]
    links_md = [f"* {label}: {target}" for label, target in links.items() if target]
    if links_md:
        parts += ["**Links**", "", *links_md, ""]
    parts += ["| stage | state | seconds |", "|---|---|---:|"]
    for label, ss in states.items():
        state = "Cached" if ss and all(s == "Cached" for s in ss) else ", ".join(sorted(set(ss)))
        parts.append(f"| {label} | {state} | {seconds.get(label, 0.0):.1f} |")
    return "\n".join(parts)


def run_tags() -> dict[str, str]:
    """A drift flow's parent-run tags: the flow, and the Prefect flow run behind it when there is one."""
    tags = {"drift.flow": "drift"}
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            tags["prefect.flow_run_id"] = str(flow_run.id)
            tags["prefect.flow_run_name"] = str(flow_run.name)
    except Exception:
        pass
    return tags


def default_run_name(cfg: DriftConfig, suffix: str = "") -> str:
    """``<run.name>[-<suffix>]-<UTC time>``: parent runs tell apart in MLflow's chart legends."""
    stamp = time.strftime("%m%d-%H%M%S", time.gmtime())  # short: the MLflow runs table cuts names
    return "-".join(p for p in (cfg.run.name, suffix, stamp) if p)


def artifact_key(run_name: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes): ``drift-<run.name>-<what>``, so
    each config's runs collect under one key in the Prefect UI's Artifacts page."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-") or "run"
    return f"drift-{slug}-{what}"


def link_mlflow_run(tracker: Tracker, key_name: str) -> None:
    """A keyed Prefect link artifact on the flow run pointing at its MLflow run page (for a local
    store: the address ``mlflow ui`` serves, see ``flows.story``); the MLflow run already carries the
    flow run id (tag ``prefect.flow_run_id``)."""
    try:
        from prefect.artifacts import create_link_artifact
        from prefect.runtime import flow_run

        if not flow_run.id:
            return
        create_link_artifact(
            key=artifact_key(key_name, "mlflow-run"),
            link=tracker.ui_url(),
            link_text=f"MLflow run {tracker.run_id}",
            description=_ui_note(tracker),
        )
    except Exception as exc:  # a missing link must never fail a run
        from prefect import get_run_logger

        get_run_logger().warning("could not create the MLflow link artifact: %s", exc)


def _ui_note(tracker: Tracker) -> str:
    from flows.story import ui_command

    command = ui_command(tracker.uri)
    where = f"experiment {tracker.experiment_id}, run {tracker.run_id}"
    return f"MLflow {where}" + (f"; start the UI with `{command}`" if command else "")


def publish_summary(tracker: Tracker, key_name: str, description: str) -> None:
    """The parent run's description as a keyed Prefect markdown artifact (the same story in both UIs)."""
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.runtime import flow_run

        if not flow_run.id:
            return
        create_markdown_artifact(
            key=artifact_key(key_name, "summary"),
            markdown=f"[MLflow run {tracker.run_id}]({tracker.ui_url()})\n\n{description}",
            description=_ui_note(tracker),
        )
    except Exception as exc:  # a missing summary must never fail a run
        from prefect import get_run_logger

        get_run_logger().warning("could not create the summary artifact: %s", exc)


def tell_the_story(
    tracker: Tracker,
    stages: StageRunner,
    config_name: str,
    results: dict[str, Manifest],
    benchmark: str,
    registered: RegisteredVersion | None,
    rollouts_run: str,
) -> None:
    """The parent run explains itself: cache tags, a description (per-turn table, stages, links),
    and the same text as the flow run's keyed Prefect artifact."""
    tracker.set_tags(cache_tags(stages.states))
    experiment = tracker.experiment_id
    links = {
        "Prefect flow run": prefect_flow_run_url(run_tags().get("prefect.flow_run_id")),
        "registered version": registered
        and f"[{registered.name} version {registered.version}](#/models/{registered.name}/versions/{registered.version})",
        "rollouts": rollouts_run
        and f"[run {rollouts_run}, `rollouts/`](#/experiments/{experiment}/runs/{rollouts_run}/artifacts/rollouts)",
    }
    text = describe_run(tracker.run_name(), results, benchmark, stages.states, stages.timings, links)
    tracker.set_tags({"mlflow.note.content": text})
    publish_summary(tracker, config_name, text)
