"""The ingest stage: a dataset source and a selection in, the problem table out.

The problem table has one row per problem and four string columns: ``prompt_id`` (stable and
unique), ``question``, ``gold`` (the final answer, taken from the answer field by
:func:`drift_core.verify.extract_gold`) and ``source`` (``DataConfig.source`` as given).

Sources (``DataConfig.source``)
-------------------------------
``builtin:arith``
    Seeded integer arithmetic ("What is 47 + 18 - 5?", gold "60"; ``*`` binds tighter than ``+``/``-``,
    answers may be negative). Operands have ``arith.digits`` digits (0-9 for one digit). The RNG seed
    is derived from ``(arith.seed, split)``, so each split has its own stream, and problem ``i`` of a
    split does not depend on ``arith.n`` for the train split (raising ``n`` extends the set). Questions
    are distinct within a split, and every split other than ``train`` draws until it has ``n``
    questions none of which occurs in the train split of the same config (``n`` problems), so
    train and test are disjoint. A problem space too small for that is an error. Ids:
    ``arith-<seed>-<split>-<i>``.
``builtin:guess``
    A seeded number-guessing game: every question is "I am thinking of a whole number from 1 to 64.
    Guess it." (``guess.low``/``guess.high``), the gold is the secret, so the question says nothing
    about the answer and only feedback (``protocol.feedback: {kind: direction}``, "Incorrect. The
    answer is larger."/"smaller.") can find it. The range's secrets are partitioned once, by
    ``guess.seed``: the range is cut into consecutive pairs (low, low+1), (low+2, low+3), ..., and a
    seeded coin per pair sends one of the two to ``train`` and the other to ``test`` (an odd-sized
    range's last value goes to ``train``). So the splits share no secret, each holds half of them,
    spread over the whole range (every depth of a binary search occurs in both), and a model that
    memorised the training secrets gains nothing on the test split. The games take the split's
    secrets in rounds, each round every secret of the half once in an order shuffled by an RNG seeded
    by ``(guess.seed, low, high, split)``, so every secret occurs equally often (up to one) and game
    ``i`` does not depend on ``guess.n`` (raising ``n`` extends the set). Splits: ``train`` and ``test`` only. Ids: ``guess-<seed>-<split>-<i>``, so ids
    differ between splits too. A question-blind constant sequence of T guesses solves about T/64 of
    the games when it does not know the split's half, T/32 when chosen on the split's secrets (the
    ceiling ``tasks/ceilings.py`` prints: 20.0% for the default test split of 300 games at T = 6); a
    binary search on the direction feedback finds 63 of the 64 secrets
    within 6 turns and all within 7.
``builtin:gsm8k``
    The vendored GSM8K files (``tasks/builtin_data/gsm8k``, split ``train`` 7,473 or ``test`` 1,319
    rows), gold = the text after ``####``; ids ``gsm8k-<split>-<row index>``. For every builtin the
    field settings (``question_field``, ``answer_field``, ``id_field``, ``gold_style``) are ignored:
    their columns are ``question`` and ``answer``.
Local files: ``.jsonl``/``.ndjson``, ``.json`` (a list of objects), ``.parquet``, ``.csv``
    A path relative to ``base_dir`` (or the working directory). Columns are mapped by
    ``question_field``/``answer_field``/``id_field``; the gold by ``gold_style`` (``auto`` detects
    ``####``, ``The answer is:``, ``\\boxed{}``, else the whole answer). Without ``id_field`` the id
    is ``<file stem>-<row index>`` (0-based, counting every non-blank record, bad ones included, so
    ids do not move when a bad row is skipped or fixed). ``split``/``subset`` are ignored. CSV cells
    are read as text; non-string values of other formats are converted with ``str`` (lists and
    objects as JSON).
``hf:<dataset id>[@<revision>]``
    ``datasets.load_dataset(id, subset, split=split, revision=revision)`` (``pip install drift[hf]``),
    then the same column mapping as a local file; ids ``<dataset name>-<split>-<row index>`` without
    ``id_field`` (so ``hf:openai/gsm8k`` with subset ``main`` gives the same ids as
    ``builtin:gsm8k``). Pin ``@<revision>`` (a commit) for a cache key that notices upstream
    changes: without it the key holds only id, subset and split.

Column presets are plain configs::

    GSM8K       source: hf:openai/gsm8k  subset: main  question_field: question  answer_field: answer
                gold_style: gsm8k
    MetaMathQA  source: hf:meta-math/MetaMathQA  question_field: query  answer_field: response
                gold_style: metamath  filter_field: type  filter_value: "MATH_*"   (the paper's MATH
                prompts; types are MATH_AnsAug, MATH_Rephrased, MATH_SV, MATH_FOBAR, GSM_*)
    MATH-500    source: hf:HuggingFaceH4/MATH-500  split: test  question_field: problem
                answer_field: answer  gold_style: plain  id_field: unique_id
                (or answer_field: solution  gold_style: boxed)

Selection, in this order
------------------------
1. ``filter_field``/``filter_value``: keep rows whose field (as text) equals ``filter_value``, or,
   when ``filter_value`` ends with ``*``, starts with the text before the ``*`` (``MATH_*``). Both or
   neither must be set. Rows filtered out are not validated.
2. Validation of the kept rows: a non-empty question, an answer with a gold answer in it, a
   non-empty unique id. With ``on_bad_rows="error"`` (default) the first bad row raises
   :class:`IngestError` naming the file and row (line for JSONL); with ``"skip"`` bad rows (and
   malformed JSONL lines, and later copies of a duplicated id) are dropped and counted in the
   :class:`IngestReport`.
3. ``shuffle_seed``: order by ``sha256(f"{shuffle_seed}:{prompt_id}")``, which does not depend on
   any library's RNG and orders a subset the same way as the whole set.
4. ``offset``, then ``limit``.

An empty result is an error (it is always a config mistake), naming the counts at each step.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from prefect import task
from pydantic import BaseModel, Field

from drift_core.choices import gold_index, render_choices
from drift_core.errors import UserError
from drift_core.schemas import ArithConfig, DataConfig, GuessConfig
from drift_core.verify import GoldStyle, extract_gold
from tasks.caching import served_from_store
from tasks.store import ArtifactStore, Manifest

log = logging.getLogger(__name__)

__all__ = [
    "IngestError",
    "IngestReport",
    "content_hash",
    "generate_arith",
    "generate_guess",
    "guess_secrets",
    "ingest",
    "ingest_key",
    "load_problems",
    "problem_origins",
    "source_identity",
]

#: Bump when parsing or id rules change: it is part of every ingest cache key.
INGEST_VERSION = 1
#: Bump when the arithmetic generator's output for a given config changes.
ARITH_VERSION = 1
#: Bump when the guessing game's output (question text, partition, secrets) for a given config changes.
GUESS_VERSION = 1
GUESS_QUESTION = "I am thinking of a whole number from {low} to {high}. Guess it."
GUESS_SPLITS = ("train", "test")
BUILTINS = ("builtin:arith", "builtin:guess", "builtin:gsm8k")

BUILTIN_DIR = Path(__file__).parent / "builtin_data"
GSM8K_SPLITS = ("train", "test")
LOCAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")
COLUMNS = ("prompt_id", "question", "gold", "source")
SCHEMA = {c: pl.String for c in COLUMNS}
_MAX_EXAMPLES = 5


class IngestError(UserError, ValueError):
    """The data source cannot be turned into a problem table; the message says where and why."""


class IngestReport(BaseModel):
    """What ``load_problems`` read and dropped."""

    rows_read: int = Field(ge=0, description="records in the source (bad ones included)")
    rows_kept: int = Field(ge=0, description="rows of the returned table")
    rows_skipped: int = Field(default=0, ge=0, description="bad rows dropped (on_bad_rows=skip)")
    rows_filtered: int = Field(default=0, ge=0, description="rows dropped by filter_field/filter_value")
    skipped_examples: list[str] = Field(default_factory=list, description="first reasons for skipping")


# --------------------------------------------------------------------------------------------
# Raw records
# --------------------------------------------------------------------------------------------


@dataclass
class _Record:
    index: int  # 0-based record index, the default id suffix
    where: str  # "line 12" or "row 11", for messages
    values: dict[str, Any] | None  # None when the record could not be parsed
    error: str | None = None


@dataclass
class _Table:
    label: str  # file or dataset name, for messages
    columns: list[str]
    records: list[_Record]


@dataclass(frozen=True)
class _Mapping:
    question: str
    answer: str | None  # None: options as columns (the gold is the correct_field column's option)
    id: str | None
    style: GoldStyle
    default_id: Callable[[int], str]


def _to_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _jsonl_table(lines: Iterable[str], label: str) -> _Table:
    records: list[_Record] = []
    columns: dict[str, None] = {}
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"line {line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append(
                _Record(
                    len(records),
                    where,
                    None,
                    f"malformed JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})",
                )
            )
            continue
        if not isinstance(obj, dict):
            records.append(
                _Record(len(records), where, None, f"expected a JSON object, got {type(obj).__name__}")
            )
            continue
        columns.update(dict.fromkeys(obj))
        records.append(_Record(len(records), where, obj))
    return _Table(label, list(columns), records)


def _read_jsonl(path: Path) -> _Table:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            return _jsonl_table(f, str(path))
    except UnicodeDecodeError as exc:
        raise IngestError(f"{path}: not UTF-8 text ({exc})") from exc


def _read_json(path: Path) -> _Table:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise IngestError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise IngestError(f"{path}: not UTF-8 text ({exc})") from exc
    if not isinstance(data, list):
        raise IngestError(
            f"{path}: a .json source must be a list of objects, got {type(data).__name__} "
            "(use .jsonl for one object per line)"
        )
    records: list[_Record] = []
    columns: dict[str, None] = {}
    for i, obj in enumerate(data):
        if isinstance(obj, dict):
            columns.update(dict.fromkeys(obj))
            records.append(_Record(i, f"item {i}", obj))
        else:
            records.append(_Record(i, f"item {i}", None, f"expected a JSON object, got {type(obj).__name__}"))
    return _Table(str(path), list(columns), records)


def _frame_table(df: pl.DataFrame, label: str, needed: Iterable[str]) -> _Table:
    cols = [c for c in dict.fromkeys(needed) if c in df.columns]
    data = {c: df.get_column(c).to_list() for c in cols}
    records = [_Record(i, f"row {i}", {c: data[c][i] for c in cols}) for i in range(df.height)]
    return _Table(label, list(df.columns), records)


def _read_polars(path: Path, needed: Iterable[str]) -> _Table:
    try:
        csv = path.suffix.lower() == ".csv"
        df = pl.read_csv(path, infer_schema=False) if csv else pl.read_parquet(path)
    except Exception as exc:  # polars raises several error types for unreadable files
        raise IngestError(f"{path}: cannot read as {path.suffix[1:]}: {exc}") from exc
    return _frame_table(df, str(path), needed)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _kind(source: str) -> str:
    if source.startswith("builtin:"):
        if source not in BUILTINS:
            raise IngestError(f"unknown builtin source {source!r}: expected one of {', '.join(BUILTINS)}")
        return source
    if source.startswith("hf:"):
        if not source[3:].split("@", 1)[0]:
            raise IngestError(f"source {source!r}: expected hf:<dataset id>[@<revision>]")
        return "hf"
    return "file"


def _local_path(cfg: DataConfig, base_dir: Path | None) -> Path:
    path = Path(cfg.source).expanduser()
    if not path.is_absolute():
        path = (Path(base_dir) if base_dir is not None else Path.cwd()) / path
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise IngestError(
            f"source {cfg.source!r}: unsupported file type {path.suffix!r}; expected one of "
            f"{', '.join(LOCAL_SUFFIXES)}, {', '.join(BUILTINS)} or hf:<dataset id>"
        )
    if not path.is_file():
        raise IngestError(f"source {cfg.source!r}: file not found: {path}")
    return path


def _hf_parts(source: str) -> tuple[str, str | None]:
    ident, _, revision = source[3:].partition("@")
    return ident, revision or None


def _gsm8k_path(split: str) -> Path:
    if split not in GSM8K_SPLITS:
        raise IngestError(f"builtin:gsm8k has splits {', '.join(GSM8K_SPLITS)}, not {split!r}")
    return BUILTIN_DIR / "gsm8k" / f"{split}.jsonl.gz"


def _arith_space(a: ArithConfig) -> int:
    lo, hi = _operand_range(a.digits)
    return (hi - lo + 1) ** a.n_operands * len(set(a.ops)) ** (a.n_operands - 1)


def _operand_range(digits: int) -> tuple[int, int]:
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


def _evaluate(operands: list[int], ops: list[str]) -> int:
    """Integer value with the usual precedence: ``*`` before ``+`` and ``-``, left to right."""
    total, term = 0, operands[0]
    sign = 1
    for op, x in zip(ops, operands[1:], strict=True):
        if op == "*":
            term *= x
        else:
            total += sign * term
            sign, term = (1 if op == "+" else -1), x
    return total + sign * term


def _arith_stream(a: ArithConfig, split: str):
    digest = hashlib.sha256(f"drift-arith:v{ARITH_VERSION}:{a.seed}:{split}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    lo, hi = _operand_range(a.digits)
    while True:
        operands = [rng.randint(lo, hi) for _ in range(a.n_operands)]
        ops = [rng.choice(a.ops) for _ in range(a.n_operands - 1)]
        expr = " ".join([str(operands[0])] + [f"{o} {x}" for o, x in zip(ops, operands[1:], strict=True)])
        yield f"What is {expr}?", str(_evaluate(operands, ops))


def _draw_arith(a: ArithConfig, split: str, exclude: set[str], context: str) -> list[tuple[str, str]]:
    available = _arith_space(a) - len(exclude)
    if a.n > available:
        raise IngestError(
            f"builtin:arith split {split!r}: {a.n} distinct problems requested but only {available} exist "
            f"(digits={a.digits}, n_operands={a.n_operands}, ops={a.ops}"
            + (f", minus {len(exclude)} train problems" if exclude else "")
            + f"); lower {context}.arith.n or raise digits/n_operands"
        )
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    budget = 30 * a.n + 10_000
    for question, gold in _arith_stream(a, split):
        budget -= 1
        if budget < 0:
            raise IngestError(
                f"builtin:arith split {split!r}: drew only {len(out)} of {a.n} distinct problems; the problem "
                f"space is nearly exhausted, lower {context}.arith.n or raise digits/n_operands"
            )
        if question in seen or question in exclude:
            continue
        seen.add(question)
        out.append((question, gold))
        if len(out) == a.n:
            return out
    raise AssertionError("unreachable")  # pragma: no cover


def generate_arith(a: ArithConfig, split: str = "train", context: str = "data") -> list[tuple[str, str]]:
    """``a.n`` distinct (question, gold) pairs of ``split``; non-train splits avoid the train set.
    ``context`` is the config key of the data section, for messages."""
    exclude = set() if split == "train" else {q for q, _ in _draw_arith(a, "train", set(), context)}
    return _draw_arith(a, split, exclude, context)


def _arith_table(cfg: DataConfig, context: str = "data") -> _Table:
    problems = generate_arith(cfg.arith, cfg.split, context)
    records = [_Record(i, f"problem {i}", {"question": q, "answer": g}) for i, (q, g) in enumerate(problems)]
    return _Table("builtin:arith", ["question", "answer"], records)


def _guess_rng(g: GuessConfig, what: str) -> random.Random:
    digest = hashlib.sha256(
        f"drift-guess:v{GUESS_VERSION}:{g.seed}:{g.low}:{g.high}:{what}".encode()
    ).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def guess_secrets(g: GuessConfig, split: str, context: str = "data") -> list[int]:
    """The secrets of ``split``'s half of the range, ascending (the partition in the module docstring)."""
    if split not in GUESS_SPLITS:
        raise IngestError(
            f"builtin:guess has splits {', '.join(GUESS_SPLITS)}, not {split!r} (set {context}.split): "
            "the range's secrets are partitioned into exactly these two"
        )
    coin = _guess_rng(g, "partition")
    train: list[int] = []
    test: list[int] = []
    for first in range(g.low, g.high + 1, 2):
        if first == g.high:  # an odd-sized range's last value
            train.append(first)
            break
        a, b = (first, first + 1) if coin.random() < 0.5 else (first + 1, first)
        train.append(a)
        test.append(b)
    return sorted(train if split == "train" else test)


def generate_guess(g: GuessConfig, split: str = "train", context: str = "data") -> list[tuple[str, str]]:
    """``g.n`` (question, gold) games of ``split``: the range's question and a secret of the split's half."""
    secrets = guess_secrets(g, split, context)
    question = GUESS_QUESTION.format(low=g.low, high=g.high)
    rng = _guess_rng(g, f"split:{split}")
    drawn: list[int] = []
    while len(drawn) < g.n:  # rounds: every secret of the half once per round, in a seeded order
        round_ = list(secrets)
        rng.shuffle(round_)
        drawn += round_
    return [(question, str(secret)) for secret in drawn[: g.n]]


def _guess_table(cfg: DataConfig, context: str = "data") -> _Table:
    problems = generate_guess(cfg.guess, cfg.split, context)
    records = [_Record(i, f"game {i}", {"question": q, "answer": g}) for i, (q, g) in enumerate(problems)]
    return _Table("builtin:guess", ["question", "answer"], records)


def _load_hf(cfg: DataConfig, needed: Iterable[str]) -> tuple[_Table, list[str]]:
    """The dataset's rows (several subsets: concatenated in the given order) and their default ids:
    ``<name>-<split>-<row>``, or ``<name>-<subset>-<split>-<row>`` when ``subset`` is a list."""
    ident, revision = _hf_parts(cfg.source)
    name = ident.rsplit("/", 1)[-1]
    try:
        import datasets
    except ImportError as exc:
        raise IngestError(
            f"source {cfg.source!r} needs the Hugging Face datasets library: pip install drift[hf]"
        ) from exc
    subsets = cfg.subset if isinstance(cfg.subset, list) else [cfg.subset]
    needed = list(needed)
    tables: list[_Table] = []
    ids: list[str] = []
    for subset in subsets:
        try:
            ds = datasets.load_dataset(ident, subset, split=cfg.split, revision=revision)
            df = pl.from_arrow(ds.with_format("arrow")[:])
        except Exception as exc:  # network, auth, unknown split: re-raise with the config that caused it
            raise IngestError(
                f"source {cfg.source!r} (subset={subset!r}, split={cfg.split!r}): load_dataset failed: {exc}"
            ) from exc
        tables.append(_frame_table(df, f"{ident}[{subset or ''}:{cfg.split}]", needed))
        prefix = f"{name}-{subset}" if isinstance(cfg.subset, list) else name
        ids += [f"{prefix}-{cfg.split}-{i}" for i in range(df.height)]
    if len(tables) == 1:
        return tables[0], ids
    records: list[_Record] = []
    for t in tables:  # "where" names the subset, so a bad row can be found
        offset = len(records)
        records += [_Record(offset + r.index, f"{t.label} {r.where}", r.values, r.error) for r in t.records]
    columns = list(dict.fromkeys(c for t in tables for c in t.columns))
    return _Table(f"{ident}[{len(tables)} subsets:{cfg.split}]", columns, records), ids


def _fields(cfg: DataConfig) -> list[str]:
    """The columns the mapping reads."""
    answer = [] if cfg.correct_field is not None else [cfg.answer_field]
    options = [cfg.correct_field, *(cfg.incorrect_fields or []), cfg.choices_field]
    extra = [f for f in (*options, cfg.id_field, cfg.filter_field) if f]
    return list(dict.fromkeys([cfg.question_field, *answer, *extra]))


def _open_source(cfg: DataConfig, base_dir: Path | None, context: str = "data") -> tuple[_Table, _Mapping]:
    kind = _kind(cfg.source)
    answer = None if cfg.correct_field is not None else cfg.answer_field
    user_mapping = dict(question=cfg.question_field, answer=answer, id=cfg.id_field, style=cfg.gold_style)
    needed = _fields(cfg)
    if kind.startswith("builtin:") and cfg.multiple_choice:
        raise IngestError(f"{cfg.source} is not multiple choice; unset {context}.correct_field/choices_field")
    if kind == "builtin:arith":
        seed, split = cfg.arith.seed, cfg.split
        mapping = _Mapping("question", "answer", None, "plain", lambda i: f"arith-{seed}-{split}-{i}")
        return _arith_table(cfg, context), mapping
    if kind == "builtin:guess":
        seed, split = cfg.guess.seed, cfg.split
        mapping = _Mapping("question", "answer", None, "plain", lambda i: f"guess-{seed}-{split}-{i}")
        return _guess_table(cfg, context), mapping
    if kind == "builtin:gsm8k":
        split = cfg.split
        table = _read_jsonl(_gsm8k_path(split))
        table.label = f"builtin:gsm8k[{split}]"
        return table, _Mapping("question", "answer", None, "gsm8k", lambda i: f"gsm8k-{split}-{i}")
    if kind == "hf":
        table, ids = _load_hf(cfg, needed)
        return table, _Mapping(**user_mapping, default_id=ids.__getitem__)
    path = _local_path(cfg, base_dir)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        table = _read_jsonl(path)
    elif suffix == ".json":
        table = _read_json(path)
    else:
        table = _read_polars(path, needed)
    stem = path.stem
    return table, _Mapping(**user_mapping, default_id=lambda i: f"{stem}-{i}")


# --------------------------------------------------------------------------------------------
# Validation and selection
# --------------------------------------------------------------------------------------------


def _check_columns(table: _Table, m: _Mapping, cfg: DataConfig, context: str) -> None:
    expected: dict[str, str | list[str]] = {"question_field": m.question}
    if m.answer is not None:
        expected["answer_field"] = m.answer
    if m.id:
        expected["id_field"] = m.id
    if cfg.filter_field:
        expected["filter_field"] = cfg.filter_field
    if cfg.correct_field is not None:
        expected["correct_field"] = cfg.correct_field
        expected["incorrect_fields"] = list(cfg.incorrect_fields or [])
    elif cfg.choices_field is not None:
        expected["choices_field"] = cfg.choices_field
    wanted = [c for v in expected.values() for c in ([v] if isinstance(v, str) else v)]
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        mapping = ", ".join(f"{k}={v!r}" for k, v in expected.items())
        keys = [k for k, v in expected.items() if set([v] if isinstance(v, str) else v) & set(missing)]
        raise IngestError(
            f"{table.label}: missing column(s) {missing}; found columns {table.columns}; "
            f"the mapping expects {mapping} (set {' / '.join(f'{context}.{k}' for k in keys)})"
        )


def _options(values: dict[str, Any], cfg: DataConfig, m: _Mapping) -> tuple[list[str], int]:
    """The options of a multiple-choice row and the index of the correct one (ValueError: why not)."""
    if cfg.correct_field is not None:
        fields = [cfg.correct_field, *(cfg.incorrect_fields or [])]
        options = [_to_text(values.get(f)) for f in fields]
        for f, o in zip(fields, options, strict=True):
            if o is None or not o.strip():
                raise ValueError(f"empty option (field {f!r})")
        return [o.strip() for o in options], 0
    raw = values.get(cfg.choices_field)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f"field {cfg.choices_field!r} is not a list of options: {raw[:80]!r}") from None
    if not isinstance(raw, list | tuple):
        raise ValueError(f"field {cfg.choices_field!r} is not a list of options: {raw!r}")
    options = [_to_text(o) for o in raw]
    if any(o is None or not o.strip() for o in options):
        raise ValueError(f"empty option in field {cfg.choices_field!r}")
    answer = values.get(m.answer)
    if answer is None or not str(answer).strip():
        raise ValueError(f"empty answer (field {m.answer!r})")
    try:
        correct = gold_index(str(answer), len(options))
    except ValueError as exc:
        raise ValueError(f"field {m.answer!r}: {exc}") from None
    return [o.strip() for o in options], correct


def _filter_match(cfg: DataConfig, context: str) -> Callable[[str | None], bool] | None:
    if (cfg.filter_field is None) != (cfg.filter_value is None):
        raise IngestError(f"{context}.filter_field and {context}.filter_value must be set together")
    if cfg.filter_field is None:
        return None
    value = cfg.filter_value
    if value.endswith("*"):
        prefix = value[:-1]
        return lambda v: v is not None and v.startswith(prefix)
    return lambda v: v == value


def _shuffle_key(seed: int, prompt_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()


def load_problems(
    cfg: DataConfig, base_dir: Path | None = None, context: str = "data"
) -> tuple[pl.DataFrame, IngestReport]:
    """Read ``cfg.source``, validate it and apply the selection; see the module docstring.
    ``context`` is where ``cfg`` sits in the config (``data``, ``eval.data``, ``eval.suite[1].data``):
    error messages name the keys to set under it."""
    df, report, _ = _load(cfg, base_dir, context)
    return df, report


def problem_origins(cfg: DataConfig, base_dir: Path | None = None, context: str = "data") -> dict[str, str]:
    """Where each prompt id of the problem table comes from (``line 12``, ``row 3``), for messages:
    the table itself does not keep it, so this reads the source again (only on the error path)."""
    return _load(cfg, base_dir, context)[2]


class _BadRow(ValueError):
    """A row that cannot be a problem; the message says why."""


def _problem(values: dict[str, Any], index: int, cfg: DataConfig, m: _Mapping) -> tuple[str, str, str]:
    """One row as (prompt id, question, gold); multiple-choice rows get their options rendered
    under the question and the correct option's letter as gold."""
    question = _to_text(values.get(m.question))
    if question is None or not question.strip():
        raise _BadRow(f"empty question (field {m.question!r})")
    if m.id:
        prompt_id = _to_text(values.get(m.id))
        if prompt_id is None or not prompt_id.strip():
            raise _BadRow(f"empty prompt id (field {m.id!r})")
    else:
        prompt_id = m.default_id(index)
    if cfg.multiple_choice:
        try:
            options, correct = _options(values, cfg, m)
            question, gold = render_choices(
                question, options, correct, prompt_id, cfg.choice_seed, cfg.shuffle_choices
            )
        except ValueError as exc:
            raise _BadRow(f"multiple choice: {exc}") from exc
        return prompt_id, question, gold
    answer = _to_text(values.get(m.answer))
    if answer is None or not answer.strip():
        raise _BadRow(f"empty answer (field {m.answer!r})")
    try:
        return prompt_id, question, extract_gold(answer, m.style)
    except ValueError as exc:
        raise _BadRow(f"no gold answer in field {m.answer!r}: {exc}") from exc


def _load(cfg: DataConfig, base_dir: Path | None, context: str) -> tuple[pl.DataFrame, IngestReport, dict]:
    table, m = _open_source(cfg, Path(base_dir) if base_dir is not None else None, context)
    _check_columns(table, m, cfg, context)
    match = _filter_match(cfg, context)
    skip = cfg.on_bad_rows == "skip"
    skipped: list[str] = []
    filtered = 0

    def bad(rec: _Record, reason: str) -> None:
        message = f"{table.label}: {rec.where}: {reason}"
        if not skip:
            raise IngestError(f"{message} (set {context}.on_bad_rows=skip to drop bad rows)")
        skipped.append(message)

    ids: list[str] = []
    questions: list[str] = []
    golds: list[str] = []
    first_seen: dict[str, str] = {}
    duplicates: list[str] = []
    for rec in table.records:
        if rec.values is None:
            bad(rec, rec.error or "unreadable record")
            continue
        if match is not None and not match(_to_text(rec.values.get(cfg.filter_field))):
            filtered += 1
            continue
        try:
            prompt_id, question, gold = _problem(rec.values, rec.index, cfg, m)
        except _BadRow as exc:
            bad(rec, str(exc))
            continue
        if prompt_id in first_seen:
            if skip:
                bad(rec, f"duplicate prompt id {prompt_id!r} (first at {first_seen[prompt_id]})")
                continue
            duplicates.append(f"{prompt_id!r} ({first_seen[prompt_id]} and {rec.where})")
            continue
        first_seen[prompt_id] = rec.where  # also the origins returned for messages
        ids.append(prompt_id)
        questions.append(question)
        golds.append(gold)
    if duplicates:
        more = f" and {len(duplicates) - _MAX_EXAMPLES} more" if len(duplicates) > _MAX_EXAMPLES else ""
        raise IngestError(
            f"{table.label}: duplicate prompt ids {', '.join(duplicates[:_MAX_EXAMPLES])}{more} "
            f"(field {m.id!r}); ids must be unique"
        )

    order = list(range(len(ids)))
    if cfg.shuffle_seed is not None:
        seed = cfg.shuffle_seed
        order.sort(key=lambda i: _shuffle_key(seed, ids[i]))
    stop = None if cfg.limit is None else cfg.offset + cfg.limit
    order = order[cfg.offset : stop]
    if not order:
        raise IngestError(
            f"{table.label}: no problems left: {len(table.records)} read, {len(skipped)} skipped, "
            f"{filtered} filtered out (filter {cfg.filter_field}={cfg.filter_value!r}), "
            f"{len(ids)} valid, offset={cfg.offset}, limit={cfg.limit}"
        )
    df = pl.DataFrame(
        {
            "prompt_id": [ids[i] for i in order],
            "question": [questions[i] for i in order],
            "gold": [golds[i] for i in order],
            "source": [cfg.source] * len(order),
        },
        schema=SCHEMA,
    )
    report = IngestReport(
        rows_read=len(table.records),
        rows_kept=df.height,
        rows_skipped=len(skipped),
        rows_filtered=filtered,
        skipped_examples=skipped[:_MAX_EXAMPLES],
    )
    if skipped:
        log.warning("%s: skipped %d bad rows, e.g. %s", table.label, len(skipped), skipped[0])
    origins = {pid: f"{table.label}: {where}" for pid, where in first_seen.items()}
    return df, report, origins


# --------------------------------------------------------------------------------------------
# Hashes and the cache key
# --------------------------------------------------------------------------------------------


def content_hash(df: pl.DataFrame) -> str:
    """sha256 of the problem table's (prompt_id, question, gold) rows, in order."""
    h = hashlib.sha256()
    for row in df.select("prompt_id", "question", "gold").iter_rows():
        h.update(json.dumps(row, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _sha256_and_size(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def source_identity(cfg: DataConfig, base_dir: Path | str | None = None) -> dict[str, Any]:
    """What identifies the source's content, without reading it into a table: the file hash and size
    for a local file (not its location), the vendored file hash for GSM8K, the generator config for
    arith and guess, and id/subset/split/revision for a hub dataset."""
    kind = _kind(cfg.source)
    if kind == "builtin:arith":
        return {
            "kind": kind,
            "generator_version": ARITH_VERSION,
            "split": cfg.split,
            "arith": cfg.arith.model_dump(mode="json"),
        }
    if kind == "builtin:guess":
        return {
            "kind": kind,
            "generator_version": GUESS_VERSION,
            "split": cfg.split,
            "guess": cfg.guess.model_dump(mode="json"),
        }
    if kind == "builtin:gsm8k":
        path = _gsm8k_path(cfg.split)
        digest, size = _sha256_and_size(path)
        return {"kind": kind, "split": cfg.split, "file": path.name, "sha256": digest, "size": size}
    if kind == "hf":
        ident, revision = _hf_parts(cfg.source)
        return {"kind": "hf", "id": ident, "subset": cfg.subset, "split": cfg.split, "revision": revision}
    path = _local_path(cfg, Path(base_dir) if base_dir is not None else None)
    digest, size = _sha256_and_size(path)
    # the stem names the default prompt ids and the suffix picks the parser, so both matter
    return {"kind": "file", "name": path.name, "sha256": digest, "size": size}


_CHOICE_FIELDS = {"correct_field", "incorrect_fields", "choices_field", "shuffle_choices", "choice_seed"}


def ingest_key(cfg: DataConfig, base_dir: Path | str | None = None) -> str:
    """The ingest cache key: sha256 of the source identity and every selection field (the
    multiple-choice fields only for multiple-choice data, so other keys did not move when they came)."""
    exclude = {"arith", "guess", "split", "subset"} | (set() if cfg.multiple_choice else _CHOICE_FIELDS)
    selection = cfg.model_dump(mode="json", exclude=exclude)
    payload = {"version": INGEST_VERSION, "source": source_identity(cfg, base_dir), "selection": selection}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Prefect task
# --------------------------------------------------------------------------------------------


@task(name="ingest")
def ingest(
    cfg: DataConfig,
    store_root: str,
    base_dir: str | None = None,
    key: str | None = None,
    context: str = "data",
) -> Manifest:
    """Write the problem table to the artifact store (or return the stored one) and its manifest.
    ``key`` is ``ingest_key(cfg, base_dir)``; the flow passes it so Prefect's cache uses it too.
    ``context``: the config key of ``cfg`` (``eval.data``, ...), named in error messages."""
    store = ArtifactStore(store_root)
    key = key or ingest_key(cfg, base_dir)
    if (hit := served_from_store(store, "ingest", key)) is not None:
        return hit
    df, report = load_problems(cfg, Path(base_dir) if base_dir is not None else None, context)
    meta = {
        "rows_read": report.rows_read,
        "rows_skipped": report.rows_skipped,
        "rows_filtered": report.rows_filtered,
        "skipped_examples": report.skipped_examples,
        "source": cfg.source,
        "content_hash": content_hash(df),
    }
    return store.write_parquet(df, stage="ingest", key=key, meta=meta)
