"""drift_core.loss: the supervised-positions-only loss equals the full-logits reference (value and
every parameter's gradient) on the tiny random llama, through PEFT and DDP too; the mean-of-means
arithmetic is checked by hand on a zeroed llama (uniform logits: CE = log V per token)."""

from __future__ import annotations

import math
import socket
import time

import pytest
import torch

from drift_core.batching import TokenizedExample, collate, tokenize_trajectory
from drift_core.loss import full_logits_loss, logits_to_keep_takes_masks, unwrap_model, weighted_sft_loss

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
FEEDBACK = {"role": "user", "content": "Incorrect. Please think again."}


def _conversations() -> list[tuple[list[dict], str]]:
    q = [
        "What is 12 + 30? Answer in <answer>...</answer>.",
        "Compute 7 * 8 - 3, then explain the steps briefly. Answer in <answer>...</answer>.",
        "How many primes are below 20?",
    ]
    a = ["<answer>41</answer>", "<answer>53</answer>", "There are 8.\n<answer>8</answer>"]
    convs = [
        ([SYSTEM, {"role": "user", "content": q[0]}, {"role": "assistant", "content": a[0]}], "terminal"),
        (
            [
                SYSTEM,
                {"role": "user", "content": q[1]},
                {"role": "assistant", "content": a[0]},
                FEEDBACK,
                {"role": "assistant", "content": a[1]},
            ],
            "terminal",
        ),
        (
            [
                {"role": "user", "content": q[2]},
                {"role": "assistant", "content": "<answer>7</answer>"},
                FEEDBACK,
                {"role": "assistant", "content": a[2]},
            ],
            "all_turns",
        ),
    ]
    return convs


def _batch(tokenizer, weights=(1.7, 0.0, 0.6, 2.5)) -> dict[str, torch.Tensor]:
    examples = [tokenize_trajectory(tokenizer, m, t, max_seq_len=512) for m, t in _conversations()]
    # a sample with no supervised token (e.g. everything truncated away): contributes 0, no NaN
    examples.append(TokenizedExample(input_ids=examples[0].input_ids[:9], labels=[-100] * 9, n_supervised=0))
    return collate(examples, weights, pad_token_id=tokenizer.pad_token_id)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(fn, model, batch, **kw):
    model.zero_grad(set_to_none=True)
    out = fn(model, batch, **kw)
    out.loss.backward()
    return out, _grads(unwrap_model(model))


def _assert_same(out, ref, grads, ref_grads):
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.per_sample_loss, ref.per_sample_loss, atol=1e-5, rtol=1e-5)
    assert out.n_tokens == ref.n_tokens
    assert out.tokens_per_sample.tolist() == ref.tokens_per_sample.tolist()
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(
            g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


NORMALISATIONS = [("mean", None), ("weight_sum", None), ("weight_sum", 13.25)]


@pytest.mark.parametrize("method", ["logits_to_keep", "decoder"])
@pytest.mark.parametrize(("normalize", "global_sum"), NORMALISATIONS)
def test_matches_full_logits(tiny_model, smol_tokenizer, method, normalize, global_sum):
    batch = _batch(smol_tokenizer)
    kw = {"normalize": normalize, "global_weight_sum": global_sum}
    ref, ref_grads = _run(full_logits_loss, tiny_model, batch, **kw)
    out, grads = _run(weighted_sft_loss, tiny_model, batch, method=method, **kw)
    _assert_same(out, ref, grads, ref_grads)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    assert out.per_sample_loss[-1].item() == 0.0 and out.tokens_per_sample[-1].item() == 0
    assert out.n_tokens == sum(int((batch["labels"][i] != -100).sum()) for i in range(4))
    # the reduction itself, from the per-sample losses
    w = batch["weights"]
    weighted = (out.per_sample_loss * w).sum().item()
    expect = weighted / 4 if normalize == "mean" else weighted / (global_sum or w.sum().item())
    assert out.loss.item() == pytest.approx(expect, rel=1e-6)


def test_auto_uses_logits_to_keep_and_never_builds_full_logits(tiny_model, smol_tokenizer):
    batch = _batch(smol_tokenizer)
    shapes = []
    hook = tiny_model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        out = weighted_sft_loss(tiny_model, batch)
        weighted_sft_loss(tiny_model, batch, method="decoder")
    finally:
        hook.remove()
    v = tiny_model.config.vocab_size
    if logits_to_keep_takes_masks():
        assert shapes == [(out.n_tokens, v), (out.n_tokens, v)]  # [N, V], never [B, T, V]
    else:  # positions: [B, K, V] for the K positions supervised in any row, never all T of them
        labels = batch["labels"][:, 1:]
        k = int((labels != -100).any(dim=0).sum())
        assert k < labels.shape[1]
        assert shapes == [(labels.shape[0], k, v), (out.n_tokens, v)]


def test_batch_without_supervised_tokens(tiny_model):
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]])
    batch = {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "labels": torch.full_like(ids, -100),
        "weights": torch.tensor([1.0, 0.0]),
    }
    for method in ("logits_to_keep", "decoder"):
        for normalize in ("mean", "weight_sum"):
            tiny_model.zero_grad(set_to_none=True)
            out = weighted_sft_loss(tiny_model, batch, normalize=normalize, method=method)
            assert out.loss.item() == 0.0 and out.n_tokens == 0
            out.loss.backward()  # still in the graph: every parameter gets a (zero) gradient
            assert all(p.grad is not None and not p.grad.any() for p in tiny_model.parameters())
    # all weights zero with weight_sum: 0, not 0/0
    batch["labels"] = ids.masked_fill(batch["attention_mask"] == 0, -100)
    batch["weights"] = torch.zeros(2)
    assert weighted_sft_loss(tiny_model, batch, normalize="weight_sum").loss.item() == 0.0


@pytest.mark.parametrize("method", ["logits_to_keep", "decoder"])
def test_hand_computed_mean_of_means_on_uniform_logits(method):
    """Zeroed llama: hidden states are 0, so logits are 0 and every token's CE is exactly log(V).

    Samples: A has 2 supervised tokens (w=2), B has 1 (w=1), C has none (w=0.5).
    mean:       (2*logV + 1*logV + 0.5*0) / 3 = logV        (a token-weighted mean would give 5/3 logV,
                                                             dropping C from the mean 3/2 logV)
    weight_sum: 3*logV / 3.5, or 3*logV / 7 with a global weight sum of 7."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 11
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4], [1, 2, 3, 0], [1, 2, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, 3, 4], [-100, -100, 3, -100], [-100, -100, -100, -100]]),
        "weights": torch.tensor([2.0, 1.0, 0.5]),
    }
    log_v = math.log(vocab)
    out = weighted_sft_loss(model, batch, "mean", method=method)
    assert out.per_sample_loss.tolist() == pytest.approx([log_v, log_v, 0.0], abs=1e-6)
    assert out.tokens_per_sample.tolist() == [2, 1, 0] and out.n_tokens == 3
    assert out.loss.item() == pytest.approx(log_v, abs=1e-6)
    assert weighted_sft_loss(model, batch, "weight_sum", method=method).loss.item() == pytest.approx(
        3 * log_v / 3.5, abs=1e-6
    )
    assert weighted_sft_loss(model, batch, "weight_sum", 7.0, method=method).loss.item() == pytest.approx(
        3 * log_v / 7, abs=1e-6
    )
    assert full_logits_loss(model, batch).loss.item() == pytest.approx(log_v, abs=1e-6)


def test_peft_wrapped_model(tiny_model, smol_tokenizer):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():  # LoRA B starts at zero: give the adapters an effect and a gradient path
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    assert unwrap_model(model) is model.get_base_model()
    batch = _batch(smol_tokenizer)
    ref, ref_grads = _run(full_logits_loss, model, batch)
    assert len(ref_grads) == 2 * 3 * tiny_model.config.num_hidden_layers  # only the adapters train
    for method in ("logits_to_keep", "decoder"):
        out, grads = _run(weighted_sft_loss, model, batch, method=method)
        _assert_same(out, ref, grads, ref_grads)


# ---------------------------------------------------------------------------------------------
# DDP (two gloo processes on the CPU): the gradient is all-reduced through the wrapper's forward
# ---------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, model, batch: dict, out_path: str) -> None:
    import gc

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _ddp_step(rank, model, batch, out_path)
    finally:
        # The DDP wrapper's C++ Reducer holds the process group. Freed after destroy_process_group,
        # it is the group's last owner and destroys it holding the GIL, joining a gloo thread that
        # waits for the GIL to free its last work: a deadlock (1 run in 12 on a loaded 2-core box,
        # py-spy: ~ProcessGroupGloo -> thread::join vs ~AsyncWork -> gil_scoped_acquire). So the
        # wrapper dies first (its frame is gone; gc for cycles), and the group goes through
        # destroy_process_group, whose binding releases the GIL.
        gc.collect()
        dist.destroy_process_group()


def _ddp_step(rank: int, model, batch: dict, out_path: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    half = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
    ddp = DistributedDataParallel(model)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        weighted_sft_loss(ddp, half, method="decoder")
    out = weighted_sft_loss(ddp, half)  # auto -> logits_to_keep, forward through DDP
    out.loss.backward()
    if rank == 0:
        torch.save(_grads(ddp.module), out_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_are_all_reduced(tiny_model, smol_tokenizer, tmp_path):
    import torch.multiprocessing as mp

    out_path = str(tmp_path / "ddp_grads.pt")
    batch = _batch(smol_tokenizer)
    ctx = mp.start_processes(
        _ddp_worker, args=(2, _free_port(), tiny_model, batch, out_path), nprocs=2, join=False
    )
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two-process gloo run did not finish in 300 s")
    ddp_grads = torch.load(out_path)

    expected: dict[str, torch.Tensor] = {}
    for rank in range(2):
        half = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
        _, g = _run(full_logits_loss, tiny_model, half)
        for n, t in g.items():
            expected[n] = expected.get(n, 0) + t / 2  # DDP averages over ranks
    assert ddp_grads.keys() == expected.keys()
    for n, g in ddp_grads.items():
        torch.testing.assert_close(g, expected[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
