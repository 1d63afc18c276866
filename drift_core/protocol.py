"""The multi-turn feedback protocol: prompts, answer parsing, grading one turn, an episode.

An episode is: system message, user message (instruction + problem + output format), then
assistant answer / feedback pairs until an answer is correct or ``max_turns`` answers were given.
A turn with no parseable answer still counts as a turn and earns ``cfg.format_penalty``.

The messages are the reference's, byte for byte (github.com/2020-qqtcg/DRIFT, src/prompting.py:
``build_initial_messages``, ``build_reward_message``, ``parse_response``), in both prompt modes;
the quoted strings below are protocol data taken from there. The conversation keeps the
reference's canonical re-rendering of each parsed answer (``history: canonical``), so every later
turn, and every training example, is conditioned on the history the reference conditions on.
The feedback text is computed here, in ``Episode.add_turn`` (``drift_core.feedback``), so every
turn loop (rollout, evaluation, online RL) gets the configured kind without knowing about it.

Changing a text here changes what every rollout and evaluation generates: the rollout and
evaluation cache keys hold the protocol config, not these constants, so such a change must come
with a config change that alters those keys (as the fields ``answer_parse``/``history`` did).

Contract with the engines: the assistant content handed to ``parse_answers``/``grade_turn`` is the
whole message, pre-fill included, and ends with the stop string ``</answer>`` when generation
stopped on it (engines that strip stop strings must put it back). A missing ``</answer>`` means
the answer was cut off, which is a format error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from drift_core.feedback import UNARY_FEEDBACK, call_function, direction_text
from drift_core.schemas import FeedbackConfig, ProtocolConfig, TrajectoryRecord, TurnResult
from drift_core.verify import Verifier, parse_number

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ACTION_SEPARATOR = "||"

# Protocol data quoted from the reference (src/prompting.py, src/benchmark.py): must match byte for byte.
SYSTEM_MESSAGE = "You're a helpful assistant. "
MATH_INSTRUCTION = "You are solving Math problems. Only give the final answer between <answer> and </answer>."
CHOICE_INSTRUCTION = (
    "You are solving multiple-choice questions. Only give the final answer letter (A-D) "
    "between <answer> and </answer>."
)
ANSWER_PLACEHOLDER = "<answer> [your answer] </answer>"
THINK_PLACEHOLDER = "<think> [Your thoughts] </think> <answer> [your answer] </answer>"
SPECIAL_TOKENS = ("<think>", "</think>", "<answer>", "</answer>", "<|im_start|>", "<|im_end|>")

_FIRST_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FIRST_THINK_ANSWER = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL)


def instruction_text(cfg: ProtocolConfig) -> str:
    """The task instruction (the reference's ``env_instruction``), the same in both modes."""
    return MATH_INSTRUCTION if cfg.task_instruction is None else cfg.task_instruction


def format_text(cfg: ProtocolConfig) -> str:
    """The output-format sentence of the simple mode and of every full-mode turn block."""
    placeholder = ANSWER_PLACEHOLDER if cfg.answer_format == "answer" else THINK_PLACEHOLDER
    return f"Always output: {placeholder} with no extra text. Strictly follow this format."


def turn_block(turn: int, state: str, actions_left: int, cfg: ProtocolConfig) -> str:
    """Full mode's block for one turn: the state (the problem, then the feedback), the actions
    left, the format and the length limit."""
    return (
        f"Turn {turn}:\nState:\n{state}\nYou have {actions_left} actions left. {format_text(cfg)} "
        f"Max response length: {cfg.instruction_max_tokens} words (tokens).\n"
    )


def initial_messages(question: str, cfg: ProtocolConfig) -> list[dict[str, str]]:
    """System message (left out when ``cfg.system_prompt`` is empty) and the first user message.

    simple: instruction, blank line, ``Problem:`` and the problem, blank line, format sentence.
    full: instruction, newline, the turn-1 block with the whole action budget."""
    state = question.strip()
    if cfg.prompt_mode == "simple":
        user = f"{instruction_text(cfg)}\n\nProblem:\n{state}\n\n{format_text(cfg)}"
    else:
        user = f"{instruction_text(cfg)}\n{turn_block(1, state, cfg.max_actions_per_traj, cfg)}"
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
    """The fixed feedback as a user message (simple mode, fixed text only); episodes compute
    theirs with :func:`feedback_content`."""
    if not isinstance(cfg.feedback, str):
        raise ValueError(f"protocol.feedback is kind {cfg.feedback.kind!r}: it depends on the answer")
    return {"role": "user", "content": cfg.feedback}


def feedback_text(cfg: ProtocolConfig, result: TurnResult, gold: str, turn: int) -> str:
    """What the feedback says after wrong turn ``turn`` (1-based), by ``protocol.feedback``'s kind."""
    fb = cfg.feedback
    if isinstance(fb, str):
        return fb
    if fb.kind == "direction":
        return direction_text(result.answer, result.normalized_answer, gold, fb.fallback)
    return call_function(fb.function or "", result.answer, gold, turn)


def feedback_content(cfg: ProtocolConfig, text: str, next_turn: int, actions_left: int) -> str:
    """The feedback user message: the text alone (simple), or the reward and the next turn's block
    with the text as its state (full; the reward of a wrong turn is 0.0)."""
    if cfg.prompt_mode == "simple":
        return text
    return f"Reward:\n{0.0}\n{turn_block(next_turn, text, actions_left, cfg)}"


def _strip_special_tokens(text: str) -> str:
    for token in SPECIAL_TOKENS:  # in this order: removing one token may form the next
        text = text.replace(token, "")
    return text.strip()


def reference_parse(content: str, cfg: ProtocolConfig) -> tuple[str, list[str]]:
    """The canonical message and the actions of one assistant message, as the reference parses.

    The first ``<answer>..</answer>`` (think format: the first ``<think>..</think>`` followed by
    whitespace and an answer block), special tokens removed, split on ``||`` into at most
    ``cfg.max_actions`` non-empty actions (when more were given, the kept ones re-joined with
    `` || ``). The canonical message is ``<answer>{answer}</answer>`` (think:
    ``<think>{thoughts}</think><answer>{answer}</answer>``); with no block it is the content and
    there are no actions."""
    pattern = _FIRST_THINK_ANSWER if cfg.answer_format == "think" else _FIRST_ANSWER
    m = pattern.search(content)
    if m is None:
        return content, []
    body = _strip_special_tokens(m.group(m.lastindex or 1))
    actions = [a.strip() for a in body.split(ACTION_SEPARATOR) if a.strip()]
    if len(actions) > cfg.max_actions:
        actions = actions[: cfg.max_actions]
        body = f" {ACTION_SEPARATOR} ".join(actions)
    if cfg.answer_format == "think":
        return (
            f"{THINK_OPEN}{_strip_special_tokens(m.group(1))}{THINK_CLOSE}{ANSWER_OPEN}{body}{ANSWER_CLOSE}",
            actions,
        )
    return f"{ANSWER_OPEN}{body}{ANSWER_CLOSE}", actions


def _last_block_answers(content: str, cfg: ProtocolConfig) -> list[str]:
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


def parse_answers(content: str, cfg: ProtocolConfig) -> list[str]:
    """The answers ("actions") of one assistant message, or [] when it has no well-formed answer.

    ``answer_parse: reference`` (default): :func:`reference_parse`. ``last_block``: the last
    closed ``<answer>...</answer>`` block (in think format a ``</think>`` must come before it),
    split on ``||``, stripped, empty parts dropped, the first ``cfg.max_actions`` kept."""
    if cfg.answer_parse == "reference":
        return reference_parse(content, cfg)[1]
    return _last_block_answers(content, cfg)


def history_content(content: str, cfg: ProtocolConfig) -> str:
    """What the conversation keeps of an assistant message (``protocol.history``)."""
    return reference_parse(content, cfg)[0] if cfg.history == "canonical" else content


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
        normalized_answer=ACTION_SEPARATOR.join(verifier.normal_form(a) for a in actions),
        correct=correct,
        valid=True,
        format_penalty=0.0,
        n_tokens=n_tokens,
    )


@dataclass
class Episode:
    """One trajectory being rolled out. ``messages`` is the chat so far; after a wrong answer
    (while turns remain) it ends with the feedback message, ready for the next generation.

    Built with :meth:`start`, it carries its protocol: ``add_turn`` then keeps the configured
    history form of each answer and computes the configured feedback. Built directly without a
    protocol, it keeps the raw answers and sends ``feedback`` as fixed text."""

    prompt_id: str
    traj_idx: int
    gold: str
    messages: list[dict[str, str]]
    turns: list[TurnResult] = field(default_factory=list)
    max_turns: int = 3
    feedback: str = UNARY_FEEDBACK
    protocol: ProtocolConfig | None = None

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
        """A fresh episode; ``max_turns`` overrides ``cfg.max_turns`` (evaluation may use more).

        Direction feedback needs a numeric gold: a gold that is not a number fails here, before
        any generation, naming the prompt."""
        direction = isinstance(cfg.feedback, FeedbackConfig) and cfg.feedback.kind == "direction"
        if direction and parse_number(gold) is None:
            raise ValueError(
                f"protocol.feedback kind direction needs numeric golds: gold {gold!r} of prompt "
                f"{prompt_id!r} is not a number (use fixed text or kind callable for this data)"
            )
        return cls(
            prompt_id=prompt_id,
            traj_idx=traj_idx,
            gold=gold,
            messages=initial_messages(question, cfg),
            max_turns=max_turns or cfg.max_turns,
            feedback=cfg.feedback if isinstance(cfg.feedback, str) else "",
            protocol=cfg,
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
        cfg = self.protocol
        kept = content if cfg is None else history_content(content, cfg)
        self.messages.append({"role": "assistant", "content": kept})
        self.turns.append(result)
        if self.is_open():
            self.messages.append({"role": "user", "content": self._feedback(result)})

    def _feedback(self, result: TurnResult) -> str:
        cfg = self.protocol
        if cfg is None:
            return self.feedback
        turn = len(self.turns)
        text = feedback_text(cfg, result, self.gold, turn)
        return feedback_content(cfg, text, turn + 1, self.actions_left())

    def actions_left(self) -> int:
        """The reference's action budget left (full mode's "You have N actions left"): the
        trajectory budget minus the actions answered so far (one per action of a parsed answer)."""
        budget = self.protocol.max_actions_per_traj if self.protocol else 0
        used = sum(len(t.answer.split(ACTION_SEPARATOR)) for t in self.turns if t.answer is not None)
        return max(budget - used, 0)

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
