"""Cache keys: what each stage's output depends on, hashed.

A stage key is sha256 over the stage name, a schema version, and a JSON document of its inputs:
upstream artifacts by their content hash, models by fingerprint, and only the config sections
that change the stage's output. Settings that change speed but not results (batch sizes, worker
counts, pool names) are left out, so tuning them never invalidates rollouts.

The same key names the Prefect cache entry (task state ``Cached``) and the artifact directory in
the store, so a cache hit can always be checked against the artifact's content hash.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

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
