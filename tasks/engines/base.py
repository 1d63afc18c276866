"""The rollout engine interface: rendered prompts in, n completions per prompt out.

Engines see plain prompt strings (the chat template is applied by the caller, with the answer
tag pre-filled), so every engine produces exactly the same conversation format, and a new engine
(SGLang, a remote server) only has to implement ``generate``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field


class SamplingParams(BaseModel):
    """Sampling settings for one ``generate`` call (temperature 0 means greedy)."""

    n: int = Field(default=1, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=64, ge=1)
    stop: list[str] = Field(default_factory=list)
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    text: str  # generated text, cut after the first stop string (which is kept)
    n_tokens: int  # generated tokens up to and including the stop
    finish_reason: Literal["stop", "length"]


class Engine(ABC):
    """Generates completions; one instance holds one model."""

    name: str = "engine"

    @abstractmethod
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        """Return ``params.n`` completions for each prompt, in prompt order."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model (GPU memory) when the engine is no longer needed."""


# ------------------------------------------------------------------------------------------
# Stopping generation when the process is asked to end
# ------------------------------------------------------------------------------------------
# Shards generate in worker threads, and a flow run that is interrupted (Ctrl-C, SIGTERM from a
# worker, a pod or ``kill``) waits for its running threads before the process can exit: without a
# way in, that was the rest of every running shard (minutes on a GPU). The flow sets this event on
# its way out (``flows.stages.StageRunner.map``) and engines check it at every decoding step.

_stop = threading.Event()


class GenerationStopped(RuntimeError):
    """Raised by ``generate`` when the process asked generation to stop: the shard is abandoned
    (nothing written), not finished."""


def stop_generation() -> None:
    """Make every ``generate`` in this process stop at its next decoding step and raise."""
    _stop.set()


def allow_generation() -> None:
    """Clear a stop request (a new flow run in a process whose previous one was interrupted)."""
    _stop.clear()


def generation_stopped() -> bool:
    return _stop.is_set()


def raise_if_stopped() -> None:
    if _stop.is_set():
        raise GenerationStopped("generation stopped: the flow run was interrupted")


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut ``text`` right after the earliest stop string; report whether one was found."""
    best = -1
    best_len = 0
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best < 0 or i < best):
            best, best_len = i, len(s)
    if best < 0:
        return text, False
    return text[: best + best_len], True
