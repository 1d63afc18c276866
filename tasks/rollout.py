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
from tasks.engines.base import Completion, Finished, Request
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
    progress: Callable[[int], None] | None = None,  # called with the number of trajectories just finished
    per_trajectory: bool = False,
) -> list[TrajectoryRecord]:
    """Play the multi-turn protocol for ``problems`` (dicts with prompt_id, question, gold): the one
    turn loop of rollout and evaluation.

    Turn 1 asks for K completions of each problem (one request, n=K); every graded turn that leaves
    its episode open asks for the next (n=1) after the feedback message. The engine decides when
    requests run (``Engine.serve``): in waves, one turn of every episode at a time, or, with
    ``per_trajectory`` on an engine that schedules per request (vLLM), each episode's next turn as
    soon as its own turn is graded. Turn t samples with seed ``seed * 1000 + t``; each request has
    its own stream (problem index at turn 1, episode index after), so per-request-seeded engines give
    the same tokens under both schedules."""
    prefill = generation_prefill(protocol)
    stop = stop_strings(protocol)
    episodes = [
        Episode.start(p["prompt_id"], j, p["question"], p["gold"], protocol, max_turns=max_turns)
        for p in problems
        for j in range(k)
    ]
    seconds = [0.0] * len(episodes)

    def request(key: tuple[str, int], messages: list[dict], turn: int, n: int) -> Request:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        params = SamplingParams(
            n=n,
            temperature=sampling.temperature_at(turn),
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            stop=stop,
            seed=seed * 1000 + turn,
        )
        return Request(key=key, prompt=text + prefill, params=params, stream=key[1])

    clock = [time.perf_counter()]

    def on_done(finished: Finished) -> list[Request]:
        """Grade the finished turns, record them and ask for the turns that follow."""
        targets: list[int] = []
        completions: list[Completion] = []
        for req, outputs in finished:
            kind, index = req.key
            targets += [index * k + j for j in range(k)] if kind == "problem" else [index]
            completions += outputs
        # generation time since the last hand-back, shared out over the turns it produced
        elapsed = (time.perf_counter() - clock[0]) / max(1, len(targets))
        contents = [prefill + c.text for c in completions]
        verdicts = grader.grade(
            [
                (content, episodes[i].gold, c.n_tokens)
                for i, content, c in zip(targets, contents, completions, strict=True)
            ]
        )
        follow: list[Request] = []
        for i, content, verdict in zip(targets, contents, verdicts, strict=True):
            episodes[i].add_turn(content, verdict)
            seconds[i] += elapsed
            if episodes[i].is_open():
                follow.append(request(("episode", i), episodes[i].messages, len(episodes[i].turns) + 1, 1))
        if progress:  # trajectories finished by these turns (a bar of K x problems ends at its total)
            progress(len(targets) - len(follow))
        clock[0] = time.perf_counter()
        return follow

    first = [request(("problem", p), episodes[p * k].messages, 1, k) for p in range(len(problems))]
    engine.serve(first, on_done, per_trajectory=per_trajectory)
    return [ep.to_record(gen_seconds=s) for ep, s in zip(episodes, seconds, strict=True)]


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
            per_trajectory=engine_cfg.scheduling == "trajectory",
        )
    df = records_to_frame(records)
    meta: dict[str, float | str] = dict(rollout_stats(df, max_turns))
    meta["wall_seconds"] = time.perf_counter() - started
    meta["engine"] = engine.name  # which engine made these tokens (kept, not keyed)
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
