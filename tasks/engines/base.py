"""The rollout engine interface: rendered prompts in, n completions per prompt out.

Engines see plain prompt strings (the chat template is applied by the caller, with the answer
tag pre-filled), so every engine produces exactly the same conversation format, and a new engine
(SGLang, a remote server) only has to implement ``generate``.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
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


@dataclass(frozen=True)
class Request:
    """One prompt to complete ``params.n`` times, as part of a stream of requests (``Engine.serve``).

    ``stream`` names the request's random stream: an engine with per-request seeds (vLLM) samples it
    with ``request_seed(params.seed, stream)``, so its completions do not depend on which other
    requests share a step, and both schedulers give the same tokens. An engine with per-batch seeds
    (transformers) samples every request of a wave with ``params.seed``, as ``generate`` does."""

    key: Hashable  # the caller's handle (an episode, a problem)
    prompt: str
    params: SamplingParams
    stream: int = 0


Finished = list[tuple[Request, list[Completion]]]
OnDone = Callable[[Finished], list[Request]]


def request_seed(seed: int, stream: int) -> int:
    """A 48-bit seed for one request's stream. Hashed, not added: vLLM seeds the ``n`` samples of a
    request with ``seed + i``, so neighbouring sums would share streams between requests."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


class Engine(ABC):
    """Generates completions; one instance holds one model."""

    name: str = "engine"
    per_trajectory: bool = False  # whether ``serve`` can start a request while others are running

    @abstractmethod
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        """Return ``params.n`` completions for each prompt, in prompt order."""

    def serve(self, requests: list[Request], on_done: OnDone, per_trajectory: bool = False) -> None:
        """Complete ``requests`` and every request ``on_done`` returns, until none is left.

        The default runs in waves (turn-synchronous): all pending requests are generated (one
        ``generate`` call per distinct sampling settings, in order), handed to ``on_done`` together,
        and what it returns is the next wave. Engines that can schedule per request override this
        and, with ``per_trajectory``, hand each request back as soon as it finishes."""
        pending = list(requests)
        while pending:
            finished: Finished = []
            for params, group in _by_params(pending):
                outputs = self.generate([r.prompt for r in group], params)
                finished.extend(zip(group, outputs, strict=True))
            raise_if_stopped()
            pending = on_done(finished)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model (GPU memory) when the engine is no longer needed."""


def _by_params(requests: list[Request]) -> list[tuple[SamplingParams, list[Request]]]:
    """Requests grouped by identical sampling settings, groups and members in first-seen order."""
    groups: dict[str, tuple[SamplingParams, list[Request]]] = {}
    for r in requests:
        groups.setdefault(r.params.model_dump_json(), (r.params, []))[1].append(r)
    return list(groups.values())


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


def completion_from_tokens(
    token_ids: list[int],
    params: SamplingParams,
    eos_ids: set[int],
    decode: Callable[[list[int]], str],
    count: Callable[[str], int],
) -> Completion:
    """One completion from the generated token ids, the same way for every engine: the text up to
    the end-of-turn token (dropped) or the first stop string (kept), and the tokens that took (the
    end-of-turn token counted, tokens past the stop string not)."""
    n = len(token_ids)
    for k, tok in enumerate(token_ids):  # tokens after a finished sequence are padding
        if tok in eos_ids:
            n = k
            break
    text, stopped = cut_at_stop(decode(token_ids[:n]), params.stop)
    hit_eos = n < len(token_ids)
    n_tokens = n + (1 if hit_eos else 0)
    if stopped:  # count tokens only up to the stop string
        n_tokens = min(n_tokens, count(text))
    return Completion(
        text=text, n_tokens=n_tokens, finish_reason="stop" if (stopped or hit_eos) else "length"
    )


def eos_token_ids(generation_eos, tokenizer) -> set[int]:
    """Tokens that end a turn: the generation config's eos ids, the tokenizer's eos and its pad
    (padding after a finished sequence)."""
    ids = set(
        generation_eos
        if isinstance(generation_eos, list)
        else []
        if generation_eos is None
        else [generation_eos]
    )
    for tok in (tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tok is not None:
            ids.add(tok)
    return ids
