"""Cache keys: what each stage's output depends on, hashed.

A stage key is sha256 over the stage name, a schema version, and a JSON document of its inputs:
upstream artifacts by their content hash, models by fingerprint, and only the config sections
that change the stage's output. Settings that change speed but not results (batch sizes, worker
counts, pool names) are left out, so tuning them never invalidates rollouts.

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
from typing import Any

from prefect.context import TaskRunContext
from prefect.states import Completed, State
from pydantic import BaseModel

from tasks.store import ArtifactStore, Manifest

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
