"""reasoning-gym scorers run under a deadline, in the verifier worker subprocesses (:mod:`pacsrl.rewards._pool`).

A reasoning-gym task scores an answer with its own Python code, and some of it runs the model's text
through SymPy (``countdown`` calls ``parse_expr`` on it: ``9**9**9**9`` never returns). So, as for
math-verify, the parent never calls a scorer itself: the answers of one call go to a worker subprocess
in one request, the worker imports reasoning-gym and builds the task's scorer once, answers job by job,
and is killed when a job overruns its deadline (:meth:`pacsrl.rewards._pool.WorkerPool.run_batch`).

A job that times out or whose scorer raises scores 0.0 and is counted in
:func:`pacsrl.rewards.verifier_stats`, shared with the math verifier. Timeouts are logged as warnings
one by one; scorer errors are logged as warnings when a task's count reaches 1, 2, 4, 8, ...: a scorer
may reject odd answers by raising, but one that raises on every row is broken and must not go unseen.

The parent process does not import reasoning-gym for this (the worker does).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pacsrl.rewards._pool import Outcome, count_job, get_pool, preview, validate_timeout

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0


class _ErrorCounts:
    """Scorer errors per task in this process, to rate-limit their warnings."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, task: str) -> int:
        with self._lock:
            self._counts[task] = self._counts.get(task, 0) + 1
            return self._counts[task]

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()


_ERRORS = _ErrorCounts()
os.register_at_fork(after_in_child=_ERRORS.after_fork_in_child)


def _is_power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


def score_gym_answers(
    task: str,
    answers: Sequence[str],
    entries: Sequence[Mapping[str, Any]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    num_workers: int = 1,
) -> list[tuple[float, Outcome]]:
    """Score each answer with ``task``'s own scorer: ``(score, outcome)`` per answer, in order.

    ``score`` is the scorer's ``score_answer(answer, entry)`` as a float (partial credit included);
    0.0 when the outcome is ``"timeout"`` (over ``timeout`` seconds) or ``"error"`` (the scorer raised or
    the worker died). Every job is counted in :func:`pacsrl.rewards.verifier_stats`.

    Args:
        task: reasoning-gym task name.
        answers: the extracted answers (the text inside ``<answer>...</answer>``).
        entries: for each answer, the entry the scorer reads (``question``, ``answer``, ``metadata``);
            must be JSON-serialisable, as it travels to the worker.
        timeout: seconds allowed per answer.
        num_workers: worker subprocesses the answers are spread over (contiguous chunks).

    Raises:
        ValueError: on a non-positive timeout or misaligned inputs.
        RuntimeError: if a worker cannot start or cannot build the task's scorer (e.g. reasoning-gym is
            not installed, or the task is unknown): an environment problem, never scored 0.0.
    """
    timeout = validate_timeout(timeout)
    if len(answers) != len(entries):
        raise ValueError(f"got {len(answers)} answers but {len(entries)} entries; they must match one to one")
    jobs = [{"task": task, "answer": a, "entry": dict(e)} for a, e in zip(answers, entries)]
    if not jobs:
        return []
    pool = get_pool(num_workers)
    setup = (f"gym:{task}", {"op": "gym_load", "task": task})

    def run(chunk: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
        return pool.run_batch(lambda pending: {"op": "gym", "jobs": pending}, chunk, timeout, setup)

    n_chunks = min(num_workers, len(jobs))
    if n_chunks == 1:
        responses = run(jobs)
    else:
        bounds = [len(jobs) * k // n_chunks for k in range(n_chunks + 1)]
        chunks = [jobs[bounds[k] : bounds[k + 1]] for k in range(n_chunks)]
        with ThreadPoolExecutor(max_workers=n_chunks) as executor:
            responses = [r for part in executor.map(run, chunks) for r in part]
    return [_outcome(task, job["answer"], response, timeout) for job, response in zip(jobs, responses)]


def _outcome(
    task: str, answer: str, response: dict[str, Any] | None, timeout: float
) -> tuple[float, Outcome]:
    if response is None:
        stats = count_job("timeout")
        logger.warning(
            "%s scorer timed out after %.3g s on answer %s, which scores 0.0 "
            "(%d timeouts in %d checks so far)",
            task,
            timeout,
            preview(answer),
            stats.timeouts,
            stats.calls,
        )
        return 0.0, "timeout"
    if "error" in response:
        stats = count_job("error")
        count = _ERRORS.add(task)
        if _is_power_of_two(count):
            logger.warning(
                "%s scorer raised on answer %s, which scores 0.0: %s (%d %s scorer errors so far, logged at "
                "1, 2, 4, ...; %d errors in %d checks of all verifiers). A scorer that raises on every row "
                "is broken, e.g. by metadata types changed in the JSON round trip",
                task,
                preview(answer),
                response["error"],
                count,
                task,
                stats.errors,
                stats.calls,
            )
        return 0.0, "error"
    count_job("ok")
    return float(response["score"]), "ok"
