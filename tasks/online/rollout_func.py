"""The TRL adapter: ``ProtocolRollout`` is ``GRPOTrainer``'s ``rollout_func``, playing drift's
protocol with the current policy, one multi-turn completion per prompt row.

Contract, as TRL 1.16's ``GRPOTrainer`` reads it (``_generate`` and
``_generate_and_score_completions``; experimental in TRL, the version is pinned in pyproject's
``online`` extra): ``prompts`` holds this process's rows with each prompt already repeated
``num_generations`` times in a row (the trainer's ``RepeatSampler``), and the function returns one
completion per row: ``prompt_ids``, ``completion_ids``, ``logprobs`` (one per completion token), and
``env_mask`` (1 = sampled by the model, 0 = inserted; multiplied into the loss mask). Every other
key reaches the reward functions as a keyword argument: ``drift_return`` carries each trajectory's
return.

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

Why the turn loop is not ``Engine.serve`` (``tasks.engines.base``, which ``run_episodes`` drives):
a ``Request`` carries its prompt as text and a ``Completion`` hands back text and a token count.
This loop needs (1) token-id contexts, the sequence itself, because re-tokenising the decoded
history does not give back the sampled ids (a sampled split such as ``"5"`` ``"</"`` ``"answer>"``
re-encodes differently, and GRPO would then score tokens the policy never sampled); (2) the
sampled ids and one log-probability per id back, special tokens kept, to build ``env_mask`` and
TRL's ``logprobs``; (3) the trainer's current model each step, where an engine holds one loaded
model. Passing those through ``Request.key`` and a subclassed ``Completion`` would hide the
contract in side channels; the shared part, grading a turn and ``Episode.add_turn`` (history and
feedback), is already shared through ``drift_core.protocol`` and ``tasks.grade``. What the engine
interface would need: token-id prompts and ids plus log-probabilities in ``Completion``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drift_core.multiturn import TokenEpisode, template_gap
from drift_core.protocol import Episode, generation_prefill, initial_messages, stop_strings
from drift_core.returns import trajectory_return
from drift_core.schemas import ProtocolConfig, SamplingConfig, WeightsConfig
from tasks.atomic import write_text_atomic
from tasks.engines.transformers_engine import eos_ids
from tasks.online.sampling import sample_turn

TRL_VERSION_TESTED = "1.16.0"


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

    def render(self, messages: list[dict[str, str]], open_turn: bool) -> str:
        """The chat as text: with an open turn, the generation prompt and the pre-fill."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)
        return text + self.prefill if open_turn else text

    def encode(self, text: str) -> list[int]:
        """Token ids of template text (its special tokens are in the text)."""
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
        texts = [self.render(ep.messages, open_turn=True) for ep in episodes]
        tokens = [TokenEpisode(prompt_ids=self.encode(t)) for t in texts]
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
                texts[i], kept = self.continue_history(
                    tokens[i], texts[i], ids, logps, episodes[i], eos, where
                )
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

    def continue_history(
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
        rendered = self.render(messages, open_turn=open_)
        gap_ids = self.encode(template_gap(text, rendered, where=where))
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
        write_text_atomic(self.log_dir / f"step-{step:06d}.jsonl", "\n".join(lines) + "\n")


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
