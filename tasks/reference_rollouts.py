"""Rollouts made by the DRIFT reference scripts, as the rollout artifact of a drift run.

``drift run CONFIG --rollouts-from rollouts.jsonl`` re-weights, trains and evaluates rollouts a user
already made with the reference's ``generate_weighted_data_vllm_metamathqa.py`` (on a GPU cluster,
say). The file is read exactly as ``drift weights`` reads it (:mod:`tasks.weights_jsonl`: the rule
of ``weight_sft.py``), and three things the trainer needs and the reference records lack are
derived here, the way ``weight_sft.py`` itself treats the records:

* ``traj_idx``: a record's position among the records of its ``prompt_id``, in file order (the
  reference writes a prompt's K trajectories in the order it sampled them and does not store the
  index). A file that has its own ``traj_idx`` column keeps it, if it numbers each group's records
  without repeats;
* ``messages``: the conversation up to its last assistant message (``weight_sft.py`` ignores what
  follows it, with a warning);
* ``trainable``: False for a record without an assistant message or whose last one is empty.
  ``weight_sft.py`` computes the weights over every record and only then drops those from training,
  so they stay in the artifact (they count in their group's mean) and the weights stage drops
  them after weighting (:func:`trainable_rows`).

The artifact keeps the normalised columns (``turn_rewards`` as a list, ``answer_norms``,
``format_penalty`` as applied, ``solved``), so the weights stage computes the script's returns
from it with the reference repetition rule (:func:`is_reference_frame`).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import task

from drift_core.errors import InputError
from tasks.caching import served_from_store
from tasks.store import ArtifactStore, Manifest
from tasks.weights_jsonl import BadRowsReport, parquet_storable, read_reference_jsonl

__all__ = ["import_reference_rollouts", "is_reference_frame", "reference_rollout_frame", "trainable_rows"]

REFERENCE_SUFFIXES = (".jsonl", ".ndjson")
MESSAGES = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))


def is_reference_file(ref: str) -> bool:
    """``--rollouts-from`` names a reference-format JSONL file (not an MLflow run id or a manifest)."""
    return Path(ref).suffix.lower() in REFERENCE_SUFFIXES


def is_reference_frame(columns: list[str]) -> bool:
    """A rollout artifact imported from reference JSONL (its answer list is ``answer_norms``)."""
    return "answer_norms" in columns and "turn_correct" not in columns


def _last_assistant(messages: list[dict] | None) -> tuple[list[dict] | None, bool]:
    """(the messages up to the last assistant message, whether that message is non-empty)."""
    if not messages:
        return messages, False
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        return messages, False
    return messages[: last + 1], bool(messages[last].get("content"))


def reference_rollout_frame(path: str | Path) -> pl.DataFrame:
    """The records of a reference rollout file as a rollout artifact frame (module docstring).
    Any bad record is an error naming file, line and field (as ``drift weights`` without
    ``--on-bad-rows skip``): a training run should not start on a file with holes."""
    path = Path(path)
    df = read_reference_jsonl(path, "error", BadRowsReport())
    if df.height == 0:
        raise InputError(f"{path}: no trajectories in the file")
    if "messages" not in df.columns:
        raise InputError(
            f"{path}: the records have no 'messages' (the conversation to train on); found {df.columns}"
        )
    try:
        messages = df["messages"].cast(MESSAGES)
    except pl.exceptions.PolarsError as exc:
        raise InputError(
            f"{path}: 'messages' must be a list of {{'role', 'content'}} objects in every record ({exc})"
        ) from None
    bad_role = messages.list.eval(
        ~pl.element().struct.field("role").is_in(["system", "user", "assistant"])
    ).list.any()
    if bad_role.any():
        row = int(bad_role.arg_true()[0])
        raise InputError(f"{path}: row {row + 1}: a message role is not system, user or assistant")
    trimmed = [_last_assistant(m) for m in messages.to_list()]
    df = df.with_columns(
        pl.Series("messages", [m for m, _ in trimmed], dtype=MESSAGES),
        pl.Series("trainable", [ok for _, ok in trimmed], dtype=pl.Boolean),
        pl.Series("n_turns", [sum(x["role"] == "assistant" for x in (m or [])) for m, _ in trimmed]),
    )
    df = _with_traj_idx(df, path)
    return parquet_storable(df)


def _with_traj_idx(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    if "traj_idx" not in df.columns:
        return df.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).over("prompt_id").alias("traj_idx"))
    if not df.schema["traj_idx"].is_integer() or df["traj_idx"].null_count():
        raise InputError(f"{path}: traj_idx must be an integer in every record, got {df.schema['traj_idx']}")
    dup = df.group_by("prompt_id").agg(pl.col("traj_idx").is_duplicated().any().alias("d")).filter("d")
    if dup.height:
        raise InputError(f"{path}: traj_idx repeats within prompt_id {dup['prompt_id'][0]!r}")
    return df.with_columns(pl.col("traj_idx").cast(pl.Int64))


def trainable_rows(df: pl.DataFrame) -> pl.DataFrame:
    """The weighted rows ``weight_sft.py`` trains on (after weighting over all of them)."""
    return df.filter(pl.col("trainable")) if "trainable" in df.columns else df


@task(name="rollout-import")
def import_reference_rollouts(path: str, store_root: str, key: str) -> Manifest:
    """Publish a reference rollout file as a ``rollout`` artifact (cached by the file's hash)."""
    store = ArtifactStore(store_root)
    if (hit := served_from_store(store, "rollout", key)) is not None:
        return hit
    df = reference_rollout_frame(path)
    meta = {
        "trajectories": float(df.height),
        "prompts": float(df["prompt_id"].n_unique()),
        "solved_share": float(df["solved"].mean() or 0.0),
        "mean_turns": float(df["n_turns"].mean() or 0.0),
        "imported_from": str(path),
    }
    return store.write_parquet(df, "rollout", key, meta=meta)
