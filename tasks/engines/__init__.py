"""Rollout engines behind one interface (``Engine.generate``) and a per-process engine cache."""

from __future__ import annotations

import threading

from drift_core.schemas import EngineConfig, ModelConfig
from tasks.engines.base import Completion, Engine, SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "compute_dtype", "get_engine", "release_engines"]

_cache: dict[tuple, Engine] = {}
_lock = threading.Lock()


def get_engine(model_path: str, model_cfg: ModelConfig, engine_cfg: EngineConfig) -> Engine:
    """One engine per (model, engine settings) per process: shards reuse the loaded model."""
    key = (model_path, model_cfg.model_dump_json(), engine_cfg.model_dump_json())
    with _lock:
        if key in _cache:
            return _cache[key]
        for old in list(_cache):  # keep one model resident: rollout then eval must not hold two
            _cache.pop(old).close()
        if engine_cfg.kind == "vllm":
            from tasks.engines.vllm_engine import VLLMEngine

            engine: Engine = VLLMEngine(model_path, model_cfg, engine_cfg)
        else:
            from tasks.engines.transformers_engine import TransformersEngine

            engine = TransformersEngine(model_path, model_cfg, engine_cfg)
        _cache[key] = engine
        return engine


def compute_dtype(model_path: str, model_cfg: ModelConfig, engine_cfg: EngineConfig) -> str:
    """The dtype the engine will compute in, ``model_cfg.dtype: auto`` resolved as that engine
    resolves it, without loading the model: what rollout and evaluation keys hold
    (``tasks.caching.engine_identity``), so a bfloat16 run is never served a float32 run's tokens.
    Both engines: ``auto`` is float32 on a CPU (``tasks.models.torch_dtype``,
    ``tasks.engines.vllm_engine.vllm_dtype``). On a GPU the transformers engine's is bfloat16, vLLM's
    the checkpoint's dtype, float32 downcast to bfloat16 (float16 before compute capability 8.0;
    ``tasks.engines.vllm_engine.auto_dtype``)."""
    if model_cfg.dtype != "auto":
        return model_cfg.dtype
    import torch

    if engine_cfg.kind == "vllm":
        from tasks.engines.vllm_engine import auto_dtype

        if not torch.cuda.is_available():
            # what engine_args passes for auto on a CPU (vllm_dtype). float32 is left out of the
            # engine identity, so these are the old float32 keys (engine_identity: the exception)
            return "float32"
        return auto_dtype(
            model_path, model_cfg, on_cpu=False, gpu_bf16=torch.cuda.get_device_capability() >= (8, 0)
        )
    from tasks.models import pick_device, torch_dtype

    return str(torch_dtype("auto", pick_device(engine_cfg.device))).removeprefix("torch.")


def release_engines() -> None:
    with _lock:
        for old in list(_cache):
            _cache.pop(old).close()
