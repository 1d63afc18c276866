"""Evaluation, the same for every flow: the eval suite (every benchmark ingested and its golds checked
before any generation) and ``evaluate``, the one loop that evaluates models on it. An evaluation is
the rollout shard task with K=1 and greedy decoding, then ``summarize-eval``; its key holds the
model's fingerprint, the benchmark's content, the protocol and the verifier."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drift_core.protocol import CHOICE_INSTRUCTION
from drift_core.schemas import DriftConfig, EvalEntry, ModelConfig, ProtocolConfig, VerifierConfig
from flows.stages import Record, Shards, StageRunner, sharded_calls
from tasks.caching import generation_key
from tasks.engines import compute_dtype
from tasks.evaluate import greedy, summarize_eval
from tasks.golds import checked_verifier
from tasks.ingest import ingest, ingest_key
from tasks.models import ResolvedModel
from tasks.rollout import rollout_shard
from tasks.store import Manifest
from tasks.tracking import Tracker

__all__ = [
    "EvalSet",
    "System",
    "entry_protocol",
    "eval_label",
    "evaluate",
    "log_comparison",
    "log_suite_params",
    "prepare_eval_suite",
    "protocol_block",
]

#: an evaluation's side files, attached to its MLflow stage run
EVAL_FILES = ("metrics.json", "multi_at.png")


@dataclass(frozen=True)
class EvalSet:
    """One benchmark of the eval suite, ingested and checked: what its evaluate stages run with."""

    name: str
    config_key: str  # "eval" (eval.data) or "eval.suite[i]": named in messages
    problems: Manifest
    verifier: VerifierConfig  # kind resolved (never auto)
    requested_kind: str  # the kind as configured (may be auto)
    protocol: ProtocolConfig  # the run's protocol with the eval turns and the entry's overrides
    max_new_tokens: int


@dataclass(frozen=True)
class System:
    """A model under evaluation: its name in stage labels and metrics, and where it is."""

    name: str  # "reference", "trained", "champion", "model"
    path: str  # what the engine loads
    fingerprint: str  # what the evaluation's key holds
    model_cfg: ModelConfig
    params: dict[str, Any] = field(default_factory=dict)  # what its stage runs record about it
    named_metrics: bool = True  # metrics <benchmark>.<name>.x; False: <benchmark>.x (a run of one model)

    @classmethod
    def of(cls, name: str, model: ResolvedModel) -> System:
        """A model of a drift run under evaluation; its stage runs record its fingerprint as of now."""
        params = {"system": name, "model_fingerprint": model.fingerprint}
        return cls(name, model.path, model.fingerprint, model.cfg, params)

    def prefix(self, ev: EvalSet) -> str:
        return f"{ev.name}.{self.name}" if self.named_metrics else ev.name


def entry_protocol(cfg: DriftConfig, entry: EvalEntry) -> ProtocolConfig:
    """The protocol one benchmark is evaluated with: the run's, with the eval turns, the eval
    prompt mode when set (the reference's eval script runs simple mode whatever the rollouts used),
    and the entry's answer format and instruction."""
    update: dict[str, Any] = {"max_turns": cfg.eval_max_turns}
    if cfg.eval.prompt_mode is not None:
        update["prompt_mode"] = cfg.eval.prompt_mode
    answer_format = entry.answer_format or cfg.eval.answer_format
    if answer_format is not None:
        update["answer_format"] = answer_format
    if entry.task_instruction is not None:
        update["task_instruction"] = entry.task_instruction
    elif entry.data.multiple_choice and cfg.protocol.task_instruction is None:
        update["task_instruction"] = CHOICE_INSTRUCTION
    return cfg.protocol.model_copy(update=update)


def prepare_eval_suite(cfg: DriftConfig, stages: StageRunner, base_dir: str) -> list[EvalSet]:
    """Ingest every benchmark of the suite and check every gold against its verifier (resolving
    ``auto``): run before any generation, so a data/verifier mismatch fails in seconds."""
    entries = cfg.eval.entries()
    out = []
    for config_key, entry in entries:
        label = "ingest-eval" if len(entries) == 1 else f"ingest-eval-{entry.name}"
        problems = stages.run(
            label,
            ingest,
            cfg=entry.data,
            store_root=stages.store.url,
            base_dir=base_dir,
            key=ingest_key(entry.data, base_dir),
            context=f"{config_key}.data",
        )
        requested = cfg.eval_verifier(entry)
        verifier = checked_verifier(
            stages.store, problems, entry.data, requested, config_key, base_dir, entry.name
        )
        max_new = entry.max_new_tokens or cfg.eval.max_new_tokens or cfg.rollout.sampling.max_new_tokens
        out.append(
            EvalSet(
                entry.name,
                config_key,
                problems,
                verifier,
                requested.kind,
                entry_protocol(cfg, entry),
                max_new,
            )
        )
    return out


def eval_label(system: str, ev: EvalSet, suite: list[EvalSet]) -> str:
    """Stage name: ``evaluate-<system>`` for a suite of one, ``evaluate-<system>-<benchmark>``."""
    return f"evaluate-{system}" if len(suite) == 1 else f"evaluate-{system}-{ev.name}"


def log_suite_params(
    tracker: Tracker,
    suite: list[EvalSet],
    cfg: DriftConfig | None = None,
    rollout: bool = True,
    rollout_verifier: str | None = None,
) -> None:
    """The verifier each benchmark is graded with (``auto`` resolved), on the parent run; with
    ``cfg``, also the effective protocol the command printed (:func:`protocol_block`), as the
    parent run's artifact ``protocol.txt`` (``rollout``: the block has the rollout row)."""
    params = {}
    for ev in suite:
        params[f"eval.suite.{ev.name}.verifier.kind"] = ev.verifier.kind
        params[f"eval.suite.{ev.name}.verifier.requested"] = ev.requested_kind
        params[f"eval.suite.{ev.name}.problems"] = ev.problems.rows
    tracker.log_params(tracker.run_id, params)
    if cfg is not None:
        verifiers = {ev.name: ev.verifier.kind for ev in suite}
        block = protocol_block(cfg, verifiers, rollout=rollout, rollout_verifier=rollout_verifier)
        tracker.client.log_text(tracker.run_id, block + "\n", PROTOCOL_FILE)


#: the parent run's artifact holding the effective protocol (what the command printed)
PROTOCOL_FILE = "protocol.txt"


def protocol_block(
    cfg: DriftConfig,
    verifiers: dict[str, str] | None = None,
    rollout: bool = True,
    rollout_verifier: str | None = None,
) -> str:
    """The effective protocol in one short block, as ``drift run`` and ``drift eval`` print it
    before generating and log it: system prompt, instruction, engine and dtype, then one row for the
    rollouts (``rollout``) and one per benchmark: prompt mode, answer format, turns, max new tokens,
    verifier. ``verifiers``: benchmark -> kind resolved against its golds (``auto`` is shown as
    ``<kind> (auto)``), ``rollout_verifier`` the same for the training data; without one, the
    configured kind."""
    verifiers = verifiers or {}

    def text(value: str) -> str:
        shown = repr(value)  # quotes, trailing spaces and newlines visible, on one line
        return shown if len(shown) <= 90 else f"{shown[:80]}... ({len(value)} characters)"

    def kind(requested: str, resolved: str | None) -> str:
        if requested != "auto":
            return requested
        return f"{resolved} (auto)" if resolved else "auto (resolved from the golds)"

    header = ("", "prompt mode", "answer format", "turns", "max new tokens", "verifier")
    rows = []
    if rollout:
        p = cfg.protocol
        rows.append(
            ("rollout", p.prompt_mode, p.answer_format, str(p.max_turns),
             str(cfg.rollout.sampling.max_new_tokens), kind(cfg.verifier.kind, rollout_verifier))
        )  # fmt: skip
    for _, entry in cfg.eval.entries():
        p = entry_protocol(cfg, entry)
        max_new = entry.max_new_tokens or cfg.eval.max_new_tokens or cfg.rollout.sampling.max_new_tokens
        rows.append(
            (f"eval {entry.name}", p.prompt_mode, p.answer_format, str(p.max_turns), str(max_new),
             kind(cfg.eval_verifier(entry).kind, verifiers.get(entry.name)))
        )  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    table = ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    instruction = cfg.protocol.task_instruction
    lines = [
        "protocol:",
        f"  system prompt: {text(cfg.protocol.system_prompt)}",
        f"  instruction:   {'the default (math)' if instruction is None else text(instruction)}",
        f"  engine:        {cfg.engine.kind}, dtype {cfg.reference_model.dtype}",
        *(f"  {line}" for line in table),
    ]
    return "\n".join(lines)


def evaluate(
    cfg: DriftConfig,
    stages: StageRunner,
    suite: list[EvalSet],
    systems: list[System],
    benchmarks: list[EvalSet] | None = None,
) -> dict[str, dict[str, Manifest]]:
    """Evaluate every system on every benchmark (default: the whole suite), each as its own
    recorded stage: ``{benchmark: {system: manifest}}``."""
    results: dict[str, dict[str, Manifest]] = {}
    for ev in benchmarks or suite:
        for system in systems:
            label = eval_label(system.name, ev, suite)
            results.setdefault(ev.name, {})[system.name] = _evaluate_one(cfg, stages, ev, label, system)
    return results


def _evaluate_one(cfg: DriftConfig, stages: StageRunner, ev: EvalSet, label: str, system: System) -> Manifest:
    """Model ``system`` on benchmark ``ev`` (shards, then their summary), as stage ``label``; its
    metrics by turn on the stage run and, under ``<benchmark>[.<system>]``, on the parent run."""
    max_turns = ev.protocol.max_turns
    base = generation_key(
        "evaluate",
        model=system.fingerprint,
        problems=ev.problems.sha256,
        protocol=ev.protocol,
        verifier=ev.verifier,
        engine=cfg.engine,
        dtype=compute_dtype(system.path, system.model_cfg, cfg.engine),
        max_new_tokens=ev.max_new_tokens,
    )
    common = {
        "model_path": system.path,
        "model_cfg": system.model_cfg,
        "engine_cfg": cfg.engine,
        "protocol": ev.protocol,
        "verifier": ev.verifier,
        "sampling": greedy(ev.max_new_tokens),
        "k": 1,
        "max_turns": max_turns,
        "seed": 0,
        "store_root": stages.store.url,
        "stage": "eval-shard",
    }
    # task runs evaluate-trained-shard-0, evaluate-reference-math500-shard-0, ...
    shard_task = rollout_shard.with_options(name="eval-shard", task_run_name=f"{label}-shard-{{shard}}")
    calls = sharded_calls("eval-shard", ev.problems, cfg.eval.shard_size, base, common)
    params = {
        **system.params,
        "benchmark": ev.name,
        "verifier.kind": ev.verifier.kind,
        "verifier.requested": ev.requested_kind,
    }
    return stages.stage(
        label,
        summarize_eval,
        shards=Shards(shard_task, calls, base, "evaluate"),
        record=Record(params, eval_metrics=True, prefix=system.prefix(ev), files=EVAL_FILES),
        label=system.name,
        max_turns=max_turns,
        store_root=stages.store.url,
    )


def log_comparison(
    tracker: Tracker, stages: StageRunner, results: dict[str, Manifest], benchmark: str
) -> None:
    """Reference and trained multi@t on one chart (the suite's first benchmark), 95% intervals shaded."""
    from tasks.plots import plot_file, plot_multi_at, wilson_interval

    curves = {name: m.meta.get("multi_at", []) for name, m in results.items()}
    n = max((int(m.meta.get("n_problems") or 0) for m in results.values()), default=0)
    bands = {name: [wilson_interval(v, n) for v in values] for name, values in curves.items()}
    draw = lambda path: plot_multi_at(curves, path, intervals=bands, benchmark=benchmark, n=n)  # noqa: E731
    data = {"curves": curves, "benchmark": benchmark, "n": n, "bands": "wilson95"}
    with plot_file(stages.plots_dir, "multi_at.png", draw, data) as png:
        tracker.log_file(tracker.run_id, png)
