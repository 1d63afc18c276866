"""The multi-turn protocol: prompt texts, answer parsing, grading a turn, episodes."""

from __future__ import annotations

from functools import partial

import pytest

from drift_core.protocol import (
    Episode,
    feedback_message,
    generation_prefill,
    grade_turn,
    initial_messages,
    parse_answers,
    reference_parse,
    stop_strings,
)
from drift_core.schemas import ProtocolConfig, TrajectoryRecord
from drift_core.verify import ExactVerifier, MathVerifier, NumericVerifier, ReferenceVerifier

QUESTION = "What is 1/2 + 1/4?"
VERIFIER = MathVerifier(timeout_s=5.0)


# Expected texts are written out by hand from the reference's prompting.py
# (github.com/2020-qqtcg/DRIFT, build_initial_messages / build_reward_message / build_turn_block).
REF_SYSTEM = "You're a helpful assistant. "
REF_MATH = "You are solving Math problems. Only give the final answer between <answer> and </answer>."


def test_simple_answer_messages_are_the_references() -> None:
    cfg = ProtocolConfig()
    assert initial_messages(QUESTION, cfg) == [
        {"role": "system", "content": REF_SYSTEM},
        {
            "role": "user",
            "content": REF_MATH + "\n\nProblem:\nWhat is 1/2 + 1/4?\n\n"
            "Always output: <answer> [your answer] </answer> with no extra text. Strictly follow this format.",
        },
    ]


def test_simple_think_message() -> None:
    cfg = ProtocolConfig(answer_format="think")
    assert initial_messages("  Q?\n", cfg)[1]["content"] == (
        REF_MATH + "\n\nProblem:\nQ?\n\nAlways output: <think> [Your thoughts] </think> "
        "<answer> [your answer] </answer> with no extra text. Strictly follow this format."
    )


def test_full_think_messages_are_the_references() -> None:
    cfg = ProtocolConfig(prompt_mode="full", answer_format="think")
    assert initial_messages(QUESTION, cfg)[1]["content"] == (
        REF_MATH + "\nTurn 1:\nState:\nWhat is 1/2 + 1/4?\nYou have 5 actions left. "
        "Always output: <think> [Your thoughts] </think> <answer> [your answer] </answer> "
        "with no extra text. Strictly follow this format. Max response length: 400 words (tokens).\n"
    )


def test_full_mode_feedback_is_the_reward_and_the_next_turn_block() -> None:
    cfg = ProtocolConfig(prompt_mode="full", max_turns=3, instruction_max_tokens=1000)
    ep = Episode.start("p", 0, QUESTION, "3/4", cfg)
    _play(ep, ["<answer>1/2</answer>"], cfg)
    assert ep.messages[-1] == {
        "role": "user",
        "content": "Reward:\n0.0\nTurn 2:\nState:\nIncorrect. Please think again.\nYou have 4 actions "
        "left. Always output: <answer> [your answer] </answer> with no extra text. Strictly follow "
        "this format. Max response length: 1000 words (tokens).\n",
    }


def test_instruction_override_and_no_system() -> None:
    cfg = ProtocolConfig(task_instruction="Add the fractions.", max_actions=3, system_prompt="")
    assert initial_messages(QUESTION, cfg) == [
        {
            "role": "user",
            "content": "Add the fractions.\n\nProblem:\nWhat is 1/2 + 1/4?\n\n"
            "Always output: <answer> [your answer] </answer> with no extra text. Strictly follow this format.",
        }
    ]


def test_prefill_stop_feedback() -> None:
    assert generation_prefill(ProtocolConfig()) == "<answer>"
    assert generation_prefill(ProtocolConfig(answer_format="think")) == "<think>"
    assert generation_prefill(ProtocolConfig(prefill=False)) == ""
    assert stop_strings(ProtocolConfig()) == ["</answer>"]
    assert feedback_message(ProtocolConfig()) == {"role": "user", "content": "Incorrect. Please think again."}
    assert feedback_message(ProtocolConfig(feedback="Try again."))["content"] == "Try again."


LB = partial(ProtocolConfig, answer_parse="last_block", history="raw")


@pytest.mark.parametrize(
    ("content", "cfg", "expected"),
    [
        ("<answer>3/4</answer>", ProtocolConfig(), ("<answer>3/4</answer>", ["3/4"])),
        ("<answer> 18 </answer>", ProtocolConfig(), ("<answer>18</answer>", ["18"])),
        ("<answer>18<|im_end|></answer>", ProtocolConfig(), ("<answer>18</answer>", ["18"])),
        (
            "<answer>The total is <answer>18</answer>",
            ProtocolConfig(),
            ("<answer>The total is 18</answer>", ["The total is 18"]),
        ),
        ("<answer>1</answer> no wait <answer>2</answer>", ProtocolConfig(), ("<answer>1</answer>", ["1"])),
        (
            "<answer>17 || 18</answer>",
            ProtocolConfig(max_actions=5),
            ("<answer>17 || 18</answer>", ["17", "18"]),
        ),
        (
            "<answer>17||18 ||19</answer>",
            ProtocolConfig(max_actions=2),
            ("<answer>17 || 18</answer>", ["17", "18"]),
        ),
        ("<answer>17 || 18</answer>", ProtocolConfig(), ("<answer>17</answer>", ["17"])),
        ("<answer> || </answer>", ProtocolConfig(), ("<answer>||</answer>", [])),
        ("The answer is 3/4.", ProtocolConfig(), ("The answer is 3/4.", [])),
        ("<answer>3/4", ProtocolConfig(), ("<answer>3/4", [])),
        (
            "<think> a </think> \n<answer> 3/4 </answer>",
            ProtocolConfig(answer_format="think"),
            ("<think>a</think><answer>3/4</answer>", ["3/4"]),
        ),
        (
            "<think>a</think> so <answer>3/4</answer>",
            ProtocolConfig(answer_format="think"),
            ("<think>a</think> so <answer>3/4</answer>", []),
        ),
    ],
    ids=[
        "plain",
        "spaces-canonical",
        "special-token-stripped",
        "nested-first-open",
        "two-blocks-first",
        "two-actions-of-5",
        "three-actions-capped-rejoined",
        "one-action-of-1",
        "only-separators",
        "no-tags",
        "no-closing-tag",
        "think",
        "think-text-between",
    ],
)
def test_reference_parse(content: str, cfg: ProtocolConfig, expected: tuple[str, list[str]]) -> None:
    assert reference_parse(content, cfg) == expected
    assert parse_answers(content, cfg) == expected[1]


@pytest.mark.parametrize(
    ("content", "cfg", "expected"),
    [
        ("<answer>3/4</answer>", LB(), ["3/4"]),
        ("<answer>  3/4 \n</answer>", LB(), ["3/4"]),
        ("The answer is 3/4.", LB(), []),
        ("<answer>3/4", LB(), []),
        ("3/4</answer>", LB(), []),
        ("<answer></answer>", LB(), []),
        ("<answer>1</answer> no wait <answer>2</answer>", LB(), ["2"]),
        ("<answer>1 <answer>2</answer>", LB(), ["2"]),
        ("<answer>1 || 2 || 3</answer>", LB(), ["1"]),
        ("<answer>1 || 2 || 3</answer>", LB(max_actions=2), ["1", "2"]),
        ("<answer>1 |||| 2</answer>", LB(max_actions=5), ["1", "2"]),
        ("<think>1/2+1/4=3/4</think><answer>3/4</answer>", LB(answer_format="think"), ["3/4"]),
        ("<think>1/2+1/4=3/4 <answer>3/4</answer>", LB(answer_format="think"), []),
        ("<answer>3/4</answer></think>", LB(answer_format="think"), []),
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
def test_parse_answers_last_block(content: str, cfg: ProtocolConfig, expected: list[str]) -> None:
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


# -- history: the reference's canonical re-rendering (issue 30, item 2) -----------------------


def test_history_keeps_the_canonical_answer_and_records_keep_the_raw_response() -> None:
    cfg = ProtocolConfig(max_turns=3, max_actions=5)
    ep = Episode.start("p", 0, QUESTION, "18", cfg)
    raw = ["<answer> 17 ||16<|im_end|> </answer>", "<answer> 18 </answer>"]
    _play(ep, raw, cfg)
    assert [m["content"] for m in ep.messages[2:]] == [
        "<answer>17 ||16</answer>",
        "Incorrect. Please think again.",
        "<answer>18</answer>",
    ]
    assert [t.response for t in ep.turns] == raw
    assert [t.answer for t in ep.turns] == ["17||16", "18"]


def test_raw_history_keeps_the_generated_text() -> None:
    cfg = ProtocolConfig(max_turns=2, answer_parse="last_block", history="raw")
    ep = Episode.start("p", 0, QUESTION, "18", cfg)
    _play(ep, ["<answer> 17 </answer>"], cfg)
    assert ep.messages[2]["content"] == "<answer> 17 </answer>"


def test_canonical_history_needs_the_reference_parse() -> None:
    with pytest.raises(ValueError, match="answer_parse: last_block set history: raw"):
        ProtocolConfig(answer_parse="last_block")


def test_unparseable_answer_is_kept_as_generated() -> None:
    cfg = ProtocolConfig(max_turns=2)
    ep = Episode.start("p", 0, QUESTION, "18", cfg)
    _play(ep, ["<answer>18 and more"], cfg)
    assert ep.messages[2]["content"] == "<answer>18 and more"


# -- the reference verifier on the issue's cases ------------------------------------------------


@pytest.mark.parametrize(
    ("content", "max_actions", "reference", "math"),
    [
        ("<answer>$18</answer>", 1, False, True),
        ("<answer>18.</answer>", 1, False, True),
        ("<answer>\\text{18}</answer>", 1, False, True),
        ("<answer>The total is <answer>18</answer>", 1, False, False),
        ("<answer>17 || 18</answer>", 5, True, True),
        ("<answer>17 || 18</answer>", 1, False, False),
        ("<answer>18<|im_end|></answer>", 1, True, True),
        ("<answer> 18 </answer>", 1, True, True),
    ],
    ids=["dollar", "period", "text", "nested", "two-actions-of-5", "two-actions-of-1", "im-end", "spaces"],
)
def test_reference_verifier_grades_the_issue_cases(
    content: str, max_actions: int, reference: bool, math: bool
) -> None:
    cfg = ProtocolConfig(max_actions=max_actions)
    assert grade_turn(content, "18", cfg, ReferenceVerifier()).correct is reference
    assert grade_turn(content, "18", cfg, VERIFIER).correct is math


def test_last_block_parse_with_math_reads_the_nested_answer() -> None:
    """drift's earlier reading (still available) counts the nested block right."""
    cfg = ProtocolConfig(answer_parse="last_block", history="raw")
    assert grade_turn("<answer>The total is <answer>18</answer>", "18", cfg, VERIFIER).correct


def test_reference_normal_forms_in_records() -> None:
    cfg = ProtocolConfig(max_actions=2)
    turn = grade_turn("<answer>The Answer || B </answer>", "b", cfg, ReferenceVerifier())
    assert (turn.answer, turn.normalized_answer, turn.correct) == ("The Answer||B", "theanswer||b", True)
    choice = grade_turn("<answer>It is (c)</answer>", "C", cfg, ReferenceVerifier(dataset="mmlu_pro"))
    assert (choice.normalized_answer, choice.correct) == ("c", True)


# -- feedback kinds (issue 30, item 6) ---------------------------------------------------------


def _episode_after(cfg: ProtocolConfig, gold: str, contents: list[str]) -> Episode:
    ep = Episode.start("p", 0, QUESTION, gold, cfg)
    for content in contents:
        ep.add_turn(content, grade_turn(content, gold, cfg, NumericVerifier()))
    return ep


def test_direction_feedback_says_larger_or_smaller() -> None:
    cfg = ProtocolConfig(max_turns=4, feedback={"kind": "direction"})
    ep = _episode_after(cfg, "42", ["<answer>17</answer>", "<answer>$50</answer>", "<answer>many</answer>"])
    feedback = [m["content"] for m in ep.messages if m["role"] == "user"][1:]
    assert feedback == [
        "Incorrect. The answer is larger.",
        "Incorrect. The answer is smaller.",
        "Incorrect. Please think again.",
    ]


def test_direction_feedback_reads_the_verifiers_number_and_falls_back() -> None:
    cfg = ProtocolConfig(max_turns=4, max_actions=2, feedback={"kind": "direction", "fallback": "Wrong."})
    ep = Episode.start("p", 0, QUESTION, "-3.5", cfg)
    reader = NumericVerifier(read="last_number")
    for content in ["<answer>1 + 2 = 3</answer>", "<answer>1 || 2</answer>", "no tags"]:
        ep.add_turn(content, grade_turn(content, "-3.5", cfg, reader))
    feedback = [m["content"] for m in ep.messages if m["role"] == "user"][1:]
    assert feedback == ["Incorrect. The answer is smaller.", "Wrong.", "Wrong."]


def test_direction_feedback_in_full_mode_is_the_state() -> None:
    cfg = ProtocolConfig(prompt_mode="full", max_turns=2, feedback={"kind": "direction"})
    ep = _episode_after(cfg, "42", ["<answer>17</answer>"])
    assert ep.messages[-1]["content"].startswith(
        "Reward:\n0.0\nTurn 2:\nState:\nIncorrect. The answer is larger.\n"
    )


def test_direction_feedback_refuses_a_gold_that_is_not_a_number() -> None:
    cfg = ProtocolConfig(feedback={"kind": "direction"})
    with pytest.raises(ValueError, match="gold 'x\\+1' of prompt 'p7' is not a number"):
        Episode.start("p7", 0, QUESTION, "x+1", cfg)


def test_callable_feedback_gets_answer_gold_and_turn() -> None:
    cfg = ProtocolConfig(max_turns=3, feedback={"kind": "callable", "function": "tests.feedback_fns:off_by"})
    ep = _episode_after(cfg, "42", ["<answer>40</answer>", "no tags"])
    assert [m["content"] for m in ep.messages if m["role"] == "user"][1:] == [
        "turn 1: off by 2",
        "turn 2: no answer",
    ]


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("tests.feedback_fns", "expected 'module:function'"),
        ("tests.no_such_module:f", "cannot import module 'tests.no_such_module'"),
        ("tests.feedback_fns:nope", "has no attribute 'nope'"),
        ("tests.feedback_fns:NOT_CALLABLE", "is not callable"),
        ("tests.feedback_fns:two_args", "must accept \\(answer, gold, turn\\)"),
    ],
)
def test_callable_feedback_is_checked_when_the_config_is_read(function: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProtocolConfig(feedback={"kind": "callable", "function": function})


def test_callable_feedback_must_return_text() -> None:
    cfg = ProtocolConfig(max_turns=2, feedback={"kind": "callable", "function": "tests.feedback_fns:silent"})
    with pytest.raises(ValueError, match="must return a non-empty string"):
        _episode_after(cfg, "42", ["<answer>40</answer>"])


def test_feedback_config_errors_name_the_rule() -> None:
    with pytest.raises(ValueError, match="kind callable needs function"):
        ProtocolConfig(feedback={"kind": "callable"})
    with pytest.raises(ValueError, match="function is set only with kind callable"):
        ProtocolConfig(feedback={"kind": "direction", "function": "tests.feedback_fns:off_by"})
    with pytest.raises(ValueError, match="empty feedback text"):
        ProtocolConfig(feedback="  ")


def test_feedback_kind_in_the_dump() -> None:
    """Fixed text dumps as before (cache keys unchanged at the default); a callable dumps its name
    and its source's hash, and the dump validates back (the grading pool's round trip)."""
    assert ProtocolConfig().model_dump()["feedback"] == "Incorrect. Please think again."
    dumped = ProtocolConfig(
        feedback={"kind": "callable", "function": "tests.feedback_fns:off_by"}
    ).model_dump()
    fb = dumped["feedback"]
    assert (fb["kind"], fb["function"], len(fb["source_sha256"])) == (
        "callable",
        "tests.feedback_fns:off_by",
        64,
    )
    assert ProtocolConfig.model_validate(dumped).model_dump() == dumped
