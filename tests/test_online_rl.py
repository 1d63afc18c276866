"""The online multi-turn RL baseline (``drift online``, TRL GRPO) on the tiny model: two GRPO steps
with 2 prompts x 2 generations, then checks that stand outside the code under test:

* the completion TRL trained on is the protocol's conversation, token for token, with the model's
  turns unmasked and the template/feedback tokens between them masked;
* the rewards TRL logged equal drift_core's returns of the sampled trajectories, re-graded here
  from the stored messages and the dataset's golds;
* the MLflow parent run, its params and per-step metrics exist; the model directory loads;
* a run interrupted after its first checkpoint resumes from it and counts its costs once.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from drift_core.protocol import Episode, grade_turn, initial_messages
from drift_core.verify import make_verifier
from flows.config import load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)  # two GRPO runs of two steps: about a minute each on 2 busy cores


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One thread: on a shared 2-core box two spinning OpenMP threads make the tiny model's
    generate several times slower (as in test_train)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _config(tmp_path: Path, *extra: str):
    return load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"online.output_dir={tmp_path}/online",
            "data.arith.n=2",
            "verifier.workers=1",
            "online.prompts_per_step=2",
            "online.num_generations=2",
            "online.micro_batch_size=2",
            "online.max_steps=2",
            "online.save_steps=1",
            "online.learning_rate=1e-4",
            *extra,
        ],
    )


def _records(out: Path) -> dict[int, list[dict]]:
    steps = {}
    for file in sorted((out / "rollouts").glob("step-*.jsonl")):
        rows = [json.loads(line) for line in file.read_text().splitlines() if line]
        steps[rows[0]["step"]] = rows
    return steps


def _segments(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) runs of the env mask."""
    runs: list[tuple[int, int, int]] = []
    for i, m in enumerate(mask):
        if runs and runs[-1][0] == m:
            runs[-1] = (m, runs[-1][1], i + 1)
        else:
            runs.append((m, i, i + 1))
    return runs


def _check_tokens(rec: dict, tokenizer, cfg) -> bool:
    """Masks and token layout of one trajectory; returns whether the exact-text check applied.

    A turn whose text the episode re-rendered before another turn (``rewritten_turns``) is in the
    sequence as its re-rendered message (masked), not as its sampled tokens."""
    ids, mask = rec["completion_ids"], rec["env_mask"]
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    rewritten = rec["rewritten_turns"]
    kept = [t for t in range(1, rec["n_turns"] + 1) if t not in rewritten]
    assert rec["n_turns"] not in rewritten, "the last turn is never re-rendered: nothing follows it"
    assert [len(s) for s in rec["sampled_ids"]] == rec["gen_tokens"]
    runs = _segments(mask)
    model_runs = [(s, e) for m, s, e in runs if m == 1]
    gaps = [(s, e) for m, s, e in runs if m == 0]
    assert runs[0][0] == (0 if 1 in rewritten else 1), "a completion starts with the model's first turn"
    assert len(model_runs) == len(kept), (len(model_runs), kept)
    assert [ids[s:e] for s, e in model_runs] == [rec["sampled_ids"][t - 1] for t in kept]
    assert sum(mask) == sum(rec["gen_tokens"][t - 1] for t in kept)
    assistant = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
    feedback = [m["content"] for m in rec["messages"][2:] if m["role"] == "user"]
    assert len(feedback) == rec["n_turns"] - 1
    for t, (s, e) in zip(kept[:-1], model_runs, strict=False):  # a kept turn before the last: as sampled
        text = tokenizer.decode(ids[s:e], skip_special_tokens=False).removesuffix("<|im_end|>")
        assert assistant[t - 1] == "<answer>" + text, (assistant[t - 1], text)
    gap_text = "".join(tokenizer.decode(ids[s:e], skip_special_tokens=False) for s, e in gaps)
    assert gap_text.endswith("<|im_end|>") and all(gap_text.count(f) >= 1 for f in feedback), gap_text
    assert gap_text.count("<|im_start|>assistant\n<answer>") == rec["n_turns"] - 1, gap_text
    last = rec["sampled_ids"][-1]
    last_text = tokenizer.decode(
        last[:-1] if last[-1] == tokenizer.eos_token_id else last, skip_special_tokens=False
    )
    if assistant[-1] != "<answer>" + last_text:
        return False  # the last message is re-rendered (special token, spaces): the sequence holds the sample
    rendered = tokenizer.apply_chat_template(rec["messages"], tokenize=False)
    decoded = tokenizer.decode(rec["prompt_ids"] + ids, skip_special_tokens=False)
    assert rendered in (decoded, decoded + "\n"), (rendered, decoded)
    return True


def _independent_returns(rows: list[dict], golds: dict[str, str], cfg) -> list[float]:
    """Re-grade every stored assistant message against the dataset's gold (the protocol's grading,
    not the online code's), then the return written out by hand (docs/method.md#return):
    sum_t gamma^(t-1) correct_t + format penalties - lambda * (1 - distinct answers / answers given),
    a turn without a parsed answer counting in neither."""
    from tasks.golds import check_golds

    table = pl.DataFrame({"prompt_id": list(golds), "gold": list(golds.values())})
    verifier = make_verifier(check_golds(table, cfg.data, cfg.verifier, ""))  # the run's verifier kind
    gamma, lam = cfg.weights.gamma, cfg.weights.repetition_lambda
    returns = []
    for rec in rows:
        episode = Episode.start(rec["prompt_id"], 0, "-", golds[rec["prompt_id"]], cfg.protocol)
        for message in (m for m in rec["messages"] if m["role"] == "assistant"):
            assert episode.is_open(), "a turn after the episode should have stopped"
            episode.add_turn(
                message["content"], grade_turn(message["content"], episode.gold, cfg.protocol, verifier)
            )
        assert not episode.is_open(), "the episode stopped before it was solved or out of turns"
        r = episode.to_record(gen_seconds=0.0)
        discounted = sum(gamma**t for t, correct in enumerate(r.turn_correct) if correct)
        given = [a for a in r.normalized_answers if a is not None]
        repetition = lam * (1 - len(set(given)) / len(given)) if given else 0.0
        returns.append(discounted + r.format_penalty - repetition)
    return returns


def _check_logprobs(rows: list[dict], model, temperature: float) -> None:
    """The log-probabilities handed to TRL are those of the sampled tokens under the policy that
    sampled them (softmax of logits / temperature), recomputed here with one plain forward pass."""
    import torch

    for rec in rows:
        ids = torch.tensor([rec["prompt_ids"] + rec["completion_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float() / temperature
        start = len(rec["prompt_ids"])
        logps = torch.log_softmax(logits[start - 1 : -1], dim=-1)
        expected = logps.gather(-1, ids[0, start:].unsqueeze(-1)).squeeze(-1).tolist()
        for k, m in enumerate(rec["env_mask"]):
            assert rec["logprobs"][k] == (pytest.approx(expected[k], abs=1e-3) if m else 0.0)


def test_online_grpo_smoke(tmp_path):
    from mlflow.tracking import MlflowClient

    from tasks.ingest import load_problems
    from tasks.models import load_model, load_tokenizer, resolve_model
    from tasks.online_rl import train_online

    cfg = _config(tmp_path)
    initial = load_model(resolve_model(cfg.train_model))  # the policy that sampled step 1
    result = train_online(cfg, base_dir=ROOT)
    out = Path(result.output_dir)
    assert result.optimizer_steps == 2 and not result.cached and result.resumed_from is None
    assert not list(out.glob("checkpoint-*")), "a finished run replaces its checkpoints by the model"

    # the model directory is what `drift eval --model DIR` loads
    tokenizer = load_tokenizer(result.model_dir)
    model = load_model(result.model_dir)
    assert model.config.num_hidden_layers == 2 and (Path(result.model_dir) / "model.safetensors").exists()

    steps = _records(out)
    assert sorted(steps) == [1, 2] and all(len(rows) == 4 for rows in steps.values())
    exact = [_check_tokens(rec, tokenizer, cfg) for rows in steps.values() for rec in rows]
    assert sum(exact) >= len(exact) // 2
    assert result.generated_tokens == sum(sum(r["gen_tokens"]) for rows in steps.values() for r in rows)
    _check_logprobs(steps[1], initial, cfg.rollout.sampling.temperature)
    assert any(r["n_turns"] > 1 for rows in steps.values() for r in rows), "no multi-turn episode sampled"

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == cfg.run.experiment
    assert run.data.params["online.num_generations"] == "2" and run.data.params["weights.gamma"] == "0.9"
    assert run.data.tags["drift.model_dir"] == result.model_dir
    for name in ("loss", "generated_tokens", "wall_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)][:2] == [1, 2], name
    assert run.data.metrics["optimizer_steps"] == 2
    assert run.data.metrics["generated_tokens"] == result.generated_tokens

    df, _ = load_problems(cfg.data, ROOT)
    golds = dict(zip(df["prompt_id"].to_list(), df["gold"].to_list(), strict=True))
    logged = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "rewards/drift_return/mean")
    }
    for step, rows in steps.items():
        expected = _independent_returns(rows, golds, cfg)
        assert [r["drift_return"] for r in rows] == pytest.approx(expected, abs=1e-9)
        assert logged[step] == pytest.approx(sum(expected) / len(expected), abs=1e-5)

    again = train_online(cfg, base_dir=ROOT)  # the same command again: the finished result, no training
    assert again.cached and again.model_dump(exclude={"cached"}) == result.model_dump(exclude={"cached"})


def test_online_grpo_resumes_after_interruption(tmp_path):
    from mlflow.tracking import MlflowClient
    from transformers import TrainerCallback

    from tasks.online_rl import train_online

    class Interrupted(Exception):
        pass

    class StopAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise Interrupted(f"stopped after checkpoint-{state.global_step}")

    cfg = _config(tmp_path, "protocol.max_turns=1")
    with pytest.raises(Interrupted):
        train_online(cfg, base_dir=ROOT, callbacks=[StopAfterFirstCheckpoint()])
    result = train_online(cfg, base_dir=ROOT)
    assert result.resumed_from is not None and result.resumed_from.endswith("checkpoint-1")
    assert result.optimizer_steps == 2
    steps = _records(Path(result.output_dir))
    # step 1 was sampled by the first attempt, step 2 by the resumed one; each is counted once
    assert sorted(steps) == [1, 2]
    assert result.generated_tokens == sum(sum(r["gen_tokens"]) for rows in steps.values() for r in rows)

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs(
        [client.get_run(result.mlflow_run_id).info.experiment_id], order_by=["attributes.start_time ASC"]
    )
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    assert runs[1].data.params["online.resumed_from"] == result.resumed_from
    assert [m.step for m in client.get_metric_history(runs[1].info.run_id, "loss")] == [2]


def test_online_refuses_a_feedback_temperature_it_cannot_score(tmp_path):
    """TRL scores every completion token under one temperature (GRPOConfig.temperature): a hotter
    retry temperature would make its importance ratios wrong, so `drift online` stops, naming both
    keys, before any model is loaded or any directory written."""
    from tasks.online_rl import train_online

    cfg = _config(tmp_path, "rollout.sampling.temperature=0.7", "rollout.sampling.feedback_temperature=1.2")
    with pytest.raises(
        ValueError, match=r"feedback_temperature=1.2 differs from rollout.sampling.temperature=0.7"
    ):
        train_online(cfg, base_dir=ROOT)
    assert not (tmp_path / "online").exists()


def test_online_run_directory_is_keyed_by_what_changes_the_training(tmp_path):
    """A re-run of the same command finds its run directory (resumes or returns the finished
    result); a change of anything that changes what is trained, the reward's gamma and
    repetition_lambda included, gets a directory of its own; worker counts and beta (not part of
    the online reward) do not."""
    from tasks.online_rl import run_dir

    base = run_dir(_config(tmp_path), "sha256:model-a")
    assert base == run_dir(_config(tmp_path), "sha256:model-a")
    assert base.parent == (tmp_path / "online").resolve() and base.name.startswith("tiny-"), base
    assert run_dir(_config(tmp_path), "sha256:model-b") != base
    changed = [
        "weights.repetition_lambda=0.25",
        "weights.gamma=0.5",
        "rollout.sampling.temperature=0.7",
        "protocol.max_turns=3",
        "data.arith.seed=1",
        "online.learning_rate=2e-4",
        "online.num_generations=4",
    ]
    dirs = [run_dir(_config(tmp_path, change), "sha256:model-a") for change in changed]
    assert base not in dirs and len(set(dirs)) == len(changed), dict(zip(changed, dirs, strict=True))
    for same in ("verifier.workers=2", "weights.beta=0.5"):
        assert run_dir(_config(tmp_path, same), "sha256:model-a") == base, same


# ------------------------------------------------------------------------------------------
# The history later turns are conditioned on: the episode's (canonical answers, configured feedback)
# ------------------------------------------------------------------------------------------

DIRECTION = "protocol.feedback={kind: direction}"


def _rollout(cfg, grader=None):
    from tasks.models import load_tokenizer, resolve_model
    from tasks.online_rl import ProtocolRollout

    tokenizer = load_tokenizer(resolve_model(cfg.train_model))
    return ProtocolRollout(
        tokenizer, {}, cfg.protocol, cfg.rollout.sampling, cfg.weights, 3, 4, grader, 8, seed=0
    )


@pytest.mark.parametrize(
    ("sampled", "kept", "inserted"),
    [
        # sampled as the episode keeps it: the model's tokens stay, then the template and the feedback
        ("5</answer>", True, "<|im_end|>\n<|im_start|>user\nIncorrect. The answer is larger.<|im_end|>\n"),
        # re-rendered by the episode (<answer> 5 </answer> -> <answer>5</answer>): the kept message instead
        (
            " 5 </answer>",
            False,
            "5</answer><|im_end|>\n<|im_start|>user\nIncorrect. The answer is larger.<|im_end|>\n",
        ),
    ],
)
def test_next_turn_is_conditioned_on_the_episodes_history(tmp_path, sampled, kept, inserted):
    """After a wrong "5" to gold 7 under direction feedback the next turn sees the episode's history:
    "<answer>5</answer>", then "Incorrect. The answer is larger." (7 > 5), then the next prompt."""
    from drift_core.multiturn import TokenEpisode
    from drift_core.protocol import Episode, grade_turn
    from drift_core.verify import make_verifier

    cfg = _config(tmp_path, DIRECTION)
    rollout = _rollout(cfg)
    tok = rollout.tokenizer
    episode = Episode.start("p", 0, "3 + 4 = ?", "7", cfg.protocol, max_turns=3)
    context = rollout.render(episode.messages, open_turn=True)
    tokens = TokenEpisode(prompt_ids=rollout.encode(context))
    ids = tok(sampled, add_special_tokens=False)["input_ids"]
    content = "<answer>" + sampled
    episode.add_turn(content, grade_turn(content, "7", cfg.protocol, make_verifier(cfg.verifier)))
    assert episode.messages[-2:] == [
        {"role": "assistant", "content": "<answer>5</answer>"},
        {"role": "user", "content": "Incorrect. The answer is larger."},
    ]
    text, was_kept = rollout.continue_history(
        tokens, context, ids, [-0.5] * len(ids), episode, {tok.eos_token_id}, "p"
    )
    assert was_kept is kept
    completion = tok.decode(tokens.completion_ids, skip_special_tokens=False)
    expected = (sampled if kept else "") + inserted + "<|im_start|>assistant\n<answer>"
    assert completion == expected
    assert tokens.env_mask == [1] * len(ids) * kept + [0] * (len(tokens.completion_ids) - len(ids) * kept)
    assert tokens.logprobs[: len(ids) * kept] == [-0.5] * len(ids) * kept
    assert text == context + expected == rollout.render(episode.messages, open_turn=True)


def test_online_episodes_carry_direction_feedback(tmp_path):
    """One step of episodes played by the real tiny policy under direction feedback (no training):
    after every wrong turn the sequence the next turn is sampled from holds the feedback worked out
    here by hand from the turn's answer and the gold (larger when the gold is larger)."""
    from tasks.grade import Grader
    from tasks.ingest import load_problems
    from tasks.models import load_model, resolve_model
    from tasks.online_rl import Problem, problem_index

    cfg = _config(tmp_path, DIRECTION, "protocol.max_turns=3", "data.arith.n=4")
    df, _ = load_problems(cfg.data, ROOT)
    problems = [Problem(r["prompt_id"], r["question"], r["gold"]) for r in df.iter_rows(named=True)]
    model = load_model(resolve_model(cfg.train_model))
    with Grader(cfg.protocol, cfg.verifier) as grader:
        rollout = _rollout(cfg, grader)
        rollout.problems = problem_index(problems, cfg.protocol)
        rollout.log_dir = tmp_path / "rollouts"
        prompts = [initial_messages(p.question, cfg.protocol) for p in problems for _ in range(4)]
        out = rollout.play(model, prompts, step=1)
    rows = _records(tmp_path)[1]
    assert len(rows) == 16 and out["n_turns"] == [r["n_turns"] for r in rows]
    directed = 0
    for rec, prompt_ids, completion in zip(rows, out["prompt_ids"], out["completion_ids"], strict=True):
        gold = int(dict(zip(df["prompt_id"], df["gold"], strict=True))[rec["prompt_id"]])
        decoded = rollout.tokenizer.decode(completion, skip_special_tokens=False)
        at = 0
        for answer in rec["answers"][:-1]:  # every turn but the last was wrong and got feedback
            try:
                value = int(answer)
            except (TypeError, ValueError):
                value = None
            if value is None or value == gold:
                expected = "Incorrect. Please think again."
            else:
                expected = (
                    "Incorrect. The answer is larger."
                    if gold > value
                    else "Incorrect. The answer is smaller."
                )
                directed += 1
            block = f"<|im_start|>user\n{expected}<|im_end|>\n<|im_start|>assistant\n<answer>"
            found = decoded.find(block, at)
            assert found >= 0, (expected, decoded)
            at = found + len(block)
        assert "Please think again" in decoded or "The answer is" in decoded or rec["n_turns"] == 1
        assert rec["prompt_ids"] == prompt_ids
    assert directed >= 3, "too few wrong numeric answers to check the direction"


@pytest.mark.parametrize("stop", ["答案", "</answer>"])
def test_online_sampler_stops_at_the_token_completing_a_stop_string(smol_tokenizer, stop):
    """The online sampler's stop check is the rollout engine's (``StopOnStrings``, a window in
    bytes): a CJK stop string spread over one byte-level token per byte (答案: 6 bytes, more tokens
    than characters) still ends the row at the token that completes it, after a prompt ending in
    the stop string's first half (which is not the reply), and ``kept_length`` keeps up to there."""
    import torch

    from tasks.online.sampling import _stop_criteria, kept_length

    tok = smol_tokenizer
    prompt = tok("Say it: " + stop[: len(stop) // 2], add_special_tokens=False)["input_ids"]
    byte_tokens = [i for ch in stop for i in tok(ch, add_special_tokens=False)["input_ids"]]
    assert len(byte_tokens) > len(stop) + 1 or stop.isascii()  # longer than a window in characters
    filler = tok(" x 7", add_special_tokens=False)["input_ids"]
    generated = filler + byte_tokens + filler
    criteria = _stop_criteria(tok, [stop], len(prompt))

    def stops_at(t: int) -> bool:
        return bool(criteria(torch.tensor([prompt + generated[:t]]), None)[0])

    completes = len(filler) + len(byte_tokens)
    assert [t for t in range(1, len(generated) + 1) if stops_at(t)][0] == completes
    assert not stops_at(len(filler))  # the prompt's half does not count

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    assert kept_length(generated, {tok.eos_token_id}, [stop], decode) == completes
