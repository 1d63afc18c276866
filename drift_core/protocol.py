"""The multi-turn unary-feedback protocol: prompts, answer parsing, grading one turn, an episode.

An episode is: system message, user message (instruction + problem + output format), then
assistant answer / feedback ("Incorrect. Please think again.") pairs until an answer is correct or
``max_turns`` answers were given. A turn with no parseable answer still counts as a turn and earns
``cfg.format_penalty``.

Contract with the engines: the assistant content handed to ``parse_answers``/``grade_turn`` is the
whole message, pre-fill included, and ends with the stop string ``</answer>`` when generation
stopped on it (engines that strip stop strings must put it back). A missing ``</answer>`` means
the answer was cut off, which is a format error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drift_core.schemas import ProtocolConfig, TrajectoryRecord, TurnResult
from drift_core.verify import Verifier, normalize_answer

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ACTION_SEPARATOR = "||"

SIMPLE_INSTRUCTION = "Solve the following problem."
FULL_INSTRUCTION = (
    "Solve the following problem. Work carefully and give a single final answer. "
    "You may get several attempts: if your answer is wrong, you will be told so, and you should "
    "then reconsider your reasoning and give a corrected answer instead of repeating a previous one."
)
CHOICE_INSTRUCTION = (
    "Answer the following multiple-choice question. Your final answer is the letter of the correct option."
)
ANSWER_FORMAT = "Put your final answer within <answer> </answer> tags."
THINK_FORMAT = (
    "First think through the problem within <think> </think> tags, "
    "then put your final answer within <answer> </answer> tags."
)


def instruction_text(cfg: ProtocolConfig) -> str:
    if cfg.task_instruction is not None:
        return cfg.task_instruction
    return SIMPLE_INSTRUCTION if cfg.prompt_mode == "simple" else FULL_INSTRUCTION


def format_text(cfg: ProtocolConfig) -> str:
    text = ANSWER_FORMAT if cfg.answer_format == "answer" else THINK_FORMAT
    if cfg.max_actions > 1:
        text += (
            f" You may give up to {cfg.max_actions} candidate answers inside the tags, "
            f"separated by {ACTION_SEPARATOR}."
        )
    return text


def initial_messages(question: str, cfg: ProtocolConfig) -> list[dict[str, str]]:
    """System message (left out when ``cfg.system_prompt`` is empty) and the first user message:
    instruction, blank line, problem, blank line, output format."""
    user = f"{instruction_text(cfg)}\n\n{question.strip()}\n\n{format_text(cfg)}"
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return [*messages, {"role": "user", "content": user}]


def generation_prefill(cfg: ProtocolConfig) -> str:
    """Text the generation prompt is pre-filled with (it is part of the assistant message)."""
    if not cfg.prefill:
        return ""
    return ANSWER_OPEN if cfg.answer_format == "answer" else THINK_OPEN


def stop_strings(cfg: ProtocolConfig) -> list[str]:
    return [ANSWER_CLOSE]


def feedback_message(cfg: ProtocolConfig) -> dict[str, str]:
    return {"role": "user", "content": cfg.feedback}


def parse_answers(content: str, cfg: ProtocolConfig) -> list[str]:
    """The answers ("actions") of one assistant message, or [] when it has no well-formed answer.

    Reads the last ``<answer>...</answer>`` block (closing tag required; in think format a
    ``</think>`` must come before it), splits it on ``||``, strips, drops empty parts and keeps the
    first ``cfg.max_actions``.
    """
    end = content.rfind(ANSWER_CLOSE)
    if end < 0:
        return []
    start = content.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return []
    if cfg.answer_format == "think" and content.rfind(THINK_CLOSE, 0, start) < 0:
        return []
    body = content[start + len(ANSWER_OPEN) : end]
    actions = [part.strip() for part in body.split(ACTION_SEPARATOR)]
    return [a for a in actions if a][: cfg.max_actions]


def grade_turn(
    content: str, gold: str, cfg: ProtocolConfig, verifier: Verifier, n_tokens: int = 0
) -> TurnResult:
    """Grade one assistant message. With several actions the turn is correct if ANY action is
    correct (each action is verified under its own time limit). A message with no parseable answer
    is invalid, incorrect and earns ``cfg.format_penalty``; the verifier's own ``valid`` flag (e.g. no
    number in a numeric answer) does not add a format penalty."""
    actions = parse_answers(content, cfg)
    if not actions:
        return TurnResult(
            response=content,
            answer=None,
            normalized_answer=None,
            correct=False,
            valid=False,
            format_penalty=cfg.format_penalty,
            n_tokens=n_tokens,
        )
    correct = any(verifier(action, gold).correct for action in actions)
    return TurnResult(
        response=content,
        answer=ACTION_SEPARATOR.join(actions),
        normalized_answer=ACTION_SEPARATOR.join(
            normalize_answer(verifier.read_answer(a) or a) for a in actions
        ),
        correct=correct,
        valid=True,
        format_penalty=0.0,
        n_tokens=n_tokens,
    )


@dataclass
class Episode:
    """One trajectory being rolled out. ``messages`` is the chat so far; after a wrong answer
    (while turns remain) it ends with the feedback message, ready for the next generation."""

    prompt_id: str
    traj_idx: int
    gold: str
    messages: list[dict[str, str]]
    turns: list[TurnResult] = field(default_factory=list)
    max_turns: int = 3
    feedback: str = ProtocolConfig().feedback

    @classmethod
    def start(
        cls,
        prompt_id: str,
        traj_idx: int,
        question: str,
        gold: str,
        cfg: ProtocolConfig,
        max_turns: int | None = None,
    ) -> Episode:
        """A fresh episode; ``max_turns`` overrides ``cfg.max_turns`` (evaluation may use more)."""
        return cls(
            prompt_id=prompt_id,
            traj_idx=traj_idx,
            gold=gold,
            messages=initial_messages(question, cfg),
            max_turns=max_turns or cfg.max_turns,
            feedback=cfg.feedback,
        )

    @property
    def solved(self) -> bool:
        return any(t.correct for t in self.turns)

    def is_open(self, max_turns: int | None = None) -> bool:
        """True while no turn was correct and fewer than ``max_turns`` turns were taken."""
        limit = self.max_turns if max_turns is None else max_turns
        return not self.solved and len(self.turns) < limit

    def add_turn(self, content: str, result: TurnResult) -> None:
        """Record an assistant message and its grade; add the feedback message if the episode is
        still open (by ``self.max_turns``: set it at construction, e.g. with ``Episode.start``)."""
        if self.solved:
            raise ValueError(f"episode {self.prompt_id}/{self.traj_idx} is solved; cannot add a turn")
        self.messages.append({"role": "assistant", "content": content})
        self.turns.append(result)
        if self.is_open():
            self.messages.append({"role": "user", "content": self.feedback})

    def to_record(self, gen_seconds: float) -> TrajectoryRecord:
        """The stored form; its messages end with the last assistant message."""
        if not self.turns:
            raise ValueError(f"episode {self.prompt_id}/{self.traj_idx} has no turns")
        messages = list(self.messages)
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        return TrajectoryRecord(
            prompt_id=self.prompt_id,
            traj_idx=self.traj_idx,
            messages=messages,
            turn_correct=[t.correct for t in self.turns],
            turn_valid=[t.valid for t in self.turns],
            answers=[t.answer for t in self.turns],
            normalized_answers=[t.normalized_answer for t in self.turns],
            format_penalty=sum(t.format_penalty for t in self.turns),
            n_turns=len(self.turns),
            solved=self.solved,
            gen_tokens=[t.n_tokens for t in self.turns],
            gen_seconds=gen_seconds,
        )
