"""Reading the paper reference scripts' JSONL trajectories for ``drift weights``, the way
``weight_sft.py`` reads them (see ``tasks.weights_io`` for the format and docs/reliability.md for
where drift is stricter).

One reading path: polars' NDJSON reader builds the table, vectorised checks find the bad rows and
one vectorised normaliser converts the columns. Python's ``json`` only steps in to name problems:
it words the message of each reported bad row (file, line, row, field), and when polars cannot
read the file as one table (a malformed line, NaN, a field of the wrong JSON type) it finds the
rows at fault, which are reported (or with ``on_bad_rows="skip"`` dropped and counted) before
polars reads the rest.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa

from drift_core.errors import InputError

__all__ = ["BadRowsReport", "OnBadRows", "parquet_storable", "penalty_field", "read_reference_jsonl"]

OnBadRows = Literal["error", "skip"]

JSONL_REQUIRED = ("prompt_id", "turn_rewards")
# weight_sft.py reads format_penalty whenever the FILE has that column (a record without it, or with
# null, counts 0), and trajectory_penalty only when no record has a format_penalty
PENALTY_FIELDS = ("format_penalty", "trajectory_penalty")
_TURN_KEY = re.compile(r"t([0-9]+)")  # a turn reward key; any other key is ignored (weight_sft.py)
_CANONICAL_TURN_KEY = re.compile(r"t[1-9][0-9]*")
MAX_EXAMPLES = 20


@dataclass
class BadRowsReport:
    """Rows dropped with ``on_bad_rows="skip"``: how many, and the first few reasons."""

    n_skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.n_skipped += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(message)


def is_numeric(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype.is_float()


def read_reference_jsonl(path: Path, on_bad_rows: OnBadRows, report: BadRowsReport) -> pl.DataFrame:
    """The one JSONL path: polars reads, vectorised checks, one vectorised normaliser. The file's
    lines are split in Python only when a row has to be named or polars cannot read the file."""
    raw, _ = _polars_table(path)
    lines: list[tuple[int, bytes]] | None = None  # row r (1-based) of the file is lines[r - 1]
    rows: np.ndarray | None = None  # the file row (0-based) of each row of ``raw``
    if raw is None:  # find the rows polars cannot take, report them, read the rest
        lines = _nonblank_lines(path)
        penalty = penalty_field(_keys_in(lines))
        rejected = [i for i, (_, line) in enumerate(lines) if _line_problem(line, penalty) is not None]
        _report_bad(path, lines, rejected, [], on_bad_rows, report, penalty)
        rows = np.setdiff1d(np.arange(len(lines)), rejected)
        if rows.size == 0:
            return _empty_normalised()
        raw, why = _polars_table(path, [lines[i] for i in rows])
        if raw is None:
            raise InputError(
                f"{path}: polars cannot read the records as one table ({why}), though each row "
                "passes the checks: a field probably holds different JSON types in different rows"
            )
    flags = raw.select(
        [c.fill_null(False).alias(f"bad{i}") for i, (c, _) in enumerate(_row_checks(raw.schema))]
    )
    mask = np.zeros(raw.height, dtype=bool)
    for name in flags.columns:
        mask |= flags[name].to_numpy()
    if mask.any():
        if lines is None:
            lines = _nonblank_lines(path)
            if len(lines) != raw.height:  # polars and Python disagree on what a line is
                raise ValueError(f"{path}: {len(lines)} non-blank lines but polars read {raw.height} rows")
            rows = np.arange(len(lines))
        assert rows is not None
        bad = np.flatnonzero(mask)
        checks = _row_checks(raw.schema)
        fallback = [  # only for the rows whose message is shown
            "; ".join(msg for i, (_, msg) in enumerate(checks) if flags[f"bad{i}"][int(b)])
            for b in bad[:MAX_EXAMPLES]
        ]
        _report_bad(path, lines, rows[bad].tolist(), fallback, on_bad_rows, report, penalty_field(raw.schema))
        raw = raw.filter(pl.Series(~mask))
    return _normalise_jsonl(raw)


def _keys_in(lines: list[tuple[int, bytes]]) -> set[str]:
    """Every top-level key of the records that parse as JSON objects (the columns ``datasets``
    would give the file)."""
    keys: set[str] = set()
    for _, line in lines:
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict):
            keys.update(obj)
    return keys


def _nonblank_lines(path: Path) -> list[tuple[int, bytes]]:
    """(line number, bytes) of every line that is not blank; blank lines are not rows."""
    return [(n, line) for n, line in enumerate(path.read_bytes().split(b"\n"), start=1) if line.strip()]


def _polars_table(
    path: Path, lines: list[tuple[int, bytes]] | None = None
) -> tuple[pl.DataFrame | None, str | None]:
    """polars' NDJSON reader over the file (or over some of its lines); (None, why) when it fails or
    gives types drift cannot use. An empty or blank file gives an empty frame."""
    source = path if lines is None else io.BytesIO(b"\n".join(line for _, line in lines))
    try:
        raw = pl.read_ndjson(source, infer_schema_length=None)
    except Exception as e:  # noqa: BLE001 - polars raises several types; the rows are found next
        if lines is None and not any(line.strip() for line in path.read_bytes().splitlines()):
            return _empty_raw(), None
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    why = _schema_problem(raw.schema)
    return (None, why) if why else (raw, None)


def _empty_raw() -> pl.DataFrame:
    return pl.DataFrame(schema={"prompt_id": pl.String, "turn_rewards": pl.Struct({"t1": pl.Float64})})


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
            if _TURN_KEY.fullmatch(f.name) and not (is_numeric(f.dtype) or f.dtype == pl.Null):
                return f"turn_rewards.{f.name} read as {f.dtype}"
    for name in PENALTY_FIELDS:
        d = schema.get(name)
        if d is not None and not (is_numeric(d) or d == pl.Null):
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


def penalty_field(columns: object) -> str | None:
    """The penalty column weight_sft.py reads for every record of a file with these columns:
    ``format_penalty`` if the file has it at all, else ``trajectory_penalty``, else none.

    The script loads the JSONL with ``datasets``, which gives every record every column of the
    file (null where a record lacks it), and tests ``"format_penalty" in example``: so once one
    record carries ``format_penalty``, a record without it reads null and counts 0, never its own
    ``trajectory_penalty``."""
    return next((n for n in PENALTY_FIELDS if n in columns), None)  # type: ignore[operator]


def _penalty_expr(schema: pl.Schema) -> pl.Expr:
    """The file's penalty column (:func:`penalty_field`), null as 0; 0 without one."""
    name = penalty_field(schema)
    return pl.lit(0.0) if name is None else pl.col(name).cast(pl.Float64).fill_null(0.0)


def _col(schema: pl.Schema, name: str) -> pl.Expr:
    return pl.col(name) if name in schema else pl.lit(None)


def _row_checks(schema: pl.Schema) -> list[tuple[pl.Expr, str]]:
    """(condition that marks a row bad, what is wrong): the same rules as :func:`_line_problem`."""
    turns, odd = _turn_fields(schema)
    checks = [
        (_col(schema, "prompt_id").is_null(), "prompt_id is missing or null"),
        (_col(schema, "prompt_id").cast(pl.String) == "", "prompt_id is empty"),
        (_col(schema, "turn_rewards").is_null(), "turn_rewards is missing or null"),
    ]
    for name in odd:
        checks.append(
            (_turn_expr(schema, name).is_not_null(), f"turn_rewards key {name!r} is not t1, t2, ...")
        )
    exprs = [_turn_expr(schema, n) for n in turns]
    if not exprs:
        checks.append((pl.int_range(pl.len()) >= 0, "turn_rewards holds no turn reward t1, t2, ..."))
    else:
        checks.append((pl.all_horizontal([e.is_null() for e in exprs]), "turn_rewards holds no turn reward"))
    for t, e in enumerate(exprs):
        checks.append((e.is_not_null() & ~e.is_finite(), f"turn reward t{t + 1} is not finite"))
    fp = _penalty_expr(schema)
    checks.append((~fp.is_finite() | (fp > 0), "the format penalty is not a finite number <= 0"))
    return checks


def _normalise_jsonl(raw: pl.DataFrame) -> pl.DataFrame:
    """Checked reference records -> the normalised columns (see the module docstring)."""
    if raw.height == 0:
        return _empty_normalised()
    schema = raw.schema
    turns, _ = _turn_fields(schema)
    exprs = [_turn_expr(schema, n) for n in turns]
    # struct -> list column through numpy (polars' concat_list/drop_nulls are slow on 1M rows):
    # a [n, k] matrix, NaN where a turn is absent. Each row's list runs to its last present turn;
    # an absent turn before it is a reward of 0 at its own index, as weight_sft.py reads a null
    # (``float(None)`` fails, the script takes 0) and discounts every turn by its key's number
    mat = raw.select(exprs).to_numpy().astype(np.float64, copy=True).reshape(raw.height, len(exprs))
    absent = np.isnan(mat)
    length = np.where(absent.all(axis=1), 0, mat.shape[1] - np.argmax(~absent[:, ::-1], axis=1))
    mat[absent] = 0.0
    present = np.arange(mat.shape[1])[None, :] < length[:, None]
    offsets = np.zeros(raw.height + 1, dtype=np.int64)
    np.cumsum(length, out=offsets[1:])
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
        if inner in (pl.String, pl.Null) or is_numeric(inner):
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


def _line_problem(line: bytes, penalty: str | None) -> str | None:
    """What is wrong with one JSONL record, worded for a person; None when nothing is.

    The same rules as the vectorised :func:`_row_checks`, plus the JSON types polars cannot show
    per row. Runs only on rows already known to be bad, or when polars cannot read the file.
    ``penalty`` is the file's penalty column (:func:`penalty_field`); the other one is not read."""
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
        if value is None:  # a null turn is an absent turn (polars reads an absent key as null too)
            continue
        if not _CANONICAL_TURN_KEY.fullmatch(key):
            return f"turn_rewards key {key!r} is not of the form t1, t2, ..."
        if not _is_number(value):
            return f"turn_rewards[{key!r}] is not a number: {value!r}"
        if not _finite(value):
            return f"turn_rewards[{key!r}] is not finite: {value!r}"
        turns.append(int(key[1:]))
    if not turns:
        return f"turn_rewards must be a non-empty object of turn rewards t1, t2, ..., got {tr!r}"
    if pid == "":
        return "prompt_id is empty (weight_sft.py refuses it too)"
    value = obj.get(penalty) if penalty else None
    if value is not None and (not _is_number(value) or not _finite(value) or value > 0):
        return f"{penalty} must be a finite number <= 0, got {value!r}"
    return None


def _report_bad(
    path: Path,
    lines: list[tuple[int, bytes]],
    bad: list[int],
    fallback: list[str],
    on_bad_rows: OnBadRows,
    report: BadRowsReport,
    penalty: str | None,
) -> None:
    """Raise for the first bad row (``error``) or count them all (``skip``); each reported row's
    message comes from :func:`_line_problem`, else from the vectorised check that caught it."""
    if not bad:
        return

    def describe(j: int) -> str:
        i = bad[j]
        lineno, line = lines[i]
        why = _line_problem(line, penalty) or (fallback[j] if j < len(fallback) else "bad row")
        return f"{path}: line {lineno} (row {i + 1}): {why}"

    if on_bad_rows == "error":
        more = f" ({len(bad)} bad rows in all)" if len(bad) > 1 else ""
        raise InputError(describe(0) + more)
    room = max(0, MAX_EXAMPLES - len(report.examples))
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


def _has_empty_struct(dtype: pl.DataType) -> bool:
    if isinstance(dtype, pl.Struct):
        return not dtype.fields or any(_has_empty_struct(f.dtype) for f in dtype.fields)
    if isinstance(dtype, pl.List | pl.Array):
        return _has_empty_struct(dtype.inner)
    return False


def parquet_storable(df: pl.DataFrame) -> pl.DataFrame:
    """``df`` with every column that holds an object with no fields anywhere in its type (the
    reference generation script writes ``reward_details.tN.info`` as ``{}`` for a turn without an
    answer; in a file where it is ``{}`` in every row polars reads a struct with no fields, which
    parquet cannot store) replaced by its JSON text, null kept null. Other columns are untouched."""
    bad = [name for name, dtype in df.schema.items() if _has_empty_struct(dtype)]
    if not bad:
        return df
    return df.with_columns(
        pl.when(pl.col(name).is_not_null())
        .then(pl.struct(pl.col(name).alias("v")).struct.json_encode().str.slice(5).str.head(-1))
        .alias(name)
        for name in bad
    )
