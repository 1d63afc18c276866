"""I/O of the weights stage and of the ``drift weights`` command: graded trajectories in, parquet with
``return`` and ``weight`` out. The formulas live in :mod:`drift_core.returns` and
:mod:`drift_core.weights`; this module only reads, validates, converts columns and writes.

Two input formats are accepted (chosen by extension: ``.jsonl``/``.ndjson``/``.json`` or ``.parquet``):

* the paper reference scripts' JSONL records: ``prompt_id``, ``turn_rewards`` as
  ``{"t1": r1, "t2": r2, ...}``, ``answer_norms`` (list of normalised answers, null for none) and
  ``format_penalty`` (the trajectory's summed penalty, <= 0); ``solved`` = any turn reward > 0;
* drift's own trajectories parquet (:class:`drift_core.schemas.TrajectoryRecord` columns):
  turn rewards are ``turn_correct`` as 0/1; ``solved`` is taken from the file when present.

Both are normalised to the columns ``prompt_id`` (str), ``turn_rewards`` (list[f64]),
``normalized_answers`` (list[str]), ``format_penalty`` (f64), ``solved`` (bool); every other column is
carried through unchanged (``answer_norms`` becomes ``normalized_answers``). Output rows keep the input
row order. Everything stays columnar (polars/Arrow + numpy): no Python object per row on the fast paths.

``prompt_id`` is a group key and is stored as text: JSON integers become their decimal text. (On the
columnar path polars reads a column that mixes strings with other JSON values as text, so such values
are taken as their text there; a column of only non-string, non-integer ids is rejected.)

JSONL is read by polars in one go; if that fails (malformed line, NaN, odd types) or the vectorised
checks find a bad row, the file is re-read line by line in Python, which names the file, line and
row of every problem and, with ``on_bad_rows="skip"``, drops the bad rows (the report counts them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from drift_core.returns import returns_from_arrays
from drift_core.schemas import WeightsConfig
from drift_core.weights import WeightDiagnostics, compute_weights, diagnostics

log = logging.getLogger(__name__)

__all__ = [
    "BadRowsReport",
    "WeightsReport",
    "compute_weight_table",
    "load_weight_inputs",
    "read_weight_inputs",
    "run_weights_command",
    "weigh_parquet",
    "write_parquet_atomic",
]

OnBadRows = Literal["error", "skip"]

JSONL_REQUIRED = ("prompt_id", "turn_rewards", "answer_norms", "format_penalty")
PARQUET_REQUIRED = ("prompt_id", "turn_correct", "normalized_answers", "format_penalty")
NORMALISED = ("prompt_id", "turn_rewards", "normalized_answers", "format_penalty", "solved")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_TURN_KEY = re.compile(r"t([1-9][0-9]*)")
_MAX_EXAMPLES = 20
_CHUNK_ROWS = 50_000
_STREAM_BATCH_ROWS = 8192  # rows per record batch of weigh_parquet: its working set beyond O(rows)


@dataclass
class BadRowsReport:
    """Rows dropped with ``on_bad_rows="skip"``: how many, and the first few reasons."""

    n_skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.n_skipped += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(message)


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
    """Read and normalise trajectories (see the module docstring) -> (frame, skipped-rows report)."""
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
        df = _read_jsonl_fast(p)
        if df is None:
            df = _read_jsonl_python(p, on_bad_rows, report)
    else:
        raise ValueError(f"{p}: unknown input format {suffix!r}; expected .jsonl/.ndjson/.json or .parquet")
    return df, report


def load_weight_inputs(path: str | os.PathLike, on_bad_rows: OnBadRows = "error") -> pl.DataFrame:
    """Normalised trajectories (``prompt_id, turn_rewards, normalized_answers, format_penalty, solved``
    + carried columns). Bad rows raise ValueError, or with ``on_bad_rows="skip"`` are dropped and
    counted in a warning (use :func:`read_weight_inputs` to get the count)."""
    df, report = read_weight_inputs(path, on_bad_rows)
    if report.n_skipped:
        log.warning("%s: skipped %d bad rows, e.g. %s", path, report.n_skipped, report.examples[:3])
    return df


# --- JSONL, fast path ------------------------------------------------------------------------


def _is_numeric(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype.is_float()


def _read_jsonl_fast(path: Path) -> pl.DataFrame | None:
    """One polars read plus vectorised checks; None when anything looks off (the slow path then
    names the problem exactly)."""
    try:
        raw = pl.read_ndjson(path, infer_schema_length=None)
    except Exception:  # noqa: BLE001 - polars raises several types; the slow path reports precisely
        return None
    schema = raw.schema
    if raw.height == 0 or any(c not in schema for c in JSONL_REQUIRED):
        return None
    tr = schema["turn_rewards"]
    if not isinstance(tr, pl.Struct) or not tr.fields:
        return None
    by_turn: dict[int, pl.Field] = {}
    for f in tr.fields:
        m = _TURN_KEY.fullmatch(f.name)
        if m is None or not _is_numeric(f.dtype):
            return None
        by_turn[int(m.group(1))] = f
    k = len(by_turn)
    if sorted(by_turn) != list(range(1, k + 1)):
        return None
    ans = schema["answer_norms"]
    if not (isinstance(ans, pl.List) and ans.inner in (pl.String, pl.Null)):
        return None
    if not _is_numeric(schema["format_penalty"]) or not (
        schema["prompt_id"] == pl.String or schema["prompt_id"].is_integer()
    ):
        return None

    turns = [pl.col("turn_rewards").struct.field(f"t{t}").cast(pl.Float64) for t in range(1, k + 1)]
    ok = (
        pl.col("prompt_id").is_not_null()
        & pl.col("turn_rewards").is_not_null()
        & turns[0].is_not_null()
        & pl.col("answer_norms").is_not_null()
        & pl.col("format_penalty").is_not_null()
        & pl.col("format_penalty").cast(pl.Float64).is_finite()
        & (pl.col("format_penalty") <= 0)
    )
    for t in range(k):
        ok = ok & (turns[t].is_null() | turns[t].is_finite())
        if t + 1 < k:  # no gaps: once a turn is missing, every later one is too
            ok = ok & ~(turns[t].is_null() & turns[t + 1].is_not_null())
    if not raw.select(ok.fill_null(False).all()).item():
        return None

    # struct -> list column through numpy (polars' concat_list/drop_nulls are slow on 1M rows):
    # a [n, k] matrix, NaN where a turn is absent (JSON has no NaN here: it fails the polars read)
    mat = raw.select(turns).to_numpy().astype(np.float64, copy=False).reshape(raw.height, k)
    present = ~np.isnan(mat)
    offsets = np.zeros(raw.height + 1, dtype=np.int64)
    np.cumsum(present.sum(axis=1), out=offsets[1:])
    rewards = pl.Series(
        "turn_rewards", pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(mat[present]))
    )
    normalised = raw.with_columns(
        pl.col("prompt_id").cast(pl.String),
        rewards,
        pl.col("answer_norms").cast(pl.List(pl.String)),
        pl.col("format_penalty").cast(pl.Float64),
        (pl.max_horizontal(turns) > 0).alias("solved"),
    ).rename({"answer_norms": "normalized_answers"})
    return _order_columns(normalised, list(raw.columns))


def _order_columns(df: pl.DataFrame, raw_columns: list[str]) -> pl.DataFrame:
    """Input column order, answer_norms renamed in place, ``solved`` appended if new."""
    cols = ["normalized_answers" if c == "answer_norms" else c for c in raw_columns]
    if "solved" not in cols:
        cols.append("solved")
    return df.select(cols)


# --- JSONL, exact line-by-line path ---------------------------------------------------------------


class _BadRow(Exception):
    pass


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _normalise_record(obj: Any) -> dict[str, Any]:
    """One reference-format record -> normalised dict (carried keys kept in order); _BadRow if bad."""
    if not isinstance(obj, dict):
        raise _BadRow(f"expected a JSON object, got {type(obj).__name__}")
    for name in JSONL_REQUIRED:
        if name not in obj:
            raise _BadRow(f"missing required field {name!r}; fields found: {sorted(obj)}")
        if obj[name] is None:
            raise _BadRow(f"required field {name!r} is null; fields found: {sorted(obj)}")
    pid = obj["prompt_id"]
    if not (isinstance(pid, str) or (isinstance(pid, int) and not isinstance(pid, bool))):
        raise _BadRow(f"prompt_id must be a string or an integer, got {pid!r}")
    tr = obj["turn_rewards"]
    if not isinstance(tr, dict) or not tr:
        raise _BadRow(f'turn_rewards must be a non-empty object {{"t1": r1, "t2": r2, ...}}, got {tr!r}')
    turns: dict[int, float] = {}
    for key, value in tr.items():
        m = _TURN_KEY.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            raise _BadRow(f"turn_rewards key {key!r} is not of the form t1, t2, ...")
        if value is None:  # a null turn is an absent turn (as in the columnar fast path)
            continue
        if not _is_number(value):
            raise _BadRow(f"turn_rewards[{key!r}] is not a number: {value!r}")
        try:
            fv = float(value)
        except OverflowError:
            fv = math.inf
        if not math.isfinite(fv):
            raise _BadRow(f"turn_rewards[{key!r}] is not finite: {value!r}")
        turns[int(m.group(1))] = fv
    if not turns or sorted(turns) != list(range(1, len(turns) + 1)):
        raise _BadRow(f"turn_rewards keys must be t1..tN without gaps (null = absent), got {tr!r}")
    answers = obj["answer_norms"]
    if not isinstance(answers, list) or not all(a is None or isinstance(a, str) for a in answers):
        raise _BadRow(f"answer_norms must be a list of strings (or nulls), got {answers!r}")
    fp = obj["format_penalty"]
    if not _is_number(fp) or not math.isfinite(float(fp)) or fp > 0:
        raise _BadRow(f"format_penalty must be a finite number <= 0, got {fp!r}")

    rewards = [turns[t] for t in range(1, len(turns) + 1)]
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key == "prompt_id":
            out[key] = str(pid)
        elif key == "turn_rewards":
            out[key] = rewards
        elif key == "answer_norms":
            out["normalized_answers"] = answers
        elif key == "format_penalty":
            out[key] = float(fp)
        elif key != "solved":
            out[key] = value
    out["solved"] = any(r > 0 for r in rewards)
    return out


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line


def _read_jsonl_python(path: Path, on_bad_rows: OnBadRows, report: BadRowsReport) -> pl.DataFrame:
    chunks: list[pl.DataFrame] = []
    buf: list[dict[str, Any]] = []
    columns: dict[str, None] = {}  # first-seen order of the normalised columns
    for row, (lineno, line) in enumerate(_iter_lines(path), start=1):
        where = f"{path}: line {lineno} (row {row})"
        try:
            try:
                obj = json.loads(line.rstrip())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                detail = (
                    f"{e.msg.removesuffix(' at')} at column {e.colno}"
                    if isinstance(e, json.JSONDecodeError)
                    else str(e)
                )
                raise _BadRow(f"malformed JSON: {detail}") from None
            rec = _normalise_record(obj)
        except _BadRow as e:
            if on_bad_rows == "error":
                raise ValueError(f"{where}: {e}") from None
            report.add(f"{where}: {e}")
            continue
        for key in rec:
            columns.setdefault(key, None)
        buf.append(rec)
        if len(buf) >= _CHUNK_ROWS:
            chunks.append(_frame_from_records(path, buf))
            buf = []
    if buf:
        chunks.append(_frame_from_records(path, buf))
    if not chunks:
        return _empty_normalised()
    df = pl.concat(chunks, how="diagonal_relaxed") if len(chunks) > 1 else chunks[0]
    return df.with_columns(
        pl.col("turn_rewards").cast(pl.List(pl.Float64)),
        pl.col("normalized_answers").cast(pl.List(pl.String)),
    ).select(list(columns))


def _frame_from_records(path: Path, records: list[dict[str, Any]]) -> pl.DataFrame:
    try:
        return pl.from_dicts(records, infer_schema_length=None, strict=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"{path}: cannot build a table from the records (inconsistent field types?): {e}"
        ) from e


def _empty_normalised() -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            "prompt_id": pl.String,
            "turn_rewards": pl.List(pl.Float64),
            "normalized_answers": pl.List(pl.String),
            "format_penalty": pl.Float64,
            "solved": pl.Boolean,
        }
    )


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
        "format_penalty": _is_numeric,
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
        report.examples.extend(describe(int(r)) for r in rows[: _MAX_EXAMPLES - len(report.examples)])
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
    """Add ``return`` (DESIGN item 3) and ``weight`` (item 4 / cfg.mode) to normalised trajectories,
    rows in the same order; also return the weight diagnostics."""
    missing = [c for c in NORMALISED if c not in df.columns]
    if missing:
        raise ValueError(f"compute_weight_table: missing columns {missing}; columns found: {df.columns}")
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


def _returns(df: pl.DataFrame, cfg: WeightsConfig) -> np.ndarray:
    """Return R of every row of a normalised frame (DESIGN item 3), vectorised."""
    # list.drop_nulls is slow on big frames; count nulls per list instead (n_unique counts null once)
    answers = pl.col("normalized_answers")
    n_null = answers.list.eval(pl.element().null_count()).list.first().fill_null(0)
    feats = df.select(
        pl.col("turn_rewards").list.len().fill_null(0).alias("n_turns"),
        (answers.list.len().fill_null(0) - n_null).alias("n_answered"),
        (answers.list.n_unique().fill_null(0) - (n_null > 0).cast(pl.UInt32)).alias("n_distinct"),
    )
    lengths = feats["n_turns"].to_numpy().astype(np.int64)
    if df.height and (lengths == 0).any():
        raise ValueError(f"row {int(np.flatnonzero(lengths == 0)[0])}: no turn rewards")
    flat = df["turn_rewards"].explode().cast(pl.Float64).to_numpy() if df.height else np.zeros(0)
    n_answered = feats["n_answered"].to_numpy()
    n_distinct = feats["n_distinct"].to_numpy()
    penalty = df["format_penalty"].cast(pl.Float64).to_numpy()
    return returns_from_arrays(
        flat,
        penalty,
        n_distinct,
        n_answered,
        gamma=cfg.gamma,
        repetition_lambda=cfg.repetition_lambda,
        lengths=lengths,
    )


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary name in the target's directory; on success fsync it and ``os.replace`` it
    into place, on any error remove it: readers see the old file or the complete new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet_atomic(df: pl.DataFrame, path: str | os.PathLike) -> Path:
    """Write parquet to a temporary file in the target directory, fsync it, then ``os.replace`` it into
    place: readers see the old file or the complete new one, never a partial one."""
    with _atomic_target(path) as tmp:
        df.write_parquet(tmp)
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
        df, report = read_weight_inputs(path, on_bad_rows)
        table, diag = compute_weight_table(df, cfg)
        write_parquet_atomic(table, output)
        return StreamedWeights(0, diag, report, np.zeros(0))

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
    all_returns = np.concatenate(returns)
    groups = _group_codes(pl.concat(ids))
    all_solved = np.concatenate(solved)
    del returns, ids, solved
    weights = compute_weights(all_returns, groups, all_solved, cfg)
    diag = diagnostics(weights, groups, all_solved, all_returns)

    with _atomic_target(output) as tmp:
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
    A parquet input is streamed (:func:`weigh_parquet`), so its size is not bounded by memory."""
    if Path(input).suffix.lower() == ".parquet" and Path(input).is_file():
        streamed = weigh_parquet(input, output, cfg, on_bad_rows)
        diag, report = streamed.diagnostics, streamed.report
    else:
        df, report = read_weight_inputs(input, on_bad_rows)
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
