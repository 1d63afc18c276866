"""I/O of the weights stage and of the ``drift weights`` command: graded trajectories in, parquet with
``return`` and ``weight`` out. The formulas live in :mod:`drift_core.returns` and
:mod:`drift_core.weights`; this module only reads, validates, converts columns and writes.

Two input formats are accepted (chosen by extension: ``.jsonl``/``.ndjson``/``.json`` or ``.parquet``):

* the paper reference scripts' JSONL records, read as ``weight_sft.py`` reads them: ``prompt_id``;
  ``turn_rewards`` as ``{"t1": r1, "t2": r2, ...}`` (keys that are not ``t<digits>`` are ignored);
  ``answer_norms``, the list of normalised answers (absent, null or not a list: no repetition
  penalty); ``format_penalty``, the trajectory's summed penalty, read for every record once the file
  has that column (absent or null in a record: 0), else ``trajectory_penalty`` (null: 0), else 0
  (:func:`tasks.weights_jsonl.penalty_field`); a turn reward absent or null before a later one is
  0 at its own index. ``solved`` = any turn reward > 0. The repetition term follows the reference rule
  (``drift_core.returns``, rule ``"reference"``);
* drift's own trajectories parquet (:class:`drift_core.schemas.TrajectoryRecord` columns):
  turn rewards are ``turn_correct`` as 0/1; ``solved`` is taken from the file when present; the
  repetition term counts the answers given (rule ``"answers_given"``).

Both are normalised to ``prompt_id`` (str), ``turn_rewards`` (list[f64]), ``format_penalty`` (f64),
``solved`` (bool) and the answer list under its own name: ``answer_norms`` (JSONL) or
``normalized_answers`` (parquet), list[str]. The column name says which repetition rule applies, so
a normalised frame carries its meaning with it. Every other column is carried through unchanged
(a column holding an object with no fields, ``{}`` in every row, is written as its JSON text:
parquet cannot store it); output rows keep the input row order.

``prompt_id`` is a group key and is stored as text: JSON integers become their decimal text. (polars
reads a column that mixes strings with other JSON values as text, so such values are taken as their
text; a column of only non-string, non-integer ids is rejected.)

JSONL is read by :mod:`tasks.weights_jsonl` (one path: polars' NDJSON reader, vectorised checks,
row-level messages); parquet here, streamed in record batches by :func:`weigh_parquet`.

An input without a single trajectory (empty, only blank lines, every row skipped) is an error
(:class:`NoTrajectoriesError`): a wrong file should not pass as an empty result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from drift_core.errors import UserError
from drift_core.returns import RepetitionRule, returns_from_arrays
from drift_core.schemas import WeightsConfig
from drift_core.weights import WeightDiagnostics, compute_weights, diagnostics
from tasks.atomic import atomic_path
from tasks.weights_jsonl import (
    MAX_EXAMPLES,
    BadRowsReport,
    OnBadRows,
    is_numeric,
    parquet_storable,
    read_reference_jsonl,
)

log = logging.getLogger(__name__)

__all__ = [
    "BadRowsReport",
    "NoTrajectoriesError",
    "WeightsReport",
    "compute_weight_table",
    "load_weight_inputs",
    "read_weight_inputs",
    "run_weights_command",
    "weigh_parquet",
    "write_parquet_atomic",
]

PARQUET_REQUIRED = ("prompt_id", "turn_correct", "normalized_answers", "format_penalty")
NORMALISED = ("prompt_id", "turn_rewards", "format_penalty", "solved")
# the answer list column of a normalised frame, and the repetition rule its name stands for
ANSWER_COLUMNS: dict[str, RepetitionRule] = {
    "answer_norms": "reference",
    "normalized_answers": "answers_given",
}
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_STREAM_BATCH_ROWS = 8192  # rows per record batch of weigh_parquet: its working set beyond O(rows)


class NoTrajectoriesError(UserError, ValueError):
    """The input holds no trajectory at all (empty, only blank lines, or every row skipped)."""


class WeightsReport(WeightDiagnostics):
    """What ``drift weights`` did: the weight diagnostics plus the I/O facts."""

    input: str
    output: str
    n_skipped_rows: int = 0
    skipped_examples: list[str] = []


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_weight_inputs(
    path: str | os.PathLike, on_bad_rows: OnBadRows = "error"
) -> tuple[pl.DataFrame, BadRowsReport]:
    """Read and normalise trajectories (see the module docstring) -> (frame, skipped-rows report).
    The frame may be empty (e.g. every row skipped); :func:`run_weights_command` refuses that."""
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    report = BadRowsReport()
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        df = _read_parquet(p, on_bad_rows, report)
    elif suffix in JSONL_SUFFIXES:
        df = read_reference_jsonl(p, on_bad_rows, report)
    else:
        raise ValueError(f"{p}: unknown input format {suffix!r}; expected .jsonl/.ndjson/.json or .parquet")
    return df, report


def load_weight_inputs(path: str | os.PathLike, on_bad_rows: OnBadRows = "error") -> pl.DataFrame:
    """Normalised trajectories (``prompt_id, turn_rewards, answer list, format_penalty, solved``
    + carried columns). Bad rows raise ValueError, or with ``on_bad_rows="skip"`` are dropped and
    counted in a warning (use :func:`read_weight_inputs` to get the count)."""
    df, report = read_weight_inputs(path, on_bad_rows)
    if report.n_skipped:
        log.warning("%s: skipped %d bad rows, e.g. %s", path, report.n_skipped, report.examples[:3])
    return df


# --- parquet -------------------------------------------------------------------------------------


def _read_parquet(path: Path, on_bad_rows: OnBadRows, report: BadRowsReport) -> pl.DataFrame:
    return _normalise_parquet(pl.read_parquet(path), path, on_bad_rows, report)


def _check_parquet_columns(path: Path, columns: list[str]) -> None:
    for name in PARQUET_REQUIRED:
        if name not in columns:
            raise ValueError(f"{path}: missing required column {name!r}; columns found: {columns}")


def _normalise_parquet(
    raw: pl.DataFrame, path: Path, on_bad_rows: OnBadRows, report: BadRowsReport, first_row: int = 0
) -> pl.DataFrame:
    """Validate and normalise a drift trajectories frame (or a chunk of one whose first row is row
    ``first_row`` of the file); bad rows raise or, with ``skip``, are dropped and counted."""
    schema = raw.schema
    _check_parquet_columns(path, list(schema))
    expect = {
        "turn_correct": lambda d: isinstance(d, pl.List) and d.inner == pl.Boolean,
        "normalized_answers": lambda d: isinstance(d, pl.List) and d.inner in (pl.String, pl.Null),
        "format_penalty": is_numeric,
        "prompt_id": lambda d: d == pl.String or d.is_integer(),
        "solved": lambda d: d == pl.Boolean,
    }
    for name, check in expect.items():
        if name in schema and not check(schema[name]):
            raise ValueError(f"{path}: column {name!r} has type {schema[name]}, which drift cannot use")

    tc = pl.col("turn_correct")
    fp = pl.col("format_penalty").cast(pl.Float64)
    problems = [
        (pl.col("prompt_id").is_null(), "prompt_id is null"),
        (tc.is_null(), "turn_correct is null"),
        (tc.list.len() == 0, "turn_correct is empty (a trajectory has at least one turn)"),
        (tc.list.eval(pl.element().is_null()).list.any(), "turn_correct holds a null"),
        (pl.col("normalized_answers").is_null(), "normalized_answers is null"),
        (fp.is_null() | ~fp.is_finite() | (fp > 0), "format_penalty is not a finite number <= 0"),
    ]
    if "solved" in schema:
        problems.append((pl.col("solved").is_null(), "solved is null"))
    flags = raw.select([cond.fill_null(False).alias(f"bad{i}") for i, (cond, _) in enumerate(problems)])
    bad = np.zeros(raw.height, dtype=bool)
    for i in range(len(problems)):
        bad |= flags[f"bad{i}"].to_numpy()
    if bad.any():
        rows = np.flatnonzero(bad)

        def describe(r: int) -> str:
            reasons = [msg for i, (_, msg) in enumerate(problems) if flags[f"bad{i}"][r]]
            return f"{path}: row {first_row + r}: {'; '.join(reasons)}"

        if on_bad_rows == "error":
            raise ValueError(f"{describe(int(rows[0]))} ({len(rows)} bad rows in all)")
        report.n_skipped += len(rows)
        report.examples.extend(describe(int(r)) for r in rows[: MAX_EXAMPLES - len(report.examples)])
        raw = raw.filter(pl.Series(~bad))

    cols = {
        "prompt_id": pl.col("prompt_id").cast(pl.String),
        "turn_rewards": tc.cast(pl.List(pl.Float64)),
        "format_penalty": fp,
    }
    if "solved" not in schema:
        cols["solved"] = tc.list.any()
    out = raw.with_columns(**cols)
    order = list(raw.columns)
    if "turn_rewards" not in order:
        order.insert(order.index("turn_correct") + 1, "turn_rewards")
    if "solved" not in order:
        order.append("solved")
    return out.with_columns(pl.col("normalized_answers").cast(pl.List(pl.String))).select(order)


# --------------------------------------------------------------------------------------------
# Computing and writing
# --------------------------------------------------------------------------------------------


def compute_weight_table(df: pl.DataFrame, cfg: WeightsConfig) -> tuple[pl.DataFrame, WeightDiagnostics]:
    """Add ``return`` (docs/method.md#return) and ``weight`` (docs/method.md#weights, cfg.mode) to normalised trajectories,
    rows in the same order; also return the weight diagnostics. The repetition rule is the one of
    the frame's answer column (``answer_norms``: reference, ``normalized_answers``: answers given)."""
    missing = [c for c in NORMALISED if c not in df.columns]
    if missing or not any(c in df.columns for c in ANSWER_COLUMNS):
        raise ValueError(
            f"compute_weight_table: missing columns {missing or list(ANSWER_COLUMNS)}; "
            f"columns found: {df.columns}"
        )
    returns = _returns(df, cfg)
    groups = _group_codes(df["prompt_id"])
    solved = df["solved"].to_numpy().astype(bool)
    weights = compute_weights(returns, groups, solved, cfg)
    diag = diagnostics(weights, groups, solved, returns)
    out = df.with_columns(pl.Series("return", returns), pl.Series("weight", weights))
    return out, diag


def _group_codes(prompt_id: pl.Series) -> np.ndarray:
    """Dense integer group codes without sorting strings (a categorical is hash-based)."""
    return prompt_id.cast(pl.String).cast(pl.Categorical).to_physical().to_numpy()


def _repetition_exprs(column: str) -> tuple[pl.Expr, pl.Expr]:
    """(distinct, n) of the repetition term for every row, by the rule the column stands for
    (``drift_core.returns.repetition_counts``, vectorised)."""
    answers = pl.col(column).cast(pl.List(pl.String))
    # list.drop_nulls is slow on big frames; count nulls per list instead (n_unique counts null once)
    n_null = answers.list.eval(pl.element().null_count()).list.first().fill_null(0)
    n_len = answers.list.len().fill_null(0)
    distinct = answers.list.n_unique().fill_null(0) - (n_null > 0).cast(pl.UInt32)
    if ANSWER_COLUMNS[column] == "answers_given":
        return distinct, n_len - n_null
    has_empty = answers.list.contains("").fill_null(False).cast(pl.UInt32)  # "" is not an answer
    return distinct - has_empty, n_len


def _returns(df: pl.DataFrame, cfg: WeightsConfig) -> np.ndarray:
    """Return R of every row of a normalised frame (docs/method.md#return), vectorised."""
    column = next(c for c in ANSWER_COLUMNS if c in df.columns)
    distinct, n = _repetition_exprs(column)
    feats = df.select(
        pl.col("turn_rewards").list.len().fill_null(0).alias("n_turns"),
        n.alias("n"),
        distinct.alias("n_distinct"),
    )
    lengths = feats["n_turns"].to_numpy().astype(np.int64)
    if df.height and (lengths == 0).any():
        raise ValueError(f"row {int(np.flatnonzero(lengths == 0)[0])}: no turn rewards")
    flat = df["turn_rewards"].explode().cast(pl.Float64).to_numpy() if df.height else np.zeros(0)
    penalty = df["format_penalty"].cast(pl.Float64).to_numpy()
    return returns_from_arrays(
        flat,
        penalty,
        feats["n_distinct"].to_numpy(),
        feats["n"].to_numpy(),
        gamma=cfg.gamma,
        repetition_lambda=cfg.repetition_lambda,
        lengths=lengths,
    )


def write_parquet_atomic(df: pl.DataFrame, path: str | os.PathLike) -> Path:
    """Write parquet atomically (:func:`tasks.atomic.atomic_path`): readers see the old file or the
    complete new one, never a partial one."""
    with atomic_path(path) as tmp:
        parquet_storable(df).write_parquet(tmp)
    return Path(path)


@dataclass
class StreamedWeights:
    """What :func:`weigh_parquet` wrote: its diagnostics, skipped rows and the weight column."""

    rows: int
    diagnostics: WeightDiagnostics
    report: BadRowsReport
    weights: np.ndarray


def weigh_parquet(
    input: str | os.PathLike,
    output: str | os.PathLike,
    cfg: WeightsConfig,
    on_bad_rows: OnBadRows = "error",
    batch_rows: int = _STREAM_BATCH_ROWS,
) -> StreamedWeights:
    """:func:`compute_weight_table` for a drift trajectories parquet too large to hold in memory
    (the ``messages`` column holds every conversation), written atomically to ``output``.

    Two passes over record batches of ``batch_rows`` rows. Pass 1 reads only the columns the return
    needs and keeps one return, group code and solved flag per row; the weights of all rows come
    from those arrays. Pass 2 streams every column through, appends ``return`` and ``weight`` and
    writes each batch as it goes. Memory is O(rows x a few numbers) + O(one batch), never the text.
    The output equals ``compute_weight_table`` on the whole file (same rows, order and columns).
    """
    path = Path(input)
    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    _check_parquet_columns(path, columns)
    if parquet.metadata.num_rows == 0:
        raise NoTrajectoriesError(f"{path}: no trajectories: the table has 0 rows; nothing written")

    report = BadRowsReport()
    needed = [c for c in (*PARQUET_REQUIRED, "solved") if c in columns]
    returns, ids, solved = [], [], []
    first_row = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=needed):
        chunk = _normalise_parquet(pl.from_arrow(batch), path, "skip", report, first_row)
        first_row += batch.num_rows
        returns.append(_returns(chunk, cfg))
        ids.append(chunk["prompt_id"])
        solved.append(chunk["solved"].to_numpy().astype(bool))
    if report.n_skipped and on_bad_rows == "error":  # the same message as the in-memory path
        raise ValueError(f"{report.examples[0]} ({report.n_skipped} bad rows in all)")
    if report.n_skipped == first_row:
        raise _all_skipped(path, report)
    all_returns = np.concatenate(returns)
    groups = _group_codes(pl.concat(ids))
    all_solved = np.concatenate(solved)
    del returns, ids, solved
    weights = compute_weights(all_returns, groups, all_solved, cfg)
    diag = diagnostics(weights, groups, all_solved, all_returns)

    with atomic_path(output) as tmp:
        writer: pq.ParquetWriter | None = None
        done = first_row = 0
        try:
            for batch in parquet.iter_batches(batch_size=batch_rows):
                chunk = _normalise_parquet(pl.from_arrow(batch), path, "skip", BadRowsReport(), first_row)
                first_row += batch.num_rows
                stop = done + chunk.height
                table = chunk.with_columns(
                    pl.Series("return", all_returns[done:stop]), pl.Series("weight", weights[done:stop])
                ).to_arrow()
                done = stop
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()
    return StreamedWeights(done, diag, report, weights)


def run_weights_command(
    input: str | os.PathLike,
    output: str | os.PathLike,
    cfg: WeightsConfig,
    on_bad_rows: OnBadRows = "error",
) -> WeightsReport:
    """Read ``input``, compute returns and weights, write ``output`` atomically; the diagnostics.
    A parquet input is streamed (:func:`weigh_parquet`), so its size is not bounded by memory.
    An input without trajectories raises :class:`NoTrajectoriesError` and writes nothing."""
    if Path(input).suffix.lower() == ".parquet" and Path(input).is_file():
        streamed = weigh_parquet(input, output, cfg, on_bad_rows)
        diag, report = streamed.diagnostics, streamed.report
    else:
        df, report = read_weight_inputs(input, on_bad_rows)
        if df.height == 0:
            raise _no_rows(Path(input), report)
        table, diag = compute_weight_table(df, cfg)
        del df
        write_parquet_atomic(table, output)
    return WeightsReport(
        **diag.model_dump(),
        input=str(input),
        output=str(output),
        n_skipped_rows=report.n_skipped,
        skipped_examples=report.examples,
    )


def _no_rows(path: Path, report: BadRowsReport) -> NoTrajectoriesError:
    if report.n_skipped:
        return _all_skipped(path, report)
    what = "has only blank lines" if path.stat().st_size else "is empty"
    return NoTrajectoriesError(f"{path}: no trajectories: the file {what}; nothing written")


def _all_skipped(path: Path, report: BadRowsReport) -> NoTrajectoriesError:
    first = report.examples[0] if report.examples else ""
    return NoTrajectoriesError(
        f"{path}: no trajectories: all {report.n_skipped} rows were bad and skipped "
        f"(first: {first}); nothing written"
    )
