"""Masks, truncation, length grouping and collation (drift_core.batching) with the real SmolLM2
tokenizer (ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n``, default system prompt inserted when the
conversation has none)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_core.batching import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    length_grouped_batches,
    tokenize_trajectory,
    training_pairs,
)

END = "<|im_end|>"

TRAJ = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Solve: 12 + 30. Put the result in <answer>...</answer>."},
    {"role": "assistant", "content": "<answer>41</answer>"},
    {"role": "user", "content": "Incorrect. Please think again."},
    {"role": "assistant", "content": " 12+30 is\n\n<answer>42</answer>  "},  # leading/trailing spaces
]
NO_SYSTEM = TRAJ[1:]  # the template inserts its default system prompt
UNICODE = [
    {"role": "user", "content": "Wie viel ist ½ + ¼? Antworte mit <answer>…</answer>"},
    {"role": "assistant", "content": "\n<answer>¾</answer>"},  # a newline right after the prompt
]
CONVERSATIONS = [TRAJ, NO_SYSTEM, UNICODE]


def _runs(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of supervised label ids."""
    runs: list[list[int]] = []
    prev = False
    for x in labels:
        if x != IGNORE_INDEX:
            if not prev:
                runs.append([])
            runs[-1].append(x)
        prev = x != IGNORE_INDEX
    return runs


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _full_ids(tok, messages) -> list[int]:
    return tok(tok.apply_chat_template(messages, tokenize=False))["input_ids"]


def test_training_pairs():
    (pair,) = training_pairs(TRAJ, "terminal")
    assert pair == (TRAJ[:4], TRAJ[4])
    pairs = training_pairs(TRAJ, "all_turns")
    assert pairs == [(TRAJ[:2], TRAJ[2]), (TRAJ[:4], TRAJ[4])]
    with pytest.raises(ValueError, match="end with an assistant"):
        training_pairs(TRAJ[:4], "terminal")
    with pytest.raises(ValueError, match="target"):
        training_pairs(TRAJ, "last")  # type: ignore[arg-type]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["system", "default-system", "unicode"])
def test_terminal_mask_is_exactly_the_last_response(smol_tokenizer, messages):
    ex = tokenize_trajectory(smol_tokenizer, messages, "terminal", max_seq_len=4096)
    # the input is exactly the tokenised rendering of the whole conversation
    assert ex.input_ids == _full_ids(smol_tokenizer, messages)
    assert ex.input_ids == smol_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert len(ex.labels) == len(ex.input_ids) and ex.n_truncated == 0
    (run,) = _runs(ex.labels)
    assert _decode(smol_tokenizer, run) == messages[-1]["content"] + END
    assert ex.n_supervised == len(run)
    # the supervised run sits right before the trailing "\n" and agrees with input_ids
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(ex.labels, ex.input_ids, strict=True))
    assert ex.labels[-2] == smol_tokenizer.convert_tokens_to_ids(END) and ex.labels[-1] == IGNORE_INDEX


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["system", "default-system", "unicode"])
def test_all_turns_supervises_every_response(smol_tokenizer, messages):
    ex = tokenize_trajectory(smol_tokenizer, messages, "all_turns", max_seq_len=4096)
    assert ex.input_ids == _full_ids(smol_tokenizer, messages)
    responses = [m["content"] + END for m in messages if m["role"] == "assistant"]
    assert [_decode(smol_tokenizer, r) for r in _runs(ex.labels)] == responses
    terminal = tokenize_trajectory(smol_tokenizer, messages, "terminal", max_seq_len=4096)
    # the terminal mask is the all-turns mask restricted to the last response
    assert terminal.input_ids == ex.input_ids
    assert ex.n_supervised > terminal.n_supervised or len(responses) == 1
    assert [b for a, b in zip(ex.labels, terminal.labels, strict=True) if a != b] == [IGNORE_INDEX] * (
        ex.n_supervised - terminal.n_supervised
    )


def test_token_merged_across_the_prompt_boundary_is_not_supervised(smol_tokenizer):
    """ "assistant\n" + "   x" tokenises as "\n  " + " x": the first token holds the prompt's newline."""
    messages = [*TRAJ[:4], {"role": "assistant", "content": "   <answer>42</answer>"}]
    ex = tokenize_trajectory(smol_tokenizer, messages, "terminal")
    assert ex.input_ids == _full_ids(smol_tokenizer, messages)
    (run,) = _runs(ex.labels)
    assert _decode(smol_tokenizer, run) == " <answer>42</answer>" + END  # "\n  " stays unsupervised


def test_pydantic_messages_accepted(smol_tokenizer):
    from drift_core.schemas import Message

    a = tokenize_trajectory(smol_tokenizer, [Message(**m) for m in TRAJ], "terminal")
    assert a == tokenize_trajectory(smol_tokenizer, TRAJ, "terminal")


def test_other_template_without_trailing_newline(smol_tokenizer):
    """A Llama-3-like layout: blank line after the header, stripped content, no newline after the end
    marker. The span is still content + end marker."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (
        "{{ '<|im_start|>' }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n\n' + m['content'] | trim "
        "+ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}"
    )
    ex = tokenize_trajectory(tok, TRAJ, "all_turns")
    assert ex.input_ids == _full_ids(tok, TRAJ)
    want = [m["content"].strip() + END for m in TRAJ if m["role"] == "assistant"]
    assert [_decode(tok, r) for r in _runs(ex.labels)] == want
    assert ex.labels[-1] != IGNORE_INDEX  # nothing after the end marker


def test_template_that_rewrites_history_is_an_error_for_all_turns(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' and not loop.last %}[...]{% else %}{{ m['content'] }}{% endif %}"
        "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="not a prefix"):
        tokenize_trajectory(tok, TRAJ, "all_turns")
    ex = tokenize_trajectory(tok, TRAJ, "terminal")  # the last turn is rendered as is
    assert [_decode(tok, r) for r in _runs(ex.labels)] == [TRAJ[-1]["content"] + END]


def test_left_truncation_keeps_the_response(smol_tokenizer):
    full = tokenize_trajectory(smol_tokenizer, TRAJ, "terminal")
    (resp,) = _runs(full.labels)
    n = len(full.input_ids)
    # only the trailing "\n" has to go: nothing of the history is lost
    ex = tokenize_trajectory(smol_tokenizer, TRAJ, "terminal", max_seq_len=n - 1)
    assert ex.input_ids == full.input_ids[:-1] and ex.n_truncated == 1
    for max_len in (n - 5, len(resp) + 1):
        ex = tokenize_trajectory(smol_tokenizer, TRAJ, "terminal", max_seq_len=max_len)
        assert len(ex.input_ids) == max_len
        assert ex.input_ids == full.input_ids[:-1][-max_len:]  # a left cut of the history
        assert _runs(ex.labels) == [resp] and ex.n_supervised == len(resp)
        assert ex.labels[0] == IGNORE_INDEX and ex.n_truncated == n - max_len
    with pytest.raises(ValueError, match=rf"response is {len(resp)} tokens.*max_seq_len={len(resp)}"):
        tokenize_trajectory(smol_tokenizer, TRAJ, "terminal", max_seq_len=len(resp))


def test_all_turns_truncation_cuts_early_turns_only(smol_tokenizer):
    full = tokenize_trajectory(smol_tokenizer, TRAJ, "all_turns")
    first, last = _runs(full.labels)
    # cut into the middle of the first response
    start_first = full.labels.index(first[0])
    keep_from = start_first + 2
    max_len = len(full.input_ids) - 1 - keep_from
    ex = tokenize_trajectory(smol_tokenizer, TRAJ, "all_turns", max_seq_len=max_len)
    assert ex.input_ids == full.input_ids[keep_from:-1]
    runs = _runs(ex.labels)
    assert runs[-1] == last
    assert runs[0] == first[3:]  # position 0 is never supervised, the rest of the fragment stays


def test_length_grouped_batches_groups_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(10, 1000) for _ in range(2000)]
    batches = length_grouped_batches(lengths, batch_size=8, seed=1)

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    perm = list(range(len(lengths)))
    rng.shuffle(perm)
    random_batches = [perm[k : k + 8] for k in range(0, len(perm), 8)]
    assert padding(batches) < 0.1 * padding(random_batches)
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first
    assert batches != length_grouped_batches(lengths, batch_size=8, seed=2)
    flat = length_grouped_batches(lengths, batch_size=8, seed=0, shuffle=False)
    assert [lengths[b[0]] for b in flat] == sorted((lengths[b[0]] for b in flat), reverse=True)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 5000), max_size=300),
    batch_size=st.integers(1, 40),
    seed=st.integers(0, 2**32),
    shuffle=st.booleans(),
)
def test_length_grouped_batches_properties(lengths, batch_size, seed, shuffle):
    batches = length_grouped_batches(lengths, batch_size, seed, shuffle)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert all(1 <= len(b) <= batch_size for b in batches)
    short = sum(len(b) < batch_size for b in batches)
    mega = batch_size * max(1, min(len(lengths) // (4 * batch_size), 50))
    assert short <= (1 if not shuffle else -(-len(lengths) // mega))
    assert batches == length_grouped_batches(lengths, batch_size, seed, shuffle)  # deterministic
    if not shuffle:
        assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def test_length_grouped_batches_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_batches([1, 2], 0, seed=0)


def test_collate():
    a = TokenizedExample(input_ids=[5, 6, 7], labels=[-100, 6, 7], n_supervised=2)
    b = TokenizedExample(input_ids=[8, 9, 10, 11, 12], labels=[-100, -100, -100, 11, 12], n_supervised=2)
    batch = collate([a, b], [0.5, 2.0], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, -100, 11, 12]]
    assert batch["weights"].dtype == torch.float32 and batch["weights"].tolist() == [0.5, 2.0]
    assert collate([a], [1.0], pad_token_id=0, pad_to_multiple_of=8)["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError, match="weights"):
        collate([a, b], [1.0], pad_token_id=0)


# --- train.supervise_eot: the end-of-turn label ---------------------------------------------


def _supervised(ex: TokenizedExample) -> list[int]:
    return [t for t in ex.labels if t != IGNORE_INDEX]


@pytest.mark.parametrize("mode", [True, False, "reference"])
def test_supervise_eot_on_smollm2_where_pad_is_the_end_of_turn(smol_tokenizer, mode):
    from drift_core.batching import unsupervised_token_ids

    messages = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "<answer>2</answer>"}]
    eot = smol_tokenizer.convert_tokens_to_ids(END)
    assert smol_tokenizer.pad_token_id == eot  # SmolLM2: pad and end of turn are one token
    content = smol_tokenizer("<answer>2</answer>", add_special_tokens=False)["input_ids"]
    ex = tokenize_trajectory(
        smol_tokenizer, messages, unsupervised_ids=unsupervised_token_ids(smol_tokenizer, mode)
    )
    # True: the response and its <|im_end|>; false and reference (weight_sft.py masks every label
    # equal to the pad token) both drop exactly that last token
    assert _supervised(ex) == (content + [eot] if mode is True else content)


def test_supervise_eot_reference_keeps_the_end_of_turn_where_pad_differs(smol_tokenizer):
    # a Qwen2.5-like tokenizer: pad <|endoftext|>, end of turn <|im_end|>: weight_sft.py supervises it
    from drift_core.batching import unsupervised_token_ids

    qwen_like = copy.deepcopy(smol_tokenizer)
    qwen_like.pad_token = "<|endoftext|>"
    eot = qwen_like.convert_tokens_to_ids(END)
    assert qwen_like.pad_token_id != eot
    messages = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]
    ref = tokenize_trajectory(
        qwen_like, messages, unsupervised_ids=unsupervised_token_ids(qwen_like, "reference")
    )
    assert _supervised(ref)[-1] == eot
    off = tokenize_trajectory(qwen_like, messages, unsupervised_ids=unsupervised_token_ids(qwen_like, False))
    assert _supervised(off) == _supervised(ref)[:-1]


def test_supervise_eot_at_its_default_leaves_train_keys_as_they_were():
    from drift_core.schemas import TrainConfig
    from tasks.caching import result_fields

    assert "supervise_eot" not in TrainConfig().model_dump()  # train keys made before it still match
    assert TrainConfig(supervise_eot="reference").model_dump()["supervise_eot"] == "reference"
    assert result_fields(TrainConfig(supervise_eot=False))["supervise_eot"] is False
    with pytest.raises(ValueError):
        TrainConfig(supervise_eot="sometimes")
