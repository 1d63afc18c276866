"""I/O of the weights stage and of the ``drift weights`` command: graded trajectories in, parquet with
``return`` and ``weight`` out. The formulas live in :mod:`drift_core.returns` and
:mod:`drift_core.weights`; this module only reads, validates, converts columns and writes.

Two input formats are accepted (chosen by extension: ``.jsonl``/``.ndjson``/``.json`` or ``.parquet``):

* the paper reference scripts' JSONL records, read as ``weight_sft.py`` reads them: ``prompt_id``;
  ``turn_rewards`` as ``{"t1": r1, "t2": r2, ...}`` (keys that are not ``t<digits>`` are ignored);
  ``answer_norms``, the list of normalised answers (absent, null or not a list: no repetition
  penalty); ``format_penalty``, the trajectory's summed penalty (absent or null: ``trajectory_penalty``,
  then 0). ``solved`` = any turn reward > 0. The repetition term follows the reference rule
  (``drift_core.returns``, rule ``"reference"``);
* drift's own trajectories parquet (:class:`drift_core.schemas.TrajectoryRecord` columns):
  turn rewards are ``turn_correct`` as 0/1; ``solved`` is taken from the file when present; the
  repetition term counts the answers given (rule ``"answers_given"``).

Both are normalised to ``prompt_id`` (str), ``turn_rewards`` (list[f64]), ``format_penalty`` (f64),
``solved`` (bool) and the answer list under its own name: ``answer_norms`` (JSONL) or
``normalized_answers`` (parquet), list[str]. The column name says which repetition rule applies, so
a normalised frame carries its meaning with it. Every other column is carried through unchanged;
output rows keep the input row order.

``prompt_id`` is a group key and is stored as text: JSON integers become their decimal text. (polars
reads a column that mixes strings with other JSON values as text, so such values are taken as their
text; a column of only non-string, non-integer ids is rejected.)

JSONL has one reading path: polars' NDJSON reader builds the table, vectorised checks find the bad
rows and one vectorised normaliser converts the columns. Python's ``json`` only steps in to name
problems: it words the message of each reported bad row (file, line, row, field), and when polars
cannot read the file as one table (a malformed line, NaN, a field of the wrong JSON type) it finds
the rows at fault, which are reported (or with ``on_bad_rows="skip"`` dropped and counted) before
polars reads the rest.

An input without a single trajectory (empty, only blank lines, every row skipped) is an error
(:class:`NoTrajectoriesError`): a wrong file should not pass as an empty result.
"""

from __future__ import annotations

import contextlib
import io
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

from drift_core.returns import RepetitionRule, returns_from_arrays
from drift_core.schemas import WeightsConfig
from drift_core.weights import WeightDiagnostics, compute_weights, diagnostics

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

OnBadRows = Literal["error", "skip"]

JSONL_REQUIRED = ("prompt_id", "turn_rewards")
PENALTY_FIELDS = ("format_penalty", "trajectory_penalty")  # the first present and non-null one is used
PARQUET_REQUIRED = ("prompt_id", "turn_correct", "normalized_answers", "format_penalty")
NORMALISED = ("prompt_id", "turn_rewards", "format_penalty", "solved")
# the answer list column of a normalised frame, and the repetition rule its name stands for
ANSWER_COLUMNS: dict[str, RepetitionRule] = {
    "answer_norms": "reference",
    "normalized_answers": "answers_given",
}
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_TURN_KEY = re.compile(r"t([0-9]+)")  # a turn reward key; any other key is ignored (weight_sft.py)
_CANONICAL_TURN_KEY = re.compile(r"t[1-9][0-9]*")
_MAX_EXAMPLES = 20
_STREAM_BATCH_ROWS = 8192  # rows per record batch of weigh_parquet: its working set beyond O(rows)


class NoTrajectoriesError(ValueError):
    """The input holds no trajectory at all (empty, only blank lines, or every row skipped)."""


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
        df = _read_jsonl(p, on_bad_rows, report)
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


def _is_numeric(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype.is_float()


# --- JSONL ---------------------------------------------------------------------------------------


def _read_jsonl(path: Path, on_bad_rows: OnBadRows, report: BadRowsReport) -> pl.DataFrame:
    """The one JSONL path: polars reads, vectorised checks, one vectorised normaliser."""
    lines = _nonblank_lines(path)  # row r (1-based) of the file is lines[r - 1]
    if not lines:
        return _empty_normalised()
    rows = np.arange(len(lines))
    raw, why = _polars_table(path, lines)
    if raw is None:  # find the rows polars cannot take, report them, read the rest
        rejected = [i for i, (_, line) in enumerate(lines) if _line_problem(line) is not None]
        _report_bad(path, lines, rejected, [], on_bad_rows, report)
        rows = np.setdiff1d(rows, rejected)
        if rows.size == 0:
            return _empty_normalised()
        raw, why = _polars_table(path, [lines[i] for i in rows])
        if raw is None:
            raise ValueError(
                f"{path}: polars cannot read the records as one table ({why}), though each row "
                "passes the checks: a field probably holds different JSON types in different rows"
            )
    checks = _row_checks(raw.schema)
    if checks:
        flags = raw.select([c.fill_null(False).alias(f"bad{i}") for i, (c, _) in enumerate(checks)])
        mask = np.zeros(raw.height, dtype=bool)
        for name in flags.columns:
            mask |= flags[name].to_numpy()
        if mask.any():
            bad = np.flatnonzero(mask)
            fallback = [  # only for the rows whose message is shown
                "; ".join(msg for i, (_, msg) in enumerate(checks) if flags[f"bad{i}"][int(b)])
                for b in bad[:_MAX_EXAMPLES]
            ]
            _report_bad(path, lines, rows[bad].tolist(), fallback, on_bad_rows, report)
            raw = raw.filter(pl.Series(~mask))
    return _normalise_jsonl(raw)


def _nonblank_lines(path: Path) -> list[tuple[int, bytes]]:
    """(line number, bytes) of every line that is not blank; blank lines are not rows."""
    return [(n, line) for n, line in enumerate(path.read_bytes().split(b"\n"), start=1) if line.strip()]


def _polars_table(path: Path, lines: list[tuple[int, bytes]]) -> tuple[pl.DataFrame | None, str | None]:
    """polars' NDJSON reader over the lines; (None, why) when it fails or gives types drift cannot use."""
    try:
        raw = pl.read_ndjson(io.BytesIO(b"\n".join(line for _, line in lines)), infer_schema_length=None)
    except Exception as e:  # noqa: BLE001 - polars raises several types; the rows are found next
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    why = _schema_problem(raw.schema)
    return (None, why) if why else (raw, None)


def _schema_problem(schema: pl.Schema) -> str | None:
    """Why the columns polars inferred cannot be used as they are (some row has a wrong JSON type)."""
    pid = schema.get("prompt_id")
    if pid is not None and not (pid in (pl.String, pl.Null) or pid.is_integer()):
        return f"prompt_id read as {pid}"
    tr = schema.get("turn_rewards")
    if tr is not None and tr != pl.Null:
        if not isinstance(tr, pl.Struct):
            return f"turn_rewards read as {tr}"
        for f in tr.fields:
            if _TURN_KEY.fullmatch(f.name) and not (_is_numeric(f.dtype) or f.dtype == pl.Null):
                return f"turn_rewards.{f.name} read as {f.dtype}"
    for name in PENALTY_FIELDS:
        d = schema.get(name)
        if d is not None and not (_is_numeric(d) or d == pl.Null):
            return f"{name} read as {d}"
    return None


def _turn_fields(schema: pl.Schema) -> tuple[list[str], list[str]]:
    """(canonical turn keys t1..tK in turn order, with gaps filled by absent names; other t<digits>
    keys such as t0 or t01)."""
    tr = schema.get("turn_rewards")
    names = [f.name for f in tr.fields] if isinstance(tr, pl.Struct) else []
    canonical = {int(n[1:]) for n in names if _CANONICAL_TURN_KEY.fullmatch(n)}
    odd = [n for n in names if _TURN_KEY.fullmatch(n) and not _CANONICAL_TURN_KEY.fullmatch(n)]
    return [f"t{t}" for t in range(1, max(canonical, default=0) + 1)], odd


def _turn_expr(schema: pl.Schema, name: str) -> pl.Expr:
    tr = schema.get("turn_rewards")
    if isinstance(tr, pl.Struct) and name in {f.name for f in tr.fields}:
        return pl.col("turn_rewards").struct.field(name).cast(pl.Float64)
    return pl.lit(None, dtype=pl.Float64)


def _penalty_expr(schema: pl.Schema) -> pl.Expr:
    """format_penalty, else trajectory_penalty, else 0 (as weight_sft.py falls back)."""
    present = [pl.col(n).cast(pl.Float64) for n in PENALTY_FIELDS if n in schema]
    return pl.coalesce([*present, pl.lit(0.0)])


def _col(schema: pl.Schema, name: str) -> pl.Expr:
    return pl.col(name) if name in schema else pl.lit(None)


def _row_checks(schema: pl.Schema) -> list[tuple[pl.Expr, str]]:
    """(condition that marks a row bad, what is wrong): the same rules as :func:`_line_problem`."""
    turns, odd = _turn_fields(schema)
    checks = [
        (_col(schema, "prompt_id").is_null(), "prompt_id is missing or null"),
        (_col(schema, "turn_rewards").is_null(), "turn_rewards is missing or null"),
    ]
    for name in odd:
        checks.append(
            (_turn_expr(schema, name).is_not_null(), f"turn_rewards key {name!r} is not t1, t2, ...")
        )
    exprs = [_turn_expr(schema, n) for n in turns]
    if not exprs:
        checks.append((pl.lit(True), "turn_rewards holds no turn reward t1, t2, ..."))
    else:
        checks.append((exprs[0].is_null(), "turn_rewards holds no t1"))
    for t, e in enumerate(exprs):
        checks.append((e.is_not_null() & ~e.is_finite(), f"turn reward t{t + 1} is not finite"))
        if t + 1 < len(exprs):
            checks.append((e.is_null() & exprs[t + 1].is_not_null(), "turn_rewards keys have a gap"))
    fp = _penalty_expr(schema)
    checks.append((~fp.is_finite() | (fp > 0), "the format penalty is not a finite number <= 0"))
    return checks


def _normalise_jsonl(raw: pl.DataFrame) -> pl.DataFrame:
    """Checked reference records -> the normalised columns (see the module docstring)."""
    schema = raw.schema
    turns, _ = _turn_fields(schema)
    exprs = [_turn_expr(schema, n) for n in turns]
    # struct -> list column through numpy (polars' concat_list/drop_nulls are slow on 1M rows):
    # a [n, k] matrix, NaN where a turn is absent; no gaps, so the present turns lead each row
    mat = raw.select(exprs).to_numpy().astype(np.float64, copy=False).reshape(raw.height, len(exprs))
    present = ~np.isnan(mat)
    offsets = np.zeros(raw.height + 1, dtype=np.int64)
    np.cumsum(present.sum(axis=1), out=offsets[1:])
    rewards = pl.Series(
        "turn_rewards", pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(mat[present]))
    )
    out = raw.with_columns(
        pl.col("prompt_id").cast(pl.String),
        rewards,
        _answer_lists(raw),
        _penalty_expr(schema).alias("format_penalty"),
        (pl.max_horizontal(exprs) > 0).fill_null(False).alias("solved"),
    )
    cols = list(raw.columns)
    for name in ("answer_norms", "format_penalty", "solved"):
        if name not in cols:
            cols.append(name)
    return out.select(cols)


def _answer_lists(raw: pl.DataFrame) -> pl.Series:
    """``answer_norms`` as list[str]; null where the record has none or it is not a list."""
    n = raw.height
    if "answer_norms" not in raw.columns:
        return pl.Series("answer_norms", [None] * n, dtype=pl.List(pl.String))
    col = raw["answer_norms"]
    if isinstance(col.dtype, pl.List):  # entries that are not strings: their JSON text, as polars
        inner = col.dtype.inner  # reads them when the file also has string entries
        if inner in (pl.String, pl.Null) or _is_numeric(inner):
            return col.cast(pl.List(pl.String))
        values = [
            None if v is None else [a if a is None or isinstance(a, str) else json.dumps(a) for a in v]
            for v in col.to_list()
        ]
        return pl.Series("answer_norms", values, dtype=pl.List(pl.String))
    if col.dtype == pl.String:  # lists mixed with strings: polars kept each list as its JSON text
        texts = col.to_list()
        lists = [json.loads(t) if t is not None and t.startswith("[") else None for t in texts]
        values = [
            None if v is None else [a if a is None or isinstance(a, str) else json.dumps(a) for a in v]
            for v in lists
        ]
        return pl.Series("answer_norms", values, dtype=pl.List(pl.String))
    return pl.Series("answer_norms", [None] * n, dtype=pl.List(pl.String))  # numbers, objects: no list


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int too large for a float
        return False


def _line_problem(line: bytes) -> str | None:
    """What is wrong with one JSONL record, worded for a person; None when nothing is.

    The same rules as the vectorised :func:`_row_checks`, plus the JSON types polars cannot show
    per row. Runs only on rows already known to be bad, or when polars cannot read the file."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        return f"malformed JSON: {detail}"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for name in JSONL_REQUIRED:
        if name not in obj:
            return f"missing required field {name!r}; fields found: {sorted(obj)}"
        if obj[name] is None:
            return f"required field {name!r} is null; fields found: {sorted(obj)}"
    pid = obj["prompt_id"]
    if not (isinstance(pid, str) or (isinstance(pid, int) and not isinstance(pid, bool))):
        return f"prompt_id must be a string or an integer, got {pid!r}"
    tr = obj["turn_rewards"]
    if not isinstance(tr, dict):
        return f'turn_rewards must be a non-empty object {{"t1": r1, "t2": r2, ...}}, got {tr!r}'
    turns: list[int] = []
    for key, value in tr.items():
        if not _TURN_KEY.fullmatch(key):
            continue  # not a turn reward: ignored, as weight_sft.py does
        if not _CANONICAL_TURN_KEY.fullmatch(key):
            return f"turn_rewards key {key!r} is not of the form t1, t2, ..."
        if value is None:  # a null turn is an absent turn
            continue
        if not _is_number(value):
            return f"turn_rewards[{key!r}] is not a number: {value!r}"
        if not _finite(value):
            return f"turn_rewards[{key!r}] is not finite: {value!r}"
        turns.append(int(key[1:]))
    if not turns:
        return f"turn_rewards must be a non-empty object of turn rewards t1, t2, ..., got {tr!r}"
    if sorted(turns) != list(range(1, len(turns) + 1)):
        return f"turn_rewards keys must be t1..tN without gaps (null = absent), got {tr!r}"
    for name in PENALTY_FIELDS:
        value = obj.get(name)
        if value is None:
            continue
        if not _is_number(value) or not _finite(value) or value > 0:
            return f"{name} must be a finite number <= 0, got {value!r}"
        break
    return None


def _report_bad(
    path: Path,
    lines: list[tuple[int, bytes]],
    bad: list[int],
    fallback: list[str],
    on_bad_rows: OnBadRows,
    report: BadRowsReport,
) -> None:
    """Raise for the first bad row (``error``) or count them all (``skip``); each reported row's
    message comes from :func:`_line_problem`, else from the vectorised check that caught it."""
    if not bad:
        return

    def describe(j: int) -> str:
        i = bad[j]
        lineno, line = lines[i]
        why = _line_problem(line) or (fallback[j] if j < len(fallback) else "bad row")
        return f"{path}: line {lineno} (row {i + 1}): {why}"

    if on_bad_rows == "error":
        more = f" ({len(bad)} bad rows in all)" if len(bad) > 1 else ""
        raise ValueError(describe(0) + more)
    room = max(0, _MAX_EXAMPLES - len(report.examples))
    report.examples.extend(describe(j) for j in range(min(room, len(bad))))
    report.n_skipped += len(bad)


def _empty_normalised() -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            "prompt_id": pl.String,
            "turn_rewards": pl.List(pl.Float64),
            "answer_norms": pl.List(pl.String),
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
    """Return R of every row of a normalised frame (DESIGN item 3), vectorised."""
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
