"""``drift weights INPUT --gamma G --beta B [--lambda L] [--mode M] [--unsolved-groups drop] --output OUT``.

Reads graded trajectories (reference-format JSONL or drift's trajectories parquet), computes DRIFT
returns and weights, writes parquet with ``prompt_id, return, weight`` + the carried columns in input
row order, and prints the weight diagnostics. Exit codes: 0 ok, 1 bad input data, 2 bad arguments or
an input with no trajectories at all (empty, only blank lines, every row skipped: a wrong file?),
in which case nothing is written.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from drift_core.schemas import WeightsConfig
from drift_core.weights import weight_warnings

_DEFAULTS = WeightsConfig()


def add_weights_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "weights",
        help="compute DRIFT returns and weights for graded trajectories",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("input", help="trajectories: reference-format .jsonl or drift trajectories .parquet")
    p.add_argument("--output", "-o", required=True, help="output parquet (written atomically)")
    p.add_argument("--gamma", type=float, default=_DEFAULTS.gamma, help="turn discount (default %(default)s)")
    p.add_argument(
        "--beta", type=float, default=_DEFAULTS.beta, help="weight temperature (default %(default)s)"
    )
    p.add_argument(
        "--lambda",
        dest="repetition_lambda",
        type=float,
        default=_DEFAULTS.repetition_lambda,
        help="repetition penalty (default %(default)s)",
    )
    p.add_argument("--mode", choices=["drift", "uniform", "success_only"], default=_DEFAULTS.mode)
    p.add_argument(
        "--unsolved-groups",
        choices=["weight", "drop"],
        default=_DEFAULTS.unsolved_groups,
        help="drop: weight 0 for every group with no solved trajectory (an ablation, not the paper; "
        "default %(default)s)",
    )
    p.add_argument(
        "--on-bad-rows",
        choices=["error", "skip"],
        default="error",
        help="stop at the first bad row (default) or skip bad rows and report how many",
    )
    p.set_defaults(func=run)
    return p


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.6g}" if abs(value) < 1e6 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def run(args: argparse.Namespace) -> int:
    from tasks.weights_io import NoTrajectoriesError, run_weights_command  # polars only when run

    try:
        cfg = WeightsConfig(
            mode=args.mode,
            gamma=args.gamma,
            beta=args.beta,
            repetition_lambda=args.repetition_lambda,
            unsolved_groups=args.unsolved_groups,
        )
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        print(f"drift weights: error: {msgs}", file=sys.stderr)
        return 2
    try:
        report = run_weights_command(args.input, args.output, cfg, on_bad_rows=args.on_bad_rows)
    except NoTrajectoriesError as e:
        print(f"drift weights: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"drift weights: error: {e}", file=sys.stderr)
        return 1

    rows = [
        ("mode", cfg.mode if cfg.unsolved_groups == "weight" else f"{cfg.mode}, unsolved groups dropped"),
        ("gamma / beta / lambda", f"{cfg.gamma:g} / {cfg.beta:g} / {cfg.repetition_lambda:g}"),
        ("trajectories", report.n_trajectories),
        ("groups", report.n_groups),
        ("skipped rows", report.n_skipped_rows),
        ("mean return", report.mean_return),
        ("ESS overall", report.ess_overall),
        ("ESS fraction", report.ess_fraction),
        ("ESS per group mean", report.ess_per_group_mean),
        ("ESS per group min", report.ess_per_group_min),
        ("max weight", report.max_weight),
        ("groups with no success", report.share_groups_no_success),
        ("weight on groups with no success", report.share_weight_no_success),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {_fmt(value):>14}")
    for warning in weight_warnings(report):
        print(f"WARNING: {warning}", file=sys.stderr)
    for msg in report.skipped_examples[:5]:
        print(f"  skipped: {msg}", file=sys.stderr)
    print(f"wrote {report.output}")
    return 0
