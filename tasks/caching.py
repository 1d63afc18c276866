"""Cache keys: what each stage's output depends on, hashed.

A stage key is sha256 over the stage name, a schema version, and a JSON document of its inputs:
upstream artifacts by their content hash, models by fingerprint, and only the config sections
that change the stage's output. Settings that change speed but not results (batch sizes, worker
counts, pool names) are left out, so tuning them never invalidates rollouts: every such list is
here (``SPEED_ONLY`` for stage keys and the online run's directory, ``TRAIN_RESUME_IGNORES`` for
a training run's resume identity), so the rule is written once.

The same key names the Prefect cache entry and the artifact directory in the store. The store is
the one record of "this stage is done" (docs/architecture.md, "Artifacts, manifests, cache keys"):
every stage task first asks the store and, on a verified hit, returns :func:`served_from_store`,
Prefect state ``Cached``, whether or not Prefect's own record was written (a SIGKILL between the two
writes leaves only the store's). A Prefect record whose artifact is missing or corrupt is
recomputed by ``flows.stages.StageRunner``.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from prefect.context import TaskRunContext
from prefect.states import Completed, State
from pydantic import BaseModel

from tasks.store import ArtifactStore, Manifest

if TYPE_CHECKING:
    from drift_core.schemas import EngineConfig

# Bump when a stage's output format or semantics change: old cache entries stop matching.
SCHEMA_VERSION = "1"


def _canonical(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def stage_key(stage: str, **inputs: Any) -> str:
    doc = json.dumps({"stage": stage, "v": SCHEMA_VERSION, "inputs": _canonical(inputs)}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


# Per section (by config class): the settings that change where or how fast a stage runs, never
# what it produces. (train.batch_size is NOT here: it changes the optimisation; the engine's
# batch_size is not keyed.)
SPEED_ONLY: dict[str, frozenset[str]] = {
    "VerifierConfig": frozenset({"workers"}),
    "RolloutConfig": frozenset({"shard_size"}),
    # packing, loss_kernel and compile compute the same objective with other kernels (equal loss
    # within bf16 tolerance, tests/test_fast_paths.py): speed settings, like the process count
    "TrainConfig": frozenset(
        {
            "work_pool",
            "checkpoint_every",
            "num_processes",
            "accelerate_config",
            "packing",
            "loss_kernel",
            "compile",
        }
    ),
    "OnlineConfig": frozenset({"output_dir"}),  # where the online run's directory lives
}

#: TrainConfig settings a resumed training run may differ in and still continue from its
#: checkpoints (``tasks.trainer.run_fingerprint``). Narrower than ``SPEED_ONLY``: the process
#: count, packing and kernels change the micro-batch plan or the state a checkpoint holds.
TRAIN_RESUME_IGNORES = frozenset({"checkpoint_every", "work_pool"})


def result_fields(model: BaseModel) -> dict:
    """A config section without the fields that change speed, not results (kept out of cache keys).
    Shard size stays out too: each shard's key holds its own prompt range, and a joined artifact's
    key holds its shards' keys (not their content hashes, which include timings)."""
    drop = SPEED_ONLY.get(type(model).__name__, frozenset())
    return {k: v for k, v in model.model_dump(mode="json").items() if k not in drop}


def engine_identity(engine: EngineConfig, dtype: str) -> str:
    """What of the engine goes into rollout and evaluation keys, each part only where it changes
    the tokens: the engine's kind; its decoding path unless standard (compiled kernels and paged
    attention may change the last bits of the logits, hence sampled tokens); vLLM's scheduler
    unless ``trajectory``; and ``dtype``, the dtype the engine computes in
    (:func:`tasks.engines.compute_dtype`, ``auto`` resolved), unless float32.

    Why the scheduler and the dtype: in bfloat16 (vLLM's own ``auto`` for SmolLM2; drift asks vLLM
    for it explicitly, or by ``auto`` on a GPU: on a CPU drift's ``auto`` is float32) the two
    schedulers batch other requests together, the kernels round differently, and the tokens part
    somewhere on 2 of 3 sampled trajectories (issue 36: 84 of 256 identical); in float32 they give
    the same tokens (tests/test_vllm.py). So a run in one must not be served the other's rollouts.

    Keys made before each part existed stay valid, as the config sections keep theirs by leaving a
    setting out of dumps at its old default (``_without_field_at`` in drift_core/schemas.py): a
    part is left out at the value every earlier key was made with. Exactly for these two that keeps
    a key only where the tokens are the same: an old ``vllm`` key is now a float32 trajectory run's,
    and an old float32 rollout made with the ``turn`` scheduler has the same tokens. Old keys of
    bfloat16 runs stop matching for bfloat16 runs (explicit ``bfloat16``, the transformers engine's
    ``auto`` on a GPU), which is the point: they served float32 and bfloat16 runs, and both
    schedulers, alike. The exception: an old ``vllm`` key may hold a bfloat16 run (vLLM's ``auto``
    on a CPU before the dtype was keyed and before drift resolved it to float32 there), and it is
    served to float32 runs, today's ``auto`` on a CPU included: tokens of the same distribution, not
    the ones the run would make. Deleting such a store's rollouts and evaluations re-makes them."""
    identity = engine.kind if engine.decoding == "standard" else f"{engine.kind}/{engine.decoding}"
    if engine.kind == "vllm" and engine.scheduling != "trajectory":  # the transformers engine has one
        identity += f"/{engine.scheduling}"
    if dtype != "float32":
        identity += f"@{dtype}"
    return identity


def generation_key(
    stage: str,
    *,
    model: str,
    problems: str,
    protocol: BaseModel,
    verifier: BaseModel,
    engine: EngineConfig,
    dtype: str,
    **settings: Any,
) -> str:
    """The base key of a stage that plays the protocol with a model (rollout, evaluation): the
    model's fingerprint, the problems' content hash, the protocol, the verifier's result fields and
    the engine's identity with the dtype it computes in (``compute_dtype``), plus the stage's own
    ``settings``."""
    return stage_key(
        stage,
        model=model,
        problems=problems,
        protocol=protocol,
        verifier=result_fields(verifier),
        engine=engine_identity(engine, dtype),
        **settings,
    )


def key_from_parameters(context, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn``: tasks take an explicit ``key`` parameter computed by the flow."""
    return f"{context.task.name}-{parameters['key']}"


def served_from_store(store: ArtifactStore, stage: str, key: str) -> State | Manifest | None:
    """The store's verified artifact for (stage, key) as a task's return value, or None when the
    stage has to run.

    Inside a Prefect task run the hit is a ``Cached`` state (type COMPLETED) holding the manifest,
    so the UI, ``state.name`` and the flow report a cache hit however the store was filled; Prefect
    then writes its own record under the same key. Called directly (``task.fn(...)``) it is the
    manifest itself.
    """
    found = store.find(stage, key)
    if found is None:
        return None
    if TaskRunContext.get() is None:
        return found
    return Completed(name="Cached", data=found, message=f"verified artifact {found.uri} in the store")
