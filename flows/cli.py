"""The ``drift`` command.

    drift run CONFIG [--set key=value ...]     run the pipeline in-process (Prefect flow ``drift``)
    drift run CONFIG --rounds R [--set ...]    iterated DRIFT, R rounds (Prefect flow ``drift-iterate``)
    drift eval --model DIR [--data SOURCE] [--config CONFIG] [--set ...]
                                               multi-turn evaluation of any model on every
                                               benchmark of the config's eval suite
    drift online CONFIG [--set key=value ...]  online multi-turn RL baseline (TRL GRPO), same protocol
                                               and reward; prints the MLflow run id and a JSON line
    drift weights INPUT --gamma G --beta B [--lambda L] --output OUT
                                               returns and weights for a trajectories file

Errors in what the user gave or chose (``drift_core.errors.UserError``: config, data, model path,
store, flags, an engine that cannot run here) end with a one-paragraph message and exit code 2;
``--debug`` shows the traceback. Any other exception is a bug in drift: its traceback, then a line
asking to report it, exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Any

from drift_core.errors import InputError, UserError
from flows import cli_weights
from flows.prefect_server import start_if_needed, use_temporary_server

EXIT_USAGE = 2
EXIT_BUG = 1
BUG_LINE = "this is a bug in drift: please report it with this traceback"


def format_results(summary: dict[str, Any]) -> str:
    """One row per benchmark: problems, verifier, the question-blind ceiling at T (when the summary
    has it: ``ceilings``), then per system (reference and trained side by side) multi@1..T, corr@T
    (the correction rate at the last turn) and fixed (multi@T - multi@1: solved after feedback), in
    percent. Under the table, per benchmark, what its blind@T means (``ceiling_notes``: a guessing
    game's differs from arithmetic's)."""
    suite = summary.get("suite") or ({"eval": summary["eval"]} if summary.get("eval") else {})
    if not suite:
        return "(no evaluation)"
    verifiers = summary.get("verifiers", {})
    ceilings = summary.get("ceilings", {})
    systems = list(dict.fromkeys(s for per in suite.values() for s in per))
    turns = max(len(m.get("multi_at", [])) for per in suite.values() for m in per.values())
    cols = [f"multi@{t}" for t in range(1, turns + 1)] + [f"corr@{turns}", "fixed"]
    group = "  ".join(f"{c:>7}" for c in cols)
    width = max(12, *(len(b) for b in suite))
    lead = f"{'benchmark':<{width}} {'n':>5}  {'verifier':<9} {f'blind@{turns}':>8}"
    head = lead + "".join(f"  | {g}" for g in [group] * len(systems))
    names = " " * len(lead) + "".join(f"  | {s:<{len(group)}}" for s in systems)
    lines = [names.rstrip(), head, "-" * len(head)]
    for bench, per in suite.items():
        n = next((m.get("n_problems") for m in per.values()), None)
        row = f"{bench:<{width}} {n if n is not None else '-':>5}  {verifiers.get(bench, '-'):<9}"
        row += f" {_pct(ceilings.get(bench)):>8}"
        for system in systems:
            m = per.get(system, {})
            multi = list(m.get("multi_at", []))
            fixed = multi[-1] - multi[0] if multi else None
            multi += [None] * (turns - len(multi))
            corr = (m.get("correction_rate") or [None] * turns)[-1]
            row += "  | " + "  ".join(f"{_pct(v):>7}" for v in [*multi, corr, fixed])
        lines.append(row)
    for bench, per in suite.items():
        for system, m in per.items():
            lines.append(
                f"{bench} / {system}: mean turns {m.get('mean_turns_used', 0):.2f}, "
                f"repeated answers {100 * m.get('repeated_answer_share', 0):.1f}%"
            )
    for bench, note in summary.get("ceiling_notes", {}).items():
        lines.append(f"{bench}: {note}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _cmd_run(args: argparse.Namespace) -> int:
    from flows.config import load_config

    overrides = [*args.set, *([f"iterate.rounds={args.rounds}"] if args.rounds else [])]
    cfg = load_config(args.config, overrides)  # validate before importing the pipeline or any compute
    if cfg.iterate.rounds > 1 and args.rollouts_from:
        raise InputError("--rollouts-from re-uses one run's rollouts; it cannot be combined with --rounds")
    _check_engine(
        cfg, {"reference_model.path": cfg.reference_model.path, "base_model.path": cfg.train_model.path}
    )
    from tasks.golds import check_eval_suite, check_training_data

    rollout_kind = None  # the training data read and its golds checked: a bad row fails now
    if not args.rollouts_from:
        rollout_kind = check_training_data(cfg, os.getcwd())
    verifiers = check_eval_suite(cfg, os.getcwd())  # every eval gold readable by its verifier, in seconds
    _print_protocol(cfg, verifiers, rollout=not args.rollouts_from, rollout_verifier=rollout_kind)
    server = start_if_needed()  # starts while the pipeline's modules and the MLflow store load
    if cfg.iterate.rounds > 1:
        from flows.iterate_flow import iterate as flow
    else:
        from flows.drift_flow import drift as flow
    from tasks.tracking import open_tracking_store

    open_tracking_store(cfg.run.tracking_uri)  # while the temporary Prefect server starts

    if cfg.run.task_runner == "dask":
        from flows.runners import task_runner_for

        flow = flow.with_options(task_runner=task_runner_for(cfg))
    from flows.orphans import crash_orphaned_flow_runs, owned_by_this_process

    with use_temporary_server(server):
        crash_orphaned_flow_runs()
        with owned_by_this_process():
            if cfg.iterate.rounds > 1:
                result = flow(config_path=args.config, overrides=overrides)
            else:
                summary = flow(config_path=args.config, overrides=args.set, rollouts_from=_rollouts_ref(args))
                result = {"rounds": [summary]}
    for summary in result["rounds"]:
        if cfg.iterate.rounds > 1:
            print(f"\n=== round {summary['round']} of {cfg.iterate.rounds} ===")
        _print_summary(summary)
    if "stopped" in result:
        print(f"\niterate {result['registered_model']}: {result['stopped']}")
    return 0


def reading_guide(summary: dict[str, Any]) -> str:
    """Two lines under the table for someone who has not read the docs: what the columns mean,
    and where the rest of the run is (its MLflow run, the rollouts it trained on)."""
    turns = max(
        (len(m.get("multi_at", [])) for per in summary.get("suite", {}).values() for m in per.values()),
        default=1,
    )
    meaning = (
        f"reading it: multi@t = % of the test problems solved within t turns; corr@{turns} = % of those "
        f"still wrong before turn {turns} that it fixed; fixed = multi@{turns} - multi@1, solved only "
        f"after feedback; blind@{turns} = the best score of answers that ignore the question."
    )
    where = "next: the MLflow run below holds every stage's run, the weights and the plots"
    if uri := summary.get("rollouts_uri"):
        where += f"; the rollouts trained on: {uri}"
    return f"{meaning}\n{where}."


def _print_summary(summary: dict[str, Any]) -> None:
    print()
    print(format_results(summary))
    print(reading_guide(summary))
    print()
    print("stage states:", json.dumps(summary["stage_states"]))
    print("stage seconds:", json.dumps(summary["stage_seconds"]))
    print(f"trained model: {summary['model_dir']}")
    if registered := summary.get("registered"):
        print(
            f"registered model: {registered['uri']}{'' if registered['created'] else ' (already registered)'}"
        )
    if promotion := summary.get("promotion"):
        print(format_promotion(promotion))
    _print_mlflow(summary)


def format_promotion(result: dict) -> str:
    """The promotion decision as the console shows it: outcome, the reason, and the numbers."""
    head = f"promotion: {result['name']} version {result['version']} "
    if result.get("outcome") == "already champion":
        head += "already is the champion (nothing to compare)"
    elif result["promoted"]:
        head += "PROMOTED to champion"
    else:
        head += f"not promoted (champion: {result.get('champion')})"
    lines = [head, f"  vs {result['baseline']}: {result['reason']}"]
    if "delta" in result:
        lines.append(
            f"  multi@T {100 * result['challenger_multi_at_t']:.1f} vs {100 * result['baseline_multi_at_t']:.1f} "
            f"on {result['n_problems']} problems; delta {100 * result['delta']:+.1f} pts, "
            f"{100 * (1 - result['alpha']):.0f}% interval [{100 * result['ci_low']:+.1f}, {100 * result['ci_high']:+.1f}]"
        )
    return "\n".join(lines)


def _print_mlflow(summary: dict[str, Any]) -> None:
    """The run's MLflow URL (opening on runs) and, for a local store, the command that serves it;
    the run id last (scripts and tests read it)."""
    from flows.story import ui_command

    if url := summary.get("mlflow_url"):
        print(f"MLflow run: {url}")
        if command := ui_command(summary["tracking_uri"]):  # no password: redacted
            print(f"  (start the MLflow UI first: {command})")
    print(f"MLflow run id: {summary['mlflow_run_id']}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from flows.config import load_config

    overrides = list(args.set)
    if args.data:  # one data set instead of the config's eval data or suite
        overrides += ["eval.suite=null", f"eval.data.source={args.data}"]
    cfg = load_config(args.config, overrides)  # no --config: the schema's defaults
    _check_engine(cfg, {"--model": args.model})
    from tasks.golds import check_eval_suite

    verifiers = check_eval_suite(cfg, os.getcwd())  # every gold readable by its verifier, before Prefect
    _print_protocol(cfg, verifiers, rollout=False)
    server = start_if_needed()
    from flows.eval_flow import evaluate_model
    from flows.orphans import crash_orphaned_flow_runs, owned_by_this_process
    from tasks.tracking import open_tracking_store

    open_tracking_store(cfg.run.tracking_uri)  # while the temporary Prefect server starts
    with use_temporary_server(server):
        crash_orphaned_flow_runs()
        with owned_by_this_process():
            summary = evaluate_model(model=args.model, config_path=args.config, overrides=overrides)
    print()
    print(format_results(summary))
    print(reading_guide(summary))
    _print_mlflow(summary)
    return 0


def _check_engine(cfg, models: dict[str, str]) -> None:
    """The engine installed and able to run ``models`` ({flag or key: reference}), in milliseconds."""
    from tasks.engines.preflight import check_engine

    check_engine(cfg.engine, models)


def _print_protocol(
    cfg, verifiers: dict[str, str], rollout: bool, rollout_verifier: str | None = None
) -> None:
    """The effective protocol, before anything generates (the flow logs it as protocol.txt)."""
    from flows.evaluation import protocol_block

    print(protocol_block(cfg, verifiers, rollout=rollout, rollout_verifier=rollout_verifier), flush=True)


def _cmd_online(args: argparse.Namespace) -> int:
    from flows.config import load_config

    cfg = load_config(args.config, args.set)
    from tasks.online_rl import train_online

    result = train_online(cfg)
    note = " (finished earlier: cached result)" if result.cached else ""
    print(f"trained model: {result.model_dir}{note}")
    _print_mlflow(_online_urls(cfg.run.tracking_uri, result.mlflow_run_id))
    print(
        json.dumps(result.model_dump(include={"model_dir", "generated_tokens", "optimizer_steps", "wall_s"}))
    )
    return 0


def _online_urls(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """What ``_print_mlflow`` needs for an online RL run: its experiment is looked up by run id."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import local_tracking_uri, run_url

    uri = local_tracking_uri(tracking_uri)
    experiment = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
    return {"mlflow_run_id": run_id, "mlflow_url": run_url(uri, experiment, run_id), "tracking_uri": uri}


def _rollouts_ref(args: argparse.Namespace) -> str | None:
    """``--rollouts-from`` as the flow gets it: a file given by a relative path made absolute."""
    ref = args.rollouts_from
    return str(Path(ref).resolve()) if ref and Path(ref).is_file() else ref


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drift", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline from a YAML config")
    run.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument(
        "--rollouts-from",
        default=None,
        help="re-use rollouts: an MLflow run id, a rollout manifest .json, or rollouts in the DRIFT "
        "reference scripts' JSONL (.jsonl: re-weighted, trained and evaluated by drift)",
    )
    run.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="iterated DRIFT: R rounds, each from the last round's model (flow drift-iterate; "
        "iterate.* settings in the config)",
    )
    run.set_defaults(func=_cmd_run)

    ev = sub.add_parser("eval", help="evaluate a model directory with the multi-turn protocol")
    ev.add_argument(
        "--model", required=True, help="model directory, hub id, builtin:... or models:/name@alias"
    )
    ev.add_argument("--data", default=None, help="eval source (builtin:gsm8k, a file, hf:...)")
    ev.add_argument(
        "--config",
        default=None,
        help="YAML config with the protocol, engine and eval settings (default: the schema's "
        "defaults: no task-specific system prompt, verifier auto, its token budget)",
    )
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.set_defaults(func=_cmd_eval)

    online = sub.add_parser(
        "online", help="online multi-turn RL baseline (TRL GRPO) on the config's data, protocol and reward"
    )
    online.add_argument("config", help="YAML config; its online: section sets the GRPO run")
    online.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    online.set_defaults(func=_cmd_online)

    cli_weights.add_weights_parser(sub)
    return parser


# In-process runs without PREFECT_API_URL start a temporary local API server (flows.prefect_server);
# on a busy 2-core machine it can take longer than Prefect's default 20 s to come up.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Flow and task run logs reach the Prefect server (and its UI) at INFO; the terminal shows
    # warnings and errors only: the command prints the results table and the run ids itself.
    "PREFECT_LOGGING_LEVEL": "INFO",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    # MLflow's usage telemetry posts to the internet from a thread that exit waits for (seconds
    # where there is no network); a pipeline run sends nothing it was not asked to.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # transformers' "Loading weights" / "Writing model shards" bars (they follow the hub's switch,
    # read at import, so launched trainers and pool workers inherit it): drift shows its own
    # progress per stage, and a first run's terminal is not a wall of third-party bars.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # vLLM's start-up logs (Triton without a CPU backend, NUMA binding, chunked prefill) and
    # torch's C++ warnings from its engine process: errors only on the terminal, a first demo run
    # is not twenty lines of another library's notes. Set either variable to see them.
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
}


class _RunErrorsReportedOnce(logging.Filter):
    """Without ``--debug``, the exception that ends a run is reported once, by ``main`` (a paragraph
    for a user error, the traceback and the bug line otherwise). Prefect's console copies of it, the ERROR
    records of the task and flow run loggers with their tracebacks, are dropped; the API handler
    still sends them to the Prefect server, where the UI shows them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or not record.name.startswith(
            ("prefect.flow_runs", "prefect.task_runs")
        )


@contextlib.contextmanager
def _quiet_run_errors(debug: bool):
    """Attach ``_RunErrorsReportedOnce`` to the root logger's handlers (Prefect's console handler)."""
    if debug:
        yield
        return
    handlers = list(logging.getLogger().handlers)
    log_filter = _RunErrorsReportedOnce()
    for handler in handlers:
        handler.addFilter(log_filter)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(log_filter)


def main(argv: list[str] | None = None) -> int:
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # vLLM logs its first warnings while importing, before it configures its loggers: they would
    # reach the root logger (and Prefect's console handler) whatever VLLM_LOGGING_LEVEL says
    with contextlib.suppress(ValueError):  # a level name logging does not know: vLLM's to report
        logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        args.func = cli_weights.run
    try:
        if args.command in ("run", "eval"):
            from prefect.logging.configuration import ensure_logging_setup

            ensure_logging_setup()  # Prefect's console handler exists from here on
        with _quiet_run_errors(args.debug):
            return args.func(args)
    except UserError as exc:  # what the user gave or chose: the message says what to change
        if args.debug:
            raise
        message = f"drift {args.command}: {exc.__class__.__name__}: {exc}"
        # never split a path or key: a user copies them from this message
        print(
            textwrap.fill(message, width=100, break_long_words=False, break_on_hyphens=False), file=sys.stderr
        )
        print("(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception:  # anything else is drift's to fix: the traceback locates it
        if args.debug:
            raise
        traceback.print_exc()
        print(f"drift {args.command}: {BUG_LINE}", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
