"""Rollout loop, engine and grading pool on the tiny model (real tokenizer, real generate)."""

from __future__ import annotations

import time

import pytest

from drift_core.schemas import (
    EngineConfig,
    ModelConfig,
    ProtocolConfig,
    RolloutConfig,
    SamplingConfig,
    VerifierConfig,
)
from tasks.engines import Engine, SamplingParams, get_engine
from tasks.engines.base import GenerationStopped, allow_generation, cut_at_stop, stop_generation
from tasks.grade import Grader
from tasks.rollout import records_to_frame, rollout_stats, run_episodes

pytestmark = pytest.mark.timeout(300)

DEMO_SYSTEM_PROMPT = "You are a calculator. Reply with only the final number, for example: <answer>7</answer>"
PROBLEMS = [
    {"prompt_id": "p0", "question": "What is 2 + 3?", "gold": "5"},
    {"prompt_id": "p1", "question": "What is 7 - 4?", "gold": "3"},
    {"prompt_id": "p2", "question": "What is 1 + 1?", "gold": "2"},
]


@pytest.fixture(scope="module")
def grader():
    g = Grader(ProtocolConfig(), VerifierConfig(workers=1, timeout_s=2.0))
    yield g
    g.close()


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return get_engine(str(tiny_model_dir), ModelConfig(path=str(tiny_model_dir)), EngineConfig(batch_size=4))


def test_cut_at_stop_keeps_the_earliest_stop():
    assert cut_at_stop("12</answer> more</answer>", ["</answer>"]) == ("12</answer>", True)
    assert cut_at_stop("no stop here", ["</answer>"]) == ("no stop here", False)


def test_engine_returns_n_completions_per_prompt_and_is_seeded(engine):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=5, stop=["</answer>"], seed=7)
    out1 = engine.generate(["a", "a longer prompt here"], params)
    out2 = engine.generate(["a", "a longer prompt here"], params)
    assert [len(o) for o in out1] == [3, 3]
    assert [[c.text for c in o] for o in out1] == [[c.text for c in o] for o in out2]
    assert all(1 <= c.n_tokens <= 5 for o in out1 for c in o)


@pytest.mark.parametrize("decoding", ["standard", "static"])
def test_a_stop_request_ends_generate_at_the_next_token(tiny_model_dir, decoding):
    """``stop_generation`` (the flow's answer to Ctrl-C / SIGTERM while shards generate) ends a
    running ``generate`` at its next decoding step and raises: the model's forward runs once more,
    not up to ``max_new_tokens`` times, and no truncated completion is returned as a result."""
    from tasks.engines.transformers_engine import TransformersEngine

    eng = TransformersEngine(
        str(tiny_model_dir),
        ModelConfig(path=str(tiny_model_dir)),
        EngineConfig(batch_size=4, decoding=decoding),
    )
    calls = 0
    forward = eng.model.forward

    def counting_forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:
            stop_generation()  # as if the signal arrived while the third step ran
        return forward(*args, **kwargs)

    eng.model.forward = counting_forward
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=200, seed=0)  # no stop strings, no EOS
    try:
        with pytest.raises(GenerationStopped):
            eng.generate(["What is 2 + 3?"], params)
        assert calls == 3, calls  # the step that saw the request was the last
        with pytest.raises(GenerationStopped):  # a later call in this process does not start either
            eng.generate(["x"], params)
        assert calls == 3
    finally:
        allow_generation()
    eng.model.forward = forward
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=4)
    assert len(eng.generate(["x"], params)[0]) == 1  # allowed again: generates as before


def test_greedy_is_deterministic_across_batch_sizes(tiny_model_dir, engine):
    from tasks.engines.transformers_engine import TransformersEngine

    other = TransformersEngine(
        str(tiny_model_dir), ModelConfig(path=str(tiny_model_dir)), EngineConfig(batch_size=1)
    )
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
    prompts = ["What is 2 + 3?", "x"]
    a = [o[0].text for o in other.generate(prompts, params)]
    engine_b = get_engine(
        str(tiny_model_dir), ModelConfig(path=str(tiny_model_dir)), EngineConfig(batch_size=4)
    )
    b = [o[0].text for o in engine_b.generate(prompts, params)]
    assert a == b


def test_run_episodes_gives_k_trajectories_that_follow_the_protocol(engine, grader):
    protocol = ProtocolConfig(max_turns=3)
    records = run_episodes(
        engine,
        engine.tokenizer,
        PROBLEMS,
        protocol,
        SamplingConfig(max_new_tokens=4),
        k=2,
        max_turns=3,
        grader=grader,
        seed=0,
    )
    assert [(r.prompt_id, r.traj_idx) for r in records] == [
        (p["prompt_id"], j) for p in PROBLEMS for j in range(2)
    ]
    for r in records:
        assert 1 <= r.n_turns <= 3
        roles = [m.role for m in r.messages]
        assert roles[:2] == ["system", "user"] and roles[-1] == "assistant"
        assert roles.count("assistant") == r.n_turns
        # feedback text sits between consecutive answers
        feedback = [m.content for m in r.messages[2:] if m.role == "user"]
        assert feedback == [protocol.feedback] * (r.n_turns - 1)
        assert all(m.content.startswith("<answer>") for m in r.messages if m.role == "assistant")
        assert r.solved == any(r.turn_correct)
        if not r.solved:
            assert r.n_turns == 3  # a random model never answers correctly here: it uses every turn
    df = records_to_frame(records)
    stats = rollout_stats(df, 3)
    assert stats["trajectories"] == 6 and stats["generated_tokens"] > 0


class _RecordingEngine(Engine):
    """The tiny engine, recording the sampling parameters of each call (one call per turn)."""

    def __init__(self, engine):
        self.engine, self.tokenizer, self.calls = engine, engine.tokenizer, []

    def generate(self, prompts, params):
        self.calls.append(params)
        return self.engine.generate(prompts, params)


def test_feedback_temperature_samples_the_turns_after_feedback(engine, grader):
    recording = _RecordingEngine(engine)
    sampling = SamplingConfig(temperature=0.5, feedback_temperature=1.5, max_new_tokens=4)
    records = run_episodes(
        recording, engine.tokenizer, PROBLEMS, ProtocolConfig(max_turns=3), sampling, 2, 3, grader, seed=0
    )
    assert all(r.n_turns == 3 for r in records)  # a random model: every trajectory reaches turn 3
    assert [(p.n, p.temperature) for p in recording.calls] == [(2, 0.5), (1, 1.5), (1, 1.5)]

    plain = _RecordingEngine(engine)
    again = _two_per_problem_three_turns(plain, engine.tokenizer, grader)
    assert [p.temperature for p in plain.calls] == [0.5, 0.5, 0.5]

    def replies(rs, turn: int) -> list[str]:
        return [[m.content for m in r.messages if m.role == "assistant"][turn] for r in rs]

    # turn 1 is the same draw either way (same temperature, same seed): the same text, token for
    # token (the random model never closes the tag, so its parsed answers are all None); the retries
    # are drawn at the other temperature, so their texts differ
    assert all(len(text) > len("<answer>") for text in replies(records, 0))
    assert replies(again, 0) == replies(records, 0)
    for turn in (1, 2):
        assert sum(a != b for a, b in zip(replies(again, turn), replies(records, turn), strict=True)) >= 1


def test_unset_feedback_temperature_keeps_existing_rollout_keys():
    """A rollout key made before ``feedback_temperature`` existed (sampling dumped as these three
    fields) still matches, so adding the setting re-made nobody's cached rollouts; setting it changes
    the key."""
    from tasks.caching import result_fields, stage_key

    before = {"k": 8, "sampling": {"temperature": 0.5, "top_p": 1.0, "max_new_tokens": 16}, "seed": 0}
    now = RolloutConfig(k=8, sampling=SamplingConfig(temperature=0.5, max_new_tokens=16))
    assert stage_key("rollout", rollout=result_fields(now)) == stage_key("rollout", rollout=before)
    hotter = now.model_copy(
        update={"sampling": now.sampling.model_copy(update={"feedback_temperature": 1.0})}
    )
    assert stage_key("rollout", rollout=result_fields(hotter)) != stage_key("rollout", rollout=before)
    assert RolloutConfig.model_validate(hotter.model_dump()).sampling.feedback_temperature == 1.0


def test_grader_grades_in_order_with_the_gold(grader):
    items = [("<answer>5</answer>", "5", 3), ("<answer>4</answer>", "5", 3), ("no tags", "5", 2)]
    results = grader.grade(items)
    assert [r.correct for r in results] == [True, False, False]
    assert [r.valid for r in results] == [True, True, False]
    assert results[2].format_penalty == pytest.approx(-0.1)


def test_a_pathological_answer_cannot_stall_grading(grader):
    items = [("<answer>9^{9^{9^{9^{9}}}}</answer>", "1", 1), ("<answer>2</answer>", "2", 1)]
    start = time.perf_counter()
    results = grader.grade(items)
    assert time.perf_counter() - start < 15
    assert results[0].correct is False and results[1].correct is True


@pytest.mark.slow
@pytest.mark.timeout(600)  # the 135M model on a CPU: 157 s measured with other jobs on the 2 cores
def test_real_smollm2_answers_in_the_protocol_format(smollm2_dir, grader):
    """The real SmolLM2-135M-Instruct (bundled GGUF, de-quantised to safetensors) plays the
    protocol: with <answer> pre-filled it closes the tag, and the verifier reads its answers."""
    from tasks.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(
        str(smollm2_dir), ModelConfig(path=str(smollm2_dir)), EngineConfig(batch_size=8)
    )
    records = run_episodes(
        engine,
        engine.tokenizer,
        PROBLEMS,
        # the reference's prompt alone rarely gets the 135M model to close the tag within 16 tokens
        # (1 of 12 turns, seed 0); the demo's calculator system prompt does (3 of the 6 first turns)
        ProtocolConfig(max_turns=2, system_prompt=DEMO_SYSTEM_PROMPT),
        SamplingConfig(max_new_tokens=16),
        k=2,
        max_turns=2,
        grader=grader,
        seed=0,
    )
    assert len(records) == 6
    # An answer is read from a turn only when the model closed the pre-filled tag within 16 tokens.
    # Measured (seed 0, CPU): 3 of the 12 turns; the 135M model often rambles past 16 tokens.
    answered = [a for r in records for a in r.answers if a is not None]
    assert len(answered) >= 2, [r.answers for r in records]
    for r in records:  # per turn, read here from the message text: the answer is what the tags hold
        replies = [m.content for m in r.messages if m.role == "assistant"]
        assert len(replies) == r.n_turns == len(r.answers) == len(r.turn_valid)
        for reply, answer, valid, correct in zip(
            replies, r.answers, r.turn_valid, r.turn_correct, strict=True
        ):
            closed = reply.startswith("<answer>") and "</answer>" in reply
            body = reply[len("<answer>") : reply.find("</answer>")].strip() if closed else ""
            assert answer == (body or None), (reply, answer)
            assert valid == (answer is not None), (reply, valid)  # valid exactly when an answer was read
            assert not correct or valid
    penalties = [sum(-0.1 for v in r.turn_valid if not v) for r in records]  # the protocol's default
    assert [r.format_penalty for r in records] == pytest.approx(penalties)


def test_progress_counts_finished_trajectories(engine, grader):
    """The rollout bar's total is K x problems: progress reports trajectories as they finish (all
    at turn 3 for a random model), not turns, so the bar ends at its total."""
    done: list[int] = []
    _two_per_problem_three_turns(engine, engine.tokenizer, grader, progress=done.append)
    assert done == [0, 0, 2 * len(PROBLEMS)]


def _two_per_problem_three_turns(engine, tokenizer, grader, **kwargs):
    """K = 2 trajectories of up to 3 turns per problem, sampled at 0.5 with 4 new tokens a turn."""
    return run_episodes(
        engine,
        tokenizer,
        PROBLEMS,
        ProtocolConfig(max_turns=3),
        SamplingConfig(temperature=0.5, max_new_tokens=4),
        2,
        3,
        grader,
        seed=0,
        **kwargs,
    )
