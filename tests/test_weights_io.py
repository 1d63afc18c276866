"""The ``drift weights`` I/O: reference-format JSONL and drift parquet in, weighted parquet out."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from helpers import write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drift_core.schemas import WeightsConfig
from flows import cli_weights
from tasks.weights_io import (
    NoTrajectoriesError,
    compute_weight_table,
    load_weight_inputs,
    read_weight_inputs,
    run_weights_command,
    write_parquet_atomic,
)

ROOT = Path(__file__).resolve().parents[1]

# --- the reference formulas, written plainly (no max subtraction, moderate values) -----------------


def reference_return(rec: dict, gamma: float, lam: float, penalty: str | None = "format_penalty") -> float:
    """The return as the paper's weight_sft.py computes it (docs/method.md#return), written plainly.
    ``penalty``: the penalty column of the whole file (the script reads format_penalty when the
    file has that column at all, null as 0; else trajectory_penalty)."""
    r = sum(
        gamma ** (int(k[1:]) - 1) * (v or 0)
        for k, v in rec["turn_rewards"].items()
        if re.fullmatch(r"t\d+", k)
    )
    r += (rec.get(penalty) or 0.0) if penalty else 0.0
    norms = rec.get("answer_norms")
    if isinstance(norms, list) and norms:
        r -= lam * (1 - len({a for a in norms if a}) / len(norms))
    return r


def reference_group_weights(ids: list, returns: list[float], beta: float) -> list[float]:
    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(ids):
        groups.setdefault(str(pid), []).append(i)
    out = [0.0] * len(ids)
    for idx in groups.values():
        ex = [math.exp(returns[i] / beta) for i in idx]
        mean = sum(ex) / len(ex)
        for i, e in zip(idx, ex, strict=True):
            out[i] = e / mean
    return out


def reference_weights(records: list[dict], gamma: float, beta: float, lam: float) -> list[float]:
    returns = [reference_return(r, gamma, lam) for r in records]
    return reference_group_weights([r["prompt_id"] for r in records], returns, beta)


def make_records(n_prompts: int = 40, k: int = 8, max_turns: int = 5, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    recs = []
    for p in range(n_prompts):
        for j in range(k):
            n_turns = rnd.randint(1, max_turns)
            solved = rnd.random() < 0.5
            rewards = {f"t{t}": (1 if (solved and t == n_turns) else 0) for t in range(1, n_turns + 1)}
            answers = [rnd.choice([None, "", "1", "2", "3", "\\frac{1}{2}"]) for _ in range(n_turns)]
            recs.append(
                {
                    "prompt_id": f"q{p:03d}-{rnd.randint(0, 10**6)}" if p % 7 == 0 else f"q{p:03d}",
                    "turn_rewards": rewards,
                    "answer_norms": answers,
                    "format_penalty": -0.1 * sum(a is None for a in answers),
                    "response": f"resp {p}/{j} <answer>{answers[-1]}</answer>",
                    "meta": {"temperature": 1.0, "sample": j},
                    "score": rnd.random(),
                }
            )
    # every prompt_id of a group must be the same: fix the random-suffixed ones per prompt
    first: dict[str, str] = {}
    for rec in recs:
        base = rec["prompt_id"].split("-")[0]
        rec["prompt_id"] = first.setdefault(base, rec["prompt_id"])
    rnd.shuffle(recs)  # groups interleaved: output must keep this order
    return recs


@pytest.mark.parametrize(("gamma", "beta", "lam"), [(0.9, 0.1, 0.5), (0.7, 1.0, 0.0), (1.0, 0.3, 1.5)])
def test_reference_equality(tmp_path, gamma, beta, lam):
    recs = make_records()
    inp = write_jsonl(tmp_path / "traj.jsonl", recs)
    out = tmp_path / "out" / "weighted.parquet"
    cfg = WeightsConfig(gamma=gamma, beta=beta, repetition_lambda=lam)
    report = run_weights_command(inp, out, cfg)
    df = pl.read_parquet(out)
    assert df.height == len(recs) == report.n_trajectories
    assert df["prompt_id"].to_list() == [r["prompt_id"] for r in recs]  # input row order
    want_r = [reference_return(r, gamma, lam) for r in recs]
    want_w = reference_weights(recs, gamma, beta, lam)
    np.testing.assert_allclose(df["return"].to_numpy(), want_r, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(df["weight"].to_numpy(), want_w, rtol=1e-9)
    # carried fields unchanged
    assert df["response"].to_list() == [r["response"] for r in recs]
    assert df["meta"].to_list() == [r["meta"] for r in recs]
    assert df["score"].to_list() == [r["score"] for r in recs]
    assert df["solved"].to_list() == [any(v > 0 for v in r["turn_rewards"].values()) for r in recs]
    assert report.n_groups == 40 and report.n_skipped_rows == 0


def test_rows_polars_cannot_read_are_set_aside_and_the_rest_read_the_same(tmp_path):
    recs = make_records(n_prompts=10, k=4, seed=3)
    recs[0]["prompt_id"] = 12345  # integer prompt ids become strings
    recs[0]["turn_rewards"] = {"t1": 0.0, "t2": 0.25}
    clean = load_weight_inputs(write_jsonl(tmp_path / "t.jsonl", recs, raw_lines={5: ""}))  # blank: no row
    # a malformed line and a NaN make polars reject the whole file: those rows are found and
    # skipped, and polars reads the rest into the same frame
    broken = write_jsonl(
        tmp_path / "b.jsonl", recs, raw_lines={3: '{"prompt_id": "x", "turn_rewards": {"t1": NaN}}', 7: "{"}
    )
    df, report = read_weight_inputs(broken, on_bad_rows="skip")
    assert report.n_skipped == 2 and [m.split(": ")[1] for m in report.examples] == [
        "line 4 (row 4)",
        "line 8 (row 8)",
    ]
    assert df.columns == clean.columns and df.to_dicts() == clean.to_dicts()
    assert clean["prompt_id"][0] == "12345"
    assert clean.schema["answer_norms"] == pl.List(pl.String)


def test_drift_parquet_input(tmp_path):
    rows = {
        "prompt_id": ["b", "a", "b", "a"],
        "traj_idx": [0, 0, 1, 1],
        "turn_correct": [[False, True], [True], [False, False, False], [False, False]],
        "normalized_answers": [["4", "5"], ["7"], ["4", "4", None], [None, None]],
        "format_penalty": [0.0, 0.0, -0.1, -0.2],
        "solved": [True, True, False, False],
        "messages": [[{"role": "user", "content": "hi"}]] * 4,
    }
    inp = tmp_path / "traj.parquet"
    pl.DataFrame(rows).write_parquet(inp)
    cfg = WeightsConfig(gamma=0.9, beta=0.5, repetition_lambda=0.5)
    out = tmp_path / "w.parquet"
    run_weights_command(inp, out, cfg)
    df = pl.read_parquet(out)
    # by hand: 0.9 (right at turn 2); 1.0; -0.1 - 0.5 * (1 - 1/2) = -0.35 ("4" twice, None not an
    # answer given); -0.2 (no answers given: no repetition term)
    want = [0.9, 1.0, -0.35, -0.2]
    np.testing.assert_allclose(df["return"].to_numpy(), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        df["weight"].to_numpy(), reference_group_weights(rows["prompt_id"], want, 0.5), rtol=1e-12
    )
    assert df["messages"].to_list() == rows["messages"]
    assert df["traj_idx"].to_list() == [0, 0, 1, 1]


def test_modes_and_cli(tmp_path, capsys):
    recs = make_records(n_prompts=3, k=4)
    inp = write_jsonl(tmp_path / "t.jsonl", recs)
    # solved, from the input records: a positive reward at some turn
    solved = [any(v > 0 for v in r["turn_rewards"].values()) for r in recs]
    assert 0 < sum(solved) < len(solved)
    parser = argparse.ArgumentParser(prog="drift")
    cli_weights.add_weights_parser(parser.add_subparsers())
    out = tmp_path / "u.parquet"
    args = parser.parse_args(
        ["weights", str(inp), "--gamma", "0.9", "--beta", "0.1", "--mode", "uniform", "--output", str(out)]
    )
    assert args.func(args) == 0
    assert pl.read_parquet(out)["weight"].to_list() == [1.0] * 12
    printed = capsys.readouterr().out
    assert "ESS fraction" in printed and f"wrote {out}" in printed
    args = parser.parse_args(["weights", str(inp), "--mode", "success_only", "-o", str(out)])
    assert args.func(args) == 0
    df = pl.read_parquet(out)
    assert df["weight"].to_list() == [float(s) for s in solved]
    args = parser.parse_args(
        ["weights", str(inp), "--mode", "uniform", "--unsolved-groups", "drop", "-o", str(out)]
    )
    assert args.func(args) == 0
    df = pl.read_parquet(out)
    solved_groups = {r["prompt_id"] for r, s in zip(recs, solved, strict=True) if s}
    weights = df["weight"].to_list()
    assert weights == [float(r["prompt_id"] in solved_groups) for r in recs]
    assert 0 < sum(weights) < len(weights)  # the records hold groups with and without a success
    assert "uniform, unsolved groups dropped" in capsys.readouterr().out
    args = parser.parse_args(["weights", str(inp), "--beta", "0", "-o", str(out)])
    assert args.func(args) == 2
    assert "beta" in capsys.readouterr().err
    args = parser.parse_args(["weights", str(tmp_path / "missing.jsonl"), "-o", str(out)])
    assert args.func(args) == 1


# --- bad input -----------------------------------------------------------------------------------

GOOD = {
    "prompt_id": "p",
    "turn_rewards": {"t1": 0, "t2": 1},
    "answer_norms": ["1", "2"],
    "format_penalty": 0.0,
}


def test_malformed_json_names_file_and_line(tmp_path):
    inp = write_jsonl(
        tmp_path / "bad.jsonl", [GOOD, GOOD, GOOD], raw_lines={2: '{"prompt_id": "p", "turn_rewards": {'}
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3 \(row 3\): malformed JSON"):
        load_weight_inputs(inp)
    df, report = read_weight_inputs(inp, on_bad_rows="skip")
    assert df.height == 3 and report.n_skipped == 1
    assert "line 3" in report.examples[0]


def test_missing_field_names_field_row_and_fields_found(tmp_path):
    bad = {k: v for k, v in GOOD.items() if k != "turn_rewards"} | {"extra": 1}
    inp = write_jsonl(tmp_path / "m.jsonl", [GOOD, bad])
    with pytest.raises(ValueError) as exc:
        load_weight_inputs(inp)
    msg = str(exc.value)
    assert "line 2 (row 2)" in msg and "'turn_rewards'" in msg
    assert "fields found: ['answer_norms', 'extra', 'format_penalty', 'prompt_id']" in msg


@pytest.mark.parametrize(
    ("line", "msg"),
    [
        (
            '{"prompt_id": "p", "turn_rewards": {"t1": NaN}, "answer_norms": [], "format_penalty": 0}',
            "not finite",
        ),
        (
            '{"prompt_id": "p", "turn_rewards": {"t1": 0, "t2": Infinity}, "answer_norms": [], "format_penalty": 0}',
            "not finite",
        ),
        (
            '{"prompt_id": "p", "turn_rewards": {"t1": 1e999}, "answer_norms": [], "format_penalty": 0}',
            "not finite",
        ),
        (
            '{"prompt_id": "p", "turn_rewards": {"t1": "1"}, "answer_norms": [], "format_penalty": 0}',
            "not a number",
        ),
        (
            '{"prompt_id": "p", "turn_rewards": {"t0": 0, "t1": 1}, "answer_norms": [], "format_penalty": 0}',
            "'t0' is not of the form",
        ),
        (
            '{"prompt_id": "p", "turn_rewards": {"t01": 0}, "answer_norms": [], "format_penalty": 0}',
            "'t01' is not of the form",
        ),
        ('{"prompt_id": "p", "turn_rewards": {"turn1": 0}, "answer_norms": []}', "non-empty object of turn"),
        ('{"prompt_id": "p", "turn_rewards": {}, "answer_norms": [], "format_penalty": 0}', "non-empty"),
        ('{"prompt_id": "p", "turn_rewards": {"t1": true}}', "not a number"),
        ('{"prompt_id": "", "turn_rewards": {"t1": 1}, "format_penalty": 0}', "prompt_id is empty"),
        ('{"prompt_id": "p", "turn_rewards": {"t1": null, "t2": null}}', "non-empty object of turn rewards"),
        ('{"prompt_id": "p", "turn_rewards": {"t1": 1}, "format_penalty": "0"}', "format_penalty must"),
        ('{"prompt_id": "p", "answer_norms": []}', "missing required field 'turn_rewards'"),
        (
            '{"prompt_id": "p", "turn_rewards": [0, 1], "answer_norms": [], "format_penalty": 0}',
            "non-empty object",
        ),
        (
            '{"prompt_id": "p", "turn_rewards": {"t1": 1}, "answer_norms": [], "format_penalty": 0.5}',
            "format_penalty",
        ),
        (
            '{"prompt_id": null, "turn_rewards": {"t1": 1}, "answer_norms": [], "format_penalty": 0}',
            "'prompt_id' is null",
        ),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_rows_are_named(tmp_path, line, msg):
    inp = write_jsonl(tmp_path / "b.jsonl", [GOOD, GOOD], raw_lines={1: line})
    with pytest.raises(ValueError, match=r"b\.jsonl: line 2 \(row 2\): .*" + msg):
        load_weight_inputs(inp)
    df, report = read_weight_inputs(inp, on_bad_rows="skip")
    assert df.height == 2 and report.n_skipped == 1


def test_float_prompt_id_rejected(tmp_path):
    # integer ids are fine (read as text); a float id is not. (Mixed with string ids, polars would
    # already have read every id as text, so the file is all-numeric here.)
    good = GOOD | {"prompt_id": 7}
    bad = '{"prompt_id": 1.5, "turn_rewards": {"t1": 1}, "answer_norms": [], "format_penalty": 0}'
    inp = write_jsonl(tmp_path / "f.jsonl", [good, good], raw_lines={1: bad})
    with pytest.raises(ValueError, match=r"line 2 \(row 2\): prompt_id must be a string or an integer"):
        load_weight_inputs(inp)
    assert load_weight_inputs(write_jsonl(tmp_path / "g.jsonl", [good]))["prompt_id"].to_list() == ["7"]


def test_skip_counts_and_run_reports(tmp_path):
    lines = {1: "not json", 3: '{"prompt_id": "p"}', 4: '{"prompt_id": "p", "turn_rewards": {"t1": NaN}}'}
    inp = write_jsonl(tmp_path / "s.jsonl", [GOOD, GOOD, GOOD], raw_lines=lines)
    report = run_weights_command(inp, tmp_path / "o.parquet", WeightsConfig(), on_bad_rows="skip")
    assert report.n_skipped_rows == 3 and report.n_trajectories == 3
    assert [m.split(":")[1].strip() for m in report.skipped_examples] == [
        "line 2 (row 2)",
        "line 4 (row 4)",
        "line 5 (row 5)",
    ]


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("", "no trajectories: the file is empty"),
        ("\n  \n\t\n", "no trajectories: the file has only blank lines"),
        ('{\n{"prompt_id": "p"}\n', "no trajectories: all 2 rows were bad and skipped"),
        ('{"prompt_id": "p", "turn_rewards": {"x": 1}}\n', "no trajectories: all 1 rows were bad"),
    ],
)
def test_no_trajectories_is_an_error_and_writes_nothing(tmp_path, capsys, text, msg):
    inp = tmp_path / "e.jsonl"
    inp.write_text(text)
    out = tmp_path / "o.parquet"
    with pytest.raises(NoTrajectoriesError, match=msg):
        run_weights_command(inp, out, WeightsConfig(), on_bad_rows="skip")
    parser = argparse.ArgumentParser(prog="drift")
    cli_weights.add_weights_parser(parser.add_subparsers())
    args = parser.parse_args(["weights", str(inp), "--on-bad-rows", "skip", "-o", str(out)])
    assert args.func(args) == 2
    assert msg in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["e.jsonl"]  # no output, no temp file


def test_parquet_without_rows_is_an_error(tmp_path):
    schema = {
        "prompt_id": pl.String,
        "turn_correct": pl.List(pl.Boolean),
        "normalized_answers": pl.List(pl.String),
        "format_penalty": pl.Float64,
    }
    inp, out = tmp_path / "t.parquet", tmp_path / "o.parquet"
    pl.DataFrame(
        {"prompt_id": ["a"], "turn_correct": [[]], "normalized_answers": [[]], "format_penalty": [0.0]},
        schema=schema,
    ).write_parquet(inp)
    with pytest.raises(NoTrajectoriesError, match="all 1 rows were bad and skipped"):
        run_weights_command(inp, out, WeightsConfig(), on_bad_rows="skip")
    pl.DataFrame(schema=schema).write_parquet(inp)
    with pytest.raises(NoTrajectoriesError, match="0 rows"):
        run_weights_command(inp, out, WeightsConfig())
    assert not out.exists()


def test_answer_entries_that_are_not_strings_are_read_as_their_json_text(tmp_path):
    # drift reads [5, "5"] as ["5", "5"] (polars' reader): 1 distinct of 2 -> 0.25; R = 1 - 0.25.
    # (weight_sft.py would count 2 distinct; docs/reliability.md lists the difference.)
    lines = ['{"prompt_id": "a", "turn_rewards": {"t1": 1}, "answer_norms": [5, "5"]}']
    _close(_returns_of(tmp_path, lines), [0.75])
    lines = ['{"prompt_id": "a", "turn_rewards": {"t1": 1}, "answer_norms": [true, true, 1.5]}']
    _close(_returns_of(tmp_path, lines), [1 - 0.5 * (1 - 2 / 3)])
    lines = ['{"prompt_id": "a", "turn_rewards": {"t1": 1}, "answer_norms": [[1], [1], null]}']
    _close(_returns_of(tmp_path, lines), [1 - 0.5 * (1 - 1 / 3)])


def test_a_field_polars_cannot_unify_is_a_file_level_error(tmp_path):
    # each record is fine, but "meta" is an object in one row and a number in the other
    inp = write_jsonl(tmp_path / "u.jsonl", [GOOD | {"meta": {"a": 1}}, GOOD | {"meta": 3}])
    with pytest.raises(ValueError, match=r"u\.jsonl: polars cannot read the records as one table"):
        load_weight_inputs(inp, on_bad_rows="skip")


def test_parquet_bad_input(tmp_path):
    base = {
        "prompt_id": ["a", "a", "b"],
        "turn_correct": [[True], [], [False]],
        "normalized_answers": [["1"], [], [None]],
        "format_penalty": [0.0, 0.0, float("nan")],
    }
    inp = tmp_path / "bad.parquet"
    pl.DataFrame(base).write_parquet(inp)
    with pytest.raises(ValueError, match=r"bad\.parquet: row 1: turn_correct is empty.*2 bad rows"):
        load_weight_inputs(inp)
    df, report = read_weight_inputs(inp, on_bad_rows="skip")
    assert df.height == 1 and report.n_skipped == 2
    assert "row 2: format_penalty" in report.examples[1]
    pl.DataFrame({k: v for k, v in base.items() if k != "normalized_answers"}).write_parquet(inp)
    with pytest.raises(ValueError, match=r"missing required column 'normalized_answers'; columns found"):
        load_weight_inputs(inp)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown input format"):
        load_weight_inputs(tmp_path / "x.csv")


def test_atomic_write(tmp_path, monkeypatch):
    target = tmp_path / "w.parquet"
    write_parquet_atomic(pl.DataFrame({"a": [1]}), target)
    write_parquet_atomic(pl.DataFrame({"a": [2]}), target)
    assert pl.read_parquet(target)["a"].to_list() == [2]

    def broken(self, path, *a, **k):
        Path(path).write_bytes(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(pl.DataFrame({"a": [3]}), target)
    monkeypatch.undo()
    assert pl.read_parquet(target)["a"].to_list() == [2]  # the old file is intact
    assert os.listdir(tmp_path) == ["w.parquet"]  # no temp file left behind


def test_compute_weight_table_keeps_order_and_columns():
    df = pl.DataFrame(
        {
            "prompt_id": ["x", "y", "x"],
            "turn_rewards": [[0.0, 1.0], [1.0], [0.0]],
            "normalized_answers": [["a", "b"], ["c"], [None]],
            "format_penalty": [0.0, 0.0, -0.1],
            "solved": [True, True, False],
            "keep": [1, 2, 3],
        }
    )
    out, diag = compute_weight_table(df, WeightsConfig(beta=1.0))
    # returns: 0.9, 1.0, -0.1; group x: [0.9, -0.1] -> w = 2 e^0.9 / (e^0.9 + e^-0.1), 2 e^-0.1 / (...)
    np.testing.assert_allclose(out["return"].to_numpy(), [0.9, 1.0, -0.1])
    s = math.exp(0.9) + math.exp(-0.1)
    np.testing.assert_allclose(out["weight"].to_numpy(), [2 * math.exp(0.9) / s, 1.0, 2 * math.exp(-0.1) / s])
    assert out.columns == [*df.columns, "return", "weight"]
    assert diag.n_groups == 2


# --- equal to weight_sft.py on the edge cases, by hand -----------------------------------------


def _returns_of(tmp_path: Path, lines: list[str], **cfg) -> list[float]:
    inp = tmp_path / "edge.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    run_weights_command(inp, tmp_path / "edge.parquet", WeightsConfig(**cfg))
    return pl.read_parquet(tmp_path / "edge.parquet")["return"].to_list()


def _close(got: list[float], want: list[float]) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_reference_edge_cases_by_hand(tmp_path):
    lines = [
        # turn 3 correct: 0.9^2 = 0.81; penalty -0.2; ["", "", "5"]: 1 distinct non-empty of 3
        # -> 0.5 * (1 - 1/3) = 1/3; R = 0.81 - 0.2 - 1/3 = 0.276666...
        '{"prompt_id": "a", "turn_rewards": {"t1": 0, "t2": 0, "t3": 1}, "answer_norms": ["", "", "5"],'
        ' "format_penalty": -0.2}',
        # no turn correct; penalty -0.1; [null, "5"]: 1 of 2 -> 0.25; R = -0.35
        '{"prompt_id": "b", "turn_rewards": {"t1": 0, "t2": 0}, "answer_norms": [null, "5"], "format_penalty": -0.1}',
        # no answer_norms: no repetition penalty; turn 2 correct: R = 0.9 - 0.1 = 0.8
        '{"prompt_id": "c", "turn_rewards": {"t1": 0, "t2": 1}, "format_penalty": -0.1}',
        # answer_norms not a list (a string, an object, a number, null): no repetition penalty: R = 1
        '{"prompt_id": "d", "turn_rewards": {"t1": 1}, "answer_norms": "5", "format_penalty": 0}',
        '{"prompt_id": "d", "turn_rewards": {"t1": 1}, "answer_norms": {"a": "5"}, "format_penalty": 0}',
        '{"prompt_id": "d", "turn_rewards": {"t1": 1}, "answer_norms": 5, "format_penalty": 0}',
        '{"prompt_id": "d", "turn_rewards": {"t1": 1}, "answer_norms": null, "format_penalty": 0}',
        # the file has a format_penalty column, so a record without one reads null = 0 and its
        # trajectory_penalty is never read: ["4", "4"]: 1 of 2 -> 0.25; R = 0 + 0 - 0.25
        '{"prompt_id": "e", "turn_rewards": {"t1": 0, "t2": 0}, "answer_norms": ["4", "4"], "trajectory_penalty": -0.3}',
        # no penalty field at all: 0; turn 1 correct: R = 1
        '{"prompt_id": "e", "turn_rewards": {"t1": 1}, "answer_norms": ["4"]}',
        # format_penalty -0.1 (trajectory_penalty ignored): R = 1 - 0.1
        '{"prompt_id": "e", "turn_rewards": {"t1": 1}, "format_penalty": -0.1, "trajectory_penalty": -0.7}',
        # format_penalty null counts 0, trajectory_penalty still ignored: R = 1
        '{"prompt_id": "e", "turn_rewards": {"t1": 1}, "format_penalty": null, "trajectory_penalty": -0.7}',
        # reward keys that are not t<digits> are ignored: R = 0.9 (t2), not 0.9 + 5 + 7
        '{"prompt_id": "f", "turn_rewards": {"t1": 0, "t2": 1, "total": 5, "turn3": 7, "t2b": 1}, "answer_norms": []}',
        # an empty list: no penalty; all entries empty or null: 0 distinct of 3 -> the whole 0.5
        '{"prompt_id": "g", "turn_rewards": {"t1": 0, "t2": 0, "t3": 0}, "answer_norms": [null, "", null]}',
        # a turn absent (or null) before a later one is 0 at its index, each turn discounted by its
        # own number: t3 correct after a missing t2: 0.9^2 = 0.81; only t2 (t1 null): 0.9
        '{"prompt_id": "h", "turn_rewards": {"t1": 0, "t3": 1}, "format_penalty": 0}',
        '{"prompt_id": "h", "turn_rewards": {"t2": 1}, "format_penalty": 0}',
    ]
    want = [
        0.81 - 0.2 - 0.5 * (1 - 1 / 3),
        -0.1 - 0.25,
        0.9 - 0.1,
        1.0,
        1.0,
        1.0,
        1.0,
        -0.25,
        1.0,
        0.9,
        1.0,
        0.9,
        -0.5,
        0.81,
        0.9,
    ]
    got = _returns_of(tmp_path, lines)
    _close(got, want)
    assert round(got[0], 4) == 0.2767 and round(got[1], 4) == -0.35  # the figures in issue 13
    # the script's rule written plainly, on every record
    recs = [json.loads(line) for line in lines]
    _close(got, [reference_return(r, 0.9, 0.5) for r in recs])
    out = pl.read_parquet(tmp_path / "edge.parquet")
    # the answer list keeps its reference name; a value that is no list is null there
    assert out["answer_norms"].to_list()[:4] == [["", "", "5"], [None, "5"], None, None]
    assert out["solved"].to_list()[:3] == [True, False, True]
    assert out["turn_rewards"].to_list()[-2:] == [[0.0, 0.0, 1.0], [0.0, 1.0]]
    # weights of group "e" (4 rows): exp(R/beta) / mean, by hand from the returns above
    e = np.array(want[7:11])
    w = np.exp(e / 0.1) / np.exp(e / 0.1).mean()
    _close(out["weight"].to_list()[7:11], w.tolist())


def test_trajectory_penalty_is_read_only_in_a_file_without_format_penalty(tmp_path):
    lines = [
        # no record has format_penalty: trajectory_penalty is the penalty; R = 0 - 0.3
        '{"prompt_id": "a", "turn_rewards": {"t1": 0}, "trajectory_penalty": -0.3}',
        # null: 0; R = 1
        '{"prompt_id": "a", "turn_rewards": {"t1": 1}, "trajectory_penalty": null}',
        # absent: 0; t2 correct: R = 0.9
        '{"prompt_id": "a", "turn_rewards": {"t1": 0, "t2": 1}}',
    ]
    _close(_returns_of(tmp_path, lines), [-0.3, 1.0, 0.9])
    # one record with a format_penalty, even a null one, switches the whole file to it
    both = [*lines, '{"prompt_id": "b", "turn_rewards": {"t1": 0}, "format_penalty": null}']
    _close(_returns_of(tmp_path, both), [0.0, 1.0, 0.9, 0.0])
    # the rule's checks follow it: a bad trajectory_penalty is an error only where it is read
    bad = ['{"prompt_id": "a", "turn_rewards": {"t1": 0}, "trajectory_penalty": 0.5}']
    with pytest.raises(
        ValueError, match=r"line 1 \(row 1\): trajectory_penalty must be a finite number <= 0"
    ):
        _returns_of(tmp_path, bad)
    _close(
        _returns_of(tmp_path, [*bad, '{"prompt_id": "a", "turn_rewards": {"t1": 1}, "format_penalty": 0}']),
        [0.0, 1.0],
    )


def test_answer_norms_mixing_lists_and_other_values_in_one_file(tmp_path):
    # polars reads such a column as text; lists are recovered, the rest is "not a list"
    lines = [
        '{"prompt_id": "a", "turn_rewards": {"t1": 0, "t2": 1}, "answer_norms": ["3", "3"]}',
        '{"prompt_id": "a", "turn_rewards": {"t1": 1}, "answer_norms": "3"}',
        '{"prompt_id": "a", "turn_rewards": {"t1": 0, "t2": 0}, "answer_norms": [null, ""]}',
    ]
    # 0.9 - 0.5 * (1 - 1/2) = 0.65; 1 (no list); 0 - 0.5 * (1 - 0/2) = -0.5
    _close(_returns_of(tmp_path, lines), [0.65, 1.0, -0.5])


def test_gamma_and_lambda_reach_the_reference_rule(tmp_path):
    line = (
        '{"prompt_id": "a", "turn_rewards": {"t1": 0, "t2": 0, "t3": 1}, "answer_norms": ["", "x", "x", "y"]}'
    )
    # gamma 0.5: 0.25; lambda 2: 2 distinct non-empty of 4 -> 2 * (1 - 2/4) = 1; R = -0.75
    _close(_returns_of(tmp_path, [line], gamma=0.5, repetition_lambda=2.0), [-0.75])


@pytest.mark.timeout(900)  # as in tests/test_robustness.py, where it was
def test_streamed_weights_equal_the_in_memory_table(tmp_path):
    from drift_core.schemas import WeightsConfig
    from tasks.weights_io import compute_weight_table, read_weight_inputs, weigh_parquet

    rng = np.random.default_rng(0)
    n = 103
    turns = [list(rng.random(rng.integers(1, 4)) < 0.4) for _ in range(n)]
    rows = {
        "prompt_id": [f"p{i // 8}" for i in range(n)],
        "traj_idx": [i % 8 for i in range(n)],
        "messages": [[{"role": "user", "content": f"q{i}"}] for i in range(n)],
        "turn_correct": turns,
        "normalized_answers": [[str(rng.integers(0, 3)) for _ in t] for t in turns],
        "format_penalty": [-0.1 * float(rng.integers(0, 2)) for _ in range(n)],
    }
    rows["format_penalty"][50] = float("nan")  # a bad row, in the fourth batch of 16
    rows["turn_correct"][77] = []
    inp = tmp_path / "traj.parquet"
    pl.DataFrame(rows).write_parquet(inp, row_group_size=40)
    cfg = WeightsConfig(beta=0.5)
    with pytest.raises(ValueError, match=r"traj\.parquet: row 50: format_penalty.*\(2 bad rows in all\)"):
        weigh_parquet(inp, tmp_path / "x.parquet", cfg, batch_rows=16)
    assert not (tmp_path / "x.parquet").exists()
    streamed = weigh_parquet(inp, tmp_path / "s.parquet", cfg, on_bad_rows="skip", batch_rows=16)
    df, report = read_weight_inputs(inp, on_bad_rows="skip")
    table, diag = compute_weight_table(df, cfg)
    assert streamed.rows == n - 2 and streamed.report.n_skipped == report.n_skipped == 2
    assert streamed.report.examples == report.examples
    assert pl.read_parquet(tmp_path / "s.parquet").equals(table)
    assert streamed.diagnostics.model_dump() == pytest.approx(diag.model_dump(), rel=1e-12)
    np.testing.assert_array_equal(streamed.weights, table["weight"].to_numpy())

    # published as a store artifact (hashed, renamed into place, manifested) without a frame in memory
    from tasks.store import ArtifactStore

    store = ArtifactStore(str(tmp_path / "store"))
    manifest = store.write_file(
        "weights", "k", lambda tmp: (weigh_parquet(inp, tmp, cfg, on_bad_rows="skip").rows, {"x": 1})
    )
    assert store.find("weights", "k") == manifest and manifest.rows == n - 2
    assert store.read_parquet(manifest).equals(table)


@pytest.mark.slow
@pytest.mark.timeout(900)  # as in tests/test_robustness.py, where it was
def test_weights_of_a_million_trajectories_in_bounded_memory(tmp_path):
    """1,000,000 trajectories with 4 messages of 150 characters each: 572 MiB of text in memory if
    the table were loaded whole. The streamed weights computation stays far below that."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_weights_memory as bench
        from bench_weights import make_parquet
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    n, chars = 1_000_000, 150
    inp, out = tmp_path / "trajectories.parquet", tmp_path / "weighted.parquet"
    make_parquet(inp, n)
    bench.add_messages(inp, chars)
    text_mib = n * bench.MESSAGES_PER_ROW * chars / 2**20
    baseline = bench.baseline_rss()
    result = bench.run_child("streaming", inp, out)
    extra = result["peak_rss_mib"] - baseline
    print(
        f"streamed weights of {n:,} rows: {result['seconds']:.1f} s, peak RSS {result['peak_rss_mib']:.0f} MiB"
    )
    assert result["rows"] == n
    assert extra < 0.75 * text_mib, f"peak RSS {extra:.0f} MiB above the interpreter: the text was loaded"
    weighted = pl.scan_parquet(out).group_by("prompt_id").agg(pl.col("weight").mean()).collect()
    np.testing.assert_allclose(weighted["weight"].to_numpy(), 1.0, rtol=1e-9)


# the two copies of the JSONL row rules (tasks/weights_jsonl.py): the vectorised ``_row_checks`` that
# finds bad rows in a table polars read, and ``_line_problem`` that words a row's message (and finds
# the bad rows alone when polars cannot read the file). A row's fate must not depend on which ran.
_reward = st.one_of(st.none(), st.sampled_from([0.0, 1.0, -0.5, 0, 1, 2, 1e400]))
_record = st.fixed_dictionaries(
    {},
    optional={
        "prompt_id": st.one_of(st.none(), st.sampled_from(["", "a", "b"])),
        "turn_rewards": st.one_of(
            st.none(), st.dictionaries(st.sampled_from(["t1", "t2", "t3", "t10", "t0", "t01", "x"]), _reward)
        ),
        "format_penalty": st.one_of(st.none(), st.sampled_from([0.0, -1.0, 0.5, 0, -2, 1e400])),
        "trajectory_penalty": st.one_of(st.none(), st.sampled_from([0.0, -1.0, 0.5])),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_record, min_size=1, max_size=5))
def test_vectorised_and_per_line_row_rules_agree(tmp_path, records):
    from tasks.weights_jsonl import _line_problem, _nonblank_lines, _polars_table, _row_checks, penalty_field

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    raw, _ = _polars_table(path)
    if raw is None:  # polars cannot read it: only the per-line rules run
        return
    flagged = np.zeros(raw.height, dtype=bool)
    for check, _ in _row_checks(raw.schema):
        flagged |= raw.select(check.fill_null(False)).to_series().to_numpy()
    penalty = penalty_field(raw.schema)
    per_line = [_line_problem(line, penalty) for _, line in _nonblank_lines(path)]
    assert flagged.tolist() == [p is not None for p in per_line], per_line
