"""Flow runs whose process was killed (SIGKILL, the OOM killer) stay ``Running`` in Prefect forever
when nothing supervises them: a ``drift run`` executes its flow in its own process, with no worker
to report the crash. The CLI tags each run it starts with its host and pid; before starting the
next one, it marks ``Crashed`` the running drift flow runs of this host whose process is gone.

Deployment runs are not tagged and never touched here: their worker reports a crashed subprocess.
The MLflow side of the same problem is :func:`tasks.tracking.close_orphaned_runs`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

from tasks.tracking import process_alive

log = logging.getLogger(__name__)

HOST_TAG, PID_TAG = "drift.host:", "drift.pid:"
FLOWS = ("drift", "drift-eval")


def owner_tags() -> list[str]:
    return [f"{HOST_TAG}{socket.gethostname()}", f"{PID_TAG}{os.getpid()}"]


@contextlib.contextmanager
def owned_by_this_process() -> Iterator[None]:
    """Tag the flow runs started inside with this host and pid."""
    from prefect import tags

    with tags(*owner_tags()):
        yield


@contextlib.contextmanager
def task_runs_without_owner_tags() -> Iterator[None]:
    """Inside a flow: the task runs started here do not inherit the owner tags (other tags stay).

    Only flow runs are looked up by owner. On a task run, every tag costs an API round trip
    (Prefect acquires a tag concurrency slot for each tagged task run), and a pid tag is new in
    every run: profiled, the first task run of a cached run waited about 2 s there, 1 run in 3."""
    from prefect.context import TagsContext

    kept = {t for t in TagsContext.get().current_tags if not t.startswith((HOST_TAG, PID_TAG))}
    with TagsContext(current_tags=kept):
        yield


def crash_orphaned_flow_runs() -> list[str]:
    """Mark ``Crashed`` this host's running drift flow runs whose process is gone; their ids.

    Never stops a run from starting: an unreachable API is logged and ignored."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    host_tag = f"{HOST_TAG}{socket.gethostname()}"
    crashed: list[str] = []
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
                    tags=FlowRunFilterTags(all_=[host_tag]),
                ),
                limit=200,
            )
            for run in runs:
                pids = [t[len(PID_TAG) :] for t in run.tags if t.startswith(PID_TAG)]
                if len(pids) != 1 or not pids[0].isdigit():
                    continue
                pid = int(pids[0])
                if pid == os.getpid() or process_alive(pid):
                    continue
                message = (
                    f"process {pid} on {socket.gethostname()} is gone (killed); marked by a later drift run"
                )
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                crashed.append(str(run.id))
    except Exception as exc:  # housekeeping must never block a run
        log.warning("could not check for crashed drift flow runs: %s", exc)
    if crashed:
        log.warning("marked %d flow run(s) of killed drift processes Crashed: %s", len(crashed), crashed)
    return crashed
