"""Evidence v2 (issue 10): does DRIFT teach feedback use, and what does it buy over online RL?

    OMP_NUM_THREADS=2 nice .venv/bin/python benchmarks/evidence.py                 # everything
    OMP_NUM_THREADS=2 nice .venv/bin/python benchmarks/evidence.py --only drift reference
    .venv/bin/python benchmarks/evidence.py --report-only                          # tables + summary
    OMP_NUM_THREADS=2 nice .venv/bin/python benchmarks/evidence.py --rollouts k16-retry1.0 \
        --only drift uniform success_only                                          # v2b: other rollouts
    OMP_NUM_THREADS=2 nice .venv/bin/python benchmarks/evidence.py --seeds 0 --only online_rl \
        --online-steps 24                                                          # a longer online run

One task (``configs/evidence.yaml``: two-digit a ± b, the task chosen by ``benchmarks/probe_task.py``),
one artifact store and one MLflow experiment (``.drift-evidence/``, experiment ``drift-evidence``), and
every system produced by drift itself:

* ``reference``: the reference model's evaluation (``evaluate-reference`` of the first pipeline run);
* ``drift``, ``drift_all_turns``, ``uniform``, ``success_only``: ``drift run`` with the weighting /
  training-target settings of each, one run per training seed, all on the SAME cached rollouts;
* ``online_rl``: ``drift online`` (TRL GRPOTrainer, multi-turn episodes in the same protocol with the
  same verifier and return) and then ``drift eval`` of the model it trained;
* ``drift_round_r``: ``drift run --rounds R`` (iterated DRIFT: round r's model is round r+1's
  reference and base model), one chain per training seed.

Every finished run is appended to ``benchmarks/results/evidence_runs.jsonl`` at once, so a killed
sweep continues where it stopped (finished tags are skipped), and its per-problem evaluation (prompt
id, answers, correctness per turn) and cost are copied out of the store into
``benchmarks/results/evidence_frames/<tag>/`` (a few KB, committed): the report reads only those, so
it survives the loss of ``.drift-evidence/`` (3.6 GB, not committed). Two sweeps may run side by side
(``--only online_rl`` next to the pipeline systems): the runs file is appended under a lock and the
report is rebuilt from the whole file. The report is a markdown table
(``evidence_table.md``) and the machine-readable ``quality_summary.json``; both are rewritten after
every run, from whatever has finished.

Cost per system: generated tokens (reference rollouts, or all online generation), optimizer steps
and wall seconds of the stages that produce the model (rollout + weights + train; iterated rounds
add up their rounds; the online baseline's training loop). Shared rollouts are charged in full to
every system that trains on them: each would have had to pay for them alone.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import VARIANTS, per_problem_solved, problem_parts  # noqa: E402 - shared with quality.py

RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "evidence_runs.jsonl"
FRAMES = RESULTS / "evidence_frames"
FRAME_COLUMNS = ["prompt_id", "answers", "normalized_answers", "turn_correct"]
SUMMARY = RESULTS / "quality_summary.json"
TABLE = RESULTS / "evidence_table.md"
STORE = ROOT / ".drift-evidence"
CONFIG = "configs/evidence.yaml"
COMMON = [
    "run.experiment=drift-evidence",
    f"run.artifact_store={STORE}/artifacts",
    f"run.tracking_uri=sqlite:///{STORE}/mlflow.db",
]
# drift, drift_all_turns, uniform, success_only: the same settings as v1; plus an ablation of
# where DRIFT's weight goes: DRIFT with the groups that hold no solved trajectory weighted 0.
PIPELINE_SYSTEMS = {
    **VARIANTS,
    "drift_solved_groups": [*VARIANTS["drift"], "weights.unsolved_groups=drop"],
}
# Paired differences beyond drift − X: the ablation against the reference, DRIFT and the baselines.
ABLATION_PAIRS = [
    ("drift_solved_groups", other) for other in ("reference", "drift", "uniform", "success_only")
]
# Rollout settings (Evidence v2b): the same systems trained on other rollouts of the same reference.
# "base" is configs/evidence.yaml as it stands (v2, quality_summary.json); every other setting gets
# its own table and summary (evidence_table_<setting>.md, quality_summary_<setting>.json).
ROLLOUT_SETTINGS: dict[str, list[str]] = {
    "base": [],
    # K = 16 and hotter retries: more groups with a success, and corrections after feedback
    "k16-retry1.0": ["rollout.k=16", "rollout.sampling.feedback_temperature=1.0"],
    # K = 16 alone: separates the two changes of k16-retry1.0
    "k16": ["rollout.k=16"],
    # Issue 30, item 7: feedback the reference can act on ("Incorrect. The answer is larger." /
    # "... smaller.") in rollouts and evaluation, retries at temperature 1.0 (the probe's setting
    # with the most corrections, benchmarks/results/probe_feedback.jsonl), rollouts and evaluations
    # by vLLM's CPU build.
    "direction": [
        "protocol.feedback={kind: direction}",
        "rollout.sampling.feedback_temperature=1.0",
        "engine.kind=vllm",
    ],
}
FEEDBACK_SETTINGS = ["direction"]
SYSTEMS = ["reference", *PIPELINE_SYSTEMS, "online_rl", "rounds"]
# v2's online rows ran 12 GRPO steps (``--online-steps 12``); a run of any other length is its own
# system (``online_rl_<N>steps``), so a longer run sits beside them instead of replacing them.
V2_ONLINE_STEPS = 12
_RUN_ID = re.compile(r"MLflow run id: ([0-9a-f]{32})")


# ------------------------------------------------------------------------------------------
# Running systems (each a real drift command in a fresh interpreter)
# ------------------------------------------------------------------------------------------


def drift(args: list[str], sets: list[str], tag: str) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "flows.cli", *args]
    for s in [*COMMON, *sets]:
        cmd += ["--set", s]
    print(f"[evidence] {tag}: drift {' '.join(cmd[3:])}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    log = RESULTS / "evidence_logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr[-20000:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"[evidence] {tag} failed (exit {proc.returncode}); log: {log}")
    return proc.stdout, wall


def pipeline_tag(name: str, seed: int, rollouts: str = "base") -> str:
    return f"{name}-s{seed}" if rollouts == "base" else f"{name}-{rollouts}-s{seed}"


def run_pipeline_system(name: str, seed: int, rollouts: str = "base") -> dict:
    tag = pipeline_tag(name, seed, rollouts)
    sets = [
        *PIPELINE_SYSTEMS[name],
        *ROLLOUT_SETTINGS[rollouts],
        f"train.seed={seed}",
        f"run.name=evidence-{tag}",
    ]
    out, wall = drift(["run", CONFIG], sets, tag)
    rec = {"tag": tag, "system": name, "seed": seed, "run_id": _RUN_ID.findall(out)[-1], "wall_s": wall}
    return rec if rollouts == "base" else rec | {"rollouts": rollouts}


def online_system(steps: int) -> str:
    return "online_rl" if steps == V2_ONLINE_STEPS else f"online_rl_{steps}steps"


def longer_online_systems(names) -> list[str]:
    """The ``online_rl_<N>steps`` systems among ``names``, shortest run first."""
    return sorted(
        (n for n in names if n.startswith("online_rl_")),
        key=lambda n: int(n[len("online_rl_") : -len("steps")]),
    )


def online_tag(seed: int, steps: int) -> str:
    return f"online_rl-s{seed}" if steps == V2_ONLINE_STEPS else f"online_rl-{steps}steps-s{seed}"


def run_online(seed: int, steps: int) -> dict:
    tag = online_tag(seed, steps)
    sets = [f"online.seed={seed}", f"run.name=evidence-{tag}", f"online.max_steps={steps}"]
    out, wall = drift(["online", CONFIG], sets, tag)
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    eval_out, eval_wall = drift(
        ["eval", "--model", result["model_dir"], "--config", CONFIG],
        [f"run.name=evidence-{tag}-eval"],
        tag + "-eval",
    )
    return {
        "tag": tag,
        "system": "online_rl",
        "seed": seed,
        "run_id": _RUN_ID.findall(out)[-1],
        "eval_run_id": _RUN_ID.findall(eval_out)[-1],
        "generated_tokens": int(result["generated_tokens"]),
        "optimizer_steps": int(result["optimizer_steps"]),
        "train_wall_s": float(result["wall_s"]),
        "wall_s": wall + eval_wall,
    }


def run_rounds(seed: int, rounds: int) -> dict:
    tag = f"rounds-s{seed}"
    out, wall = drift(
        ["run", CONFIG, "--rounds", str(rounds)],
        [
            "weights.mode=drift",
            "train.target=terminal",
            f"train.seed={seed}",
            "iterate.stop_on_no_promotion=false",
            f"run.name=evidence-{tag}",
        ],
        tag,
    )
    ids = list(dict.fromkeys(_RUN_ID.findall(out)))  # one parent run per round, in order
    if len(ids) < rounds:
        raise SystemExit(f"[evidence] {tag}: expected {rounds} round runs, found {len(ids)} run ids")
    return {"tag": tag, "system": "rounds", "seed": seed, "round_run_ids": ids[-rounds:], "wall_s": wall}


# ------------------------------------------------------------------------------------------
# Reading results back (MLflow runs -> store manifests -> per-problem tables)
# ------------------------------------------------------------------------------------------


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{STORE}/mlflow.db")


def _manifest(client, run_id: str):
    from tasks.store import Manifest

    path = client.download_artifacts(run_id, "manifest.json")
    return Manifest.model_validate_json(Path(path).read_text())


def stage_manifests(run_id: str) -> dict[str, object]:
    """The manifests of a parent run's stage runs, by stage run name (evaluate-reference, rollout,
    weights, train, evaluate-trained; evaluate-model for ``drift eval``)."""
    client = _client()
    parent = client.get_run(run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    out = {}
    for child in children:
        name = child.data.tags.get("mlflow.runName", "")
        try:
            out[name] = _manifest(client, child.info.run_id)
        except Exception:  # a stage run with no manifest (e.g. a promotion decision)
            continue
    return out


def _eval_frame(manifests: dict, which: str):
    from tasks.store import ArtifactStore

    names = [n for n in manifests if n.startswith("evaluate") and which in n]
    if not names:
        raise KeyError(f"no evaluate stage run for {which!r} among {sorted(manifests)}")
    return ArtifactStore(str(STORE / "artifacts")).read_parquet(manifests[sorted(names)[0]]).sort("prompt_id")


def _cost(manifests: dict) -> dict:
    rollout = manifests.get("rollout")
    train = manifests.get("train")
    weights = manifests.get("weights")
    return {
        "generated_tokens": int(rollout.meta.get("generated_tokens", 0)) if rollout else 0,
        "optimizer_steps": int(train.meta.get("steps", 0)) if train else 0,
        "wall_s": float(
            (rollout.meta.get("wall_seconds", 0.0) if rollout else 0.0)
            + (weights.meta.get("seconds", 0.0) if weights else 0.0)
            + (train.meta.get("seconds", 0.0) if train else 0.0)
        ),
    }


def _save_frame(df, tag: str, name: str) -> str:
    """Copy the columns the report needs out of the store (atomically); return the relative path."""
    path = FRAMES / tag / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    df.select(FRAME_COLUMNS).sort("prompt_id").write_parquet(tmp)
    tmp.replace(path)
    return str(path.relative_to(RESULTS))


def snapshot(rec: dict) -> dict:
    """Add the run's per-problem evaluation frames (saved under FRAMES) and its cost to ``rec``."""
    tag = rec["tag"]
    if rec["system"] in PIPELINE_SYSTEMS:
        m = stage_manifests(rec["run_id"])
        rec["frames"] = {
            "reference": _save_frame(_eval_frame(m, "reference"), tag, "reference"),
            "trained": _save_frame(_eval_frame(m, "trained"), tag, "trained"),
        }
        rec["cost"] = _cost(m)
        rollout = m.get("rollout")
        if rollout is not None:
            for key, value in rollout.meta.items():
                if key.startswith("solved_by_turn_") or key == "format_error_rate":
                    rec[f"rollout_{key}"] = float(value)
        if m.get("weights") is not None:
            rec["weights"] = weights_diagnostics(m["weights"].meta)
    elif rec["system"] == "online_rl":
        m = stage_manifests(rec["eval_run_id"])
        rec["frames"] = {"trained": _save_frame(_eval_frame(m, ""), tag, "trained")}
        rec["cost"] = {k: rec[k] for k in ("generated_tokens", "optimizer_steps")} | {
            "wall_s": rec["train_wall_s"]
        }
        rec["steps"] = online_steps(rec["run_id"])
    elif rec["system"] == "rounds":
        total = {"generated_tokens": 0, "optimizer_steps": 0, "wall_s": 0.0}
        rec["frames"], rec["cost"] = {}, {}
        for i, run_id in enumerate(rec["round_run_ids"], start=1):
            m = stage_manifests(run_id)
            total = {k: total[k] + v for k, v in _cost(m).items()}
            rec["frames"][f"round_{i}"] = _save_frame(_eval_frame(m, "trained"), tag, f"round_{i}")
            rec["cost"][f"round_{i}"] = dict(total)
    return rec


WEIGHTS_DIAGNOSTICS = [
    "n_trajectories",
    "ess_overall",
    "ess_fraction",
    "max_weight",
    "share_groups_no_success",
    "share_weight_no_success",
]


def weights_diagnostics(meta: dict) -> dict:
    """What the weights stage reported about the weights every system of a run trained with (the
    figures docs/results.md quotes: ESS, max weight, weight on groups with no success)."""
    return {k: round(float(meta[k]), 4) for k in WEIGHTS_DIAGNOSTICS if k in meta}


def complete_snapshots() -> None:
    """Give finished pipeline records the weights diagnostics they lack (recorded before snapshots
    kept them) while their run is still in the store; the runs file is rewritten atomically."""
    records = read_runs()
    changed = False
    for rec in records:
        if rec["system"] in PIPELINE_SYSTEMS and "weights" not in rec and (STORE / "mlflow.db").exists():
            try:
                weights = stage_manifests(rec["run_id"]).get("weights")
            except Exception:  # a run of a store since lost
                continue
            if weights is not None:
                rec["weights"], changed = weights_diagnostics(weights.meta), True
    if changed:
        with RUNS.open("a") as f:  # the append lock of record(): no sweep writes meanwhile
            fcntl.flock(f, fcntl.LOCK_EX)
            _write_atomic(RUNS, "".join(json.dumps(r) + "\n" for r in records))
            fcntl.flock(f, fcntl.LOCK_UN)


ONLINE_STEP_METRICS = {
    "return": "rewards/drift_return/mean",
    "solved": "episode/solved",
    "entropy": "entropy",
    "turns": "episode/turns",
}


def online_steps(run_id: str) -> list[dict]:
    """The online run's training curve, step by step, from its MLflow metrics (what GRPO optimised
    and whether its own episodes got solved more often)."""
    client = _client()
    by_step: dict[int, dict] = {}
    for name, key in ONLINE_STEP_METRICS.items():
        for m in client.get_metric_history(run_id, key):
            by_step.setdefault(m.step, {"step": m.step})[name] = round(m.value, 4)
    return [by_step[k] for k in sorted(by_step)]


def _read_frame(relative: str):
    import polars as pl

    return pl.read_parquet(RESULTS / relative)


def collect(records: list[dict]) -> tuple[dict, object]:
    """Per system: a list (one per seed) of (eval frame, cost); and the reference's frame. Read from
    the snapshots only; a record without one (its store lost before snapshots existed) is skipped."""
    frames: dict[str, list] = {}
    reference = None
    for r in records:
        if "frames" not in r:
            continue
        if r["system"] in PIPELINE_SYSTEMS:
            if reference is None:
                reference = _read_frame(r["frames"]["reference"])
            frames.setdefault(r["system"], []).append((_read_frame(r["frames"]["trained"]), r["cost"]))
        elif r["system"] == "online_rl":
            name = online_system(int(r["optimizer_steps"]))
            frames.setdefault(name, []).append((_read_frame(r["frames"]["trained"]), r["cost"]))
        elif r["system"] == "rounds":
            for key, rel in r["frames"].items():
                i = key.split("_")[-1]
                frames.setdefault(f"drift_round_{i}", []).append((_read_frame(rel), r["cost"][key]))
    return frames, reference


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------


def _golds(reference) -> list[str]:
    from flows.config import load_config
    from tasks.ingest import load_problems

    cfg = load_config(str(ROOT / CONFIG), [])
    df, _ = load_problems(cfg.eval.data)
    by_id = dict(zip(df["prompt_id"].to_list(), df["gold"].to_list(), strict=True))
    return [by_id[p] for p in reference["prompt_id"].to_list()]


def blind_ceiling(golds: list[str], turns: int) -> tuple[float, list[str]]:
    """The best question-blind answer sequence (the T most frequent golds, chosen on the eval golds
    themselves: an upper bound for any policy that ignores the question) and the share it solves."""
    freq = Counter(golds)
    best = [g for g, _ in freq.most_common(turns)]
    return sum(freq[g] for g in best) / len(golds), best


def answer_sequences(frames: list) -> tuple[float, list, float]:
    """How question-blind a system's answers are, read as the verifier reads them (normalised:
    "48 + 69 = 97" and "97" are one answer). Over every seed's problems pooled: the share given the
    single most common answer sequence, and that sequence; per seed, the distinct sequences per
    problem (mean over seeds). A guesser has a large first figure and a small last one."""
    seqs = Counter(tuple(a) for df in frames for a in df["normalized_answers"].to_list())
    top, count = seqs.most_common(1)[0]
    distinct = [len({tuple(a) for a in df["normalized_answers"].to_list()}) / df.height for df in frames]
    return count / sum(df.height for df in frames), list(top), float(np.mean(distinct))


def report(records: list[dict], n_boot: int = 2000, rollouts: str = "base") -> tuple[str, dict]:
    """The table and summary of the runs trained on one rollout setting (online RL and iterated
    rounds make their own rollouts: they belong to the base setting)."""
    from drift_core.metrics import bootstrap_ratio_ci, eval_metrics, paired_bootstrap_ci
    from flows.config import load_config

    records = [r for r in records if r.get("rollouts", "base") == rollouts]
    cfg = load_config(str(ROOT / CONFIG), ROLLOUT_SETTINGS[rollouts])
    T = cfg.eval.max_turns or cfg.protocol.max_turns
    frames, reference = collect(records)
    if reference is None:
        return "(no pipeline run finished yet)", {}
    golds = _golds(reference)
    ceiling, best = blind_ceiling(golds, T)
    gold_distinct = len(set(golds)) / len(golds)  # a model right at turn 1 everywhere shows this
    rollout_acc = None
    first = next((r for r in records if "rollout_solved_by_turn_1" in r), None)
    if first is not None:
        rollout_acc = 100 * float(first["rollout_solved_by_turn_1"])
    systems = {"reference": [(reference, {"generated_tokens": 0, "optimizer_steps": 0, "wall_s": 0.0})]}
    systems.update(frames)
    order = ["reference", *PIPELINE_SYSTEMS, "online_rl"]
    order += longer_online_systems(systems)
    order += sorted((s for s in systems if s.startswith("drift_round_")), key=lambda s: int(s.split("_")[-1]))
    ref_ids = reference["prompt_id"].to_list()
    solved, summary_systems = {}, {}
    head = (
        "| system | seeds | "
        + " | ".join(f"multi@{t}" for t in range(1, T + 1))
        + f" | corr@{T} | repeated | top answer sequence (share) | distinct sequences | generated tokens"
        + " | optimizer steps | wall s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in order:
        if name not in systems:
            continue
        runs = systems[name]
        for df, _ in runs:
            assert df["prompt_id"].to_list() == ref_ids, f"{name}: evaluated on other problems"
        ms = [
            eval_metrics(df["turn_correct"].to_list(), df["normalized_answers"].to_list(), T)
            for df, _ in runs
        ]
        solved[name] = np.mean([per_problem_solved(df) for df, _ in runs], axis=0)
        parts = [problem_parts(df, T) for df, _ in runs]
        multi_t = [float(np.mean([m.multi_at[t] for m in ms])) for t in range(T)]
        num = np.sum([p["multi@T"][0] for p in parts], axis=0)
        den = np.sum([p["multi@T"][1] for p in parts], axis=0)
        r, lo, hi = bootstrap_ratio_ci(num, den, n_boot=n_boot)
        corr = [m.correction_rate[T - 1] for m in ms if m.correction_rate[T - 1] is not None]
        corr_t = 100 * float(np.mean(corr)) if corr else 0.0
        repeated = 100 * float(np.mean([m.repeated_answer_share for m in ms]))
        share, seq, distinct = answer_sequences([df for df, _ in runs])
        cost = {
            k: float(np.mean([c[k] for _, c in runs]))
            for k in ("generated_tokens", "optimizer_steps", "wall_s")
        }
        multi_pct, seeds = 100 * r, len(runs) if name != "reference" else 0
        seeds_label = str(seeds) if name != "reference" else "—"
        summary_systems[name] = {
            "seeds": seeds,
            "multi_at_T": round(multi_pct, 2),
            "ci": [round(100 * lo, 2), round(100 * hi, 2)],
            "corr_at_T": round(corr_t, 2),
            "repeated": round(repeated, 2),
            "top_sequence": seq,
            "top_sequence_share": round(100 * share, 2),
            "distinct_sequences": round(100 * distinct, 2),
            "generated_tokens": int(cost["generated_tokens"]),
            "optimizer_steps": int(cost["optimizer_steps"]),
            "wall_s": round(cost["wall_s"], 1),
        }
        lines.append(
            f"| {name} | {seeds_label} | "
            + " | ".join(f"{100 * x:.1f}" for x in multi_t)
            + f" | {corr_t:.1f} | {repeated:.1f} | {seq} ({100 * share:.0f}%) | {100 * distinct:.0f}%"
            + f" | {int(cost['generated_tokens']):,}"
            f" | {int(cost['optimizer_steps'])} | {cost['wall_s']:.0f} |"
        )
    paired = {}
    lines += ["", f"Paired differences in multi@{T} (per problem, seeds averaged), 95% bootstrap CI:"]
    drift_pairs = [
        ("drift", other)
        for other in (
            "reference",
            "uniform",
            "success_only",
            "online_rl",
            *longer_online_systems(solved),
            "drift_all_turns",
        )
    ]
    for one, other in [*drift_pairs, *ABLATION_PAIRS]:
        if one in solved and other in solved:
            d, lo, hi = paired_bootstrap_ci(solved[one], solved[other], n_boot=n_boot)
            paired[f"{one}-{other}"] = [round(100 * d, 2), round(100 * lo, 2), round(100 * hi, 2)]
            lines.append(f"- {one} − {other}: {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    lines += [
        "",
        f"Question-blind ceiling: answering {best} to every problem solves {100 * ceiling:.1f}% by turn {T} "
        "(the best constant sequence, chosen on the eval golds).",
        f"Distinct sequences: per 100 problems, how many different sequences of answers (as the verifier "
        f"reads them) a system gives; the golds hold {len(set(golds))} distinct answers in {len(golds)} "
        f"problems ({100 * gold_distinct:.0f}%), what a model right at turn 1 everywhere shows.",
    ]
    feedback = cfg.protocol.feedback if isinstance(cfg.protocol.feedback, str) else cfg.protocol.feedback.kind
    if feedback == "direction":
        from drift_core.metrics import question_blind_ceiling

        lines.append(
            f"With direction feedback a question-blind policy can search: a binary search over the "
            f"{2**T - 1} most common golds solves {100 * question_blind_ceiling(golds, T, 'direction'):.1f}% "
            f"by turn {T} (the ceiling feedback_summary.json gives)."
        )
    if rollout_acc is not None:
        sampling = cfg.rollout.sampling
        by_turn = [
            f"turn {t} {100 * first[f'rollout_solved_by_turn_{t}']:.1f}%"
            for t in range(1, T + 1)
            if f"rollout_solved_by_turn_{t}" in first  # runs recorded before v2b kept turn 1 only
        ]
        lines.append(
            f"Reference rollouts (K = {cfg.rollout.k}, temperature {sampling.temperature}, after feedback "
            f"{sampling.temperature_at(2)}), solved by: " + ", ".join(by_turn) + "."
        )
    summary = {
        "task": cfg.eval.data.source + " " + json.dumps(cfg.eval.data.arith.model_dump(), sort_keys=True),
        "turns": T,
        "n_eval": len(ref_ids),
        "question_blind_ceiling": round(100 * ceiling, 2),
        "gold_distinct_answers": round(100 * gold_distinct, 2),
        "reference_turn1_rollout_acc": None if rollout_acc is None else round(rollout_acc, 2),
        "systems": summary_systems,
        "paired": paired,
    }
    return "\n".join(lines), summary


# Issue 30, item 7: the settings whose feedback is not the paper's unary text get a summary in the
# issue's schema (percent units), the question "does DRIFT teach a 135M model to use a feedback it
# can use" in one file.
FEEDBACK_SUMMARY = RESULTS / "feedback_summary.json"
FEEDBACK_SYSTEMS = ["reference", "drift", "success_only", "uniform"]


def pl_concat(frames: list):
    import polars as pl

    return pl.concat(frames)


def _fixed_per_problem(df, T: int) -> np.ndarray:
    """Per problem: 1 when solved within T turns but not at turn 1 (fixed after feedback)."""
    return np.array(
        [float(any(list(c)[:T]) and not bool(list(c)[0])) for c in df["turn_correct"].to_list()],
        dtype=np.float64,
    )


def _number(answer) -> float | None:
    try:
        return float(answer)
    except (TypeError, ValueError):
        return None


def moved_as_told(df, golds: dict[str, str]) -> dict:
    """Whether the turn after a wrong first answer moves the way direction feedback said: over the
    problems whose turn 1 is a wrong number and whose turn 2 is a number (``problems``), the share
    that changed the answer (``changed``) and, of those changes, the share that go the told way,
    i.e. to the gold's side of the turn-1 answer (``toward_gold``: it counts overshoots), the share
    that end closer to the gold than turn 1 (``closer``: |a2 - gold| < |a1 - gold|, a landing on
    the gold included) and the share that cross the gold (``overshot``); ``counts`` holds the same
    as numbers of problems. Then the same split by what the feedback said ("larger": the gold is
    above the answer). A policy deaf to the direction shows it in the split: one that always counts
    up is right after "larger" and wrong after "smaller"."""
    moves: dict[str, list[tuple[bool, bool, bool, bool]]] = {"told_larger": [], "told_smaller": []}
    for pid, answers, correct in zip(
        df["prompt_id"].to_list(),
        df["normalized_answers"].to_list(),
        df["turn_correct"].to_list(),
        strict=True,
    ):
        answers, correct = list(answers), list(correct)
        if len(answers) < 2 or correct[0]:
            continue
        a1, a2, gold = _number(answers[0]), _number(answers[1]), _number(golds[pid])
        if a1 is None or a2 is None or gold is None or gold == a1:
            continue
        told = "told_larger" if gold > a1 else "told_smaller"
        changed = a2 != a1
        moves[told].append(
            (
                changed,
                changed and (a2 > a1) == (gold > a1),
                abs(a2 - gold) < abs(a1 - gold),
                (a2 - gold) * (a1 - gold) < 0,
            )
        )

    def shares(moved: list[tuple[bool, bool, bool, bool]]) -> dict:
        changed, toward, closer, overshot = (sum(m[k] for m in moved) for k in range(4))

        def of_changes(n: int) -> float | None:
            return round(100 * n / changed, 2) if changed else None

        return {
            "problems": len(moved),
            "changed": round(100 * changed / len(moved), 2) if moved else None,
            "toward_gold": of_changes(toward),
            "closer": of_changes(closer),
            "overshot": of_changes(overshot),
            "counts": {"changed": changed, "toward_gold": toward, "closer": closer, "overshot": overshot},
        }

    return shares(moves["told_larger"] + moves["told_smaller"]) | {k: shares(v) for k, v in moves.items()}


def feedback_summary(records: list[dict], rollouts: str, n_boot: int = 2000) -> dict:
    """The reference, DRIFT and its two baselines on one rollout setting, in issue 30's schema:
    multi@1, multi@T, fixed after feedback (multi@T - multi@1) and multi@T's 95% CI per system (seeds
    pooled); paired differences per problem (seeds averaged) for multi@T and, against the
    reference, for fixed after feedback. Reference rollout corrections: the share of the reference's
    rollout trajectories solved after a wrong first turn (solved by turn T minus solved at turn 1).
    Turn 2 after a wrong number: ``moved_as_told`` with seeds pooled, and per seed (one entry per
    trained seed; the reference's one frame) without the larger/smaller split."""
    from drift_core.metrics import bootstrap_ratio_ci, paired_bootstrap_ci, question_blind_ceiling
    from flows.config import load_config

    records = [r for r in records if r.get("rollouts", "base") == rollouts]
    cfg = load_config(str(ROOT / CONFIG), ROLLOUT_SETTINGS[rollouts])
    T = cfg.eval.max_turns or cfg.protocol.max_turns
    feedback = cfg.protocol.feedback if isinstance(cfg.protocol.feedback, str) else cfg.protocol.feedback.kind
    frames, reference = collect(records)
    if reference is None:
        return {}
    golds = _golds(reference)
    blind = question_blind_ceiling(golds, T, "direction" if feedback == "direction" else "unary")
    first = next((r for r in records if f"rollout_solved_by_turn_{T}" in r), None)
    corrections = None
    if first is not None:
        corrections = 100 * (first[f"rollout_solved_by_turn_{T}"] - first["rollout_solved_by_turn_1"])
    runs = {"reference": [reference]} | {
        name: [df for df, _ in frames[name]] for name in FEEDBACK_SYSTEMS[1:] if name in frames
    }
    systems, solved, fixed = {}, {}, {}
    for name, dfs in runs.items():
        at_1 = np.concatenate(
            [np.array([float(bool(list(c)[0])) for c in df["turn_correct"].to_list()]) for df in dfs]
        )
        at_t = np.concatenate([per_problem_solved(df) for df in dfs])
        _, lo, hi = bootstrap_ratio_ci(at_t, np.ones_like(at_t), n_boot=n_boot)
        systems[name] = {
            "seeds": 0 if name == "reference" else len(dfs),
            "multi_at_1": round(100 * float(at_1.mean()), 2),
            "multi_at_T": round(100 * float(at_t.mean()), 2),
            "fixed_after_feedback": round(100 * float(at_t.mean() - at_1.mean()), 2),
            "ci": [round(100 * lo, 2), round(100 * hi, 2)],
        }
        solved[name] = np.mean([per_problem_solved(df) for df in dfs], axis=0)
        fixed[name] = np.mean([_fixed_per_problem(df, T) for df in dfs], axis=0)
    paired = {}
    if "drift" in runs:
        for other in FEEDBACK_SYSTEMS:
            if other != "drift" and other in runs:
                d, lo, hi = paired_bootstrap_ci(solved["drift"], solved[other], n_boot=n_boot)
                paired[f"drift-{other}"] = [round(100 * d, 2), round(100 * lo, 2), round(100 * hi, 2)]
        d, lo, hi = paired_bootstrap_ci(fixed["drift"], fixed["reference"], n_boot=n_boot)
        paired["drift-reference_fixed"] = [round(100 * d, 2), round(100 * lo, 2), round(100 * hi, 2)]
    weights = next((r["weights"] for r in records if "weights" in r and r["system"] == "drift"), None)
    gold_of = dict(zip(reference["prompt_id"].to_list(), golds, strict=True))
    return {
        "task": cfg.eval.data.source + " " + json.dumps(cfg.eval.data.arith.model_dump(), sort_keys=True),
        "feedback": feedback,
        "turns": T,
        "n_eval": reference.height,
        "question_blind_ceiling": round(100 * blind, 2),
        "reference_rollout_corrections": None if corrections is None else round(corrections, 2),
        "systems": systems,
        "paired": paired,
        "rollout_overrides": ROLLOUT_SETTINGS[rollouts],
        "reference_rollouts": {
            f"solved_by_turn_{t}": round(100 * first[f"rollout_solved_by_turn_{t}"], 2)
            for t in range(1, T + 1)
            if first is not None and f"rollout_solved_by_turn_{t}" in first
        },
        "drift_weights": weights,
        "fixed_after_feedback_by_seed": {
            name: [round(100 * float(_fixed_per_problem(df, T).mean()), 2) for df in dfs]
            for name, dfs in runs.items()
        },
        "turn_2_after_a_wrong_number": {
            name: moved_as_told(pl_concat(dfs), gold_of) for name, dfs in runs.items()
        },
        "turn_2_after_a_wrong_number_by_seed": {
            name: [
                {k: v for k, v in moved_as_told(df, gold_of).items() if not k.startswith("told_")}
                for df in dfs
            ]
            for name, dfs in runs.items()
        },
        "multi_at_T_by_seed": {
            name: [round(100 * float(per_problem_solved(df).mean()), 2) for df in dfs]
            for name, dfs in runs.items()
        },
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_report(records: list[dict]) -> None:
    """One table and summary per rollout setting that has runs; the base one is issue 10's."""
    settings = ["base"] + sorted({r["rollouts"] for r in records if r.get("rollouts", "base") != "base"})
    for rollouts in settings:
        table, summary = report(records, rollouts=rollouts)
        suffix = "" if rollouts == "base" else f"_{rollouts}"
        print(f"## rollouts: {rollouts}\n{table}", flush=True)
        _write_atomic(TABLE.with_name(f"{TABLE.stem}{suffix}.md"), table + "\n")
        if summary:
            summary["rollout_overrides"] = ROLLOUT_SETTINGS[rollouts]
            _write_atomic(
                SUMMARY.with_name(f"{SUMMARY.stem}{suffix}.json"), json.dumps(summary, indent=2) + "\n"
            )
        if rollouts in FEEDBACK_SETTINGS:
            fs = feedback_summary(records, rollouts)
            if fs:
                _write_atomic(FEEDBACK_SUMMARY, json.dumps(fs, indent=2) + "\n")


def read_runs() -> list[dict]:
    return [json.loads(line) for line in RUNS.read_text().splitlines() if line] if RUNS.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", choices=SYSTEMS, default=SYSTEMS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--online-steps", type=int, default=V2_ONLINE_STEPS, help="online.max_steps of the online runs"
    )
    parser.add_argument(
        "--rollouts",
        choices=ROLLOUT_SETTINGS,
        default="base",
        help="train the pipeline systems on another rollout setting (Evidence v2b); base = v2",
    )
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.rollouts != "base" and not args.report_only and {"online_rl", "rounds"} & set(args.only):
        parser.error(
            "--rollouts applies to the pipeline systems: online_rl and rounds make their own rollouts"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    complete_snapshots()

    def record(rec: dict) -> None:
        snapshot(rec)
        with RUNS.open("a") as f:  # a sweep running beside this one appends to the same file
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
        write_report(read_runs())

    def pending(tag: str) -> bool:
        return tag not in {r["tag"] for r in read_runs()}

    if not args.report_only:
        # The cheap systems first (they share one set of rollouts), every seed; then the slow ones.
        for seed in args.seeds:
            for name in PIPELINE_SYSTEMS:
                wanted = name in args.only or ("reference" in args.only and name == "drift")
                if wanted and pending(pipeline_tag(name, seed, args.rollouts)):
                    record(run_pipeline_system(name, seed, args.rollouts))
        for seed in args.seeds:
            if "online_rl" in args.only and pending(online_tag(seed, args.online_steps)):
                record(run_online(seed, args.online_steps))
        for seed in args.seeds:
            if "rounds" in args.only and pending(f"rounds-s{seed}"):
                record(run_rounds(seed, args.rounds))
    write_report(read_runs())


if __name__ == "__main__":
    main()
