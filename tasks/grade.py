"""Grading: verdicts for a batch of assistant turns, in a process pool with a time limit per answer.

The protocol needs a verdict after every turn, so grading runs inside the rollout loop, between two
generation calls. Verifiers run in worker processes, where math-verify's signal-based time limit
works (it needs a main thread); a second, outer limit on each future catches anything the signal
cannot interrupt (a long C call): the stuck worker pool is killed and rebuilt, and that answer is
graded incorrect (undecided), so one pathological answer can neither hang nor crash a rollout.

``grade`` is also a Prefect task of its own, so grading can run on CPU workers and be timed alone.

Lifetime (no grading process outlives the work that started it): :func:`grader_for` gives a shard
its pool. Inside a :func:`grading_scope` (the flow's shard runner opens one in the flow process)
shards of that process share one pool, shut down when the scope ends, also on failure. Outside any
scope (a shard on a Dask worker, local or remote, or a direct call) the pool is the shard's own and
is shut down when the shard ends. A pool worker also exits by itself once the process that started
it is gone (killed, cancelled), so a hard kill cannot orphan it either.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import task

from drift_core.schemas import ProtocolConfig, TurnResult, VerifierConfig
from tasks import grading_worker

log = logging.getLogger(__name__)

#: How long a fresh pool may take to start its workers (spawn + imports) on a busy machine.
POOL_START_TIMEOUT_S = 300.0

# A turn to grade: (assistant content incl. prefill, gold answer, generated token count)
GradeItem = tuple[str, str, int]


class Grader:
    """A grading pool for one (protocol, verifier) setting; ``close`` (or the ``with`` block) ends
    its processes."""

    def __init__(self, protocol: ProtocolConfig, verifier: VerifierConfig):
        self.protocol = protocol
        self.verifier = verifier
        self._protocol_json = protocol.model_dump_json()
        self._verifier_json = verifier.model_dump_json()
        self._pool: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.timeouts = 0
        self.graded = 0
        self.seconds = 0.0

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            # spawn: never fork a process that holds torch threads or Prefect's event loop
            self._pool = cf.ProcessPoolExecutor(
                self.verifier.workers,
                mp_context=mp.get_context("spawn"),
                initializer=grading_worker.warm_worker,
                initargs=(self._verifier_json, os.getpid()),
            )
            # per-answer limits start once the workers are up: a cold start (spawn, imports) is
            # neither charged to the first answers nor mistaken for a stuck worker
            for ready in [self._pool.submit(grading_worker.ready) for _ in range(self.verifier.workers)]:
                ready.result(timeout=POOL_START_TIMEOUT_S)
        return self._pool

    def _kill_pool(self, wait: bool = False) -> None:
        """Kill the pool's processes (``wait``: and reap them before returning)."""
        if self._pool is None:
            return
        for proc in list(getattr(self._pool, "_processes", {}).values()):
            proc.kill()
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self._pool = None

    def grade(self, items: list[GradeItem]) -> list[TurnResult]:
        """Grade a batch; results in input order."""
        if not items:
            return []
        start = time.perf_counter()
        with self._lock:
            results: list[TurnResult | None] = [None] * len(items)
            pending = list(range(len(items)))
            # generous outer limit: the in-worker limit fires first in every normal case
            outer = self.verifier.timeout_s * max(1, self.protocol.max_actions) + 10.0
            while pending:
                pool = self._get_pool()
                futures = {
                    i: pool.submit(
                        grading_worker.grade_one, *items[i], self._protocol_json, self._verifier_json
                    )
                    for i in pending
                }
                retry: list[int] = []
                broken = False
                for i, future in futures.items():
                    if broken:
                        retry.append(i)
                        continue
                    try:
                        results[i] = TurnResult.model_validate(future.result(timeout=outer))
                    except (cf.TimeoutError, cf.process.BrokenProcessPool) as exc:
                        log.warning("grading answer %d failed (%s); graded incorrect", i, type(exc).__name__)
                        self.timeouts += 1
                        results[i] = _undecided(items[i])
                        self._kill_pool()
                        broken = True  # the other futures died with the pool: resubmit them
                pending = [i for i in retry if results[i] is None]
        self.graded += len(items)
        self.seconds += time.perf_counter() - start
        return [r for r in results if r is not None]

    def close(self) -> None:
        """Shut the pool down and wait for its processes to exit."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # failed or cancelled: do not wait for answers nobody will read
            self._kill_pool(wait=True)


def _undecided(item: GradeItem) -> TurnResult:
    return TurnResult(
        response=item[0],
        answer=None,
        normalized_answer=None,
        correct=False,
        valid=True,
        format_penalty=0.0,
        n_tokens=item[2],
    )


_shared: dict[str, Grader] = {}
_scopes = 0
_shared_lock = threading.Lock()


@contextmanager
def grading_scope() -> Iterator[None]:
    """While open, shards of this process share one pool per setting (a flow's rollout shards on
    the thread runner reuse the pool turn after turn, shard after shard); at its end, also on
    failure or cancellation, every pool made inside is shut down. Scopes nest."""
    global _scopes
    with _shared_lock:
        _scopes += 1
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        with _shared_lock:
            _scopes -= 1
            spent = list(_shared.values()) if _scopes == 0 else []
            if _scopes == 0:
                _shared.clear()
        for grader in spent:
            if failed:
                grader._kill_pool(wait=True)
            else:
                grader.close()


@contextmanager
def grader_for(protocol: ProtocolConfig, verifier: VerifierConfig) -> Iterator[Grader]:
    """The grader a shard uses: the scope's shared one inside a :func:`grading_scope`, else a pool
    of the shard's own that ends with the ``with`` block."""
    key = protocol.model_dump_json() + verifier.model_dump_json()
    with _shared_lock:
        shared = None
        if _scopes > 0:
            shared = _shared.get(key) or _shared.setdefault(key, Grader(protocol, verifier))
    if shared is not None:
        yield shared
        return
    with Grader(protocol, verifier) as own:
        yield own


def responses_hash(items: list[GradeItem]) -> str:
    h = hashlib.sha256()
    for content, gold, n_tokens in items:
        h.update(json.dumps([content, gold, n_tokens]).encode() + b"\n")
    return h.hexdigest()


@task(name="grade", task_run_name="grade-{n}-responses")
def grade(items: list[GradeItem], protocol: ProtocolConfig, verifier: VerifierConfig, n: int = 0) -> dict:
    """Grade a table of responses (content, gold, n_tokens) on this worker; returns a JSON-able
    table: correct, valid, format_penalty, answer, normalized_answer, and throughput."""
    with grader_for(protocol, verifier) as grader:
        start = time.perf_counter()
        results = grader.grade([tuple(i) for i in items])
        seconds = time.perf_counter() - start
    return {
        "rows": [r.model_dump(exclude={"response"}) for r in results],
        "answers_per_s": len(items) / seconds if seconds > 0 else None,
        "timeouts": grader.timeouts,
    }
