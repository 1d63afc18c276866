"""Loading models (tasks/models.py, the transformers engine): remote code off unless configured,
safetensors weights only (docs/reliability.md, section 3)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
pytestmark = pytest.mark.timeout(900)


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


# A process that asks for the directory: it says it is ready, waits for the go file (so that every
# process asks at the same moment), then builds with a builder that records each build and takes
# long enough for the processes to overlap. A fresh interpreter, not a fork of the test worker
# (whose threads and at-fork hooks from other test files can break a forked child).
_ASK_FOR_THE_DIRECTORY = """
import sys, time
from pathlib import Path
from tasks.model_files import atomic_dir

target, log, ready, go = (Path(a) for a in sys.argv[1:5])
def build(tmp):
    with open(log, "a") as handle:
        handle.write("built\\n")
    time.sleep(0.5)
    (tmp / "config.json").write_text("{}")

ready.write_text("")
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
atomic_dir(target, build)
"""


def test_a_model_directory_is_built_once_when_processes_ask_together(tmp_path):
    """Processes that need the same model directory on a fresh machine (two test workers, a run
    and an eval): one builds it, the others wait and use it; no temporary directory is left."""
    import os
    import subprocess
    import sys
    import time

    target, log, go = tmp_path / "models" / "m", tmp_path / "builds.log", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    readies = [tmp_path / f"ready{i}" for i in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ASK_FOR_THE_DIRECTORY, str(target), str(log), str(ready), str(go)],
            env=env,
        )
        for ready in readies
    ]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in readies) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.write_text("")
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0, 0]
    assert log.read_text() == "built\n"
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]
