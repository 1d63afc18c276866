"""A multi-turn episode as one token sequence, for online RL (``tasks.online_rl``).

Online RL trains on exactly the tokens the policy saw and sampled. One episode of the protocol is
a prompt followed by one "completion" that interleaves the model's turns with what the chat
template and the environment put between them (end of turn, the feedback message, the next
assistant header and the pre-fill). ``env_mask`` marks each completion token: 1 for a token the
model sampled (trained on), 0 for a token the template or the feedback inserted (masked out of
the loss). The next turn is generated from ``prompt_ids + completion_ids`` itself, never from a
re-tokenised history, so training sees the same tokens the model conditioned on.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def template_gap(history_text: str, rendered_next: str, where: str = "") -> str:
    """The text the chat template puts after ``history_text`` (everything so far, the last model
    turn included) to reach ``rendered_next`` (the next generation prompt, or the closed chat).

    The template must render the history verbatim as a prefix; a template that rewrites earlier
    turns (strips whitespace, drops a reasoning block) cannot be played as one token sequence.
    """
    if not rendered_next.startswith(history_text):
        at = next(
            (i for i, (a, b) in enumerate(zip(history_text, rendered_next, strict=False)) if a != b),
            min(len(history_text), len(rendered_next)),
        )
        raise ValueError(
            f"chat template does not extend the history verbatim{' (' + where + ')' if where else ''}: "
            f"at character {at} the history has {history_text[at : at + 40]!r} but the template "
            f"renders {rendered_next[at : at + 40]!r}"
        )
    return rendered_next[len(history_text) :]


@dataclass
class TokenEpisode:
    """Prompt tokens plus the completion built turn by turn (model tokens and inserted tokens)."""

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def add_model(self, ids: list[int], logprobs: list[float]) -> None:
        """Tokens the policy sampled, with their log-probabilities under the sampling policy."""
        if len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} sampled tokens but {len(logprobs)} log-probabilities")
        self.completion_ids += ids
        self.env_mask += [1] * len(ids)
        self.logprobs += [float(x) for x in logprobs]

    def add_inserted(self, ids: list[int]) -> None:
        """Tokens the template or the environment inserted (no log-probability: 0.0, masked)."""
        self.completion_ids += ids
        self.env_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)

    @property
    def context(self) -> list[int]:
        """What the model conditions on for its next turn."""
        return self.prompt_ids + self.completion_ids

    @property
    def model_tokens(self) -> int:
        return sum(self.env_mask)
