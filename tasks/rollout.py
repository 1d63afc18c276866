"""Rollout: K multi-turn trajectories per prompt from the fixed reference policy.

Turn 1 samples K completions per prompt in one call (n=K); each later turn continues every still
open trajectory with n=1 after the feedback message. Generation (engine) and grading (process pool)
alternate turn by turn, because the protocol needs each verdict before it can send feedback.

Work is split into shards of prompts; each shard is its own cached Prefect task run writing its
own artifact, so a crash loses only the shards in flight (one with ``run.max_workers: 1``, the
default), and shards can run on several workers.
``collect_rollouts`` joins the shards into the trajectories table the weights stage reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import polars as pl
from prefect import task
from tqdm.auto import tqdm

from drift_core.protocol import Episode, generation_prefill, stop_strings
from drift_core.schemas import (
    EngineConfig,
    ModelConfig,
    ProtocolConfig,
    SamplingConfig,
    TrajectoryRecord,
    VerifierConfig,
)
from tasks.caching import served_from_store
from tasks.engines import Engine, SamplingParams, get_engine
from tasks.grade import Grader, grader_for
from tasks.store import ArtifactStore, Manifest

TRAJECTORY_SCHEMA = {
    "prompt_id": pl.String,
    "traj_idx": pl.Int64,
    "messages": pl.List(pl.Struct({"role": pl.String, "content": pl.String})),
    "turn_correct": pl.List(pl.Boolean),
    "turn_valid": pl.List(pl.Boolean),
    "answers": pl.List(pl.String),
    "normalized_answers": pl.List(pl.String),
    "format_penalty": pl.Float64,
    "n_turns": pl.Int64,
    "solved": pl.Boolean,
    "gen_tokens": pl.List(pl.Int64),
    "gen_seconds": pl.Float64,
}


def records_to_frame(records: list[TrajectoryRecord]) -> pl.DataFrame:
    return pl.DataFrame([r.model_dump() for r in records], schema=TRAJECTORY_SCHEMA)


def run_episodes(
    engine: Engine,
    tokenizer,
    problems: list[dict],
    protocol: ProtocolConfig,
    sampling: SamplingConfig,
    k: int,
    max_turns: int,
    grader: Grader,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> list[TrajectoryRecord]:
    """Play the multi-turn protocol for ``problems`` (dicts with prompt_id, question, gold)."""
    prefill = generation_prefill(protocol)
    stop = stop_strings(protocol)
    episodes = [
        Episode.start(p["prompt_id"], j, p["question"], p["gold"], protocol, max_turns=max_turns)
        for p in problems
        for j in range(k)
    ]
    seconds = [0.0] * len(episodes)

    def render(messages: list[dict]) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + prefill

    for turn in range(1, max_turns + 1):
        if turn == 1:
            targets = list(range(len(episodes)))
            prompts = [render(episodes[i * k].messages) for i in range(len(problems))]
            n = k
        else:
            targets = [i for i, ep in enumerate(episodes) if ep.is_open()]
            prompts = [render(episodes[i].messages) for i in targets]
            n = 1
        if not targets:
            break
        params = SamplingParams(
            n=n,
            temperature=sampling.temperature_at(turn),
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            stop=stop,
            seed=seed * 1000 + turn,
        )
        start = time.perf_counter()
        completions = [c for per_prompt in engine.generate(prompts, params) for c in per_prompt]
        elapsed = (time.perf_counter() - start) / max(1, len(targets))
        contents = [prefill + c.text for c in completions]
        verdicts = grader.grade(
            [
                (content, episodes[i].gold, c.n_tokens)
                for i, content, c in zip(targets, contents, completions, strict=False)
            ]
        )
        for i, content, verdict in zip(targets, contents, verdicts, strict=False):
            episodes[i].add_turn(content, verdict)
            seconds[i] += elapsed
        if progress:  # counts trajectories, as its total does: those this turn ended
            progress(sum(1 for i in targets if not episodes[i].is_open()))
    return [ep.to_record(gen_seconds=s) for ep, s in zip(episodes, seconds, strict=False)]


def rollout_stats(df: pl.DataFrame, max_turns: int) -> dict[str, float]:
    """Accuracy by turn over all trajectories (share correct at turn t) and generation speed."""
    stats: dict[str, float] = {"trajectories": float(df.height)}
    if df.height == 0:
        return stats
    n_turns = df["n_turns"].to_list()
    solved = df["solved"].to_list()
    for t in range(1, max_turns + 1):
        stats[f"solved_by_turn_{t}"] = (
            sum(1 for s, n in zip(solved, n_turns, strict=False) if s and n <= t) / df.height
        )
    tokens = int(df["gen_tokens"].list.sum().sum())
    secs = float(df["gen_seconds"].sum())
    stats["generated_tokens"] = float(tokens)
    stats["tokens_per_s"] = tokens / secs if secs > 0 else 0.0
    stats["mean_turns"] = float(df["n_turns"].mean())
    stats["format_error_rate"] = float(df["turn_valid"].explode().not_().cast(pl.Float64).mean() or 0.0)
    return stats


@task(name="rollout-shard", task_run_name="rollout-shard-{shard}")
def rollout_shard(
    problems: Manifest,
    shard: int,
    start: int,
    stop: int,
    model_path: str,
    model_cfg: ModelConfig,
    engine_cfg: EngineConfig,
    protocol: ProtocolConfig,
    verifier: VerifierConfig,
    sampling: SamplingConfig,
    k: int,
    max_turns: int,
    seed: int,
    store_root: str,
    key: str,
    stage: str = "rollout-shard",
) -> Manifest:
    """Roll out prompts [start, stop) of the problem table; one cached artifact per shard."""
    store = ArtifactStore(store_root)
    if (hit := served_from_store(store, stage, key)) is not None:
        return hit
    table = store.read_parquet(problems).slice(start, stop - start)
    rows = table.select("prompt_id", "question", "gold").to_dicts()
    engine = get_engine(model_path, model_cfg, engine_cfg)
    tokenizer = getattr(engine, "tokenizer", None) or _tokenizer(model_path, model_cfg)
    started = time.perf_counter()
    with (
        grader_for(protocol, verifier) as grader,
        tqdm(total=len(rows) * k, desc=f"{stage} {shard}", unit="traj", leave=False) as bar,
    ):
        records = run_episodes(
            engine,
            tokenizer,
            rows,
            protocol,
            sampling,
            k,
            max_turns,
            grader,
            seed=seed * 100_003 + shard,
            progress=bar.update,
        )
    df = records_to_frame(records)
    meta = rollout_stats(df, max_turns)
    meta["wall_seconds"] = time.perf_counter() - started
    return store.write_parquet(df, stage, key, meta=meta)


def _tokenizer(model_path: str, model_cfg: ModelConfig):
    from tasks.models import load_tokenizer

    return load_tokenizer(model_path, model_cfg)


@task(name="collect-rollouts")
def collect_rollouts(
    shards: list[Manifest],
    store_root: str,
    key: str,
    max_turns: int,
    k: int,
    stage: str = "rollout",
    reference_fingerprint: str | None = None,
) -> Manifest:
    """Concatenate shard artifacts (in shard order) into one trajectories table, checking that
    every prompt has exactly K distinct trajectories. ``reference_fingerprint`` (the model that
    rolled out) goes into the manifest's meta, so a run re-using a bare manifest can tell."""
    store = ArtifactStore(store_root)
    if (hit := served_from_store(store, stage, key)) is not None:
        return hit
    df = (
        pl.concat([store.read_parquet(m) for m in shards], how="vertical")
        if shards
        else pl.DataFrame(schema=TRAJECTORY_SCHEMA)
    )
    counts = df.group_by("prompt_id").agg(pl.len().alias("n"), pl.col("traj_idx").n_unique().alias("u"))
    bad = counts.filter((pl.col("n") != k) | (pl.col("u") != k))
    if bad.height:
        raise RuntimeError(
            f"rollout shards do not hold exactly K={k} trajectories for: {bad.head(5).to_dicts()}"
        )
    meta: dict[str, float | str] = dict(rollout_stats(df, max_turns))
    meta["wall_seconds"] = sum(m.meta.get("wall_seconds", 0.0) for m in shards)
    if reference_fingerprint:
        meta["reference_fingerprint"] = reference_fingerprint
    return store.write_parquet(df, stage, key, meta=meta)
