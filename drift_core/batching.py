"""From trajectories to training batches (docs/method.md#loss).

DRIFT trains on the *terminal* assistant message of each trajectory, conditioned on the whole
history before it (``target="terminal"``); the paper's all-turn variant supervises every assistant
message of the conversation in one sequence (``target="all_turns"``).

Masks come from ONE rendering of the conversation with the tokenizer's chat template. Each
supervised assistant message ``i`` is located by characters, not by tokens:

* ``start`` = length of ``render(messages[:i], add_generation_prompt=True)``, which must be an exact
  prefix of the full rendering (so a default system prompt that the template inserts is handled:
  it is in both renderings);
* ``end`` = length of ``render(messages[:i + 1])`` (also an exact prefix), with trailing whitespace
  removed: the supervised span is what the template emits for the message after the generation
  prompt, i.e. its content *and its end-of-turn marker* (``<|im_end|>`` for ChatML), but not the
  newline that ChatML writes after the marker. That newline is template formatting between turns;
  the engine stops generating at the marker, so the model never has to produce it.

The full rendering is tokenised once with ``return_offsets_mapping=True`` and a token is supervised
when it *starts* inside a supervised span. If BPE merges across the prompt/response boundary (a
response that begins with whitespace after ChatML's ``assistant\n``: ``"\n   x"`` is one token
``"\n  "`` plus ``" x"``), the straddling token holds prompt characters and is not supervised: the
model is never taught to emit text the prompt already contains (at generation time the prompt ends
with its own ``"\n"`` token). The input ids are therefore exactly
``tokenizer(rendered, add_special_tokens=False)``, the same ids ``apply_chat_template(tokenize=True)``
gives (the template writes any BOS itself). Tokenising the prompt and the conversation separately and
assuming the token boundary lines up (the reference scripts' approach) is wrong whenever BPE merges
across the boundary; nothing here relies on it. A template that rewrites earlier turns (so a rendered
prefix is not a prefix of the full conversation) is an error, not a silent mis-mask.

Labels follow the Hugging Face convention: aligned with ``input_ids`` (``-100`` where not
supervised), shifted by one inside the loss. Position 0 is never supervised (nothing predicts it).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "IGNORE_INDEX",
    "Target",
    "TokenizedExample",
    "collate",
    "collate_packed",
    "length_grouped_batches",
    "tokenize_trajectory",
    "training_pairs",
    "unsupervised_token_ids",
]

IGNORE_INDEX = -100
Target = Literal["terminal", "all_turns"]


@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence. ``labels[k] == input_ids[k]`` where supervised, else ``-100``."""

    input_ids: list[int]
    labels: list[int]
    n_supervised: int
    n_truncated: int = 0  # tokens dropped by truncation (left history and unsupervised tail)

    def __len__(self) -> int:
        return len(self.input_ids)


def _as_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    """Plain ``{"role", "content"}`` dicts (accepts pydantic ``Message`` objects too), validated."""
    out: list[dict[str, str]] = []
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping):
            m = m.model_dump() if hasattr(m, "model_dump") else vars(m)
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ValueError(
                f"messages[{k}]: expected {{'role': system|user|assistant, 'content': str}}, got {m!r}"
            )
        out.append({"role": role, "content": content})
    if not out or out[-1]["role"] != "assistant":
        raise ValueError("a trajectory must end with an assistant message (the terminal response)")
    return out


def _assistant_indices(messages: list[dict[str, str]], target: Target) -> list[int]:
    idx = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if target == "terminal":
        return idx[-1:]
    if target == "all_turns":
        return idx
    raise ValueError(f"target={target!r}: expected 'terminal' or 'all_turns'")


def training_pairs(
    messages: Sequence[Any], target: Target
) -> list[tuple[list[dict[str, str]], dict[str, str]]]:
    """(history, assistant message) pairs: one for ``terminal`` (the last assistant message), one per
    assistant message for ``all_turns``. The history is every message before the response."""
    msgs = _as_messages(messages)
    return [(msgs[:i], msgs[i]) for i in _assistant_indices(msgs, target)]


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _supervised_spans(
    tokenizer, msgs: list[dict[str, str]], indices: list[int], full: str
) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for i in indices:
        before = _render(tokenizer, msgs[:i], add_generation_prompt=True)
        through = (
            full if i == len(msgs) - 1 else _render(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        )
        for name, prefix in (("history + generation prompt", before), ("history + response", through)):
            if not full.startswith(prefix):
                raise ValueError(
                    f"chat template: rendering messages[:{i}] ({name}) is not a prefix of the full "
                    "conversation's rendering; the template rewrites earlier turns, so assistant "
                    f"message {i} cannot be located (use target='terminal' or another template)"
                )
        start = len(before)
        end = max(start, len(through.rstrip()))
        spans.append((start, end))
    return spans


def tokenize_trajectory(
    tokenizer,
    messages: Sequence[Any],
    target: Target = "terminal",
    max_seq_len: int | None = None,
    unsupervised_ids: frozenset[int] = frozenset(),
) -> TokenizedExample:
    """Tokenise one trajectory and mask everything but the supervised assistant message(s).

    Truncation (when the sequence is longer than ``max_seq_len``): first the unsupervised tail after
    the last supervised token (ChatML's trailing newline) is dropped, then tokens are removed from the
    LEFT of the history. The last response always stays whole; earlier responses (``all_turns``) may
    lose their beginning, and their remaining tokens stay supervised. If the last response plus one
    token of context does not fit, a ``ValueError`` names the lengths.

    ``unsupervised_ids``: token ids never supervised wherever they occur in a response (the
    reference's pad-token masking, ``train.supervise_eot``; see :func:`unsupervised_token_ids`).
    """
    msgs = _as_messages(messages)
    indices = _assistant_indices(msgs, target)
    full = _render(tokenizer, msgs, add_generation_prompt=False)
    spans = _supervised_spans(tokenizer, msgs, indices, full)

    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenize_trajectory needs a fast tokenizer (character offsets); got a slow one")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]

    labels = [IGNORE_INDEX] * len(ids)
    last_first = last_end = None  # token range [first, end) of the last supervised span
    s = 0
    for k, (a, _b) in enumerate(offsets):
        while s < len(spans) and spans[s][1] <= a:
            s += 1
        if s < len(spans) and spans[s][0] <= a < spans[s][1] and ids[k] not in unsupervised_ids:
            labels[k] = ids[k]
            if s == len(spans) - 1:
                last_first = k if last_first is None else last_first
                last_end = k + 1
    if labels:
        labels[0] = IGNORE_INDEX  # position 0 has no predecessor to predict it

    n_full = len(ids)
    if max_seq_len is not None and n_full > max_seq_len:
        if last_first is not None:
            resp = last_end - last_first
            if resp + 1 > max_seq_len:
                raise ValueError(
                    f"the supervised response is {resp} tokens; with one token of context it needs "
                    f"max_seq_len >= {resp + 1}, got max_seq_len={max_seq_len} "
                    f"(the whole conversation is {n_full} tokens)"
                )
            ids, labels = ids[:last_end], labels[:last_end]
        cut = max(0, len(ids) - max_seq_len)
        ids, labels = ids[cut:], labels[cut:]
        labels[0] = IGNORE_INDEX

    n_sup = sum(1 for x in labels if x != IGNORE_INDEX)
    return TokenizedExample(input_ids=ids, labels=labels, n_supervised=n_sup, n_truncated=n_full - len(ids))


def unsupervised_token_ids(tokenizer, supervise_eot: bool | str) -> frozenset[int]:
    """The token ids ``train.supervise_eot`` takes out of the labels.

    ``True``: none. ``False``: the eos token (the end-of-turn marker of ChatML chat models).
    ``"reference"``: what weight_sft.py's collator does: it appends the eos token to each response,
    then sets every label equal to the pad token id to -100, the pad token being the eos token when
    the tokenizer has none. So the end of turn is masked exactly where pad and end of turn are one
    token (SmolLM2: both ``<|im_end|>``) and supervised where they differ (Qwen2.5: pad
    ``<|endoftext|>``)."""
    if supervise_eot is True:
        return frozenset()
    if supervise_eot is False:
        eos = tokenizer.eos_token_id
        return frozenset() if eos is None else frozenset({int(eos)})
    if supervise_eot == "reference":
        pad = tokenizer.pad_token_id if tokenizer.pad_token is not None else tokenizer.eos_token_id
        return frozenset() if pad is None else frozenset({int(pad)})
    raise ValueError(f"supervise_eot={supervise_eot!r}: expected true, false or 'reference'")


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True
) -> list[list[int]]:
    """Batches of indices with similar lengths, so right padding stays small.

    ``shuffle=True`` (like Hugging Face's ``LengthGroupedSampler``): a seeded permutation is cut into
    mega-batches of ``batch_size * min(n // (4 * batch_size), 50)`` (at least one batch), each is sorted
    by length (longest first) and split into batches; the batch order is then shuffled and the batch
    holding the longest sequence is moved first (an out-of-memory shows up on step one).
    ``shuffle=False``: all indices sorted by length, longest first (ties by index), no randomness.
    Every index appears exactly once; only the last batch of a mega-batch may be short. The result
    depends only on (lengths, batch_size, seed, shuffle).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = [int(x) for x in lengths]
    n = len(lengths)
    if n == 0:
        return []
    if not shuffle:
        order = sorted(range(n), key=lambda i: (-lengths[i], i))
        return [order[k : k + batch_size] for k in range(0, n, batch_size)]

    rng = random.Random(seed)
    perm = list(range(n))
    rng.shuffle(perm)
    mega = batch_size * max(1, min(n // (4 * batch_size), 50))
    batches: list[list[int]] = []
    for m in range(0, n, mega):
        chunk = sorted(perm[m : m + mega], key=lambda i: -lengths[i])  # stable: ties keep permuted order
        batches.extend(chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def collate(
    examples: Sequence[TokenizedExample],
    weights: Sequence[float],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (``-100`` on padding), ``[B, T]``,
    and the per-sample ``weights`` (float32, ``[B]``)."""
    if len(examples) != len(weights):
        raise ValueError(f"{len(examples)} examples but {len(weights)} weights")
    if not examples:
        raise ValueError("collate needs at least one example")
    t = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    b = len(examples)
    input_ids = torch.full((b, t), int(pad_token_id), dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[r, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[r, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[r, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "weights": torch.tensor([float(w) for w in weights], dtype=torch.float32),
    }


def collate_packed(examples: Sequence[TokenizedExample], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Padding-free batch: the examples concatenated into one row ``[1, sum of lengths]``.

    ``position_ids`` restart at 0 for every example, and there is no ``attention_mask``: from the
    restarts transformers builds block-diagonal causal attention (flash-attention's variable-length
    kernel on a GPU, a block mask for SDPA), so no token attends across examples and no compute is
    spent on padding. ``sample_index`` names the example of every token (the loss averages per
    example), and the first token of each example is never supervised (nothing before it in its own
    sequence predicts it), so no target crosses a boundary. Same loss as ``collate``'s padded batch."""
    if len(examples) != len(weights):
        raise ValueError(f"{len(examples)} examples but {len(weights)} weights")
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    ids, labels, positions, owner = [], [], [], []
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids.extend(e.input_ids)
        labels.append(IGNORE_INDEX)
        labels.extend(e.labels[1:])
        positions.extend(range(n))
        owner.extend([i] * n)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "sample_index": torch.tensor([owner], dtype=torch.long),
        "weights": torch.tensor([float(w) for w in weights], dtype=torch.float32),
    }
