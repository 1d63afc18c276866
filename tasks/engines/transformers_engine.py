"""The default engine: transformers ``generate`` on CPU or GPU.

Throughput comes from batching: the n copies of every prompt are expanded, sorted by length and
generated in batches with left padding, so a batch wastes little compute on padding. Generation
stops per sequence at a stop string (``</answer>``) or the end-of-turn token, under inference mode,
in bf16 on a GPU. Seeds are set per batch, so a shard is reproducible for a fixed batch size.
"""

from __future__ import annotations

import threading

import torch

from drift_core.schemas import EngineConfig, ModelConfig
from tasks.engines.base import Completion, Engine, SamplingParams, cut_at_stop
from tasks.models import load_model, load_tokenizer, pick_device


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

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        expanded = [(i, p) for i, p in enumerate(prompts) for _ in range(params.n)]
        encoded = self.tokenizer([p for _, p in expanded], add_special_tokens=False)["input_ids"]
        order = sorted(range(len(expanded)), key=lambda j: len(encoded[j]), reverse=True)
        results: list[Completion | None] = [None] * len(expanded)
        with self._lock:
            for b, start in enumerate(range(0, len(order), self.cfg.batch_size)):
                idx = order[start : start + self.cfg.batch_size]
                batch = [encoded[j] for j in idx]
                for j, completion in zip(
                    idx, self._generate_batch(batch, params, seed=params.seed + b), strict=False
                ):
                    results[j] = completion
        out: list[list[Completion]] = [[] for _ in prompts]
        for (i, _), completion in zip(expanded, results, strict=False):
            out[i].append(completion)
        return out

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams, seed: int) -> list[Completion]:
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=self.device)
        attention = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=self.device
        )
        sample = params.temperature > 0
        kwargs = {"do_sample": sample, "max_new_tokens": params.max_new_tokens, "pad_token_id": pad}
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        torch.manual_seed(seed)
        generated = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new_tokens = generated[:, width:].tolist()
        eos_ids = _eos_ids(self.model, self.tokenizer)
        completions = []
        for row in new_tokens:
            n = len(row)
            for k, tok in enumerate(row):  # tokens after a finished sequence are padding
                if tok in eos_ids:
                    n = k
                    break
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            text, stopped = cut_at_stop(text, params.stop)
            hit_eos = n < len(row)
            n_tokens = n + (1 if hit_eos else 0)
            if stopped:  # count tokens only up to the stop string
                n_tokens = min(n_tokens, len(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
            finish = "stop" if (stopped or hit_eos) else "length"
            completions.append(Completion(text=text, n_tokens=n_tokens, finish_reason=finish))
        return completions


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        ids.add(tokenizer.pad_token_id)
    return ids
