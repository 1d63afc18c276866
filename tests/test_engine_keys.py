"""What of the engine goes into rollout and evaluation keys (``tasks.caching.engine_identity``):
vLLM's scheduler and the dtype the engine computes in, ``auto`` resolved (``compute_dtype``).

In bfloat16 (vLLM's own ``auto`` for the demo's SmolLM2; drift's ``auto`` is float32 on a CPU for
both engines) the two schedulers give other tokens (docs/reliability.md, "Reproducible: what each
engine promises"), so neither a scheduler nor a dtype may be served the other's rollouts. Keys made
before these parts existed stay valid where the tokens are the same (float32, the trajectory
scheduler), as the config sections keep theirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drift_core.schemas import EngineConfig, ModelConfig, ProtocolConfig, VerifierConfig
from tasks.caching import engine_identity, generation_key, stage_key
from tasks.engines import compute_dtype

VLLM = EngineConfig(kind="vllm")


def _key(engine: EngineConfig, dtype: str, stage: str = "rollout") -> str:
    return generation_key(
        stage,
        model="sha256:m",
        problems="p",
        protocol=ProtocolConfig(),
        verifier=VerifierConfig(),
        engine=engine,
        dtype=dtype,
        rollout={"k": 8},
    )


@pytest.mark.parametrize("stage", ["rollout", "evaluate"])
def test_scheduler_and_dtype_are_in_the_generation_keys(stage):
    turn = VLLM.model_copy(update={"scheduling": "turn"})
    keys = {
        (sched, dtype): _key(VLLM.model_copy(update={"scheduling": sched}), dtype, stage)
        for sched in ("trajectory", "turn")
        for dtype in ("float32", "bfloat16", "float16")
    }
    assert len(set(keys.values())) == 6  # every scheduler x dtype its own rollouts
    assert engine_identity(turn, "bfloat16") == "vllm/turn@bfloat16"
    # the transformers engine has one scheduler (turn by turn): the setting changes nothing there
    hf, hf_turn = EngineConfig(), EngineConfig(scheduling="turn")
    assert _key(hf, "float32", stage) == _key(hf_turn, "float32", stage)
    assert _key(hf, "float32", stage) != _key(hf, "bfloat16", stage)


def test_keys_made_before_the_scheduler_and_dtype_were_keyed_still_match():
    """At float32 and the trajectory scheduler the identity is what it was (the kind, the decoding
    path), so cached float32 rollouts and evaluations keep their keys."""
    before = lambda identity: stage_key(  # noqa: E731  (generation_key's document before the change)
        "rollout",
        model="sha256:m",
        problems="p",
        protocol=ProtocolConfig(),
        verifier={k: v for k, v in VerifierConfig().model_dump(mode="json").items() if k != "workers"},
        engine=identity,
        rollout={"k": 8},
    )
    assert _key(EngineConfig(), "float32") == before("transformers")
    assert _key(VLLM, "float32") == before("vllm")
    assert _key(EngineConfig(decoding="static"), "float32") == before("transformers/static")
    assert _key(VLLM, "bfloat16") != before("vllm")  # bfloat16 (explicit, or auto on a GPU): new keys


def _checkpoint(tmp_path: Path, declared: str | None) -> str:
    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}
    if declared is not None:
        config["torch_dtype"] = declared
    tmp_path.joinpath("config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("declared", ["float32", None, "bfloat16", "float16"])
def test_compute_dtype_resolves_auto_to_float32_on_a_cpu_for_both_engines(tmp_path, monkeypatch, declared):
    """On a CPU ``auto`` is float32 for both engines, whatever the checkpoint declares (vLLM's own
    ``auto`` would serve SmolLM2's float32 checkpoint in bfloat16: slow on AVX2, and the schedulers
    part); so the default CPU path keeps the keys float32 runs always had. An explicit dtype is
    what both run, and an explicit bfloat16 on vLLM is keyed apart."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = _checkpoint(tmp_path, declared)
    auto = ModelConfig(path=path)
    assert compute_dtype(path, auto, VLLM) == "float32"
    assert compute_dtype(path, auto, EngineConfig(device="auto")) == "float32"
    assert _key(VLLM, compute_dtype(path, auto, VLLM)) == _key(VLLM, "float32")
    for dtype in ("float32", "bfloat16"):
        explicit = ModelConfig(path=path, dtype=dtype)
        assert compute_dtype(path, explicit, VLLM) == compute_dtype(path, explicit, EngineConfig()) == dtype
    bf16 = compute_dtype(path, ModelConfig(path=path, dtype="bfloat16"), VLLM)
    assert _key(VLLM, bf16) != _key(VLLM, compute_dtype(path, auto, VLLM))
    assert engine_identity(VLLM, bf16) == "vllm@bfloat16"


def test_engine_args_pass_float32_for_auto_on_a_cpu_and_leave_auto_to_vllm_on_a_gpu(tmp_path):
    """What ``VLLMEngine`` passes to ``vllm.LLM`` (no engine started): ``auto`` is float32 on a
    CPU, what ``compute_dtype`` keys; on a GPU vLLM resolves it; an explicit dtype passes as it is."""
    from tasks.engines.vllm_engine import engine_args

    path = _checkpoint(tmp_path, "float32")
    engine = VLLM.model_copy(update={"max_model_len": 2048})
    dtype = lambda model, on_cpu: engine_args(path, model, engine, on_cpu=on_cpu)["dtype"]  # noqa: E731
    assert dtype(ModelConfig(path=path), on_cpu=True) == "float32"
    assert dtype(ModelConfig(path=path), on_cpu=False) == "auto"
    for explicit in ("float32", "bfloat16", "float16"):
        for on_cpu in (True, False):
            assert dtype(ModelConfig(path=path, dtype=explicit), on_cpu=on_cpu) == explicit


def test_compute_dtype_on_a_gpu(tmp_path, monkeypatch):
    """On a GPU the transformers engine's ``auto`` is bfloat16; vLLM's is bfloat16 from compute
    capability 8.0, float16 before."""
    import torch

    path = _checkpoint(tmp_path, "float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert compute_dtype(path, ModelConfig(path=path), EngineConfig()) == "bfloat16"
    assert compute_dtype(path, ModelConfig(path=path), VLLM) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert compute_dtype(path, ModelConfig(path=path), VLLM) == "float16"
    assert compute_dtype(path, ModelConfig(path=path), EngineConfig(device="cpu")) == "float32"


def test_vllm_cpu_threads_bind_every_core_of_a_small_machine():
    """vLLM keeps one core for its scheduler; on 2 cores that leaves the model one. drift binds all
    the process's cores there, at most OMP_NUM_THREADS, and leaves a user's binding, tensor
    parallelism and larger machines to vLLM."""
    from tasks.engines.vllm_engine import cpu_thread_binding

    cfg = EngineConfig(kind="vllm")
    assert cpu_thread_binding(cfg, {}, [0, 1]) == "0,1"
    assert cpu_thread_binding(cfg, {}, [2, 3, 5]) == "2,3,5"  # the affinity mask, not 0..n-1
    assert cpu_thread_binding(cfg, {"OMP_NUM_THREADS": "1"}, [0, 1]) == "0"
    assert cpu_thread_binding(cfg, {"OMP_NUM_THREADS": "8"}, [0, 1]) == "0,1"
    assert cpu_thread_binding(cfg, {"VLLM_CPU_OMP_THREADS_BIND": "auto"}, [0, 1]) is None
    assert cpu_thread_binding(cfg, {}, list(range(16))) is None
    assert cpu_thread_binding(EngineConfig(kind="vllm", tensor_parallel_size=2), {}, [0, 1]) is None
