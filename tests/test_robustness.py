"""Robustness (issue 6), each claim exercised on the real thing; docs/reliability.md lists them.

1. Bad input through the real CLI: one paragraph on stderr, exit code 2, no traceback; ``--debug``
   shows it. Config errors stop before Prefect, MLflow or the artifact store are touched.
2. Crash safety: a SIGKILL mid-write leaves no partial file at an artifact's name; a corrupt cached
   artifact is recomputed (Prefect records the recompute); a ``drift run`` SIGKILLed mid-rollout
   resumes from its finished shards and ends with exactly K trajectories per prompt.
3. Safe defaults: remote code off, safetensors only, Prefect results are JSON, the servers drift
   starts listen on 127.0.0.1 only, no secret reaches MLflow.
4. Load: grading survives pathological answers; the weights computation streams 1M trajectories.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from helpers import (
    STAGE_TASKS,
    drift_cli,
    flow_run_of,
    mlflow_run_id,
    prefect_client,
    raw_task_states,
    states_by_task,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
pytestmark = pytest.mark.timeout(900)

# sentinel secrets, in values drift reads (a URL's password in the config file, and in a `--set`
# override): they must never reach a tracked run
URL_PASSWORD = "SENTINEL_url_password_9e0a"
SET_PASSWORD = "SENTINEL_set_password_31f7"
SET_DASK_ADDRESS = f"run.dask_address=tcp://drift:{SET_PASSWORD}@127.0.0.1:8787"


# ------------------------------------------------------------------------------------- helpers


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


def task_runs(env: dict, tracking_uri: str, run_id: str) -> dict[str, list[str]]:
    """Task-run states (by task-run name) of the Prefect flow run behind an MLflow parent run."""
    return raw_task_states(env, flow_run_of(tracking_uri, run_id))


def by_task(states: dict[str, list[str]], task: str) -> list[str]:
    """States of every run of one task (``rollout-shard-0``, ``rollout-shard-1``, ... together)."""
    pattern = re.compile(rf"{re.escape(task)}(-(\d+|[0-9a-f]{{3,}}))?$")
    return sorted(s for name, ss in states.items() if pattern.fullmatch(name) for s in ss)


def write_jsonl(path: Path, rows: list, raw: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for at, line in sorted((raw or {}).items()):
        lines.insert(at, line)
    path.write_text("\n".join(lines) + "\n")
    return path


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


def _listening_sockets(root_pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of ``root_pid`` and its descendants."""
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children[int(fields[1])].append(int(stat.parent.name))
    pids, stack = set(), [root_pid]
    while stack:
        pid = stack.pop()
        pids.add(pid)
        stack.extend(children.get(pid, []))
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                    continue
                addr, port = cols[1].split(":")
                raw = bytes.fromhex(addr)
                if v6:  # four little-endian 32-bit words
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.add((socket.inet_ntop(socket.AF_INET6, raw), int(port, 16)))
                else:
                    found.add((socket.inet_ntoa(raw[::-1]), int(port, 16)))
    return found


@pytest.mark.slow
def test_malformed_jsonl_through_the_cli_and_servers_bind_localhost(tmp_path):
    """The real command with no Prefect server configured: drift starts Prefect's temporary API
    server for the run. It must listen on 127.0.0.1 only, and the user sees one paragraph naming
    the file and line of the malformed record, exit code 2."""
    data = write_jsonl(
        tmp_path / "problems.jsonl",
        [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 2 + 2?", "answer": "4"}],
        raw={1: '{"question": "What is 3 + 3?", "answer": '},
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API") and k != "PREFECT_HOME"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(TINY), "--set", f"data.source={data}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    listening: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        listening |= _listening_sockets(proc.pid)
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    assert_one_paragraph(stderr, "IngestError", f"{data}: line 2: malformed JSON", "on_bad_rows=skip")
    print("listening sockets of drift and its children:", sorted(listening))
    assert listening, "the temporary Prefect server was never seen listening"
    assert {addr for addr, _ in listening} <= {"127.0.0.1", "::1"}, listening


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
    data = write_jsonl(tmp_path / "traj.jsonl", [good, good], raw={1: bad})
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


def test_non_finite_values_never_reach_the_weights():
    from drift_core.returns import returns_from_arrays
    from drift_core.schemas import WeightsConfig
    from drift_core.weights import compute_weights

    with pytest.raises(ValueError, match=r"turn reward 2 of trajectory 1 is not finite: .*nan"):
        returns_from_arrays(
            np.array([1.0, 0.0, np.nan]), np.zeros(2), np.ones(2), np.ones(2), 0.9, 0.5, np.array([1, 2])
        )
    with pytest.raises(ValueError, match=r"return at index 1 is not finite: .*inf"):
        compute_weights(np.array([0.0, np.inf]), np.array([0, 0]), None, WeightsConfig())


# ============================================================================================
# 2. Crash safety: atomic writes
# ============================================================================================

CRASH_WRITE = """
import os, signal, sys
import polars as pl
from tasks.store import ArtifactStore

store = ArtifactStore(sys.argv[1])
if sys.argv[2] == "complete":
    store.write_parquet(pl.DataFrame({"x": [1, 2, 3]}), "stage", "key")
    sys.exit(0)
real = pl.DataFrame.write_parquet

def dies_mid_write(self, path, *args, **kwargs):
    real(self, path, *args, **kwargs)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)  # half the bytes are on disk ...
    os.kill(os.getpid(), signal.SIGKILL)  # ... when the process dies

pl.DataFrame.write_parquet = dies_mid_write
store.write_parquet(pl.DataFrame({"x": list(range(100_000))}), "stage", "key")
"""


def _crash_write(store: Path, mode: str) -> int:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH_WRITE), str(store), mode],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=120,
    ).returncode


def test_sigkill_mid_write_leaves_no_partial_artifact(tmp_path):
    from tasks.store import ArtifactStore

    # a first write killed half-way: nothing at the artifact's name, nothing found
    fresh = tmp_path / "fresh"
    assert _crash_write(fresh, "crash") == -signal.SIGKILL
    key_dir = fresh / "stage" / "key"
    assert not (key_dir / "data.parquet").exists() and not (key_dir / "manifest.json").exists()
    assert [p.name for p in key_dir.iterdir()][0].startswith(".data.parquet.")  # the temp name only
    assert ArtifactStore(str(fresh)).find("stage", "key") is None

    # a rewrite killed half-way: the previous complete artifact is untouched and still verifies
    store = tmp_path / "store"
    assert _crash_write(store, "complete") == 0
    before = (store / "stage" / "key" / "data.parquet").read_bytes()
    assert _crash_write(store, "crash") == -signal.SIGKILL
    assert (store / "stage" / "key" / "data.parquet").read_bytes() == before
    s = ArtifactStore(str(store))
    manifest = s.find("stage", "key")
    assert manifest is not None and s.read_parquet(manifest)["x"].to_list() == [1, 2, 3]


# ============================================================================================
# 2 + 3. SIGKILL mid-rollout, resume, corrupt artifacts; JSON results, no secrets
# ============================================================================================

K = 2
N_PROMPTS = 16
SHARD = 4


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, prefect_server):
    """``drift run`` SIGKILLed once its first rollout shard is stored, then run again.

    Data: 16 arithmetic problems in a JSONL file with two bad records (skipped, on_bad_rows=skip),
    K=2, shards of 4 prompts run one at a time (Prefect's thread pool set to one worker). The
    config holds a URL with a sentinel password; the second run overrides it with `--set` (another).
    """
    from drift_core.schemas import ArithConfig
    from tasks.ingest import generate_arith

    d = tmp_path_factory.mktemp("resume")
    problems = [{"question": q, "answer": a} for q, a in generate_arith(ArithConfig(n=N_PROMPTS, digits=1))]
    data = write_jsonl(
        d / "problems.jsonl",
        problems,
        raw={5: '{"question": "What is 1 +', 9: '{"question": "", "answer": "3"}'},
    )
    config = yaml.safe_load(TINY.read_text())
    config["data"] = {"source": str(data), "on_bad_rows": "skip"}
    config["rollout"].update(k=K, shard_size=SHARD)
    config["rollout"]["sampling"]["max_new_tokens"] = 16
    store, tracking = d / "store", f"sqlite:///{d / 'mlflow.db'}"
    config["run"].update(
        artifact_store=str(store),
        tracking_uri=tracking,
        dask_address=f"tcp://drift:{URL_PASSWORD}@127.0.0.1:8786",  # unused by the threads runner
    )
    config_path = d / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {
        **prefect_server,
        "PYTHONPATH": str(ROOT),
        "PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS": "1",
    }

    # run 1: killed as soon as the first shard's manifest is in the store
    log = open(d / "killed-run.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(config_path)],
        cwd=d,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # No wall-clock budget of its own: how long the first shard takes depends on the machine's load
    # (a 400 s budget fired on a 2-core box shared by other jobs). A run that dies is caught here,
    # a run that hangs by the module's pytest timeout.
    try:
        while not list(store.glob("rollout-shard/*/manifest.json")):
            assert proc.poll() is None, (d / "killed-run.log").read_text()[-3000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its grading workers, if still there
        log.close()

    # what the kill left: complete, verified shards, and no partial file at any artifact's name.
    # A shard is finished when its manifest is there (the store's record, written last); a data
    # file without one (killed between the two renames) is an unfinished shard, run again.
    from tasks.store import ArtifactStore, Manifest

    s = ArtifactStore(str(store))
    # the training problems' ingest (the store also holds the eval set's): the one with our prompt ids
    tables = [pl.read_parquet(p)["prompt_id"].to_list() for p in sorted(store.glob("ingest/*/data.parquet"))]
    (order,) = [ids for ids in tables if ids and ids[0].startswith("problems-")]
    finished = set()
    for key_dir in store.glob("rollout-shard/*"):
        files = {p.name for p in key_dir.iterdir() if not p.name.startswith(".")}
        assert files in (set(), {"data.parquet"}, {"data.parquet", "manifest.json"}), files
        if "manifest.json" in files:
            manifest = Manifest.model_validate_json((key_dir / "manifest.json").read_text())
            assert s.verify(manifest)
            first = s.read_parquet(manifest)["prompt_id"][0]
            finished.add(order.index(first) // SHARD)
    assert 1 <= len(finished) < N_PROMPTS // SHARD, f"kill came too late to test resuming: {finished}"

    # run 2: the same command again, with a `--set` (which only changes an unused address)
    second = drift_cli(["run", str(config_path), "--set", SET_DASK_ADDRESS], d, env)
    assert second.returncode == 0, second.stderr[-5000:]
    run_id = mlflow_run_id(second.stdout)
    return {
        "dir": d,
        "store": store,
        "tracking": tracking,
        "env": env,
        "config": config_path,
        "finished_at_kill": finished,
        "killed_pid": proc.pid,
        "run_id": run_id,
        "states": task_runs(prefect_server, tracking, run_id),
    }


@pytest.mark.slow
def test_sigkill_mid_rollout_resumes_finished_shards(resumed):
    """Every shard finished before the kill is Cached on the rerun, whether or not the kill came
    before Prefect wrote its own record (the store decides, tasks.caching); the rest Completed."""
    states = resumed["states"]
    print("finished at kill:", sorted(resumed["finished_at_kill"]), "second run:", states)
    shard_states = {
        int(name.rsplit("-", 1)[1]): ss for name, ss in states.items() if name.startswith("rollout-shard-")
    }
    assert sorted(shard_states) == list(range(N_PROMPTS // SHARD))
    for shard, ss in shard_states.items():
        want = "Cached" if shard in resumed["finished_at_kill"] else "Completed"
        assert ss == [want], (shard, ss, resumed["finished_at_kill"])

    # exactly K trajectories per prompt, none duplicated, every prompt present
    (collected,) = resumed["store"].glob("rollout/*/data.parquet")
    df = pl.read_parquet(collected)
    assert df.height == N_PROMPTS * K
    per_prompt = df.group_by("prompt_id").agg(pl.col("traj_idx").sort())
    assert per_prompt.height == N_PROMPTS
    assert all(idx == list(range(K)) for idx in per_prompt["traj_idx"].to_list())
    assert df.select("prompt_id", "traj_idx").is_duplicated().sum() == 0


@pytest.mark.slow
def test_the_killed_run_is_marked_crashed_by_the_next_one(resumed, prefect_server):
    """SIGKILL leaves the first run's Prefect flow run Running and its MLflow runs RUNNING; the
    second `drift run` on this host marks them Crashed / KILLED (their process is gone)."""
    from mlflow.tracking import MlflowClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    pid = resumed["killed_pid"]
    with prefect_client(prefect_server) as client:
        (killed,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"drift.pid:{pid}"]))
        )
    assert killed.state.type.value == "CRASHED", killed.state
    assert f"process {pid} on" in killed.state.message

    client = MlflowClient(resumed["tracking"])
    experiment = client.get_run(resumed["run_id"]).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`drift.pid` = '{pid}'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED", parent.info
    assert parent.data.tags["drift.closed_reason"].startswith(f"process {pid} on")
    # the stage that ended before the kill (ingest) stays FINISHED; the one it interrupted
    # (rollout: killed after its first shard) is KILLED too; no later stage had started
    stages = {r.data.tags["drift.stage"]: r.info.status for r in runs if r is not parent}
    assert stages == {"ingest": "FINISHED", "rollout": "KILLED"}, stages
    assert client.get_run(resumed["run_id"]).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_mid_rollout_stops_generation_at_once(tmp_path, prefect_server, sig):
    """Ctrl-C (SIGINT) or SIGTERM (a Prefect worker's cancel, a pod's stop, ``kill``) while a rollout
    shard generates in a worker thread: the run ends within seconds, before that shard's first turn
    is done, and leaves no shard artifact. Before, the main thread's untimed wait only saw the signal
    once the shard had finished all its turns (65 s for this shard's smaller twin, 75 s for Ctrl-C)."""
    config = yaml.safe_load(TINY.read_text())
    config["rollout"].update(k=16, shard_size=8)  # one shard of 8 prompts x 16 trajectories
    config["rollout"]["sampling"]["max_new_tokens"] = 600  # turn 1 alone: minutes on a CPU
    config["protocol"]["max_turns"] = 3
    store = tmp_path / "store"
    config["run"].update(artifact_store=str(store), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", str(config_path)],
            cwd=tmp_path,
            env={**prefect_server, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while "rollout-shard 0:" not in log_path.read_text():  # the shard's progress bar: generating
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(1.0)
        os.kill(proc.pid, sig)
        sent = time.monotonic()
        code = proc.wait(timeout=60)  # the old code: still generating (the shard needs minutes)
        waited = time.monotonic() - sent
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text()
    print(f"{sig.name}: exit {code} after {waited:.1f} s")
    # Ctrl-C: the CLI's exit status 130; SIGTERM: Prefect re-raises it with the default handler
    assert code == (130 if sig == signal.SIGINT else -signal.SIGTERM), text[-3000:]
    # within seconds: measured 0.7-3.2 s (docs/reliability.md); the old untimed wait took 65-75 s
    assert waited < 20, f"{sig.name}: the run took {waited:.1f} s to end"
    assert "128/128" not in text, "turn 1 of the shard finished after the signal"
    assert not list(store.glob("rollout-shard/*/manifest.json")), "an interrupted shard was recorded"


@pytest.mark.slow
def test_skipped_rows_are_counted_in_the_manifest_and_mlflow(resumed):
    from mlflow.tracking import MlflowClient

    (manifest_file,) = [
        p for p in resumed["store"].glob("ingest/*/manifest.json") if "problems" in p.read_text()
    ]
    meta = json.loads(manifest_file.read_text())["meta"]
    assert meta["rows_read"] == N_PROMPTS + 2 and meta["rows_skipped"] == 2
    assert any("line 6: malformed JSON" in e for e in meta["skipped_examples"])
    assert any("line 10: empty question" in e for e in meta["skipped_examples"])
    client = MlflowClient(resumed["tracking"])
    parent = client.get_run(resumed["run_id"])
    assert parent.data.metrics["ingest.rows_skipped"] == 2
    (ingest_run,) = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{resumed['run_id']}' and tags.`drift.stage` = 'ingest'",
    )
    assert ingest_run.data.metrics["ingest.rows_skipped"] == 2  # the parent's name for it


@pytest.mark.slow
def test_prefect_results_are_json_not_pickles(resumed):
    files = sorted((resumed["store"] / "prefect-results").iterdir())
    assert len(files) >= 8  # ingest x2, 4 shards, collect, weights, train, eval ...
    for path in files:
        raw = path.read_bytes()
        assert not raw.startswith(b"\x80"), f"{path.name} is a pickle"
        record = json.loads(raw)
        assert record["metadata"]["serializer"]["type"] == "json", path.name
        result = json.loads(record["result"])  # the result itself is JSON too: a small manifest
        assert result["__class__"] == "tasks.store.Manifest" and "sha256" in result["data"], path.name


@pytest.mark.slow
def test_no_secret_reaches_mlflow_or_prefect(resumed, tmp_path):
    """A password in a config URL reaches neither MLflow nor Prefect; one given with `--set`
    reaches no MLflow run but is a Prefect flow-run parameter as typed (docs/reliability.md)."""
    from mlflow.tracking import MlflowClient

    secrets = (URL_PASSWORD, SET_PASSWORD)
    client = MlflowClient(resumed["tracking"])
    parent = client.get_run(resumed["run_id"])
    killed = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`drift.pid` = '{resumed['killed_pid']}'"
    )
    # both were read: the run's address is the --set one, the killed run's the file's; logged masked
    assert parent.data.params["run.dask_address"] == "tcp://***@127.0.0.1:8787"
    (killed_parent,) = [r for r in killed if "mlflow.parentRunId" not in r.data.tags]
    assert killed_parent.data.params["run.dask_address"] == "tcp://***@127.0.0.1:8786"
    runs = client.search_runs([parent.info.experiment_id])  # the killed run and the resumed one
    assert len(runs) >= 2 + 6
    n_files = 0
    for run in runs:
        tracked = json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics)])
        assert not any(s in tracked for s in secrets), run.info.run_name
        (tmp_path / run.info.run_id).mkdir()
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        for file in (p for p in local.rglob("*") if p.is_file()):
            data, n_files = file.read_bytes(), n_files + 1
            assert not any(s.encode() in data for s in secrets), (run.info.run_name, file.name)
    print(f"checked {len(runs)} MLflow runs, {n_files} artifact files")
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    with prefect_client(resumed["env"]) as prefect:
        parameters = prefect.read_flow_run(flow_run_id).parameters
    assert URL_PASSWORD not in json.dumps(parameters)  # the file's content is no parameter
    assert parameters["overrides"] == [SET_DASK_ADDRESS]  # `--set` strings are, as given


#: the stage tasks after ingest and the rollout shards (register-model and promote talk to the
#: registry: never cached)
DOWNSTREAM_OF_ROLLOUT_SHARDS = sorted(STAGE_TASKS - {"ingest-train", "ingest-eval", "rollout-shard"})


@pytest.mark.slow
def test_corrupt_cached_artifacts_are_recomputed_not_used(resumed):
    """Truncate the problems parquet and flip bytes in one rollout shard: the next run finds the
    cached manifests, fails their hash check and recomputes exactly those two tasks."""
    from tasks.store import ArtifactStore, Manifest

    store = resumed["store"]
    (problems,) = [p.parent for p in store.glob("ingest/*/manifest.json") if "problems" in p.read_text()]
    data = problems / "data.parquet"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    shard = sorted(store.glob("rollout-shard/*/data.parquet"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))

    third = drift_cli(["run", str(resumed["config"])], resumed["dir"], resumed["env"])
    assert third.returncode == 0, third.stderr[-5000:]
    states = task_runs(resumed["env"], resumed["tracking"], mlflow_run_id(third.stdout))
    print("after corrupting two artifacts:", states)
    # Prefect's record: the cached run of each corrupt task, then its recompute
    assert by_task(states, "ingest-train").count("Completed") == 1, states
    assert by_task(states, "rollout-shard") == ["Cached"] * 4 + ["Completed"], states
    # same content, same hashes downstream: every later stage is served from the cache
    for name in DOWNSTREAM_OF_ROLLOUT_SHARDS:
        assert by_task(states, name) and set(by_task(states, name)) == {"Cached"}, (name, states)
    assert by_task(states, "ingest-eval") == ["Cached"], states  # the eval problems were not touched
    tasks = set(states_by_task(states)) - {"register-model", "promote"}
    assert tasks == {"ingest-train", "ingest-eval", "rollout-shard", *DOWNSTREAM_OF_ROLLOUT_SHARDS}, states
    assert "cached artifact" in third.stderr and "failed its hash check; recomputing" in third.stderr
    s = ArtifactStore(str(store))
    for manifest_file in store.glob("*/*/manifest.json"):
        assert s.verify(Manifest.model_validate_json(manifest_file.read_text())), manifest_file


# ============================================================================================
# 3. Safe defaults: remote code, safetensors, redaction
# ============================================================================================


def test_remote_code_off_unless_configured_and_safetensors_only(tiny_model_dir, tmp_path, monkeypatch):
    import transformers

    from drift_core.schemas import EngineConfig
    from flows.config import load_config
    from tasks.engines.transformers_engine import TransformersEngine
    from tasks.models import ModelError, load_model, load_tokenizer

    calls: list[tuple[str, dict]] = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):

        def spy(path, *args, _real=cls.from_pretrained, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)

    path = str(tiny_model_dir)
    default = load_config(TINY).reference_model.model_copy(update={"path": path})
    assert default.trust_remote_code is False
    TransformersEngine(path, default, EngineConfig(device="cpu"))  # what rollout and eval load
    load_tokenizer(path, default), load_model(path, default)  # what training loads
    assert [kw["trust_remote_code"] for _, kw in calls] == [False] * 4
    assert all(kw["use_safetensors"] is True for name, kw in calls if name == "AutoModelForCausalLM")

    calls.clear()
    enabled = load_config(TINY, ["reference_model.trust_remote_code=true"]).reference_model
    load_tokenizer(path, enabled), load_model(path, enabled.model_copy(update={"path": path}))
    assert [kw["trust_remote_code"] for _, kw in calls] == [True, True]

    # a model saved as a pickle (pytorch_model.bin) is refused, with a message, not unpickled
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="safetensors weights only"):
        load_model(str(pickled))


def test_redact_masks_credentials_and_keeps_ordinary_keys():
    from tasks.tracking import redact

    assert (
        redact("run.tracking_uri", "https://alice:pw@mlflow.internal:5000")
        == "https://***@mlflow.internal:5000"
    )
    assert redact("run.artifact_store", "s3://KEY:SECRET@bucket/drift") == "s3://***@bucket/drift"
    for key in ("hf_token", "HF_TOKEN", "accessToken", "api_key", "client_secret", "db.password"):
        assert redact(key, "value") == "***", key
    for key in ("rollout.sampling.max_new_tokens", "eval.max_new_tokens", "tokens_per_s", "tokenizer"):
        assert redact(key, 64) == 64, key
    nested = {"run": {"tracking_uri": "http://u:p@h"}, "auth_token": "t", "n": [1, "ftp://a:b@c"]}
    assert redact("", nested) == {
        "run": {"tracking_uri": "http://***@h"},
        "auth_token": "***",
        "n": [1, "ftp://***@c"],
    }


# ============================================================================================
# 4. Load: grading pool, weights in bounded memory
# ============================================================================================


def test_a_pathological_answer_costs_bounded_time_and_no_wrong_verdicts():
    """A million-digit number is stuck in a C call no signal interrupts: the pool's outer limit
    kills and rebuilds the pool; every other answer in the batch still gets its right verdict
    (including those graded by the rebuilt, fresh workers)."""
    from drift_core.schemas import ProtocolConfig, VerifierConfig
    from tasks.grade import Grader

    grader = Grader(ProtocolConfig(), VerifierConfig(kind="math", workers=2, timeout_s=1.0))
    ordinary = [
        ("<answer>\\frac{1}{2}</answer>", "0.5", True),
        ("<answer>7</answer>", "7", True),
        ("<answer>8</answer>", "7", False),
        ("<answer>\\sqrt{4}</answer>", "2", True),
        ("no answer tag", "3", False),
    ] * 4
    items = [(c, g, 8) for c, g, _ in ordinary]
    items.insert(7, ("<answer>" + "9" * 1_000_000 + "</answer>", "5", 512))
    items.insert(3, ("<answer>9^{9^{9^{9}}}</answer>", "5", 512))  # the signal-based limit stops this
    try:
        start = time.perf_counter()
        results = grader.grade(items)
        elapsed = time.perf_counter() - start
        again = grader.grade([(c, g, 8) for c, g, _ in ordinary])  # the rebuilt pool grades right
    finally:
        grader.close()
    assert results[3].correct is False and results[8].correct is False
    rest = [r.correct for i, r in enumerate(results) if i not in (3, 8)]
    assert rest == [want for _, _, want in ordinary]
    assert [r.correct for r in again] == [want for _, _, want in ordinary]
    assert grader.timeouts == 1
    outer = 1.0 * ProtocolConfig().max_actions + 10.0
    assert elapsed < outer + 60, elapsed  # the outer limit, a pool restart and 22 answers


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
