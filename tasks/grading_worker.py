"""What runs inside a grading pool's worker processes (tasks.grade starts them).

A spawned worker imports the module of every function it is handed, so this module imports only
what grading needs (drift_core: pydantic, math-verify on first use) and not tasks.grade, whose
Prefect import cost each worker about two seconds of start-up on one core: a rollout or evaluation
stage starts a pool of ``verifier.workers`` processes, and a pipeline run starts one per setting.
"""

from __future__ import annotations

import os
import threading
import time

from drift_core.protocol import grade_turn
from drift_core.schemas import ProtocolConfig, VerifierConfig
from drift_core.verify import make_verifier

#: How often a pool worker checks that the process that started it is still there.
PARENT_POLL_S = 0.5


def exit_with_parent(parent: int) -> None:
    """Exit this worker once ``parent`` is gone: a killed parent (SIGKILL, a Dask nanny killing its
    worker, a cancelled flow run) never shuts its pool down, and the worker would wait forever on
    a queue whose write end it holds itself."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def warm_worker(verifier_json: str, parent: int) -> None:
    """Pool initializer: watch the parent (above), then run the verifier once outside any time
    limit, so that importing sympy and math-verify (seconds) is not charged to the first answer a
    fresh worker grades, which would then time out and be graded incorrect."""
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True, name="parent-watch").start()
    make_verifier(VerifierConfig.model_validate_json(verifier_json)).check("\\frac{1}{2}", "0.5")


def ready() -> bool:
    return True


def grade_one(content: str, gold: str, n_tokens: int, protocol_json: str, verifier_json: str) -> dict:
    """One verdict, as a dict (a TurnResult's fields) for the trip back to the parent."""
    protocol = ProtocolConfig.model_validate_json(protocol_json)
    verifier = make_verifier(VerifierConfig.model_validate_json(verifier_json))
    return grade_turn(content, gold, protocol, verifier, n_tokens=n_tokens).model_dump()
