"""The multi-turn protocol: prompt texts, answer parsing, grading a turn, episodes."""

from __future__ import annotations

import pytest

from drift_core.protocol import (
    Episode,
    feedback_message,
    generation_prefill,
    grade_turn,
    initial_messages,
    parse_answers,
    stop_strings,
)
from drift_core.schemas import ProtocolConfig, TrajectoryRecord
from drift_core.verify import ExactVerifier, MathVerifier

QUESTION = "What is 1/2 + 1/4?"
VERIFIER = MathVerifier(timeout_s=5.0)


def test_simple_answer_messages() -> None:
    cfg = ProtocolConfig()
    assert initial_messages(QUESTION, cfg) == [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": "Solve the following problem.\n\nWhat is 1/2 + 1/4?\n\n"
            "Put your final answer within <answer> </answer> tags.",
        },
    ]


def test_full_think_messages() -> None:
    cfg = ProtocolConfig(prompt_mode="full", answer_format="think")
    assert initial_messages(QUESTION, cfg)[1]["content"] == (
        "Solve the following problem. Work carefully and give a single final answer. "
        "You may get several attempts: if your answer is wrong, you will be told so, and you should "
        "then reconsider your reasoning and give a corrected answer instead of repeating a previous one."
        "\n\nWhat is 1/2 + 1/4?\n\n"
        "First think through the problem within <think> </think> tags, "
        "then put your final answer within <answer> </answer> tags."
    )


def test_instruction_override_actions_and_no_system() -> None:
    cfg = ProtocolConfig(task_instruction="Add the fractions.", max_actions=3, system_prompt="")
    messages = initial_messages(QUESTION, cfg)
    assert messages == [
        {
            "role": "user",
            "content": "Add the fractions.\n\nWhat is 1/2 + 1/4?\n\n"
            "Put your final answer within <answer> </answer> tags. "
            "You may give up to 3 candidate answers inside the tags, separated by ||.",
        }
    ]


def test_prefill_stop_feedback() -> None:
    assert generation_prefill(ProtocolConfig()) == "<answer>"
    assert generation_prefill(ProtocolConfig(answer_format="think")) == "<think>"
    assert generation_prefill(ProtocolConfig(prefill=False)) == ""
    assert stop_strings(ProtocolConfig()) == ["</answer>"]
    assert feedback_message(ProtocolConfig()) == {"role": "user", "content": "Incorrect. Please think again."}
    assert feedback_message(ProtocolConfig(feedback="Try again."))["content"] == "Try again."


@pytest.mark.parametrize(
    ("content", "cfg", "expected"),
    [
        ("<answer>3/4</answer>", ProtocolConfig(), ["3/4"]),
        ("<answer>  3/4 \n</answer>", ProtocolConfig(), ["3/4"]),
        ("The answer is 3/4.", ProtocolConfig(), []),
        ("<answer>3/4", ProtocolConfig(), []),
        ("3/4</answer>", ProtocolConfig(), []),
        ("<answer></answer>", ProtocolConfig(), []),
        ("<answer>1</answer> no wait <answer>2</answer>", ProtocolConfig(), ["2"]),
        ("<answer>1 <answer>2</answer>", ProtocolConfig(), ["2"]),
        ("<answer>1 || 2 || 3</answer>", ProtocolConfig(), ["1"]),
        ("<answer>1 || 2 || 3</answer>", ProtocolConfig(max_actions=2), ["1", "2"]),
        ("<answer>1 |||| 2</answer>", ProtocolConfig(max_actions=5), ["1", "2"]),
        ("<think>1/2+1/4=3/4</think><answer>3/4</answer>", ProtocolConfig(answer_format="think"), ["3/4"]),
        ("<think>1/2+1/4=3/4 <answer>3/4</answer>", ProtocolConfig(answer_format="think"), []),
        ("<answer>3/4</answer></think>", ProtocolConfig(answer_format="think"), []),
    ],
    ids=[
        "plain",
        "whitespace",
        "no-tags",
        "no-closing-tag",
        "no-opening-tag",
        "empty",
        "two-blocks-last",
        "nested-open-last",
        "actions-capped-1",
        "actions-capped-2",
        "empty-actions-dropped",
        "think",
        "think-without-close",
        "think-close-after-answer",
    ],
)
def test_parse_answers(content: str, cfg: ProtocolConfig, expected: list[str]) -> None:
    assert parse_answers(content, cfg) == expected


def test_grade_turn() -> None:
    cfg = ProtocolConfig(max_actions=2)
    right = grade_turn("<answer>\\dfrac{3}{4}</answer>", "0.75", cfg, VERIFIER, n_tokens=7)
    assert (right.correct, right.valid, right.format_penalty, right.n_tokens) == (True, True, 0.0, 7)
    assert right.answer == "\\dfrac{3}{4}"
    assert right.normalized_answer == "\\frac{3}{4}"

    second_action = grade_turn("<answer>1 || 0.750</answer>", "3/4", cfg, VERIFIER)
    assert second_action.correct
    assert second_action.answer == "1||0.750"
    assert second_action.normalized_answer == "1||0.75"

    wrong = grade_turn("<answer>1</answer>", "3/4", cfg, VERIFIER)
    assert (wrong.correct, wrong.valid, wrong.format_penalty) == (False, True, 0.0)

    broken = grade_turn("I think 3/4", "3/4", cfg, VERIFIER, n_tokens=64)
    assert (broken.correct, broken.valid, broken.format_penalty) == (False, False, -0.1)
    assert broken.answer is None and broken.normalized_answer is None
    assert broken.response == "I think 3/4"


def _play(episode: Episode, contents: list[str], cfg: ProtocolConfig) -> None:
    for content in contents:
        if not episode.is_open():
            break
        episode.add_turn(content, grade_turn(content, episode.gold, cfg, ExactVerifier(), n_tokens=3))


def test_episode_stops_at_first_correct() -> None:
    cfg = ProtocolConfig(max_turns=5)
    ep = Episode.start("p1", 0, QUESTION, "3/4", cfg)
    _play(ep, ["<answer>1/2</answer>", "<answer>3/4</answer>", "<answer>never</answer>"], cfg)
    assert not ep.is_open()
    assert [t.correct for t in ep.turns] == [False, True]
    assert [m["role"] for m in ep.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert ep.messages[3] == {"role": "user", "content": "Incorrect. Please think again."}
    assert ep.messages[-1]["content"] == "<answer>3/4</answer>"
    with pytest.raises(ValueError, match="solved"):
        ep.add_turn("<answer>x</answer>", ep.turns[-1])


def test_episode_stops_at_max_turns_and_sums_penalties() -> None:
    cfg = ProtocolConfig(max_turns=3, format_penalty=-0.1)
    ep = Episode.start("p2", 4, QUESTION, "3/4", cfg)
    _play(ep, ["no tags", "<answer>1</answer>", "<answer>3/4", "<answer>3/4</answer>"], cfg)
    assert len(ep.turns) == 3 and not ep.is_open()
    assert ep.is_open(max_turns=5)  # an explicit, larger limit reopens it
    # no feedback after the last allowed turn
    assert [m["role"] for m in ep.messages][-1] == "assistant"

    record = ep.to_record(gen_seconds=1.5)
    assert record.n_turns == 3
    assert record.solved is False
    assert record.turn_correct == [False, False, False]
    assert record.turn_valid == [False, True, False]
    assert record.answers == [None, "1", None]
    assert record.normalized_answers == [None, "1", None]
    assert record.format_penalty == pytest.approx(-0.2)
    assert record.gen_tokens == [3, 3, 3]
    assert len(record.messages) == 2 + 3 + 2  # system, user, 3 answers, 2 feedbacks


def test_to_record_round_trip() -> None:
    cfg = ProtocolConfig(max_turns=4, answer_format="think")
    ep = Episode.start("gsm8k-7", 2, QUESTION, "3/4", cfg)
    _play(ep, ["<think>hmm</think><answer>1/2</answer>", "<think>ok</think><answer>3/4</answer>"], cfg)
    record = ep.to_record(gen_seconds=0.25)
    clone = TrajectoryRecord.model_validate(record.model_dump(mode="json"))
    assert clone == record
    assert clone.solved and clone.n_turns == 2 and clone.turn_correct == [False, True]
    assert clone.messages[-1].role == "assistant"
    assert clone.messages[-1].content == "<think>ok</think><answer>3/4</answer>"
    assert clone.format_penalty == 0.0


def test_to_record_drops_trailing_feedback_and_needs_turns() -> None:
    cfg = ProtocolConfig(max_turns=3)
    ep = Episode.start("p", 0, QUESTION, "3/4", cfg)
    with pytest.raises(ValueError, match="no turns"):
        ep.to_record(0.0)
    _play(ep, ["<answer>1</answer>"], cfg)
    assert ep.is_open() and ep.messages[-1]["role"] == "user"
    assert ep.to_record(0.0).messages[-1].role == "assistant"


def test_episode_max_turns_override() -> None:
    cfg = ProtocolConfig(max_turns=2)
    ep = Episode.start("p", 0, QUESTION, "3/4", cfg, max_turns=4)
    _play(ep, ["<answer>1</answer>"] * 6, cfg)
    assert len(ep.turns) == 4
