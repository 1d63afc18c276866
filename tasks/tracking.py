"""MLflow tracking: one parent run per flow run, one nested run per stage.

Uses ``MlflowClient`` with explicit run ids rather than the fluent ``mlflow.start_run`` stack, which
is thread-local and would mis-nest runs logged from Prefect's worker threads. Every parent run logs
the same flattened config keys, so runs compare column by column in the MLflow UI. Values that look
like credentials (URLs with a password, keys named *token*/*secret*/*password*) are redacted, and
nothing is read from the environment.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drift_core.schemas import DriftConfig, flatten

if TYPE_CHECKING:
    from tasks.store import Manifest

_SECRET_ENDINGS = ("token", "secret", "password", "passwd", "apikey", "credential", "credentials")
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def _is_secret_key(key: str) -> bool:
    """A key that names a credential: a word of it ends in token/secret/password/... (``hf_token``,
    ``accessToken``, ``api_key``), but ``max_new_tokens`` or ``tokenizer`` do not."""
    words = [w for w in re.split(r"[._\-\s/]+", key.lower()) if w]
    pairs = ("".join(p) for p in zip(words, words[1:], strict=False))
    return any(w.endswith(_SECRET_ENDINGS) for w in words) or any(p == "apikey" for p in pairs)


def redact(key: str, value: Any) -> Any:
    """``***`` for a value whose key names a secret; credentials in URLs (``user:pw@``) masked;
    dicts and lists redacted all the way down."""
    if _is_secret_key(key):
        return "***"
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub("***@", value)
    if isinstance(value, dict):
        return {k: redact(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(key, v) for v in value]
    return value


def local_tracking_uri(uri: str) -> str:
    """Make a relative sqlite path absolute and its directory present."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///") :]).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if uri.startswith("sqlite:////"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def open_tracking_store(uri: str) -> None:
    """Import MLflow and open (for a new database: create) the tracking store now. MLflow keeps one
    store per URI, so the run's :class:`Tracker` reuses it; the CLI calls this while other
    start-up work (the temporary Prefect server) proceeds in parallel."""
    from mlflow.tracking import MlflowClient

    # A new SQLite store logs "Creating initial MLflow database tables..." at INFO on the first
    # run only: the terminal of a run shows drift's output, not a first-use notice.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    MlflowClient(tracking_uri=local_tracking_uri(uri))


class Tracker:
    """Thin wrapper over MlflowClient for drift's run layout."""

    def __init__(
        self,
        cfg: DriftConfig,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        omit_sections: tuple[str, ...] = (),
    ):
        """``omit_sections``: config sections this kind of run does not use (``online`` for a DRIFT
        run), left out of its params so that no unused setting looks like one that mattered."""
        from mlflow.tracking import MlflowClient

        self.uri = local_tracking_uri(cfg.run.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(cfg.run.experiment)
        if experiment is None:
            artifact_location = None
            if self.uri.startswith("sqlite:"):  # keep artifacts beside the local database
                artifact_location = (Path(self.uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(
                cfg.run.experiment,
                artifact_location=artifact_location,
                tags={EXPERIMENT_KIND: "custom_model_development"},  # MLflow 3's UI: open on runs
            )
        else:
            experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND not in experiment.tags:  # made before drift set it
                self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, "custom_model_development")
        self.experiment_id = experiment_id
        self.closed_orphans = close_orphaned_runs(self.client, experiment_id)
        run = self.client.create_run(
            experiment_id,
            run_name=run_name or cfg.run.name,
            tags={**(tags or {}), **_owner_tags(), **source_tags()},
        )
        self.run_id = run.info.run_id
        self.stage_runs: dict[str, str] = {}
        params = {k: redact(k, v) for k, v in flatten(cfg).items() if k.split(".", 1)[0] not in omit_sections}
        self.log_params(self.run_id, params)
        self.log_dict(self.run_id, cfg.model_dump(mode="json"), "config.json")

    # ---------------------------------------------------------------- primitives

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        self.log_metric_steps(run_id, [(k, v, step) for k, v in metrics.items()])

    def log_metric_steps(
        self, run_id: str, rows: list[tuple[str, Any, int]], model_id: str | None = None
    ) -> None:
        """``(key, value, step)`` rows in as few writes as possible (one per 500 rows: each write is
        a database transaction); values that are not finite numbers are skipped. ``model_id``: the
        metrics are also the logged model's (shown on its page)."""
        from mlflow.entities import Metric

        now = _now_ms()
        items = [
            Metric(k, float(v), now, step, model_id=model_id)
            for k, v, step in rows
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def log_dict(self, run_id: str, obj: Any, name: str) -> None:
        """Log ``obj`` as a JSON artifact, redacted (the config and summary hold URIs)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(redact("", obj), indent=2, sort_keys=True, default=str))
            self.client.log_artifact(run_id, str(path))

    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)

    # ---------------------------------------------------------------- drift's layout

    def open_stage(self, name: str) -> str:
        """Open the nested run of one stage when the stage starts, so its duration is the stage's."""
        if name in self.stage_runs:
            return self.stage_runs[name]
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={"mlflow.parentRunId": self.run_id, "drift.stage": name, **_owner_tags(), **source_tags()},
        )
        self.stage_runs[name] = run.info.run_id
        return run.info.run_id

    def stage(self, name: str, params: dict[str, Any] | None = None, cached: bool = False) -> str:
        """The nested run of one stage (opened now unless ``open_stage`` did at its start), tagged
        with whether it was served from cache."""
        run_id = self.open_stage(name)
        self.client.set_tag(run_id, "drift.cached", str(cached).lower())
        if params:
            self.log_params(run_id, {k: redact(k, v) for k, v in params.items()})
        return run_id

    def record_stage(
        self,
        name: str,
        manifest: Manifest,
        params: dict[str, Any],
        *,
        cached: bool,
        seconds: float,
        plots_dir: Path | None = None,
        histogram: bool = False,
        loss_history: bool = False,
        eval_metrics: bool = False,
        prefix: str | None = None,
        files: tuple[Path, ...] = (),
    ) -> str:
        """A stage's nested run, filled and ended. Its params carry their section's prefix
        (``weights.beta``, ``rollout.artifact``, ``eval.system``: the names the parent's config params
        use); its metrics carry the same names on the stage run and on the parent run,
        ``<prefix>.<metric>`` (default prefix: the stage name), so one quantity has one name
        everywhere. The loss is a series by step with its tail mean beside it; per-turn values are one
        metric per turn (``arith.trained.multi_at_t2``)."""
        prefix = prefix or name
        section = stage_section(name)
        params = {**params, "artifact": manifest.uri, "sha256": manifest.sha256}
        run_id = self.stage(
            name, params={k if "." in k else f"{section}.{k}": v for k, v in params.items()}, cached=cached
        )
        meta = manifest.meta
        scalars = {
            k: v
            for k, v in meta.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in _NOT_METRICS
        }
        if eval_metrics:
            scalars.pop("n_problems", None)  # a count, logged as the stage's rows
        if manifest.rows is not None:
            scalars["rows"] = manifest.rows
        scalars["stage_seconds"] = seconds
        # one write per run: every metric write is a database transaction
        rows = [(f"{prefix}.{k}", v, 0) for k, v in scalars.items()]
        if histogram and "histogram" in meta:
            self._log_weight_histogram(run_id, meta, params.get("beta"), plots_dir)
        if loss_history and (history := meta.get("loss_history", [])):
            for step, loss, lr in history:
                rows += [(f"{prefix}.loss", loss, int(step)), (f"{prefix}.lr", lr, int(step))]
            tail = [loss for _step, loss, _lr in history[-LOSS_TAIL_STEPS:]]
            rows.append((f"{prefix}.loss_tail_mean", sum(tail) / len(tail), 0))
            self.log_params(run_id, {f"{section}.loss_tail_steps": len(tail)})
        if eval_metrics:
            rows += per_turn_rows(prefix, meta)
        self.log_metric_steps(run_id, rows)
        self.log_metric_steps(self.run_id, rows)
        for path in files:
            self.log_file(run_id, path)
        self.log_dict(run_id, manifest.model_dump(mode="json"), "manifest.json")
        self.end_stage(name)
        return run_id

    def _log_weight_histogram(self, run_id: str, meta: dict, beta: Any, plots_dir: Path | None) -> None:
        """The weights stage's histogram, on its stage run and on the parent run."""
        from tasks.plots import plot_file, plot_weight_histogram

        hist = meta["histogram"]
        notes = {k: meta.get(k) for k in ("ess_overall", "max_weight")}
        notes["beta"] = beta
        draw = lambda path: plot_weight_histogram(hist["counts"], hist["edges"], path, **notes)  # noqa: E731
        with plot_file(plots_dir, "weights.png", draw, {"hist": hist, "notes": notes}) as png:
            self.log_file(run_id, png)
            self.log_file(self.run_id, png)

    def set_tags(self, tags: dict[str, Any], run_id: str | None = None) -> None:
        """Tags on ``run_id`` (default: the parent run)."""
        for key, value in tags.items():
            self.client.set_tag(run_id or self.run_id, key, value)

    def get_run(self, run_id: str):
        """Any run of this tracking store, as MLflow returns it (raises when there is no such run)."""
        return self.client.get_run(run_id)

    def run_name(self, run_id: str | None = None) -> str:
        return self.client.get_run(run_id or self.run_id).info.run_name

    def log_inputs(self, run_id: str, datasets: list) -> None:
        """Datasets a run used (the MLflow UI's "Datasets used")."""
        self.client.log_inputs(run_id, datasets)

    def log_table(self, run_id: str, table: Any, name: str) -> None:
        """A pandas table as a run's table artifact."""
        self.client.log_table(run_id, data=table, artifact_file=name)

    def log_artifacts(self, run_id: str, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(directory), artifact_path=artifact_path)

    def model_metric_keys(self, model_id: str) -> set[str]:
        """The metric names a logged model already has."""
        return {m.key for m in self.client.get_logged_model(model_id).metrics or []}

    def ui_url(self, run_id: str | None = None) -> str:
        """The run's page in the MLflow UI, opening on runs (``run_url``)."""
        return run_url(self.uri, self.experiment_id, run_id or self.run_id)

    def end_stage(self, name: str, status: str = "FINISHED") -> None:
        if name in self.stage_runs:
            self.client.set_terminated(self.stage_runs[name], status=status)

    def finish(self, status: str = "FINISHED") -> None:
        for _name, run_id in self.stage_runs.items():
            run = self.client.get_run(run_id)
            if run.info.status == "RUNNING":
                self.client.set_terminated(run_id, status=status)
        self.client.set_terminated(self.run_id, status=status)


#: trailing steps of the loss series whose mean is the run's train-loss summary
LOSS_TAIL_STEPS = 10
#: per-turn evaluation quantities, logged as ``<prefix>.<name>_t<t>`` (one name per turn)
PER_TURN = ("multi_at", "accuracy_at_turn", "correction_rate")
#: manifest meta that is not a metric of its stage (its loss curve is logged by step instead)
_NOT_METRICS = {"final_loss", "max_turns"}


def stage_section(name: str) -> str:
    """The config section a stage's params belong to: ``eval`` for the evaluate stages, else the
    stage itself (``rollout``, ``weights``, ``train``, ``ingest``)."""
    return "eval" if name.startswith("evaluate") else name


def per_turn_rows(prefix: str, meta: dict) -> list[tuple[str, Any, int]]:
    """``(<prefix>.<quantity>_t<t>, value, 0)`` for each per-turn evaluation quantity: a per-turn
    value has the turn in its name, so no metric's "last value" means a different turn per run."""
    return [
        (f"{prefix}.{key}_t{t}", value, 0)
        for key in PER_TURN
        for t, value in enumerate(meta.get(key, []), start=1)
        if value is not None
    ]


EXPERIMENT_KIND = "mlflow.experimentKind"
UI_ENV = "DRIFT_MLFLOW_UI_URL"  # where `mlflow ui` serves a local store (default: its own default)


def mlflow_ui_base(tracking_uri: str) -> str:
    """The MLflow UI's address: the tracking server's own (credentials removed), else
    ``$DRIFT_MLFLOW_UI_URL``, else ``http://127.0.0.1:5000`` (``mlflow ui``'s default)."""
    if tracking_uri.startswith(("http://", "https://")):
        return _URL_CREDENTIALS.sub("", tracking_uri).rstrip("/")
    return os.environ.get(UI_ENV, "http://127.0.0.1:5000").rstrip("/")


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI. MLflow 3 opens experiments on its GenAI pages unless its
    global "GenAI | Model training" switch (kept in the browser) says otherwise; the
    ``workflowType=machine_learning`` parameter sets it, so the UI lands on runs."""
    return f"{mlflow_ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def source_tags() -> dict[str, str]:
    """The code version a run ran: the git commit of drift's checkout (MLflow's source version),
    marked dirty when the checkout has uncommitted changes; empty outside a git checkout."""
    global _SOURCE_TAGS
    if _SOURCE_TAGS is None:
        import subprocess

        root = Path(__file__).resolve().parents[1]
        tags = {"mlflow.source.name": str(root), "mlflow.source.type": "LOCAL"}
        try:
            git = ["git", "-C", str(root)]
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            if commit.returncode == 0:
                tags["mlflow.source.git.commit"] = commit.stdout.strip()
                dirty = subprocess.run(
                    [*git, "status", "--porcelain", "--untracked-files=no"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                tags["drift.git_dirty"] = str(bool(dirty.stdout.strip())).lower()
        except (OSError, subprocess.SubprocessError):
            pass
        _SOURCE_TAGS = tags
    return dict(_SOURCE_TAGS)


_SOURCE_TAGS: dict[str, str] | None = None


def _owner_tags() -> dict[str, str]:
    """Which process owns a run, so that a later run can tell a live run from a killed one."""
    return {"drift.host": socket.gethostname(), "drift.pid": str(os.getpid())}


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def close_orphaned_runs(client, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this experiment whose owning process on this host is gone.

    A ``drift run`` killed with SIGKILL (or by the OOM killer) cannot end its MLflow runs, which
    would otherwise show as running forever in the UI. Only runs started on this host are judged
    (another host's processes cannot be seen from here); a reused pid leaves a run as it is."""
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`drift.host` = '{host}'",
        max_results=1000,
    )
    closed = []
    for run in runs:
        pid = run.data.tags.get("drift.pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            client.set_tag(run.info.run_id, "drift.closed_reason", f"process {pid} on {host} is gone")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
