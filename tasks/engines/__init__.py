"""Rollout engines behind one interface (``Engine.generate``) and a per-process engine cache."""

from __future__ import annotations

import threading

from drift_core.schemas import EngineConfig, ModelConfig
from tasks.engines.base import Completion, Engine, SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "get_engine", "release_engines"]

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


def release_engines() -> None:
    with _lock:
        for old in list(_cache):
            _cache.pop(old).close()
