"""The online multi-turn RL baseline: TRL's ``GRPOTrainer`` playing drift's protocol (``drift online``).

DRIFT's claim is that offline rollouts from a fixed reference plus weighted SFT match online
multi-turn RL at a fraction of its cost. This module is that online RL, run from the same config:
the same prompts (``data``), protocol (``drift_core.protocol``: prompt, pre-fill, stop string,
the configured feedback after a wrong answer, stop at the first correct answer, ``max_turns``),
verifier and grader (``tasks.grade``), sampling settings (``rollout.sampling``) and reward (``drift_core.returns.trajectory_return`` with ``weights.gamma`` and
``weights.repetition_lambda``). Only the learning differs: the current policy generates, GRPO
updates it.

TRL plays multi-turn episodes through ``rollout_func(prompts, trainer)`` (experimental in TRL; the
version is pinned in pyproject's ``online`` extra). Contract, as TRL 1.16's ``GRPOTrainer`` reads
it (``_generate`` and ``_generate_and_score_completions``): ``prompts`` holds this process's rows
with each prompt already repeated ``num_generations`` times in a row (the trainer's
``RepeatSampler``), and the function returns one completion per row: ``prompt_ids``,
``completion_ids``, ``logprobs`` (one per completion token), and ``env_mask`` (1 = sampled by the
model, 0 = inserted; multiplied into the loss mask). Every other key reaches the reward functions
as a keyword argument: ``drift_return`` carries each trajectory's return.

Which history later turns see. Rollout and evaluation condition every turn on the episode's
messages: each answer in ``protocol.history``'s form (canonical: the reference's re-rendering,
``<answer> 18 </answer>`` kept as ``<answer>18</answer>``) and the feedback ``Episode.add_turn``
computed (fixed text, ``direction`` or a callable). GRPO needs one token sequence per episode in
which every trained token follows exactly the tokens it was sampled after, and the sampled tokens
with their own log-probabilities. Both hold at once except when the episode re-renders an answer
that another turn follows: then the sequence cannot hold both the sampled tokens and the message
the next turn must see. drift keeps the history (the next turn is sampled after the re-rendered
message, as in rollout and evaluation; the message enters as environment tokens, ``env_mask`` 0)
and leaves that one turn untrained (its sampled tokens are logged, ``sampled_ids``, and counted in
the costs; ``rewritten_turns`` names them; the share is logged as ``episode/rewritten_turns``).
The alternative, conditioning later turns on the raw sampled tokens, trains a policy on
histories that evaluation never shows it. The last turn is always trained as sampled: nothing is
conditioned on it. On the tiny model 1 turn in about 95 is re-rendered.

Cost figures, the comparison's other half: generated tokens (every token the policy sampled),
optimizer steps and wall seconds; they survive a resume through a file in each checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from drift_core.multiturn import TokenEpisode, template_gap
from drift_core.protocol import Episode, generation_prefill, initial_messages, stop_strings
from drift_core.returns import trajectory_return
from drift_core.schemas import DriftConfig, ProtocolConfig, SamplingConfig, WeightsConfig
from tasks.engines.transformers_engine import eos_ids

if TYPE_CHECKING:
    from trl import GRPOConfig

log = logging.getLogger(__name__)

TRL_VERSION_TESTED = "1.16.0"
COSTS_FILE = "drift_online_costs.json"
RESULT_FILE = "result.json"
MODEL_DIR = "model"
ROLLOUTS_DIR = "rollouts"


class OnlineResult(BaseModel):
    """What ``drift online`` prints last (one JSON line) and writes to ``result.json``."""

    model_dir: str
    generated_tokens: int
    optimizer_steps: int
    wall_s: float
    mlflow_run_id: str
    output_dir: str
    resumed_from: str | None = None
    cached: bool = False


@dataclass(frozen=True)
class Problem:
    prompt_id: str
    question: str
    gold: str


def prompt_key(messages: list[dict[str, str]]) -> str:
    """The key that finds a problem from the prompt TRL hands back (its chat messages)."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def problem_index(problems: list[Problem], protocol: ProtocolConfig) -> dict[str, Problem]:
    """Prompt key -> problem. ``rollout_func`` sees only prompts, so two problems with the same
    question text but different golds could not be told apart: that is an error here."""
    index: dict[str, Problem] = {}
    for p in problems:
        key = prompt_key(initial_messages(p.question, protocol))
        seen = index.get(key)
        if seen is not None and seen.gold != p.gold:
            raise ValueError(
                f"problems {seen.prompt_id!r} and {p.prompt_id!r} have the same question but different "
                f"golds ({seen.gold!r} vs {p.gold!r}); online RL finds a problem by its prompt text"
            )
        index.setdefault(key, p)
    return index


# ------------------------------------------------------------------------------------------
# Generation: one turn for many episodes, token ids in, token ids and log-probabilities out
# ------------------------------------------------------------------------------------------


def kept_length(row: list[int], eos: set[int], stop: list[str], decode: Callable[[list[int]], str]) -> int:
    """How many generated tokens belong to the turn: up to the token that completes a stop string,
    or up to and including an end-of-turn token the model sampled, or all (cut off by length).
    Positions after a finished sequence hold padding (which may be the EOS id itself)."""
    n = next((k for k, tok in enumerate(row) if tok in eos), len(row))
    if stop and any(s in decode(row[:n]) for s in stop):
        k = n
        while k > 1 and any(s in decode(row[: k - 1]) for s in stop):
            k -= 1
        return k
    return n + 1 if n < len(row) else n


def _stop_criteria(tokenizer, stop: list[str], start: int):
    """Stop a row once its generated text contains a stop string. Checks only the last few tokens
    (every token is at least one character), so it costs a short decode per row and step, where
    transformers' ``stop_strings`` pre-processes the whole vocabulary on every ``generate`` call."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    window = max(len(s) for s in stop) + 1

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            tail = input_ids[:, max(start, input_ids.shape[1] - window) :].tolist()
            done = [any(s in tokenizer.decode(row, skip_special_tokens=False) for s in stop) for row in tail]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopOnText()])


def _logprob_recorder(temperature: float):
    """A logits processor that records log p(sampled token) under softmax(logits / temperature)
    while holding one step's [batch, vocab] at a time (``output_logits`` would keep every step's):
    the token sampled at step k is the last column of ``input_ids`` when step k+1 is processed, and
    ``finish`` takes the last step's from the returned sequences. It sees the logits after the
    model's own default processors and before temperature/top-p, which it applies itself (the
    temperature) or leaves out (top-p), as TRL does when it scores the same tokens."""
    import torch
    from transformers import LogitsProcessor

    class RecordSampledLogprobs(LogitsProcessor):
        def __init__(self):
            self.previous = None
            self.steps: list = []

        def __call__(self, input_ids, scores):
            if self.previous is not None:
                self.steps.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
            self.previous = torch.log_softmax(scores.float() / temperature, dim=-1)
            return scores

        def finish(self, sequences):
            if self.previous is not None:
                self.steps.append(self.previous.gather(-1, sequences[:, -1:]).squeeze(-1))
                self.previous = None
            return (
                torch.stack(self.steps, dim=1) if self.steps else sequences.new_zeros((sequences.shape[0], 0))
            )

    return RecordSampledLogprobs()


def sample_turn(
    model,
    tokenizer,
    contexts: list[list[int]],
    sampling: SamplingConfig,
    stop: list[str],
    batch_size: int,
    seed: int,
) -> list[tuple[list[int], list[float]]]:
    """Sample one turn for each context (token ids); returns the kept tokens of each and their
    log-probabilities under the sampling distribution (softmax of logits / temperature), in the
    order of ``contexts``. Batches by length with left padding, like the rollout engine."""
    import torch
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    eos = eos_ids(model, tokenizer)
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]), reverse=True)
    out: list[tuple[list[int], list[float]] | None] = [None] * len(contexts)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for b, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start : start + batch_size]
            width = max(len(contexts[i]) for i in idx)
            input_ids = torch.tensor(
                [[pad] * (width - len(contexts[i])) + contexts[i] for i in idx], device=device
            )
            attention = torch.tensor(
                [[0] * (width - len(contexts[i])) + [1] * len(contexts[i]) for i in idx], device=device
            )
            torch.manual_seed(seed * 7919 + b)
            recorder = _logprob_recorder(sampling.temperature)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=pad,
                stopping_criteria=_stop_criteria(tokenizer, stop, width) if stop else None,
                logits_processor=LogitsProcessorList([recorder]),
            )
            new = generated[:, width:]
            logps = recorder.finish(generated)
            if logps.shape != new.shape:
                raise RuntimeError(
                    f"recorded {tuple(logps.shape)} log-probabilities for {tuple(new.shape)} tokens"
                )
            for row, i in enumerate(idx):
                ids = new[row].tolist()
                n = kept_length(ids, eos, stop, decode)
                out[i] = (ids[:n], logps[row, :n].tolist())
    return [o for o in out if o is not None]


# ------------------------------------------------------------------------------------------
# The rollout function TRL calls
# ------------------------------------------------------------------------------------------


def _through_eos(completion: list[int], gap_ids: list[int], eos: set[int]) -> list[int]:
    """The closing tokens of the last turn, through the template's end-of-turn token: a finished
    completion ends with EOS, as TRL's truncation check expects (masked: the model did not sample it)."""
    if completion and completion[-1] in eos:
        return []
    for k, tok in enumerate(gap_ids):
        if tok in eos:
            return gap_ids[: k + 1]
    return []


class ProtocolRollout:
    """``rollout_func`` for ``GRPOTrainer``: plays drift's protocol for every prompt row with the
    current policy and returns one multi-turn completion per row (see the module docstring)."""

    def __init__(
        self,
        tokenizer,
        problems: dict[str, Problem],
        protocol: ProtocolConfig,
        sampling: SamplingConfig,
        weights: WeightsConfig,
        max_turns: int,
        num_generations: int,
        grader,
        batch_size: int,
        seed: int,
        log_dir: Path | None = None,
    ):
        self.tokenizer = tokenizer
        self.problems = problems
        self.protocol = protocol
        self.sampling = sampling
        self.weights = weights
        self.max_turns = max_turns
        self.num_generations = num_generations
        self.grader = grader
        self.batch_size = batch_size
        self.seed = seed
        self.log_dir = log_dir
        self.prefill = generation_prefill(protocol)
        self.stop = stop_strings(protocol)
        self.generated_tokens = 0  # every token the policy sampled, over the whole run
        self.episodes = 0

    def _render(self, messages: list[dict[str, str]], open_turn: bool) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)
        return text + self.prefill if open_turn else text

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, prompts: list, trainer) -> dict[str, Any]:
        from trl.models import unwrap_model_for_generation

        step = int(trainer.state.global_step) + 1  # the optimizer step these samples feed
        with unwrap_model_for_generation(
            trainer.model_wrapped,
            trainer.accelerator,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as model:
            return self.play(model, prompts, step)

    def play(self, model, prompts: list, step: int) -> dict[str, Any]:
        """Play one episode per prompt row; ``step`` seeds the sampling and names the log file."""
        problems = [self._problem(p, i) for i, p in enumerate(prompts)]
        self._check_groups(prompts)
        episodes = [
            Episode.start(
                p.prompt_id, i % self.num_generations, p.question, p.gold, self.protocol, self.max_turns
            )
            for i, p in enumerate(problems)
        ]
        # texts[i] is the decoded token sequence so far (tokens[i].context), which always renders the
        # episode's own messages: see continue_history for the one place the two can part
        texts = [self._render(ep.messages, open_turn=True) for ep in episodes]
        tokens = [TokenEpisode(prompt_ids=self._encode(t)) for t in texts]
        sampled_turns: list[list[list[int]]] = [[] for _ in episodes]
        rewritten: list[list[int]] = [[] for _ in episodes]
        eos = eos_ids(model, self.tokenizer)
        for turn in range(1, self.max_turns + 1):
            open_ = [i for i, ep in enumerate(episodes) if ep.is_open()]
            if not open_:
                break
            sampled = sample_turn(
                model,
                self.tokenizer,
                [tokens[i].context for i in open_],
                self.sampling,
                self.stop,
                self.batch_size,
                seed=(self.seed * 1_000_003 + step) * 101 + turn,
            )
            items = []
            for i, (ids, _) in zip(open_, sampled, strict=True):
                self.generated_tokens += len(ids)
                sampled_turns[i].append(ids)
                body = ids[:-1] if ids and ids[-1] in eos else ids
                items.append((self.prefill + self._clean(body), episodes[i].gold, len(ids)))
            for i, (ids, logps), verdict, (content, _, _) in zip(
                open_, sampled, self.grader.grade(items), items, strict=True
            ):
                episodes[i].add_turn(content, verdict)  # keeps protocol.history's form, adds the feedback
                where = f"{episodes[i].prompt_id} turn {turn}"
                texts[i], kept = self._continue(tokens[i], texts[i], ids, logps, episodes[i], eos, where)
                if not kept:
                    rewritten[i].append(turn)
        self.episodes += len(episodes)
        returns = [self._return(ep) for ep in episodes]
        if self.log_dir is not None:
            self._log(step, episodes, tokens, returns, sampled_turns, rewritten)
        return {
            "prompt_ids": [t.prompt_ids for t in tokens],
            "completion_ids": [t.completion_ids for t in tokens],
            "logprobs": [t.logprobs for t in tokens],
            "env_mask": [t.env_mask for t in tokens],
            "drift_return": returns,
            "solved": [ep.solved for ep in episodes],
            "n_turns": [len(ep.turns) for ep in episodes],
            "rewritten_turns": [len(r) for r in rewritten],
        }

    def _continue(
        self,
        tokens: TokenEpisode,
        text: str,
        ids: list[int],
        logps: list[float],
        episode: Episode,
        eos: set[int],
        where: str,
    ) -> tuple[str, bool]:
        """Extend one episode's token sequence past the turn just sampled (``ids``, graded and added
        to ``episode``); return the new sequence text and whether the sampled tokens were kept.

        The next turn must be conditioned on the episode's messages, the history rollout and
        evaluation condition on (``protocol.history``; the feedback ``add_turn`` computed). When
        the turn's text is what the episode kept, or the episode is over (nothing is conditioned
        on it), the sampled tokens go in as the model's (``env_mask`` 1, their log-probabilities),
        then the template's tokens up to the next generation prompt (or the chat's end-of-turn).
        When the episode re-rendered an answer that continues (``<answer> 18 </answer>`` kept as
        ``<answer>18</answer>``), the sampled tokens cannot stay: every later token would be
        scored after them, not after the history it was sampled after. The re-rendered message
        goes in as environment tokens (``env_mask`` 0) and that turn is not trained."""
        open_ = episode.is_open()
        messages = [dict(m) for m in episode.messages]
        last = len(messages) - (2 if open_ else 1)  # the assistant message just added
        sampled_text = self.tokenizer.decode(
            ids[:-1] if ids and ids[-1] in eos else ids, skip_special_tokens=False
        )
        kept = not open_ or messages[last]["content"] == self.prefill + sampled_text
        if kept:
            messages[last]["content"] = self.prefill + sampled_text
            tokens.add_model(ids, logps)
            text = text + self.tokenizer.decode(ids, skip_special_tokens=False)
        rendered = self._render(messages, open_turn=open_)
        gap_ids = self._encode(template_gap(text, rendered, where=where))
        if not open_:  # close the chat up to its end-of-turn token (unless sampled)
            gap_ids = _through_eos(tokens.completion_ids, gap_ids, eos)
        tokens.add_inserted(gap_ids)
        return rendered, kept

    def _clean(self, ids: list[int]) -> str:
        """The message content exactly as the rollout engine makes it: special tokens dropped, cut
        after the first stop string."""
        from tasks.engines.base import cut_at_stop

        text, _ = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.stop)
        return text

    def _problem(self, messages, row: int) -> Problem:
        if not isinstance(messages, list):
            raise ValueError(f"prompt row {row}: expected chat messages, got {type(messages).__name__}")
        found = self.problems.get(prompt_key(messages))
        if found is None:
            raise ValueError(f"prompt row {row} is not a prompt of this run's data: {messages!r:.200}")
        return found

    def _check_groups(self, prompts: list) -> None:
        g = self.num_generations
        if len(prompts) % g:
            raise ValueError(
                f"rollout_func got {len(prompts)} prompt rows, not a multiple of num_generations={g}"
            )
        for start in range(0, len(prompts), g):
            if any(p != prompts[start] for p in prompts[start : start + g]):
                raise ValueError(
                    f"rollout_func expects each prompt repeated num_generations={g} times in a row "
                    f"(TRL {TRL_VERSION_TESTED}'s RepeatSampler); rows {start}..{start + g - 1} differ"
                )

    def _return(self, ep: Episode) -> float:
        """The return the weights stage gives drift's own trajectories (repetition over the
        answers given: one entry per turn, None where nothing could be parsed)."""
        return trajectory_return(
            [1.0 if t.correct else 0.0 for t in ep.turns],
            sum(t.format_penalty for t in ep.turns),
            [t.normalized_answer for t in ep.turns],
            self.weights.gamma,
            self.weights.repetition_lambda,
            rule="answers_given",
        )

    def _log(
        self,
        step: int,
        episodes: list[Episode],
        tokens: list[TokenEpisode],
        returns: list[float],
        sampled: list[list[list[int]]],
        rewritten: list[list[int]],
    ) -> None:
        """One JSONL file per optimizer step (rewritten when a resumed run redoes the step). Each
        turn's sampled tokens are kept (``sampled_ids``): a re-rendered turn's are not in
        ``completion_ids`` (``rewritten_turns``, 1-based)."""
        assert self.log_dir is not None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for ep, tok, ret, ids, rew in zip(episodes, tokens, returns, sampled, rewritten, strict=True):
            record = ep.to_record(gen_seconds=0.0).model_dump()
            record.update(
                step=step,
                drift_return=ret,
                prompt_ids=tok.prompt_ids,
                completion_ids=tok.completion_ids,
                env_mask=tok.env_mask,
                logprobs=tok.logprobs,
                sampled_ids=ids,
                rewritten_turns=rew,
            )
            lines.append(json.dumps(record))
        _atomic_write(self.log_dir / f"step-{step:06d}.jsonl", "\n".join(lines) + "\n")


def drift_return(
    prompts, completions, drift_return, solved=None, n_turns=None, rewritten_turns=None, log_metric=None, **_
) -> list[float]:
    """The reward TRL optimises: each trajectory's DRIFT return, computed in the rollout (where the
    turns are graded) and passed through ``rollout_func``'s extra keys."""
    if log_metric is not None and solved:
        log_metric("episode/solved", sum(bool(s) for s in solved) / len(solved))
        log_metric("episode/turns", sum(n_turns) / len(n_turns))
        if rewritten_turns is not None:  # share of turns whose sampled tokens were not trained
            log_metric("episode/rewritten_turns", sum(rewritten_turns) / max(1, sum(n_turns)))
    return [float(r) for r in drift_return]


# ------------------------------------------------------------------------------------------
# Tracking, costs and checkpoints
# ------------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Costs:
    """Cumulative over attempts: the figures restored from the checkpoint a run resumed from."""

    rollout: ProtocolRollout
    prior_wall_s: float
    started: float

    def wall_s(self) -> float:
        return self.prior_wall_s + (time.perf_counter() - self.started)

    def as_dict(self, step: int) -> dict[str, float]:
        return {"generated_tokens": self.rollout.generated_tokens, "wall_s": self.wall_s(), "step": step}


def _callback(tracker, costs: Costs):
    from transformers import TrainerCallback

    class TrackAndCheckpointCosts(TrainerCallback):
        """TRL's per-step logs and the cost figures to MLflow; the costs into each checkpoint."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            metrics = {k: v for k, v in (logs or {}).items() if isinstance(v, int | float)}
            metrics.update(generated_tokens=costs.rollout.generated_tokens, wall_s=costs.wall_s())
            tracker.log_metrics(tracker.run_id, metrics, step=int(state.global_step))

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():  # written last: marks the checkpoint complete
                _atomic_write(folder / COSTS_FILE, json.dumps(costs.as_dict(int(state.global_step))))

    return TrackAndCheckpointCosts()


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` holding the costs file (a kill during a save leaves none)."""
    if not output_dir.is_dir():
        return None
    found = []
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and (path / COSTS_FILE).exists():
            found.append((int(suffix), path))
    return max(found)[1] if found else None


def run_dir(cfg: DriftConfig, fingerprint: str) -> Path:
    """One directory per training setting, so a re-run of the same command resumes or reuses it."""
    from tasks.caching import stage_key

    key = stage_key(
        "online",
        model=fingerprint,
        data=cfg.data.model_dump(mode="json"),
        protocol=cfg.protocol.model_dump(mode="json"),
        verifier=cfg.verifier.model_dump(mode="json", exclude={"workers"}),
        sampling=cfg.rollout.sampling.model_dump(mode="json"),
        reward={"gamma": cfg.weights.gamma, "repetition_lambda": cfg.weights.repetition_lambda},
        online=cfg.online.model_dump(mode="json", exclude={"output_dir"}),
        batch_size=cfg.engine.batch_size,
        turn_history="episode-messages",  # later turns conditioned on the episode's history, not raw tokens
    )
    return Path(cfg.online.output_dir).expanduser().resolve() / f"{cfg.run.name}-{key[:12]}"


def _save_model(model, tokenizer, target: Path) -> None:
    """safetensors + tokenizer under a temporary name, then renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


def check_sampling(sampling: SamplingConfig) -> None:
    """Online RL samples every turn of an episode at one temperature > 0: TRL scores the completion
    tokens under ``GRPOConfig.temperature``, so any other sampling would make its ratios wrong."""
    if sampling.temperature <= 0:
        raise ValueError("online RL samples its trajectories: rollout.sampling.temperature must be > 0")
    feedback = sampling.feedback_temperature
    if feedback is not None and feedback != sampling.temperature:
        raise ValueError(
            f"online RL samples every turn at one temperature (TRL scores the completion tokens under "
            f"GRPOConfig.temperature): rollout.sampling.feedback_temperature={feedback} differs from "
            f"rollout.sampling.temperature={sampling.temperature}; unset it for `drift online`"
        )


def train_online(
    cfg: DriftConfig, base_dir: str | Path | None = None, callbacks: list | None = None
) -> OnlineResult:
    """Train ``cfg.train_model`` with GRPO on drift's protocol; resume a killed run of the same
    config from its last complete checkpoint; return the cached result of a finished one.
    ``callbacks``: extra ``transformers.TrainerCallback`` objects (tests interrupt a run with one)."""
    started = time.perf_counter()
    check_sampling(cfg.rollout.sampling)
    try:
        import trl
    except ImportError as exc:
        raise ValueError(
            f"drift online needs TRL: pip install -e '.[online]' (trl=={TRL_VERSION_TESTED}); {exc}"
        ) from exc

    if trl.__version__ != TRL_VERSION_TESTED:
        log.warning("drift online is tested with trl==%s, found %s", TRL_VERSION_TESTED, trl.__version__)
    from tasks.models import fingerprint_model, resolve_model
    from tasks.registry import pin_registered

    model_cfg = pin_registered(cfg.train_model, cfg.run.tracking_uri)
    model_path = resolve_model(model_cfg)
    fingerprint = fingerprint_model(model_cfg)
    out = run_dir(cfg, fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / RESULT_FILE
    if result_file.exists() and (out / MODEL_DIR / "config.json").exists():
        return OnlineResult.model_validate_json(result_file.read_text()).model_copy(update={"cached": True})
    return _train(cfg, model_cfg, model_path, fingerprint, out, started, base_dir, callbacks or [])


def grpo_config(cfg: DriftConfig, out: Path, device: str, max_turns: int) -> GRPOConfig:
    """TRL's settings from drift's: the ``online`` section, plus the sampling of ``rollout.sampling``
    (TRL scores the completion tokens under this temperature)."""
    import torch
    from trl import GRPOConfig

    online, sampling = cfg.online, cfg.rollout.sampling
    bf16 = device == "cuda" and cfg.train.precision != "fp32" and torch.cuda.is_bf16_supported()
    total = online.prompts_per_step * online.num_generations
    return GRPOConfig(
        output_dir=str(out),
        max_steps=online.max_steps,
        per_device_train_batch_size=online.micro_batch_size,
        gradient_accumulation_steps=total // online.micro_batch_size,
        num_generations=online.num_generations,
        learning_rate=online.learning_rate,
        lr_scheduler_type="constant_with_warmup"
        if online.lr_scheduler == "constant"
        else online.lr_scheduler,
        warmup_steps=online.warmup_ratio,  # a float in [0, 1): a share of max_steps
        weight_decay=online.weight_decay,
        max_grad_norm=online.max_grad_norm,
        beta=online.beta,
        epsilon=online.epsilon,
        num_iterations=online.num_iterations,
        loss_type=online.loss_type,
        scale_rewards=online.scale_rewards,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_completion_length=max_turns * (sampling.max_new_tokens + 32),
        logging_steps=1,
        save_strategy="steps",
        save_steps=online.save_steps,
        save_total_limit=2,
        seed=online.seed,
        report_to="none",
        use_cpu=device == "cpu",
        bf16=bf16,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **({"gradient_checkpointing": True} if online.gradient_checkpointing else {}),
    )


def _training_prompts(cfg: DriftConfig, base: Path):
    """The training problems (golds checked against the verifier before any generation), the
    verifier they resolved to, and TRL's dataset of first-turn prompts."""
    from datasets import Dataset

    from tasks.golds import check_golds
    from tasks.ingest import load_problems

    df, _ = load_problems(cfg.data, base)
    verifier = check_golds(df.select("prompt_id", "gold"), cfg.data, cfg.verifier, "", base)  # resolves auto
    problems = [Problem(r["prompt_id"], r["question"], r["gold"]) for r in df.iter_rows(named=True)]
    dataset = Dataset.from_list(
        [{"prompt": initial_messages(p.question, cfg.protocol), "prompt_id": p.prompt_id} for p in problems]
    )
    return problems, verifier, dataset


def _record_result(tracker, result: OnlineResult, out: Path) -> None:
    """The finished run's costs, model directory and episode logs to MLflow; ``result.json`` (which
    marks the run finished) last; then the checkpoints go (the finished model replaces them)."""
    final = {"generated_tokens": result.generated_tokens, "optimizer_steps": result.optimizer_steps}
    tracker.log_metrics(tracker.run_id, {**final, "wall_s": result.wall_s}, step=result.optimizer_steps)
    tracker.client.set_tag(tracker.run_id, "drift.model_dir", result.model_dir)
    tracker.log_dict(tracker.run_id, result.model_dump(mode="json"), RESULT_FILE)
    if (out / ROLLOUTS_DIR).is_dir():
        tracker.client.log_artifacts(tracker.run_id, str(out / ROLLOUTS_DIR), artifact_path=ROLLOUTS_DIR)
    _atomic_write(out / RESULT_FILE, result.model_dump_json())
    for checkpoint in out.glob("checkpoint-*"):  # GBs each
        shutil.rmtree(checkpoint, ignore_errors=True)


def _train(cfg, model_cfg, model_path, fingerprint, out, started, base_dir, callbacks) -> OnlineResult:
    import trl
    from trl import GRPOTrainer

    from tasks.grade import Grader
    from tasks.models import load_model, load_tokenizer, pick_device
    from tasks.tracking import Tracker

    online, protocol = cfg.online, cfg.protocol
    max_turns = online.max_turns or protocol.max_turns
    problems, verifier, dataset = _training_prompts(
        cfg, Path(base_dir) if base_dir is not None else Path.cwd()
    )
    resume = last_complete_checkpoint(out)
    prior = json.loads((resume / COSTS_FILE).read_text()) if resume else {}

    device = pick_device(cfg.engine.device)
    tokenizer = load_tokenizer(model_path, model_cfg)
    model = load_model(model_path, model_cfg, device="cpu", dtype="float32")
    args = grpo_config(cfg, out, device, max_turns)
    grader = Grader(protocol, verifier)  # its processes end with the run (the `with` below)
    rollout = ProtocolRollout(
        tokenizer,
        problem_index(problems, protocol),
        protocol,
        cfg.rollout.sampling,
        cfg.weights,
        max_turns,
        online.num_generations,
        grader,
        cfg.engine.batch_size,
        online.seed,
        log_dir=out / ROLLOUTS_DIR,
    )
    rollout.generated_tokens = int(prior.get("generated_tokens", 0))
    costs = Costs(rollout, float(prior.get("wall_s", 0.0)), started)

    tracker = Tracker(cfg, run_name=f"{cfg.run.name}-online", tags={"drift.flow": "drift-online"})
    tracker.log_params(
        tracker.run_id,
        {
            "online.trl_version": trl.__version__,
            "online.run_dir": str(out),
            "online.model_fingerprint": fingerprint,
            "online.resumed_from": str(resume) if resume else "",
        },
    )
    status = "FAILED"
    try:
        with grader:
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=[drift_return],
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[_callback(tracker, costs), *callbacks],
                rollout_func=rollout,
            )
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        target = out / MODEL_DIR
        _save_model(trainer.accelerator.unwrap_model(trainer.model), tokenizer, target)
        result = OnlineResult(
            model_dir=str(target),
            generated_tokens=rollout.generated_tokens,
            optimizer_steps=int(trainer.state.global_step),
            wall_s=round(costs.wall_s(), 3),
            mlflow_run_id=tracker.run_id,
            output_dir=str(out),
            resumed_from=str(resume) if resume else None,
        )
        _record_result(tracker, result, out)
        status = "FINISHED"
        return result
    finally:
        tracker.finish(status)
