"""Eval suites: config, multiple-choice ingest, the paper presets' layouts, verifier auto and the
gold check that runs before any generation."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import polars as pl
import pytest

from drift_core.choices import choice_order, gold_index, render_choices
from drift_core.presets import EVAL_PRESETS, MMLU_SUBJECTS
from drift_core.schemas import DataConfig, DriftConfig, EvalConfig, VerifierConfig, source_name
from drift_core.verify import make_verifier, resolve_kind, unreadable_gold
from flows.config import ConfigError, load_config
from tasks.golds import GoldError, checked_verifier
from tasks.ingest import IngestError, ingest, ingest_key, load_problems
from tasks.store import ArtifactStore

pytestmark = pytest.mark.timeout(300)

GPQA_ROWS = [
    {
        "Record ID": f"rec{i}",
        "Question": f"Which particle is number {i}?",
        "Correct Answer": f"right {i}",
        "Incorrect Answer 1": f"wrong {i}a",
        "Incorrect Answer 2": f"wrong {i}b",
        "Incorrect Answer 3": f"wrong {i}c",
        "High-level domain": "Physics",
    }
    for i in range(6)
]
GPQA = dict(
    question_field="Question",
    correct_field="Correct Answer",
    incorrect_fields=["Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"],
)
MATH_ROWS = [
    {"problem": "Convert (0,3) to polar.", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "unique_id": "a"},
    {"problem": "What is 1 + 1?", "answer": "2", "unique_id": "b"},
]


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        pl.DataFrame(rows).write_parquet(path)
    elif path.suffix == ".csv":
        pl.DataFrame(rows).write_csv(path)
    return path


def option_lines(question: str) -> dict[str, str]:
    body = question.split("\n\n")[-1]
    return {line[0]: line[3:] for line in body.splitlines()}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_eval_data_is_a_suite_of_one_named_after_its_source():
    cfg = DriftConfig.model_validate({"eval": {"data": {"source": "sets/math500.jsonl"}}})
    [(key, entry)] = cfg.eval.entries()
    assert key == "eval" and entry.name == "math500" and entry.verifier is None
    assert source_name("hf:HuggingFaceH4/MATH-500@abc") == "MATH-500"
    assert source_name("builtin:arith") == "arith"
    assert source_name("/x/GPQA diamond.csv") == "GPQA_diamond"


def test_suite_entries_presets_and_overrides():
    cfg = EvalConfig.model_validate(
        {
            "suite": [
                {"name": "mine", "data": {"source": "m.jsonl"}, "verifier": {"kind": "numeric"}},
                {"preset": "gpqa-diamond", "data": {"limit": 50}, "answer_format": "think"},
                {"preset": "mmlu-pro", "name": "pro"},
            ]
        }
    )
    assert [k for k, _ in cfg.entries()] == ["eval.suite[0]", "eval.suite[1]", "eval.suite[2]"]
    mine, gpqa, pro = cfg.suite
    assert mine.verifier.kind == "numeric"
    assert gpqa.name == "gpqa-diamond" and gpqa.data.limit == 50 and gpqa.answer_format == "think"
    assert gpqa.data.source == "hf:Idavidrein/gpqa" and gpqa.data.multiple_choice
    assert gpqa.verifier.kind == "choice"
    assert pro.name == "pro" and pro.data.choices_field == "options"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"data": {"source": "a.jsonl"}, "suite": [{"name": "a", "data": {}}]}, "not both"),
        ({"suite": []}, "eval.suite is empty"),
        ({"suite": [{"name": "a", "data": {}}, {"name": "a", "data": {}}]}, "duplicate entry names ['a']"),
        ({"suite": [{"name": "a.b", "data": {}}]}, "eval.suite.0.name"),
        ({"suite": [{"preset": "mmlu"}]}, "unknown eval preset 'mmlu'; known: math500"),
        ({"suite": [{"name": "a", "data": {"correct_field": "c"}}]}, "set together"),
        (
            {"suite": [{"name": "a", "data": {"choices_field": "c", **GPQA}}]},
            "set either correct_field",
        ),
    ],
)
def test_bad_suites_name_the_key(tmp_path, raw, expected):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"eval": raw}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)


def test_verifier_auto_is_a_kind_but_must_be_resolved():
    assert VerifierConfig(kind="auto").kind == "auto"
    with pytest.raises(ValueError, match="resolved"):
        make_verifier(VerifierConfig(kind="auto"))


# --------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------


def test_choice_order_is_seeded_by_id_and_seed_only():
    orders = {tuple(choice_order(4, f"id{i}")) for i in range(40)}
    assert len(orders) > 10  # different problems, different orders
    assert choice_order(4, "id1") == choice_order(4, "id1")
    assert any(choice_order(4, f"id{i}", 1) != choice_order(4, f"id{i}") for i in range(5))
    assert choice_order(4, "id1", shuffle=False) == [0, 1, 2, 3]
    # pinned: the order must not change between versions or machines (sha256, not hash())
    assert choice_order(4, "rec0") == [0, 3, 2, 1]


def test_render_choices_puts_letters_under_the_question_and_the_gold_on_the_right_one():
    text, gold = render_choices("Pick.", ["yes", "no", "maybe"], 0, "p1")
    assert text.startswith("Pick.\n\nA. ")
    assert option_lines(text)[gold] == "yes"
    assert sorted(option_lines(text).values()) == ["maybe", "no", "yes"]
    with pytest.raises(ValueError, match="expected 2 to 10"):
        render_choices("q", ["only"], 0, "p")


@pytest.mark.parametrize(("answer", "index"), [("2", 2), (2, 2), ("C", 2), ("c", 2), ("(B)", 1), ("0", 0)])
def test_gold_index_reads_indices_and_letters(answer, index):
    assert gold_index(answer, 4) == index


@pytest.mark.parametrize("answer", ["4", "E", "two", ""])
def test_gold_index_rejects_what_is_not_an_option(answer):
    with pytest.raises(ValueError):
        gold_index(answer, 4)


def test_gpqa_columns_become_lettered_options_with_a_letter_gold(tmp_path):
    write(tmp_path / "gpqa.csv", GPQA_ROWS)
    c = DataConfig(source="gpqa.csv", id_field="Record ID", **GPQA)
    df, _ = load_problems(c, tmp_path)
    assert df["prompt_id"].to_list() == [f"rec{i}" for i in range(6)]
    letters = df["gold"].to_list()
    assert set(letters) <= set("ABCD") and len(set(letters)) > 1  # shuffled, not always A
    for i, (question, gold) in enumerate(zip(df["question"], letters, strict=True)):
        assert question.startswith(f"Which particle is number {i}?\n\nA. ")
        assert option_lines(question)[gold] == f"right {i}"
    again, _ = load_problems(c, tmp_path)
    assert again.equals(df)  # deterministic
    reseeded, _ = load_problems(c.model_copy(update={"choice_seed": 7}), tmp_path)
    assert reseeded["gold"].to_list() != letters
    plain, _ = load_problems(c.model_copy(update={"shuffle_choices": False}), tmp_path)
    assert set(plain["gold"]) == {"A"}


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_choice_lists_with_index_or_letter_answers(tmp_path, suffix):
    rows = [
        {"question": "2 + 2?", "choices": ["3", "4", "5"], "answer": 1},
        {"question": "Capital of France?", "choices": ["Rome", "Paris"], "answer": 1},
    ]
    if suffix == ".csv":  # a CSV cell holds the list as JSON text
        rows = [{**r, "choices": json.dumps(r["choices"])} for r in rows]
    write(tmp_path / f"mc{suffix}", rows)
    df, _ = load_problems(DataConfig(source=f"mc{suffix}", choices_field="choices"), tmp_path)
    golds = df["gold"].to_list()
    assert option_lines(df["question"][0])[golds[0]] == "4"
    assert option_lines(df["question"][1])[golds[1]] == "Paris"
    letters = [{**r, "answer": "B"} for r in rows]
    write(tmp_path / f"mc{suffix}", letters)
    df2, _ = load_problems(DataConfig(source=f"mc{suffix}", choices_field="choices"), tmp_path)
    assert df2["gold"].to_list() == golds


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "line 2: multiple choice: field 'answer'"),
        ({"question": "q", "choices": ["a", ""], "answer": 0}, "line 2: multiple choice: empty option"),
        ({"question": "q", "choices": "a, b", "answer": 0}, "line 2: multiple choice: field 'choices'"),
        ({"question": "q", "choices": ["a"], "answer": 0}, "line 2: multiple choice: 1 options"),
    ],
)
def test_bad_choice_rows_name_file_and_line(tmp_path, row, expected):
    write(tmp_path / "mc.jsonl", [{"question": "ok", "choices": ["x", "y"], "answer": 0}, row])
    with pytest.raises(IngestError) as err:
        load_problems(DataConfig(source="mc.jsonl", choices_field="choices"), tmp_path, "eval.suite[1].data")
    assert expected in str(err.value) and "mc.jsonl" in str(err.value)
    assert "eval.suite[1].data.on_bad_rows=skip" in str(err.value)


def test_errors_name_the_key_in_its_context(tmp_path):
    write(tmp_path / "p.jsonl", [{"problem": "q", "solution": "1"}])
    with pytest.raises(IngestError, match=r"set eval\.data\.question_field / eval\.data\.answer_field"):
        load_problems(DataConfig(source="p.jsonl"), tmp_path, "eval.data")
    write(tmp_path / "g.csv", [{k: v for k, v in GPQA_ROWS[0].items() if k != "Incorrect Answer 3"}])
    with pytest.raises(IngestError) as err:
        load_problems(DataConfig(source="g.csv", **GPQA), tmp_path, "eval.suite[0].data")
    assert "missing column(s) ['Incorrect Answer 3']" in str(err.value)
    assert "set eval.suite[0].data.incorrect_fields" in str(err.value)
    with pytest.raises(IngestError, match="builtin:arith is not multiple choice"):
        load_problems(DataConfig(choices_field="c"))


def test_choice_fields_enter_the_ingest_key_only_for_choice_data(tmp_path):
    write(tmp_path / "p.jsonl", MATH_ROWS)
    plain = DataConfig(source="p.jsonl", question_field="problem")
    assert ingest_key(plain, tmp_path) == ingest_key(plain.model_copy(update={"choice_seed": 3}), tmp_path)
    write(tmp_path / "g.csv", GPQA_ROWS)
    mc = DataConfig(source="g.csv", **GPQA)
    assert ingest_key(mc, tmp_path) != ingest_key(mc.model_copy(update={"choice_seed": 3}), tmp_path)


# --------------------------------------------------------------------------------------------
# Verifier auto and the gold check
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("golds", "mc", "kind"),
    [
        (["1", "-2.5", "1,234"], False, "numeric"),
        (["1", "\\frac{1}{2}"], False, "math"),
        (["1", "3/4"], False, "math"),
        (["12 dollars"], False, "math"),
        (["A", "C"], True, "choice"),
        ([], False, "math"),
    ],
)
def test_resolve_kind_auto(golds, mc, kind):
    assert resolve_kind("auto", golds, mc) == kind
    assert resolve_kind("exact", golds, mc) == "exact"


def test_unreadable_gold_per_kind():
    assert unreadable_gold("numeric", "\\left( 3, \\frac{\\pi}{2} \\right)") == "not a number"
    assert unreadable_gold("numeric", "\\frac{3}{4}") is None
    assert unreadable_gold("choice", "42") == "not an option letter A-J"
    assert unreadable_gold("choice", "C") is None
    assert unreadable_gold("math", "\\left( 3, \\frac{\\pi}{2} \\right)") is None


def _ingested(tmp_path, data: DataConfig, context: str):
    store = ArtifactStore(str(tmp_path / "store"))
    manifest = ingest.fn(data, store.url, base_dir=str(tmp_path), context=f"{context}.data")
    return store, manifest


def test_gold_check_fails_before_generation_naming_entry_file_and_row(tmp_path):
    write(tmp_path / "math.jsonl", MATH_ROWS)
    data = DataConfig(source="math.jsonl", question_field="problem", id_field="unique_id")
    store, manifest = _ingested(tmp_path, data, "eval.suite[0]")
    with pytest.raises(GoldError) as err:
        checked_verifier(
            store, manifest, data, VerifierConfig(kind="numeric"), "eval.suite[0]", tmp_path, "math"
        )
    msg = str(err.value)
    assert "eval.suite[0] 'math': 1 of 2 golds cannot be read by the numeric verifier" in msg
    assert f"{tmp_path / 'math.jsonl'}: line 1 (prompt id 'a')" in msg and "not a number" in msg
    assert "Set eval.suite[0].verifier.kind: math" in msg
    auto = checked_verifier(store, manifest, data, VerifierConfig(kind="auto", timeout_s=2), "eval", tmp_path)
    assert auto.kind == "math" and auto.timeout_s == 2


def test_gold_check_resolves_choice_for_multiple_choice(tmp_path):
    write(tmp_path / "g.csv", GPQA_ROWS)
    data = DataConfig(source="g.csv", **GPQA)
    store, manifest = _ingested(tmp_path, data, "eval")
    assert checked_verifier(store, manifest, data, VerifierConfig(kind="auto"), "eval").kind == "choice"
    with pytest.raises(GoldError, match="Set eval.verifier.kind: choice"):
        checked_verifier(store, manifest, data, VerifierConfig(kind="numeric"), "eval", tmp_path)


# --------------------------------------------------------------------------------------------
# The paper presets, on local files of the same shape as their hub data sets
# --------------------------------------------------------------------------------------------

PRESET_ROWS = {
    "math500": (
        [
            {
                "problem": "Convert the point $(0,3)$ to polar coordinates.",
                "solution": "... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$",
                "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
                "subject": "Precalculus",
                "level": 2,
                "unique_id": "test/precalculus/807.json",
            },
            {
                "problem": "What is $1+1$?",
                "solution": "$\\boxed{2}$",
                "answer": "2",
                "subject": "Prealgebra",
                "level": 1,
                "unique_id": "test/prealgebra/1.json",
            },
        ],
        ["\\left( 3, \\frac{\\pi}{2} \\right)", "2"],
    ),
    "theoremqa": (
        [
            {"Question": "Is 7 prime?", "Answer": "True", "Answer_type": "bool", "Picture": None},
            {"Question": "What is 0.1 + 0.2?", "Answer": "0.3", "Answer_type": "float", "Picture": None},
            {
                "Question": "Roots of x^2-1?",
                "Answer": "[-1, 1]",
                "Answer_type": "list of integer",
                "Picture": None,
            },
        ],
        ["True", "0.3", "[-1, 1]"],
    ),
    "gpqa-diamond": (GPQA_ROWS[:3], None),
    "mmlu-redux": (
        [
            {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "error_type": "ok"},
            {
                "question": "Bad?",
                "choices": ["a", "b", "c", "d"],
                "answer": 0,
                "error_type": "wrong_groundtruth",
            },
            {
                "question": "Sky?",
                "choices": ["red", "green", "blue", "black"],
                "answer": 2,
                "error_type": "ok",
            },
        ],
        None,
    ),
    "math": (
        [
            {
                "problem": "Compute $\\frac12+\\frac12$.",
                "level": "Level 1",
                "type": "Algebra",
                "solution": "It is $\\boxed{1}$.",
            },
            {
                "problem": "Simplify $\\sqrt{8}$.",
                "level": "Level 2",
                "type": "Algebra",
                "solution": "We get $\\boxed{2\\sqrt{2}}$.",
            },
        ],
        ["1", "2\\sqrt{2}"],
    ),  # fmt: skip
    "mmlu-pro": (
        [
            {
                "question_id": 70,
                "question": "Which is a prime?",
                "options": ["4", "6", "7", "8", "9", "10", "12", "14", "15", "16"],
                "answer": "C",
                "answer_index": 2,
                "cot_content": "",
                "category": "math",
                "src": "ori_mmlu",
            },
            {
                "question_id": 71,
                "question": "Largest?",
                "options": ["1", "2", "3"],
                "answer": "C",
                "answer_index": 2,
                "cot_content": "",
                "category": "math",
                "src": "stemez",
            },
        ],
        None,
    ),
}
CORRECT_OPTION = {"gpqa-diamond": ["right 0", "right 1", "right 2"], "mmlu-redux": ["4", "blue"]}
CORRECT_OPTION["mmlu-pro"] = ["7", "3"]


def test_every_paper_benchmark_has_a_preset():
    assert set(EVAL_PRESETS) == set(PRESET_ROWS)
    assert len(MMLU_SUBJECTS) == 57 and len(set(MMLU_SUBJECTS)) == 57
    for name in EVAL_PRESETS:  # each validates as a suite entry
        EvalConfig.model_validate({"suite": [{"preset": name}]})


#: where each benchmark lives on the hub, written out from the datasets' hub pages (the layout
#: tests below run the presets on local files, so only this test reads these three fields)
HUB = {
    "math500": ("hf:HuggingFaceH4/MATH-500", None, "test"),
    "theoremqa": ("hf:TIGER-Lab/TheoremQA", None, "test"),
    "gpqa-diamond": ("hf:Idavidrein/gpqa", "gpqa_diamond", "train"),
    "mmlu-redux": ("hf:edinburgh-dawg/mmlu-redux-2.0", "57 subjects", "test"),
    "math": ("hf:EleutherAI/hendrycks_math", "7 subjects", "test"),
    "mmlu-pro": ("hf:TIGER-Lab/MMLU-Pro", None, "test"),
}
MATH_SEVEN = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra"]
MATH_SEVEN += ["number_theory", "prealgebra", "precalculus"]


def test_presets_read_the_paper_benchmarks_from_the_hub():
    """Each preset's hub id, subset and split, as a suite entry expands it."""
    entries = EvalConfig.model_validate({"suite": [{"preset": name} for name in HUB]}).suite
    for entry in entries:
        source, subset, split = HUB[entry.name]
        data = entry.data
        assert (data.source, data.split) == (source, split), entry.name
        if subset == "57 subjects":
            assert isinstance(data.subset, list) and len(data.subset) == len(set(data.subset)) == 57
            assert {"abstract_algebra", "virology", "world_religions"} <= set(data.subset)
        elif subset == "7 subjects":
            assert data.subset == MATH_SEVEN, data.subset
        else:
            assert data.subset == subset, (entry.name, data.subset)
    # a key given beside the preset overrides it, the rest of the preset stays
    entry = EvalConfig.model_validate({"suite": [{"preset": "math500", "data": {"split": "dev"}}]}).suite[0]
    assert (entry.data.source, entry.data.split) == ("hf:HuggingFaceH4/MATH-500", "dev")


@pytest.mark.parametrize("name", sorted(PRESET_ROWS))
def test_preset_layout_on_a_local_file_of_the_same_shape(tmp_path, name):
    rows, golds = PRESET_ROWS[name]
    write(tmp_path / f"{name}.parquet", rows)
    entry = EvalConfig.model_validate({"suite": [{"preset": name}]}).suite[0]
    data = entry.data.model_copy(update={"source": f"{name}.parquet", "subset": None})
    store, manifest = _ingested(tmp_path, data, "eval.suite[0]")
    df = store.read_parquet(manifest)
    kind = checked_verifier(store, manifest, data, entry.verifier, "eval.suite[0]", tmp_path).kind
    assert kind == entry.verifier.kind
    assert kind == checked_verifier(store, manifest, data, VerifierConfig(kind="auto"), "eval").kind
    if golds is not None:
        assert df["gold"].to_list() == golds
    else:
        assert [option_lines(q)[g] for q, g in zip(df["question"], df["gold"], strict=True)] == (
            CORRECT_OPTION[name]
        )
    if data.id_field:
        assert df["prompt_id"].to_list() == [str(r[data.id_field]) for r in rows]


def test_hf_subset_lists_are_concatenated_with_ids_per_subset(monkeypatch):
    calls = []

    class FakeDataset:
        def __init__(self, subset):
            self.subset = subset

        def with_format(self, fmt):
            return self

        def __getitem__(self, item):
            n = 2 if self.subset == "algebra" else 1
            return pl.DataFrame(
                {"problem": [f"{self.subset} {i}" for i in range(n)], "solution": ["\\boxed{1}"] * n}
            ).to_arrow()

    def load_dataset(ident, subset, split, revision=None):
        calls.append((ident, subset, split))
        return FakeDataset(subset)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = DataConfig(**{**EVAL_PRESETS["math"]["data"], "subset": ["algebra", "geometry"]})
    df, report = load_problems(data)
    assert calls == [("EleutherAI/hendrycks_math", s, "test") for s in ("algebra", "geometry")]
    assert df["prompt_id"].to_list() == [
        "hendrycks_math-algebra-test-0",
        "hendrycks_math-algebra-test-1",
        "hendrycks_math-geometry-test-0",
    ]
    assert df["question"].to_list() == ["algebra 0", "algebra 1", "geometry 0"] and report.rows_read == 3


# --------------------------------------------------------------------------------------------
# The command line: the gold check before Prefect starts, and a two-benchmark suite end to end
# --------------------------------------------------------------------------------------------

SUITE_YAML = """
run: {{artifact_store: {store}, tracking_uri: "sqlite:///{db}", experiment: suite}}
reference_model: {{path: builtin:tiny-smollm2}}
protocol: {{max_turns: 2}}
eval:
  max_new_tokens: 6
  shard_size: 2
  suite:
    - name: math
      data: {{source: math.jsonl, question_field: problem, id_field: unique_id}}{math_verifier}
    - name: gpqa
      data:
        source: gpqa.csv
        question_field: Question
        id_field: Record ID
        correct_field: Correct Answer
        incorrect_fields: [Incorrect Answer 1, Incorrect Answer 2, Incorrect Answer 3]
        limit: 3
"""


def stage_artifact(stage_run) -> str:
    """The artifact a stage run logged (its param ``<section>.artifact``)."""
    [uri] = [v for k, v in stage_run.data.params.items() if k.rsplit(".", 1)[-1] == "artifact"]
    return uri


def suite_dir(tmp_path: Path, math_verifier: str = "") -> Path:
    write(tmp_path / "math.jsonl", MATH_ROWS)
    write(tmp_path / "gpqa.csv", GPQA_ROWS)
    text = SUITE_YAML.format(store=tmp_path / "store", db=tmp_path / "mlflow.db", math_verifier=math_verifier)
    (tmp_path / "suite.yaml").write_text(text)
    return tmp_path / "suite.yaml"


@pytest.mark.parametrize("command", ["eval", "run"])
def test_unreadable_gold_stops_the_cli_before_prefect_starts(tmp_path, monkeypatch, capsys, command):
    from prefect.server.api.server import SubprocessASGIServer

    from flows.cli import main
    from flows.prefect_server import TemporaryServer

    def forbidden(*a, **k):
        raise AssertionError("Prefect started although a gold is unreadable")

    monkeypatch.setattr(SubprocessASGIServer, "start", forbidden)
    monkeypatch.setattr(TemporaryServer, "start", forbidden)
    monkeypatch.chdir(tmp_path)
    config = suite_dir(tmp_path, "\n      verifier: {kind: numeric}")
    argv = ["eval", "--model", "builtin:tiny-smollm2", "--config", str(config)]
    assert main(argv if command == "eval" else ["run", str(config)]) == 2
    err = " ".join(capsys.readouterr().err.split())  # unwrap the paragraph
    assert "GoldError: eval.suite[0] 'math': 1 of 2 golds cannot be read by the numeric verifier" in err
    assert f"{tmp_path / 'math.jsonl'}: line 1 (prompt id 'a')" in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)  # on a cold model cache the CLI first makes builtin:tiny-smollm2 (trains it)
def test_drift_eval_runs_every_benchmark_of_a_suite(tmp_path, prefect_server, tiny_model_dir):
    """Two local benchmarks (LaTeX golds, GPQA-style options), no verifier set: one table row and
    one set of MLflow metrics per benchmark, the verifiers auto picked in the run's params."""
    from helpers import drift_cli, mlflow_run_id
    from mlflow.tracking import MlflowClient

    config = suite_dir(tmp_path)
    out = drift_cli(
        ["eval", "--model", "builtin:tiny-smollm2", "--config", str(config)], tmp_path, prefect_server
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {
        line.split()[0]: line.split()
        for line in out.stdout.splitlines()
        if line.startswith(("math ", "gpqa ")) and "|" in line  # table rows, not the notes
    }
    assert rows["math"][1:3] == ["2", "math"] and rows["gpqa"][1:3] == ["3", "choice"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(mlflow_run_id(out.stdout))
    stages = {
        c.info.run_name: c
        for c in client.search_runs(
            [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
        )
    }
    for name, n in (("math", 2), ("gpqa", 3)):
        assert run.data.metrics[f"{name}.rows"] == n
        assert f"{name}.correction_rate_t2" in run.data.metrics
        # multi@t by hand from the benchmark's per-problem records: solved within t turns / all
        records = pl.read_parquet(stage_artifact(stages[f"evaluate-model-{name}"]))
        assert records.height == n
        for t in (1, 2):
            by_hand = sum(any(c[:t]) for c in records["turn_correct"].to_list()) / n
            assert run.data.metrics[f"{name}.multi_at_t{t}"] == pytest.approx(by_hand), (name, t)
        # the tiny model solves none of these, so also two that are not 0 here: the mean turns used
        # and the share of answers that repeat one given earlier in the same episode
        turns = records["turn_correct"].list.len().to_list()
        assert run.data.metrics[f"{name}.mean_turns_used"] == pytest.approx(sum(turns) / n)
        answers = [[a for a in row if a is not None] for row in records["normalized_answers"].to_list()]
        repeats = sum(len(row) - len(set(row)) for row in answers)
        given = sum(len(row) for row in answers)
        share = run.data.metrics[f"{name}.repeated_answer_share"]
        assert share == pytest.approx(repeats / given if given else 0.0), (name, answers)
    # measured: gpqa's three episodes answer "-1" twice each: half the answers repeat
    assert run.data.metrics["gpqa.repeated_answer_share"] > 0
    assert run.data.params["eval.suite.math.verifier.kind"] == "math"
    assert run.data.params["eval.suite.gpqa.verifier.kind"] == "choice"
    assert run.data.params["eval.suite.gpqa.verifier.requested"] == "auto"
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["evaluate-model-gpqa", "evaluate-model-math"]


def test_eval_verifier_layers_keep_what_they_do_not_set():
    cfg = DriftConfig.model_validate(
        {
            "verifier": {"kind": "numeric", "timeout_s": 7, "workers": 9},
            "eval": {
                "verifier": {"tolerance": 0.01},
                "suite": [
                    {"name": "a", "data": {"source": "a.jsonl"}},
                    {"name": "b", "data": {"source": "b.jsonl"}, "verifier": {"kind": "choice"}},
                ],
            },
        }
    )
    a, b = (cfg.eval_verifier(e) for _, e in cfg.eval.entries())
    assert (a.kind, a.timeout_s, a.workers, a.tolerance) == ("auto", 7, 9, 0.01)
    assert (b.kind, b.timeout_s, b.workers, b.tolerance) == ("choice", 7, 9, 0.01)


def test_entry_protocol_overrides_and_the_choice_instruction():
    from drift_core.protocol import CHOICE_INSTRUCTION
    from flows.evaluation import entry_protocol

    cfg = DriftConfig.model_validate(
        {
            "protocol": {"max_turns": 3},
            "eval": {
                "max_turns": 5,
                "answer_format": "think",
                "suite": [
                    {"name": "m", "data": {"source": "m.jsonl"}},
                    {"name": "g", "data": {"source": "g.csv", **GPQA}, "answer_format": "answer"},
                    {"name": "t", "data": {"source": "g.csv", **GPQA}, "task_instruction": "Pick one."},
                ],
            },
        }
    )
    m, g, t = (entry_protocol(cfg, e) for _, e in cfg.eval.entries())
    assert (m.max_turns, m.answer_format, m.task_instruction) == (5, "think", None)
    assert (g.answer_format, g.task_instruction) == ("answer", CHOICE_INSTRUCTION)
    assert t.task_instruction == "Pick one."


def test_results_table_has_one_row_per_benchmark_and_systems_side_by_side():
    from flows.cli import format_results

    def meta(multi, corr):
        return {"n_problems": 4, "multi_at": multi, "correction_rate": [None, corr], "mean_turns_used": 1.5}

    summary = {
        "suite": {
            "math": {"reference": meta([0.25, 0.5], 1 / 3), "trained": meta([0.5, 0.75], 0.5)},
            "gpqa": {"reference": meta([0.0, 0.25], 0.25), "trained": meta([0.25, 0.25], 0.0)},
        },
        "verifiers": {"math": "math", "gpqa": "choice"},
        "ceilings": {"gpqa": 0.5},
    }
    lines = format_results(summary).splitlines()
    assert lines[0].split() == ["|", "reference", "|", "trained"]
    cols = ["|", "multi@1", "multi@2", "corr@2", "fixed"]
    assert lines[1].split() == ["benchmark", "n", "verifier", "blind@2", *cols, *cols]
    # fixed after feedback = multi@2 - multi@1; blind@2 only where the summary has the ceiling
    assert lines[3].split() == ["math", "4", "math", "-", "|", "25.0", "50.0", "33.3", "25.0"] + [
        "|",
        "50.0",
        "75.0",
        "50.0",
        "25.0",
    ]
    assert lines[4].split() == ["gpqa", "4", "choice", "50.0", "|", "0.0", "25.0", "25.0", "25.0"] + [
        "|",
        "25.0",
        "25.0",
        "0.0",
        "0.0",
    ]


@pytest.mark.slow
def test_drift_run_evaluates_reference_and_trained_on_every_benchmark(tmp_path, prefect_server):
    """``drift run`` on a suite of two: both models on both benchmarks, one table row per benchmark
    with the two models side by side, ``<benchmark>.<model>.*`` metrics on the parent run and one
    nested evaluate run per (model, benchmark)."""
    from helpers import drift_cli, mlflow_run_id
    from mlflow.tracking import MlflowClient

    config = suite_dir(tmp_path)
    tiny = ["data.arith.n=4", "data.arith.digits=1", "rollout.k=2", "rollout.shard_size=4"]
    tiny += ["rollout.sampling.max_new_tokens=6", "train.max_steps=1", "train.batch_size=4"]
    tiny += ["run.register_model=false"]
    out = drift_cli(["run", str(config), *[a for s in tiny for a in ("--set", s)]], tmp_path, prefect_server)
    assert out.returncode == 0, out.stderr[-3000:]
    header = next(line for line in out.stdout.splitlines() if line.startswith("benchmark "))
    assert header.count("multi@1") == 2 and header.count("corr@2") == 2, header  # reference | trained
    rows = {
        line.split()[0]: line.split()
        for line in out.stdout.splitlines()
        if line.startswith(("math ", "gpqa ")) and "|" in line
    }
    assert rows["math"][1:3] == ["2", "math"] and rows["gpqa"][1:3] == ["3", "choice"], rows
    assert all(row.count("|") == 2 for row in rows.values()), rows  # two model columns a row

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(mlflow_run_id(out.stdout))
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    stages = {c.info.run_name: c for c in children}
    for name, n in (("math", 2), ("gpqa", 3)):
        for model in ("reference", "trained"):
            assert run.data.metrics[f"{name}.{model}.rows"] == n, (name, model)
            # by hand from that model's per-problem records on that benchmark
            records = pl.read_parquet(stage_artifact(stages[f"evaluate-{model}-{name}"]))
            assert records.height == n, (name, model)
            for t in (1, 2):
                by_hand = sum(any(c[:t]) for c in records["turn_correct"].to_list()) / n
                got = run.data.metrics[f"{name}.{model}.multi_at_t{t}"]
                assert got == pytest.approx(by_hand), (name, model, t)
    evaluate_runs = sorted(c.info.run_name for c in children if c.info.run_name.startswith("evaluate-"))
    assert evaluate_runs == [
        "evaluate-reference-gpqa",
        "evaluate-reference-math",
        "evaluate-trained-gpqa",
        "evaluate-trained-math",
    ]


def test_the_table_ends_with_how_to_read_it_and_where_to_look_next():
    from flows.cli import reading_guide

    summary = {"suite": {"arith": {"reference": {"multi_at": [0.1, 0.2, 0.3]}}}}
    meaning, where = reading_guide(summary).splitlines()
    assert meaning.startswith("reading it: multi@t = % of the test problems solved within t turns")
    assert "corr@3" in meaning and "fixed = multi@3 - multi@1" in meaning and "blind@3" in meaning
    assert where == "next: the MLflow run below holds every stage's run, the weights and the plots."
    _, where = reading_guide({**summary, "rollouts_uri": "/s/rollout/abc.parquet"}).splitlines()
    assert where.endswith("; the rollouts trained on: /s/rollout/abc.parquet.")
