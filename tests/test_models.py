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
