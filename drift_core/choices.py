"""Multiple-choice problems: the options under the question, the gold as a letter.

The options are shuffled per problem with ``random.Random(seed)`` where ``seed`` is the first 8
bytes (big-endian) of ``sha256(f"drift-choices:{choice_seed}:{prompt_id}")``: the same problem gets
the same order on every machine and in every run, independent of Python's hash seed, of the row's
position and of the other problems, and a different ``choice_seed`` gives another order. The
correct option's letter after the shuffle is the gold.
"""

from __future__ import annotations

import hashlib
import random
import string

LETTERS = string.ascii_uppercase[:10]  # A-J: what ChoiceVerifier reads (MMLU-Pro has up to 10)

__all__ = ["LETTERS", "choice_order", "render_choices", "gold_index"]


def choice_order(n: int, prompt_id: str, choice_seed: int = 0, shuffle: bool = True) -> list[int]:
    """The order (indices into the original options) in which ``n`` options are shown."""
    order = list(range(n))
    if shuffle:
        digest = hashlib.sha256(f"drift-choices:{choice_seed}:{prompt_id}".encode()).digest()
        random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def gold_index(answer: str, n: int) -> int:
    """Index of the correct option from an answer cell: a 0-based index (``2``, ``"2"``) or a letter
    (``"C"``, ``"(C)"``). Raises ValueError naming what was expected."""
    text = str(answer).strip().strip("()").strip()
    if text.isdigit():
        index = int(text)
    elif len(text) == 1 and text.upper() in LETTERS:
        index = LETTERS.index(text.upper())
    else:
        raise ValueError(f"answer {answer!r} is neither a 0-based option index nor a letter A-J")
    if index >= n:
        raise ValueError(f"answer {answer!r} points past the {n} options")
    return index


def render_choices(
    question: str,
    options: list[str],
    correct: int,
    prompt_id: str,
    choice_seed: int = 0,
    shuffle: bool = True,
) -> tuple[str, str]:
    """``(question + "\\n\\nA. ...\\nB. ...", gold letter)``; ``options[correct]`` is the right one."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"{len(options)} options; expected 2 to {len(LETTERS)}")
    if not 0 <= correct < len(options):
        raise ValueError(f"correct option {correct} is not one of the {len(options)} options")
    order = choice_order(len(options), prompt_id, choice_seed, shuffle)
    lines = [f"{LETTERS[pos]}. {options[i]}" for pos, i in enumerate(order)]
    return f"{question.strip()}\n\n" + "\n".join(lines), LETTERS[order.index(correct)]
