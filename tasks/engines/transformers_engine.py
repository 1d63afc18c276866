"""The default engine: transformers ``generate`` on CPU or GPU.

Throughput comes from batching: the n copies of every prompt are expanded, sorted by length and
generated in batches with left padding, so a batch wastes little compute on padding. Generation
stops per sequence at a stop string (``</answer>``) or the end-of-turn token, under inference mode,
in bf16 on a GPU. Seeds are set per batch, so a shard is reproducible for a fixed batch size.

``engine.decoding`` picks how each batch is decoded (transformers' own tools, nothing vendored):

* ``standard``: ``generate`` with the dynamic KV cache (one kernel launch per op per step: on a GPU a
  small model is launch-bound, see docs/benchmarks.md);
* ``static``: ``generate(cache_implementation="static")``. With a fixed-shape cache ``generate``
  compiles the decoding step (``torch.compile``, CUDA graphs) on a GPU; prompt widths are rounded up
  to ``engine.pad_multiple`` so batches repeat a few shapes instead of recompiling. Stop strings and
  per-batch seeds work as in ``standard``. On a CPU transformers does not compile: the static cache
  runs eagerly (same completions, no speed-up), and the engine says so;
* ``continuous``: ``generate_batch``, continuous batching with paged attention: finished sequences
  leave the batch at every step and waiting ones join. For greedy decoding only: sampled tokens would
  depend on which sequences share a step, so a shard would not be reproducible, and sampling falls
  back to ``standard`` (said once per engine). It has no stop strings: sequences run to end of turn
  or ``max_new_tokens`` and are cut at the stop string afterwards (the same completions, more
  tokens generated).
"""

from __future__ import annotations

import logging
import threading

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from drift_core.schemas import EngineConfig, ModelConfig
from tasks.engines.base import (
    Completion,
    Engine,
    SamplingParams,
    completion_from_tokens,
    eos_token_ids,
    generation_stopped,
    raise_if_stopped,
)
from tasks.models import load_model, load_tokenizer, pick_device

log = logging.getLogger(__name__)


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, model_path: str, model_cfg: ModelConfig, cfg: EngineConfig):
        self.device = pick_device(cfg.device)
        self.cfg = cfg
        self.tokenizer = load_tokenizer(model_path, model_cfg)
        self.tokenizer.padding_side = "left"
        self.model = load_model(model_path, model_cfg, device=self.device)
        self.model.eval()
        self.model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self._lock = threading.Lock()  # one generate at a time per loaded model
        self._said: set[str] = set()

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def decoding_for(self, params: SamplingParams) -> str:
        """The decoding path these sampling settings get: ``engine.decoding`` unless it cannot keep
        drift's guarantees for them, in which case ``standard`` (and the reason, logged once)."""
        wanted = self.cfg.decoding
        if wanted == "continuous":
            if params.temperature > 0:
                self._say(
                    "engine.decoding=continuous: sampled tokens would depend on which sequences share a "
                    "step, so a shard would not be reproducible; sampling uses standard decoding"
                )
                return "standard"
            if not hasattr(self.model, "generate_batch"):
                self._say(
                    "engine.decoding=continuous: this transformers has no generate_batch; using standard"
                )
                return "standard"
            if params.stop:
                self._say(
                    "engine.decoding=continuous: generate_batch has no stop strings; sequences run to the "
                    "end of turn or max_new_tokens and are cut at the stop string afterwards"
                )
        if wanted == "static" and str(self.device) == "cpu":
            self._say(
                "engine.decoding=static on the CPU: transformers compiles only on a GPU; the static cache runs eagerly"
            )
        return wanted

    @torch.inference_mode()
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        expanded = [(i, p) for i, p in enumerate(prompts) for _ in range(params.n)]
        encoded = self.tokenizer([p for _, p in expanded], add_special_tokens=False)["input_ids"]
        decoding = self.decoding_for(params)
        results: list[Completion | None] = [None] * len(expanded)
        with self._lock:
            if decoding == "continuous":  # no per-step hook: checked before and after
                raise_if_stopped()
                # generate_batch decodes in a thread of its own, outside this inference mode; tensors
                # made in here would be inference tensors it may not update (transformers 5.19)
                with torch.inference_mode(False), torch.no_grad():
                    results = list(self._generate_continuous(encoded, params))
                raise_if_stopped()
            else:
                order = sorted(range(len(expanded)), key=lambda j: len(encoded[j]), reverse=True)
                for b, start in enumerate(range(0, len(order), self.cfg.batch_size)):
                    raise_if_stopped()
                    idx = order[start : start + self.cfg.batch_size]
                    batch = [encoded[j] for j in idx]
                    completions = self._generate_batch(
                        batch, params, seed=params.seed + b, static=decoding == "static"
                    )
                    for j, completion in zip(idx, completions, strict=True):
                        results[j] = completion
        out: list[list[Completion]] = [[] for _ in prompts]
        for (i, _), completion in zip(expanded, results, strict=True):
            out[i].append(completion)
        return out

    def _generate_batch(
        self, batch: list[list[int]], params: SamplingParams, seed: int, static: bool = False
    ) -> list[Completion]:
        pad = self.tokenizer.pad_token_id
        shared = 0 if static else shared_prefix_length(batch)
        rests = [ids[shared:] for ids in batch]
        width = max(len(ids) for ids in rests)
        if static:  # a few repeated shapes, so the compiled step is reused across batches
            width = -(-width // self.cfg.pad_multiple) * self.cfg.pad_multiple
        # [shared prefix][left padding][the row's own tokens]: the padding sits after the prefix, so
        # the prefix's keys and values, computed once, serve every row at the same positions
        # (transformers derives positions from the attention mask, which skips the padding)
        head = batch[0][:shared]
        input_ids = torch.tensor(
            [head + [pad] * (width - len(ids)) + ids for ids in rests], device=self.device
        )
        attention = torch.tensor(
            [[1] * shared + [0] * (width - len(ids)) + [1] * len(ids) for ids in rests], device=self.device
        )
        width += shared
        sample = params.temperature > 0
        kwargs = {"do_sample": sample, "max_new_tokens": params.max_new_tokens, "pad_token_id": pad}
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        criteria = [StopWhenProcessStops()]
        if params.stop:
            criteria.append(StopOnStrings(self.tokenizer, params.stop, prompt_width=width))
        if static:
            kwargs["cache_implementation"] = "static"
        if shared:
            kwargs["past_key_values"] = self._prefix_cache(head, len(batch))
        torch.manual_seed(seed)
        generated = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            stopping_criteria=StoppingCriteriaList(criteria),
            **kwargs,
        )
        raise_if_stopped()  # the batch ended early because the process is stopping: not a result
        return [self._completion(row, params) for row in generated[:, width:].tolist()]

    def _prefix_cache(self, prefix: list[int], rows: int):
        """The KV cache of ``prefix`` computed once, repeated for ``rows`` rows."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self.model(
            input_ids=torch.tensor([prefix], device=self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.batch_repeat_interleave(rows)
        return cache

    def _generate_continuous(self, encoded: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Greedy decoding of every sequence through ``generate_batch`` (continuous batching)."""
        from transformers import GenerationConfig
        from transformers.generation import ContinuousBatchingConfig

        gen = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(eos_ids(self.model, self.tokenizer)),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        # The paged cache holds what can be in flight at once: batch_size requests of the longest
        # length here. Left to itself it takes a share of the device's free memory, which on a CPU
        # is the machine's RAM (11.7 GB for a 2-layer test model on a 24 GB box).
        in_flight = min(self.cfg.batch_size, len(encoded))
        longest = max(len(ids) for ids in encoded) + params.max_new_tokens
        page = ContinuousBatchingConfig().page_size
        blocks_per_request = -(-longest // page)
        cb = ContinuousBatchingConfig(
            max_requests_per_batch=self.cfg.batch_size,
            num_blocks=in_flight * blocks_per_request + 1,
            max_blocks_per_request=blocks_per_request,
        )
        outputs = list(
            self.model.generate_batch(
                inputs=encoded, generation_config=gen, continuous_batching_config=cb, progress_bar=False
            ).values()
        )
        failed = [o for o in outputs if o.error]
        if len(outputs) != len(encoded) or failed:
            raise RuntimeError(
                f"generate_batch returned {len(outputs)} of {len(encoded)} sequences"
                + (f"; first error: {failed[0].error}" if failed else "")
            )
        return [self._completion(list(o.generated_tokens), params) for o in outputs]

    def _completion(self, row: list[int], params: SamplingParams) -> Completion:
        """Text up to end of turn or the first stop string, and how many tokens that took."""
        return completion_from_tokens(
            row,
            params,
            eos_ids(self.model, self.tokenizer),
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            count=lambda text: len(self.tokenizer(text, add_special_tokens=False)["input_ids"]),
        )

    def _say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.warning(message)


#: Shortest prefix worth computing once for a batch (below it, the extra forward pass costs more).
MIN_SHARED_PREFIX = 16


def shared_prefix_length(batch: list[list[int]]) -> int:
    """How many leading tokens every row of ``batch`` shares (the chat template's header and the
    system prompt, for a batch of one rollout's prompts), or 0 when that is not worth a pass of its
    own: fewer than ``MIN_SHARED_PREFIX`` tokens, or a batch of one. One token of every row is left
    out, as ``generate`` starts from a token it has not seen."""
    if len(batch) < 2:
        return 0
    first, shortest = batch[0], min(len(ids) for ids in batch)
    n = 0
    while n < shortest - 1 and all(ids[n] == first[n] for ids in batch):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


class StopWhenProcessStops(StoppingCriteria):
    """Ends every sequence of the batch once ``stop_generation`` was called; it only reads a flag,
    so the tokens generated otherwise are the same."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), generation_stopped(), dtype=torch.bool, device=input_ids.device
        )


class StopOnStrings(StoppingCriteria):
    """Ends a sequence once its generated text contains a stop string (``</answer>``).

    transformers' own ``stop_strings`` does this from tables over the whole vocabulary, and every
    ``generate`` call builds its criterion anew, walking the vocabulary again: about 0.26 s per
    batch for SmolLM2's 49k tokens on one core (benchmarks/bench_transformers_engine.py), paid by
    every batch of every turn. Here each step decodes only the last B generated tokens of each
    sequence, B the longest stop string's length in bytes: checked every step, a stop string ends
    in the newest token, and as every token decodes to at least one byte it
    begins within the last B (a character cut at the window's start decodes to a replacement
    character, which neither makes nor breaks a match). Only generated tokens are read, so a stop
    string that would begin in the prompt cannot end a reply before it starts.
    The text the engine returns is cut at the first stop string either way (``completion_from_
    tokens``); this decides only when a sequence stops costing steps."""

    def __init__(self, tokenizer, stop: list[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.start = prompt_width
        self.window = max(len(s.encode()) for s in self.stop)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        tails = input_ids[:, max(self.start, input_ids.shape[1] - self.window) :].tolist()
        texts = self.tokenizer.batch_decode(tails, clean_up_tokenization_spaces=False)
        return torch.tensor(
            [any(s in text for s in self.stop) for text in texts], dtype=torch.bool, device=input_ids.device
        )


def eos_ids(model, tokenizer) -> set[int]:
    """The end-of-turn tokens of a loaded transformers model (``base.eos_token_id`` rules)."""
    return eos_token_ids(model.generation_config.eos_token_id, tokenizer)
