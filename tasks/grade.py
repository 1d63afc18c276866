"""Grading: verdicts for a batch of assistant turns, in a process pool with a time limit per answer.

The protocol needs a verdict after every turn, so grading runs inside the rollout loop, between two
generation calls. Verifiers run in worker processes, where math-verify's signal-based time limit
works (it needs a main thread); a second, outer limit on each future catches anything the signal
cannot interrupt (a long C call): the stuck worker pool is killed and rebuilt, and that answer is
graded incorrect (undecided), so one pathological answer can neither hang nor crash a rollout.

``grade`` is also a Prefect task of its own, so grading can run on CPU workers and be timed alone.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing as mp
import threading
import time

from prefect import task

from drift_core.protocol import grade_turn
from drift_core.schemas import ProtocolConfig, TurnResult, VerifierConfig
from drift_core.verify import make_verifier

log = logging.getLogger(__name__)

#: How long a fresh pool may take to start its workers (spawn + imports) on a busy machine.
POOL_START_TIMEOUT_S = 300.0

# A turn to grade: (assistant content incl. prefill, gold answer, generated token count)
GradeItem = tuple[str, str, int]


def _warm_worker(verifier_json: str) -> None:
    """Pool initializer: run the verifier once outside any time limit, so that importing sympy and
    math-verify (seconds) is not charged to the first answer a fresh worker grades, which would
    then time out and be graded incorrect."""
    make_verifier(VerifierConfig.model_validate_json(verifier_json)).check("\\frac{1}{2}", "0.5")


def _ready() -> bool:
    return True


def _grade_one(content: str, gold: str, n_tokens: int, protocol_json: str, verifier_json: str) -> dict:
    protocol = ProtocolConfig.model_validate_json(protocol_json)
    verifier = make_verifier(VerifierConfig.model_validate_json(verifier_json))
    return grade_turn(content, gold, protocol, verifier, n_tokens=n_tokens).model_dump()


class Grader:
    """A reusable grading pool for one (protocol, verifier) setting."""

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
                initializer=_warm_worker,
                initargs=(self._verifier_json,),
            )
            # per-answer limits start once the workers are up: a cold start (spawn, imports) is
            # neither charged to the first answers nor mistaken for a stuck worker
            for ready in [self._pool.submit(_ready) for _ in range(self.verifier.workers)]:
                ready.result(timeout=POOL_START_TIMEOUT_S)
        return self._pool

    def _kill_pool(self) -> None:
        if self._pool is None:
            return
        for proc in list(getattr(self._pool, "_processes", {}).values()):
            proc.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)
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
                    i: pool.submit(_grade_one, *items[i], self._protocol_json, self._verifier_json)
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
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


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


_graders: dict[str, Grader] = {}
_graders_lock = threading.Lock()


def get_grader(protocol: ProtocolConfig, verifier: VerifierConfig) -> Grader:
    """One pool per setting per process, reused across turns and shards."""
    key = protocol.model_dump_json() + verifier.model_dump_json()
    with _graders_lock:
        if key not in _graders:
            _graders[key] = Grader(protocol, verifier)
        return _graders[key]


def responses_hash(items: list[GradeItem]) -> str:
    h = hashlib.sha256()
    for content, gold, n_tokens in items:
        h.update(json.dumps([content, gold, n_tokens]).encode() + b"\n")
    return h.hexdigest()


@task(name="grade", task_run_name="grade-{n}-responses")
def grade(items: list[GradeItem], protocol: ProtocolConfig, verifier: VerifierConfig, n: int = 0) -> dict:
    """Grade a table of responses (content, gold, n_tokens) on this worker; returns a JSON-able
    table: correct, valid, format_penalty, answer, normalized_answer, and throughput."""
    grader = get_grader(protocol, verifier)
    start = time.perf_counter()
    results = grader.grade([tuple(i) for i in items])
    seconds = time.perf_counter() - start
    return {
        "rows": [r.model_dump(exclude={"response"}) for r in results],
        "answers_per_s": len(items) / seconds if seconds > 0 else None,
        "timeouts": grader.timeouts,
    }
