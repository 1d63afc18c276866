"""The vLLM engine (optional extra ``drift[vllm]``, GPU).

Written against vLLM's offline ``LLM`` API (``LLM.generate(prompts, sampling_params)`` with one
``SamplingParams`` per prompt). Prefix caching is on by default: every later turn re-sends the whole
conversation so far, and the shared history is served from the KV cache instead of recomputed.
Tensor parallelism comes from ``engine.tensor_parallel_size``.

NOT exercised in drift's test suite or CI: vLLM needs a CUDA GPU and its wheel could not be carried
to the GPU machine available during development. The transformers engine is the tested path.
"""

from __future__ import annotations

from drift_core.schemas import EngineConfig, ModelConfig
from tasks.engines.base import Completion, Engine, SamplingParams, cut_at_stop, raise_if_stopped


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, model_path: str, model_cfg: ModelConfig, cfg: EngineConfig):
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the optional extra
            raise RuntimeError(
                "engine.kind=vllm needs the vLLM extra on a CUDA machine: pip install 'drift[vllm]'"
            ) from exc
        dtype = "auto" if model_cfg.dtype == "auto" else model_cfg.dtype
        self.llm = LLM(
            model=model_path,
            revision=model_cfg.revision,
            dtype=dtype,
            trust_remote_code=model_cfg.trust_remote_code,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enable_prefix_caching=cfg.enable_prefix_caching,
        )

    def generate(
        self, prompts: list[str], params: SamplingParams
    ) -> list[list[Completion]]:  # pragma: no cover
        from vllm import SamplingParams as VllmSamplingParams

        per_prompt = [
            VllmSamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p if params.temperature > 0 else 1.0,
                max_tokens=params.max_new_tokens,
                stop=params.stop or None,
                include_stop_str_in_output=True,
                seed=params.seed + i,  # distinct stream per request, reproducible per shard
            )
            for i in range(len(prompts))
        ]
        raise_if_stopped()  # vLLM has no per-step hook here: checked before and after
        outputs = self.llm.generate(prompts, per_prompt, use_tqdm=False)
        raise_if_stopped()
        result = []
        for request in outputs:
            completions = []
            for out in request.outputs:
                text, stopped = cut_at_stop(out.text, params.stop)
                finish = "stop" if (stopped or out.finish_reason == "stop") else "length"
                completions.append(Completion(text=text, n_tokens=len(out.token_ids), finish_reason=finish))
            result.append(completions)
        return result

    def close(self) -> None:  # pragma: no cover
        self.llm = None
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:
            pass
