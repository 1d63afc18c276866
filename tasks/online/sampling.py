"""Token-level sampling for online RL: one turn for many episodes, token ids in, the kept token
ids and their log-probabilities out.

Why not a ``tasks.engines`` engine: GRPO trains on the exact token sequence the policy saw, so the
context goes in as token ids (a re-tokenised history can split differently), the sampled ids come
back with their log-probabilities, and the model is the trainer's current policy, new every
optimizer step. The turn ends as in the rollout engine: at the token completing ``</answer>`` or an
end-of-turn token the model sampled.

Not vLLM: TRL's vLLM integration cannot update vLLM's CPU build with the policy's new weights
(its CPU GEMMs keep packed copies; the exact error is in docs/operations.md, "Online RL with
vLLM"), so there is no ``online.generation`` setting; on a GPU, ``trainer.vllm_generation``
(token ids in, ids and log-probabilities out) is where a vLLM path would plug in.
"""

from __future__ import annotations

from collections.abc import Callable

from drift_core.schemas import SamplingConfig
from tasks.engines.transformers_engine import StopOnStrings, eos_ids


def kept_length(row: list[int], eos: set[int], stop: list[str], decode: Callable[[list[int]], str]) -> int:
    """How many generated tokens belong to the turn: up to the token that completes a stop string,
    or up to and including an end-of-turn token the model sampled, or all (cut off by length).
    Positions after a finished sequence hold padding (which may be the EOS id itself)."""
    n = next((k for k, tok in enumerate(row) if tok in eos), len(row))
    if stop and any(s in decode(row[:n]) for s in stop):
        k = n
        while k > 1 and any(s in decode(row[: k - 1]) for s in stop):
            k -= 1
        return k
    return n + 1 if n < len(row) else n


def _stop_criteria(tokenizer, stop: list[str], start: int):
    """Stop a row once its generated text (after ``start``) contains a stop string: the rollout
    engine's check (:class:`tasks.engines.transformers_engine.StopOnStrings`, a window counted in
    bytes, so a multi-byte stop string spread over many tokens is still seen)."""
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([StopOnStrings(tokenizer, stop, prompt_width=start)])


def _logprob_recorder(temperature: float):
    """A logits processor that records log p(sampled token) under softmax(logits / temperature)
    while holding one step's [batch, vocab] at a time (``output_logits`` would keep every step's):
    the token sampled at step k is the last column of ``input_ids`` when step k+1 is processed, and
    ``finish`` takes the last step's from the returned sequences. It sees the logits after the
    model's own default processors and before temperature/top-p, which it applies itself (the
    temperature) or leaves out (top-p), as TRL does when it scores the same tokens."""
    import torch
    from transformers import LogitsProcessor

    class RecordSampledLogprobs(LogitsProcessor):
        def __init__(self):
            self.previous = None
            self.steps: list = []

        def __call__(self, input_ids, scores):
            if self.previous is not None:
                self.steps.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
            self.previous = torch.log_softmax(scores.float() / temperature, dim=-1)
            return scores

        def finish(self, sequences):
            if self.previous is not None:
                self.steps.append(self.previous.gather(-1, sequences[:, -1:]).squeeze(-1))
                self.previous = None
            return (
                torch.stack(self.steps, dim=1) if self.steps else sequences.new_zeros((sequences.shape[0], 0))
            )

    return RecordSampledLogprobs()


def sample_turn(
    model,
    tokenizer,
    contexts: list[list[int]],
    sampling: SamplingConfig,
    stop: list[str],
    batch_size: int,
    seed: int,
) -> list[tuple[list[int], list[float]]]:
    """Sample one turn for each context (token ids); returns the kept tokens of each and their
    log-probabilities under the sampling distribution (softmax of logits / temperature), in the
    order of ``contexts``. Batches by length with left padding, like the rollout engine."""
    import torch
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    eos = eos_ids(model, tokenizer)
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]), reverse=True)
    out: list[tuple[list[int], list[float]] | None] = [None] * len(contexts)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for b, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start : start + batch_size]
            width = max(len(contexts[i]) for i in idx)
            input_ids = torch.tensor(
                [[pad] * (width - len(contexts[i])) + contexts[i] for i in idx], device=device
            )
            attention = torch.tensor(
                [[0] * (width - len(contexts[i])) + [1] * len(contexts[i]) for i in idx], device=device
            )
            torch.manual_seed(seed * 7919 + b)
            recorder = _logprob_recorder(sampling.temperature)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=pad,
                stopping_criteria=_stop_criteria(tokenizer, stop, width) if stop else None,
                logits_processor=LogitsProcessorList([recorder]),
            )
            new = generated[:, width:]
            logps = recorder.finish(generated)
            if logps.shape != new.shape:
                raise RuntimeError(
                    f"recorded {tuple(logps.shape)} log-probabilities for {tuple(new.shape)} tokens"
                )
            for row, i in enumerate(idx):
                ids = new[row].tolist()
                n = kept_length(ids, eos, stop, decode)
                out[i] = (ids[:n], logps[row, :n].tolist())
    return [o for o in out if o is not None]
