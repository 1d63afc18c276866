"""The speed paths, on the CPU: the engine's decoding paths (static KV cache, continuous batching)
give the current path's greedy completions and fall back where they cannot keep drift's guarantees;
padding-free packing gives the padded batch's loss and gradients; Liger falls back clearly where it
cannot run; regional compilation leaves the model's parameter names alone."""

from __future__ import annotations

import logging

import pytest
import torch

from drift_core.batching import collate, collate_packed, tokenize_trajectory
from drift_core.loss import liger_available, weighted_sft_loss
from drift_core.schemas import EngineConfig, ModelConfig, TrainConfig
from tasks.engines.base import SamplingParams

pytestmark = pytest.mark.timeout(300)

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
PROMPTS = [f"What is {a} + {b}?" for a, b in [(2, 3), (7, 1), (4, 4), (9, 0), (1, 8), (6, 2)]]


def rendered(tokenizer, question: str) -> str:
    """The protocol's own first-turn prompt, as the rollout stage renders it."""
    from drift_core.protocol import generation_prefill, initial_messages
    from drift_core.schemas import ProtocolConfig

    protocol = ProtocolConfig()
    msgs = initial_messages(question, protocol)
    return tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    ) + generation_prefill(protocol)


def engine_for(model_dir, decoding: str, batch_size: int = 4):
    from tasks.engines.transformers_engine import TransformersEngine

    cfg = EngineConfig(device="cpu", batch_size=batch_size, decoding=decoding, pad_multiple=16)
    return TransformersEngine(str(model_dir), ModelConfig(path=str(model_dir)), cfg)


@pytest.fixture(scope="module")
def standard(tiny_answering_dir):
    return engine_for(tiny_answering_dir, "standard")


@pytest.fixture(scope="module")
def prompts(standard):
    return [rendered(standard.tokenizer, q) for q in PROMPTS]


GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=16, stop=["</answer>"])


def test_static_cache_gives_the_standard_greedy_completions(tiny_answering_dir, standard, prompts, caplog):
    static = engine_for(tiny_answering_dir, "static")
    with caplog.at_level(logging.WARNING, logger="tasks.engines.transformers_engine"):
        got = static.generate(prompts, GREEDY)
    assert got == standard.generate(prompts, GREEDY)
    assert any(c.finish_reason == "stop" for row in got for c in row)  # stop strings were exercised
    assert "runs eagerly" in caplog.text  # on a CPU transformers does not compile, and we say so


def test_static_cache_sampling_is_reproducible_per_shard(tiny_answering_dir, prompts):
    static = engine_for(tiny_answering_dir, "static")
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, stop=["</answer>"], seed=5)
    first = static.generate(prompts, params)
    assert first == static.generate(prompts, params)  # the same seed: the same completions

    def texts(out) -> list[list[str]]:
        return [[c.text for c in row] for row in out]

    # ...and the seed and the temperature are used: another seed draws other completions, the two
    # samples of one prompt are not all alike, and greedy decoding is not what was sampled
    reseeded = static.generate(prompts, params.model_copy(update={"seed": 6}))
    assert texts(reseeded) != texts(first)
    assert any(row[0] != row[1] for row in texts(first)), texts(first)
    greedy = static.generate(prompts, params.model_copy(update={"n": 1, "temperature": 0.0}))
    assert [row[0] for row in texts(greedy)] != [row[0] for row in texts(first)]


@pytest.mark.slow  # continuous batching's manager starts a thread and sizes a paged cache: slow on a CPU
def test_continuous_batching_gives_the_standard_greedy_completions(tiny_answering_dir, standard, prompts):
    continuous = engine_for(tiny_answering_dir, "continuous")
    assert continuous.generate(prompts, GREEDY) == standard.generate(prompts, GREEDY)


def test_continuous_batching_falls_back_to_standard_for_sampling(tiny_answering_dir, caplog):
    continuous = engine_for(tiny_answering_dir, "continuous")
    sampled = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, stop=["</answer>"], seed=1)
    with caplog.at_level(logging.WARNING, logger="tasks.engines.transformers_engine"):
        assert continuous.decoding_for(sampled) == "standard"
        assert continuous.decoding_for(sampled) == "standard"
        assert continuous.decoding_for(GREEDY) == "continuous"
    assert caplog.text.count("would not be reproducible") == 1  # said once per engine
    assert "no stop strings" in caplog.text


# ------------------------------------------------------------------------------ shared prefixes


def test_shared_prefix_length_by_hand():
    from tasks.engines.transformers_engine import MIN_SHARED_PREFIX, shared_prefix_length

    head = list(range(100, 100 + MIN_SHARED_PREFIX))
    assert shared_prefix_length([head + [1, 2], head + [1, 3, 4]]) == MIN_SHARED_PREFIX + 1
    assert shared_prefix_length([head + [1, 2], head + [1, 2]]) == MIN_SHARED_PREFIX + 1  # one token left
    assert shared_prefix_length([head + [1], head + [1]]) == MIN_SHARED_PREFIX
    assert shared_prefix_length([head[:-1] + [1, 2], head[:-1] + [3, 2]]) == 0  # too short to pay
    assert shared_prefix_length([head + [1, 2]]) == 0  # a batch of one: nothing to share
    assert shared_prefix_length([head + [1], head + [2], [7] + head]) == 0


def test_a_shared_prefix_computed_once_gives_the_same_completions(tiny_answering_dir, monkeypatch):
    """A batch whose rows share the chat template's header and the system prompt has that prefix
    prefilled once, then the padding, then each row's own tokens. Against the whole prompt per row
    (sharing turned off): the same completions, greedy and sampled, for prompts of different
    lengths (padding between prefix and rows) and for n copies of one prompt (the whole prompt
    shared but its last token)."""
    from tasks.engines import transformers_engine

    engine = engine_for(tiny_answering_dir, "standard", batch_size=12)
    questions = [*PROMPTS[:4], "What is 12 + 345?", "What is 2 + 3 + 4 + 5 + 6 + 7?"]
    prompts = [rendered(engine.tokenizer, q) for q in questions]
    sampled = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, stop=["</answer>"], seed=4)
    copies = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, stop=["</answer>"], seed=9)
    calls = [(prompts, GREEDY), (prompts, sampled), (prompts[:1], copies)]
    assert len({len(engine.tokenizer(p)["input_ids"]) for p in prompts}) > 1  # rows of several lengths

    prefixes: list[int] = []
    real_cache = transformers_engine.TransformersEngine._prefix_cache
    monkeypatch.setattr(
        transformers_engine.TransformersEngine,
        "_prefix_cache",
        lambda self, prefix, rows: prefixes.append(len(prefix)) or real_cache(self, prefix, rows),
    )
    shared = [engine.generate(p, params) for p, params in calls]
    assert len(prefixes) == len(calls) and min(prefixes) >= 40, prefixes  # every batch shared a prefix
    monkeypatch.setattr(transformers_engine, "MIN_SHARED_PREFIX", 10**9)
    whole = [engine.generate(p, params) for p, params in calls]
    assert len(prefixes) == len(calls)  # ...and the second time none did
    assert shared == whole
    assert any(c.finish_reason == "stop" for out in shared for row in out for c in row)


# ---------------------------------------------------------------------------------- stop strings


def _first_stop_step(criterion, prompt: list[int], generated: list[int]) -> int | None:
    """The step (1-based count of generated tokens) at which ``criterion`` first ends the sequence."""
    for t in range(1, len(generated) + 1):
        if bool(criterion(torch.tensor([prompt + generated[:t]]), None)[0]):
            return t
    return None


def test_stop_strings_end_a_sequence_at_the_token_that_completes_them(smol_tokenizer):
    """drift's stop-string check (tasks.engines.transformers_engine.StopOnStrings) against the
    definition, computed independently: a sequence ends at the first step whose generated text
    (decoded whole) contains a stop string. Sequences are random concatenations of pieces that split
    ``</answer>`` and a two-character CJK stop string across tokens in many ways, after a prompt
    ending in a stop string's first half (which must not count: it is not the reply)."""
    import random

    from tasks.engines.transformers_engine import StopOnStrings

    tok = smol_tokenizer
    stops = ["</answer>", "答案"]
    pieces = [
        "</",
        "answer",
        ">",
        "</answer>",
        "</ans",
        "wer>",
        "<",
        "/",
        "a",
        "7",
        " ",
        "answer>\n",
        "答",
        "案",
        "答案",
        "x",
    ]
    piece_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in pieces]
    # ...and spelled one character per token: a stop string of B bytes spanning B tokens
    piece_ids.append([i for ch in "</answer>" for i in tok(ch, add_special_tokens=False)["input_ids"]])
    assert len(piece_ids[-1]) == len("</answer>")
    prompt = tok("What is 3 + 4? </answ", add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    for stops in (["</answer>"], ["答案"], ["</answer>", "答案"]):  # 答案: 5 byte-level tokens
        criterion = StopOnStrings(tok, stops, prompt_width=len(prompt))
        fired = 0
        for _ in range(200):
            generated = [
                i for _ in range(rng.randint(1, 8)) for i in piece_ids[rng.randrange(len(piece_ids))]
            ]
            want = next(
                (
                    t
                    for t in range(1, len(generated) + 1)
                    if any(s in tok.decode(generated[:t]) for s in stops)
                ),
                None,
            )
            assert _first_stop_step(criterion, prompt, generated) == want, (
                stops,
                tok.convert_ids_to_tokens(generated),
            )
            fired += want is not None
        assert 20 < fired < 200, (stops, fired)  # both outcomes were exercised
    criterion = StopOnStrings(tok, ["</answer>"], prompt_width=len(prompt))
    # the prompt's "</answ" completed by the reply's "er>": a reply that never wrote the stop string
    assert _first_stop_step(criterion, prompt, tok("er> 7", add_special_tokens=False)["input_ids"]) is None


def test_stop_strings_give_the_completions_of_transformers_own_check(
    tiny_answering_dir, prompts, monkeypatch
):
    """Sampled and greedy, one batch of many lengths: the completions (text, token count, finish
    reason) with drift's check are those with transformers' ``StopStringCriteria``."""
    from transformers import StopStringCriteria

    from tasks.engines import transformers_engine

    engine = engine_for(tiny_answering_dir, "standard", batch_size=12)
    params = [GREEDY, SamplingParams(n=2, temperature=1.0, max_new_tokens=16, stop=["</answer>"], seed=3)]
    ours = [engine.generate(prompts, p) for p in params]
    monkeypatch.setattr(
        transformers_engine,
        "StopOnStrings",
        lambda tokenizer, stop, prompt_width: StopStringCriteria(tokenizer, stop),
    )
    theirs = [engine.generate(prompts, p) for p in params]
    assert ours == theirs
    finishes = [c.finish_reason for out in ours for row in out for c in row]
    assert "stop" in finishes and any(
        c.text.endswith("</answer>") for out in ours for row in out for c in row
    )


# ------------------------------------------------------------------------------------- training


def trajectories(tokenizer, n: int = 5):
    examples = []
    for i in range(n):
        msgs = [SYSTEM, {"role": "user", "content": f"What is {i} + {2 * i + 1}?" + " more words" * i}]
        if i % 2:
            msgs += [
                {"role": "assistant", "content": "<answer>0</answer>"},
                {"role": "user", "content": "Incorrect."},
            ]
        msgs.append({"role": "assistant", "content": f"<answer>{3 * i + 1}</answer>"})
        examples.append(tokenize_trajectory(tokenizer, msgs, "all_turns" if i == 3 else "terminal", 512))
    return examples


@pytest.mark.parametrize("normalize", ["mean", "weight_sum"])
def test_packed_batch_gives_the_padded_loss_and_gradients(tiny_model, smol_tokenizer, normalize):
    """Five sequences of different lengths (one all-turns): one packed row against the right-padded
    batch, same loss, per-sample losses and gradients to fp32 tolerance."""
    examples = trajectories(smol_tokenizer)
    assert len({len(e.input_ids) for e in examples}) == len(examples)
    weights = [0.5, 1.0, 2.0, 0.25, 1.25]
    model = tiny_model.float()

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        out = weighted_sft_loss(model, batch, normalize=normalize)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    padded, g_padded = loss_and_grads(collate(examples, weights, smol_tokenizer.pad_token_id))
    packed_batch = collate_packed(examples, weights)
    assert packed_batch["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples))
    packed, g_packed = loss_and_grads(packed_batch)
    assert packed.n_tokens == padded.n_tokens
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed.per_sample_loss, padded.per_sample_loss, rtol=1e-5, atol=1e-6)
    assert g_packed.keys() == g_padded.keys()
    for name in g_padded:
        torch.testing.assert_close(g_packed[name], g_padded[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_with_packing_matches_the_padded_run(tiny_model_dir, tmp_path):
    from tests.test_train import cfg_for, make_data, run

    data = make_data(8)
    padded = run(tiny_model_dir, data, cfg_for(max_steps=3), tmp_path / "a", tmp_path / "ca")
    packed = run(tiny_model_dir, data, cfg_for(max_steps=3, packing=True), tmp_path / "b", tmp_path / "cb")
    assert [h[0] for h in packed.loss_history] == [h[0] for h in padded.loss_history]
    for (_, lp, _), (_, lq, _) in zip(packed.loss_history, padded.loss_history, strict=True):
        assert lp == pytest.approx(lq, rel=1e-4)


def test_liger_falls_back_clearly_without_cuda_or_the_package(caplog):
    from tasks.trainer import resolve_loss_method

    reason = liger_available()
    if reason is None:
        pytest.skip("CUDA and liger-kernel are both here: the fallback does not apply")
    with caplog.at_level(logging.WARNING, logger="tasks.trainer"):
        assert resolve_loss_method(TrainConfig(loss_kernel="liger")) == "auto"
    assert "train.loss_kernel=liger" in caplog.text and reason in caplog.text
    assert resolve_loss_method(TrainConfig()) == "auto"


def test_regional_compile_keeps_parameter_names(tiny_model_dir):
    from tasks.trainer import _build_model

    cfg = TrainConfig(compile=True)
    plain = _build_model(
        str(tiny_model_dir), ModelConfig(path=str(tiny_model_dir)), cfg, compile_layers=False
    )
    compiled = _build_model(str(tiny_model_dir), ModelConfig(path=str(tiny_model_dir)), cfg)
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints and saves unchanged
    layers = compiled.get_decoder().layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
