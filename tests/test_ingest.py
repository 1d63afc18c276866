"""The ingest stage: builtin sources, local formats, bad input, selection, hashes, the Prefect task."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import polars as pl
import pytest

from drift_core.schemas import ArithConfig, DataConfig
from tasks import ingest as ingest_mod
from tasks.ingest import (
    IngestError,
    content_hash,
    generate_arith,
    ingest,
    ingest_key,
    load_problems,
    source_identity,
)
from tasks.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]

ROWS = [
    {"question": "What is 1 + 1?", "answer": "It is 2.\n#### 2", "uid": "a", "type": "MATH_SV"},
    {"question": "What is 2 * 3?", "answer": "We get \\boxed{6}.", "uid": "b", "type": "GSM_AnsAug"},
    {
        "question": "Half of 1?",
        "answer": "So... The answer is: \\frac{1}{2}",
        "uid": "c",
        "type": "MATH_FOBAR",
    },
    {"question": "What is 1,000 + 234?", "answer": "1,234", "uid": "d", "type": "MATH_SV"},
]
GOLDS = ["2", "6", "\\frac{1}{2}", "1,234"]  # auto: gsm8k, boxed, metamath, plain


def write(path: Path, rows: list[dict]) -> Path:
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        pl.DataFrame(rows).write_parquet(path)
    elif suffix == ".csv":
        pl.DataFrame(rows).write_csv(path)
    return path


def cfg(source: str, **kw) -> DataConfig:
    return DataConfig(source=source, **kw)


# --------------------------------------------------------------------------------------------
# builtin:arith
# --------------------------------------------------------------------------------------------


def test_arith_is_deterministic_with_stable_ids():
    c = cfg("builtin:arith", arith=ArithConfig(n=50, seed=3))
    a, report = load_problems(c)
    b, _ = load_problems(c)
    assert a.equals(b)
    assert a.columns == ["prompt_id", "question", "gold", "source"]
    assert a["prompt_id"].to_list() == [f"arith-3-train-{i}" for i in range(50)]
    assert set(a["source"]) == {"builtin:arith"}
    assert report.rows_read == report.rows_kept == 50 and report.rows_skipped == 0
    assert a["question"].n_unique() == 50
    other, _ = load_problems(cfg("builtin:arith", arith=ArithConfig(n=50, seed=4)))
    assert other["question"].to_list() != a["question"].to_list()
    # the train split is prefix-stable: raising n extends it
    more, _ = load_problems(cfg("builtin:arith", arith=ArithConfig(n=80, seed=3)))
    assert more.head(50).equals(a)


def test_arith_train_and_test_are_disjoint_even_in_a_small_space():
    # one digit, two operands, +/-: only 200 questions, so train (80) and test (80) must avoid each other
    a = ArithConfig(n=80, digits=1, n_operands=2, ops=["+", "-"], seed=0)
    train, _ = load_problems(cfg("builtin:arith", split="train", arith=a))
    test, _ = load_problems(cfg("builtin:arith", split="test", arith=a))
    assert test.height == 80 and test["question"].n_unique() == 80
    assert not set(train["question"]) & set(test["question"])
    assert test["prompt_id"][0] == "arith-0-test-0"


def test_arith_gold_is_the_value_of_the_expression():
    a = ArithConfig(n=200, digits=2, n_operands=4, ops=["+", "-", "*"], seed=1)
    df, _ = load_problems(cfg("builtin:arith", arith=a))
    for q, gold in zip(df["question"], df["gold"], strict=True):
        assert q.startswith("What is ") and q.endswith("?")
        expr = q[len("What is ") : -1]
        assert eval(expr) == int(gold), q  # noqa: S307 - digits and + - * only
    assert any("*" in q for q in df["question"]) and any(g.startswith("-") for g in df["gold"])
    assert generate_arith(a)[:3] == list(zip(df["question"][:3], df["gold"][:3], strict=True))


def test_arith_space_too_small_is_an_error():
    a = ArithConfig(n=150, digits=1, n_operands=2, ops=["+"])  # 100 questions exist
    with pytest.raises(IngestError, match=r"150 distinct problems requested but only 100 exist"):
        load_problems(cfg("builtin:arith", arith=a))
    a = ArithConfig(n=60, digits=1, n_operands=2, ops=["+"])  # train takes 60, test needs 60 of 40
    with pytest.raises(IngestError, match=r"only 40 exist.*minus 60 train problems"):
        load_problems(cfg("builtin:arith", split="test", arith=a))


# --------------------------------------------------------------------------------------------
# builtin:gsm8k
# --------------------------------------------------------------------------------------------


def test_gsm8k_vendored_counts_and_first_rows():
    train, report = load_problems(cfg("builtin:gsm8k"))
    test, _ = load_problems(cfg("builtin:gsm8k", split="test"))
    assert (train.height, test.height) == (7473, 1319)
    assert report.rows_read == 7473 and report.rows_skipped == 0
    first = train.row(0, named=True)
    assert first["prompt_id"] == "gsm8k-train-0"
    assert first["question"].startswith("Natalia sold clips to 48 of her friends")
    assert first["gold"] == "72"
    assert test.row(0, named=True)["gold"] == "18" and test["prompt_id"][-1] == "gsm8k-test-1318"
    assert train["prompt_id"].n_unique() == 7473
    with pytest.raises(IngestError, match="builtin:gsm8k has splits train, test, not 'validation'"):
        load_problems(cfg("builtin:gsm8k", split="validation"))


def test_gsm8k_vendored_files_match_the_documented_hashes():
    readme = (REPO / "tasks/builtin_data/gsm8k/README.md").read_text()
    assert (REPO / "tasks/builtin_data/gsm8k/LICENSE").read_text().startswith("MIT License")
    for split in ("train", "test"):
        raw = gzip.decompress((REPO / f"tasks/builtin_data/gsm8k/{split}.jsonl.gz").read_bytes())
        assert hashlib.sha256(raw).hexdigest() in readme


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_formats_round_trip(tmp_path, suffix):
    write(tmp_path / f"probs{suffix}", ROWS)
    df, report = load_problems(cfg(f"probs{suffix}"), base_dir=tmp_path)
    assert df["prompt_id"].to_list() == [f"probs-{i}" for i in range(4)]
    assert df["question"].to_list() == [r["question"] for r in ROWS]
    assert df["gold"].to_list() == GOLDS
    assert set(df["source"]) == {f"probs{suffix}"}
    assert report.rows_read == report.rows_kept == 4
    assert df.schema == pl.Schema({c: pl.String for c in ("prompt_id", "question", "gold", "source")})
    by_id, _ = load_problems(cfg(str(tmp_path / f"probs{suffix}"), id_field="uid"))  # absolute path
    assert by_id["prompt_id"].to_list() == ["a", "b", "c", "d"]


def test_local_paths_resolve_against_cwd_and_map_columns(tmp_path, monkeypatch):
    rows = [{"query": "Q1", "response": "x. The answer is: 5.", "n": 7}]
    write(tmp_path / "mm.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    df, _ = load_problems(
        cfg("mm.jsonl", question_field="query", answer_field="response", gold_style="metamath")
    )
    assert df.row(0) == ("mm-0", "Q1", "5", "mm.jsonl")
    # non-string values become text
    df, _ = load_problems(cfg("mm.jsonl", question_field="query", answer_field="n", id_field="n"))
    assert df.row(0)[:3] == ("7", "Q1", "7")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "mm.jsonl").read_bytes())
    df, _ = load_problems(cfg("bom.jsonl", question_field="query", answer_field="n"))
    assert df.row(0)[:3] == ("bom-0", "Q1", "7")


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n\n{"question": "q2", "answer": \n')
    with pytest.raises(IngestError) as err:
        load_problems(cfg(str(path)))
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and "malformed JSON" in msg and "on_bad_rows=skip" in msg


def test_missing_columns_lists_found_columns_and_mapping(tmp_path):
    write(tmp_path / "p.csv", [{"problem": "q", "solution": "1"}])
    with pytest.raises(IngestError) as err:
        load_problems(cfg("p.csv"), base_dir=tmp_path)
    msg = str(err.value)
    assert "missing column(s) ['question', 'answer']" in msg
    assert "found columns ['problem', 'solution']" in msg
    assert "question_field='question'" in msg and "answer_field='answer'" in msg


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"question": "  ", "answer": "#### 3"}, "row 1: empty question (field 'question')"),
        ({"question": "q", "answer": None}, "row 1: empty answer (field 'answer')"),
        (
            {"question": "q", "answer": "no marker"},
            "row 1: no gold answer in field 'answer': gold style gsm8k",
        ),
    ],
)
def test_empty_question_or_gold_names_the_row(tmp_path, row, expected):
    write(tmp_path / "p.parquet", [{"question": "ok", "answer": "#### 1"}, row])
    with pytest.raises(IngestError, match="p.parquet") as err:
        load_problems(cfg("p.parquet", gold_style="gsm8k"), base_dir=tmp_path)
    assert expected in str(err.value)


def test_duplicate_ids_are_named(tmp_path):
    rows = [{"question": f"q{i}", "answer": "1", "id": k} for i, k in enumerate(["a", "b", "a", "c", "b"])]
    write(tmp_path / "d.jsonl", rows)
    with pytest.raises(IngestError) as err:
        load_problems(cfg("d.jsonl", id_field="id"), base_dir=tmp_path)
    msg = str(err.value)
    assert "duplicate prompt ids 'a' (line 1 and line 3), 'b' (line 2 and line 5)" in msg


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("nope.jsonl", "file not found: {tmp}/nope.jsonl"),
        ("data.txt", "unsupported file type '.txt'"),
        ("builtin:mmlu", "unknown builtin source 'builtin:mmlu'"),
        ("hf:", "expected hf:<dataset id>"),
    ],
)
def test_bad_sources(tmp_path, source, expected):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(IngestError) as err:
        load_problems(cfg(source), base_dir=tmp_path)
    assert expected.format(tmp=tmp_path) in str(err.value)


def test_json_must_be_a_list_and_well_formed(tmp_path):
    (tmp_path / "o.json").write_text('{"question": "q"}')
    with pytest.raises(IngestError, match="must be a list of objects, got dict"):
        load_problems(cfg("o.json"), base_dir=tmp_path)
    (tmp_path / "b.json").write_text('[{"question": "q",\n "answer": }]')
    with pytest.raises(IngestError, match="b.json: malformed JSON at line 2"):
        load_problems(cfg("b.json"), base_dir=tmp_path)


def test_skip_mode_counts_and_reports_bad_rows(tmp_path):
    lines = [
        json.dumps({"question": "q0", "answer": "#### 1", "id": "x"}),
        "{not json",
        json.dumps({"question": "", "answer": "#### 2", "id": "y"}),
        json.dumps({"question": "q3", "answer": "no marker", "id": "z"}),
        json.dumps({"question": "q4", "answer": "#### 4", "id": "x"}),
        json.dumps([1, 2]),
        json.dumps({"question": "q6", "answer": "#### 6", "id": "w"}),
    ]
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    df, report = load_problems(
        cfg("s.jsonl", id_field="id", gold_style="gsm8k", on_bad_rows="skip"), base_dir=tmp_path
    )
    assert df["prompt_id"].to_list() == ["x", "w"] and df["gold"].to_list() == ["1", "6"]
    assert (report.rows_read, report.rows_kept, report.rows_skipped) == (7, 2, 5)
    assert len(report.skipped_examples) == 5
    ex = report.skipped_examples
    assert "line 2: malformed JSON" in ex[0] and "line 3: empty question" in ex[1]
    assert "line 4: no gold answer" in ex[2] and "line 5: duplicate prompt id 'x' (first at line 1)" in ex[3]
    assert "line 6: expected a JSON object, got list" in ex[4]
    # default ids count bad records too, so they do not move when a bad row is skipped
    df, _ = load_problems(cfg("s.jsonl", gold_style="gsm8k", on_bad_rows="skip"), base_dir=tmp_path)
    assert df["prompt_id"].to_list() == ["s-0", "s-4", "s-6"]


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def test_filter_equality_and_prefix(tmp_path):
    write(tmp_path / "f.jsonl", ROWS)
    eq, report = load_problems(cfg("f.jsonl", filter_field="type", filter_value="MATH_SV"), base_dir=tmp_path)
    assert eq["prompt_id"].to_list() == ["f-0", "f-3"] and report.rows_filtered == 2
    pre, _ = load_problems(cfg("f.jsonl", filter_field="type", filter_value="MATH_*"), base_dir=tmp_path)
    assert pre["prompt_id"].to_list() == ["f-0", "f-2", "f-3"]
    with pytest.raises(IngestError, match="must be set together"):
        load_problems(cfg("f.jsonl", filter_field="type"), base_dir=tmp_path)
    with pytest.raises(IngestError, match=r"no problems left: 4 read, 0 skipped, 4 filtered out"):
        load_problems(cfg("f.jsonl", filter_field="type", filter_value="NONE"), base_dir=tmp_path)
    with pytest.raises(IngestError, match=r"missing column\(s\) \['kind'\]"):
        load_problems(cfg("f.jsonl", filter_field="kind", filter_value="x"), base_dir=tmp_path)


def test_shuffle_offset_limit():
    base = cfg("builtin:arith", arith=ArithConfig(n=40))
    full, _ = load_problems(base)
    shuffled, _ = load_problems(base.model_copy(update={"shuffle_seed": 7}))
    assert sorted(shuffled["prompt_id"]) == sorted(full["prompt_id"])
    assert shuffled["prompt_id"].to_list() != full["prompt_id"].to_list()
    assert load_problems(base.model_copy(update={"shuffle_seed": 7}))[0].equals(shuffled)
    assert load_problems(base.model_copy(update={"shuffle_seed": 8}))[0]["prompt_id"].to_list() != (
        shuffled["prompt_id"].to_list()
    )
    sel, report = load_problems(base.model_copy(update={"shuffle_seed": 7, "offset": 5, "limit": 10}))
    assert sel.equals(shuffled.slice(5, 10)) and report.rows_read == 40 and report.rows_kept == 10
    tail, _ = load_problems(base.model_copy(update={"offset": 35, "limit": 10}))
    assert tail.equals(full.tail(5))
    with pytest.raises(IngestError, match="offset=40"):
        load_problems(base.model_copy(update={"offset": 40}))


# --------------------------------------------------------------------------------------------
# Hashes and keys
# --------------------------------------------------------------------------------------------


def test_content_hash_is_stable_and_content_sensitive():
    df = pl.DataFrame({"prompt_id": ["a", "b"], "question": ["q1", "q2"], "gold": ["1", "2"], "source": "s"})
    h = content_hash(df)
    expected = hashlib.sha256(b'["a", "q1", "1"]\n["b", "q2", "2"]\n').hexdigest()
    assert h == expected  # the format is pinned: changing it invalidates every downstream cache
    assert content_hash(df.with_columns(source=pl.lit("other"))) == h
    assert content_hash(df.reverse()) != h
    assert content_hash(df.with_columns(gold=pl.Series(["1", "3"]))) != h


def test_source_identity_and_key(tmp_path):
    write(tmp_path / "p.jsonl", ROWS)
    (tmp_path / "copy").mkdir()
    write(tmp_path / "copy" / "p.jsonl", ROWS)
    ident = source_identity(cfg("p.jsonl"), tmp_path)
    data = (tmp_path / "p.jsonl").read_bytes()
    assert ident == {
        "kind": "file",
        "name": "p.jsonl",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    assert source_identity(cfg("p.jsonl"), tmp_path / "copy") == ident  # content, not location
    key = ingest_key(cfg("p.jsonl"), tmp_path)
    assert ingest_key(cfg("p.jsonl"), str(tmp_path / "copy")) == key
    assert ingest_key(cfg("p.jsonl", limit=2), tmp_path) != key
    assert ingest_key(cfg("p.jsonl", gold_style="plain"), tmp_path) != key
    write(tmp_path / "p.jsonl", ROWS[:3])
    assert ingest_key(cfg("p.jsonl"), tmp_path) != key

    arith = source_identity(cfg("builtin:arith", arith=ArithConfig(n=5)))
    assert arith["arith"]["n"] == 5 and arith["split"] == "train"
    assert ingest_key(cfg("builtin:arith", split="test")) != ingest_key(cfg("builtin:arith"))
    gsm = source_identity(cfg("builtin:gsm8k", split="test"))
    assert (
        gsm["sha256"]
        == hashlib.sha256((REPO / "tasks/builtin_data/gsm8k/test.jsonl.gz").read_bytes()).hexdigest()
    )
    hf = source_identity(cfg("hf:openai/gsm8k@abc123", subset="main", split="test"))
    assert hf == {"kind": "hf", "id": "openai/gsm8k", "subset": "main", "split": "test", "revision": "abc123"}


# --------------------------------------------------------------------------------------------
# Hugging Face (no hub here: a fake datasets module)
# --------------------------------------------------------------------------------------------


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(IngestError, match=r"pip install drift\[hf\]"):
        load_problems(cfg("hf:openai/gsm8k", subset="main"))


def test_hf_maps_columns_like_a_local_file(monkeypatch):
    calls = []

    class FakeDataset:
        def with_format(self, fmt):
            assert fmt == "arrow"
            return self

        def __getitem__(self, item):
            return pl.DataFrame({"problem": ["p0", "p1"], "answer": ["1", "\\frac12"]}).to_arrow()

    def load_dataset(ident, subset, split, revision=None):
        calls.append((ident, subset, split, revision))
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    df, _ = load_problems(cfg("hf:HuggingFaceH4/MATH-500@rev1", split="test", question_field="problem"))
    assert calls == [("HuggingFaceH4/MATH-500", None, "test", "rev1")]
    assert df["prompt_id"].to_list() == ["MATH-500-test-0", "MATH-500-test-1"]
    assert df["gold"].to_list() == ["1", "\\frac12"]


# --------------------------------------------------------------------------------------------
# The Prefect task
# --------------------------------------------------------------------------------------------


def test_ingest_task_writes_and_reuses_a_verified_manifest(tmp_path, monkeypatch):
    write(tmp_path / "p.jsonl", ROWS)
    c = cfg("p.jsonl", limit=3)
    store_root = str(tmp_path / "store")
    manifest = ingest.fn(c, store_root, base_dir=str(tmp_path))
    store = ArtifactStore(store_root)
    assert manifest.stage == "ingest" and manifest.key == ingest_key(c, tmp_path) and manifest.rows == 3
    assert store.find("ingest", manifest.key) == manifest
    df = store.read_parquet(manifest)
    assert df.equals(load_problems(c, tmp_path)[0])
    assert manifest.meta["rows_read"] == 4 and manifest.meta["rows_skipped"] == 0
    assert manifest.meta["source"] == "p.jsonl" and manifest.meta["content_hash"] == content_hash(df)
    json.dumps(manifest.model_dump())  # small and serialisable

    def boom(*a, **k):
        raise AssertionError("recomputed although a verified artifact exists")

    with monkeypatch.context() as m:
        m.setattr(ingest_mod, "load_problems", boom)
        assert ingest.fn(c, store_root, base_dir=str(tmp_path)) == manifest
    explicit = ingest.fn(c, store_root, base_dir=str(tmp_path), key="k" * 64)  # the flow's key wins
    assert explicit.key == "k" * 64 and explicit.sha256 == manifest.sha256
    Path(manifest.uri).write_bytes(b"corrupt")  # a damaged artifact is recomputed
    again = ingest.fn(c, store_root, base_dir=str(tmp_path))
    assert again == manifest and store.verify(again)


FLOW_SCRIPT = """
import json, sys
from prefect import flow
from drift_core.schemas import DataConfig, ArithConfig
from tasks.ingest import ingest

@flow
def tiny():
    return ingest(DataConfig(source="builtin:arith", arith=ArithConfig(n=8)), sys.argv[1])

print("MANIFEST=" + tiny().model_dump_json())
"""


@pytest.mark.slow
def test_ingest_task_runs_inside_a_flow(tmp_path):
    # A fresh interpreter, so that PREFECT_HOME (and with it the temporary server's database) is set
    # before prefect is imported. Prefect starts a temporary local server for the run; creating its
    # database takes 10-35 s on two busy cores, hence the generous startup timeout.
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "150",
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("PREFECT_API_URL", None)
    script = tmp_path / "flow.py"
    script.write_text(textwrap.dedent(FLOW_SCRIPT))
    store_root = str(tmp_path / "store")
    proc = subprocess.run(
        [sys.executable, str(script), store_root],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MANIFEST="))
    manifest = ArtifactStore(store_root).find("ingest", json.loads(line[len("MANIFEST=") :])["key"])
    assert manifest is not None and manifest.rows == 8
