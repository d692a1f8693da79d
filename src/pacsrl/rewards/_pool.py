"""A pool of verifier worker subprocesses (:mod:`pacsrl.rewards._worker`), shared by every verifier, and the
counters of the jobs they run.

Verifiers never run a check in the training process: :mod:`pacsrl.rewards.math` sends math-verify jobs and
:mod:`pacsrl.rewards.gym` reasoning-gym scorer jobs to a worker subprocess, which is killed when a job overruns
its deadline. So a check never raises on completion text, never hangs, and works from any thread or process.

- :func:`get_pool` gives this process's pool of at most ``num_workers`` workers (one pool per size), started
  lazily and shared by all threads; :meth:`WorkerPool.run` runs one job, :meth:`WorkerPool.run_batch` a batch
  sent in one request. A worker that timed out or died is killed and replaced on the next call.
- :func:`count_job` counts each finished job by its :data:`Outcome`; :func:`verifier_stats` reads the counters.
- After ``os.fork`` the child drops the parent's workers (never signals them) and starts its own; at exit the
  idle workers are stopped (:func:`shutdown_workers`).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pacsrl.rewards._worker import HEADER, write_message

# Spawning a worker imports SymPy (about a second, more on a loaded machine); not part of any job's budget.
STARTUP_TIMEOUT = 120.0


# --------------------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class VerifierStats:
    """Counts of verifier jobs in this process since start-up (or :func:`reset_verifier_stats`), shared by every verifier.

    Args:
        calls: jobs run (one per completion, per gold answer in :func:`pacsrl.rewards.math.find_unparseable_gold`, or
            per answer given to a reasoning-gym scorer by :func:`pacsrl.rewards.gym.score_gym_answers`).
        timeouts: jobs that overran their deadline; the worker was killed and the job scored 0.0.
        errors: jobs where math-verify or a gym scorer raised, or the worker died; scored 0.0.
    """

    calls: int = 0
    timeouts: int = 0
    errors: int = 0


class _StatsCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = VerifierStats()

    def add(self, calls: int = 0, timeouts: int = 0, errors: int = 0) -> VerifierStats:
        with self._lock:
            s = self._stats
            self._stats = VerifierStats(s.calls + calls, s.timeouts + timeouts, s.errors + errors)
            return self._stats

    def get(self) -> VerifierStats:
        with self._lock:
            return self._stats

    def reset(self) -> None:
        with self._lock:
            self._stats = VerifierStats()

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()


_STATS = _StatsCounter()

Outcome = Literal["ok", "timeout", "error"]


def count_job(outcome: Outcome) -> VerifierStats:
    """Count one finished job (its outcome) and return the counters after it."""
    return _STATS.add(calls=1, timeouts=int(outcome == "timeout"), errors=int(outcome == "error"))


def verifier_stats() -> VerifierStats:
    """Snapshot of this process's verifier counters (thread-safe)."""
    return _STATS.get()


def timeout_count() -> int:
    """Number of verifier jobs that timed out in this process so far."""
    return _STATS.get().timeouts


def reset_verifier_stats() -> None:
    """Set this process's verifier counters back to zero."""
    _STATS.reset()


# --------------------------------------------------------------------------------------------------------
# Worker subprocesses


class JobTimeout(Exception):
    pass


class WorkerDied(Exception):
    pass


class Worker:
    """One worker subprocess (:func:`pacsrl.rewards._worker.main`); used by one thread at a time."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from pacsrl.rewards._worker import main; main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            close_fds=True,
        )
        self.loaded: set[str] = set()  # keys of the setup requests this worker has run (see run_batch)
        try:
            ready = self._receive(time.monotonic() + STARTUP_TIMEOUT)
        except (JobTimeout, WorkerDied) as exc:
            self.kill()
            raise RuntimeError(
                f"the math-verify worker subprocess ({sys.executable}, pacsrl.rewards._worker) did not start "
                f"({type(exc).__name__}); its stderr above says why (is math-verify installed?)"
            ) from exc
        if ready != {"ready": True}:
            self.kill()
            raise RuntimeError(f"the math-verify worker sent {ready!r} instead of its ready message")

    def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one job and wait at most ``timeout`` seconds for its answer."""
        self.send(message)
        return self._receive(time.monotonic() + timeout)

    def send(self, message: dict[str, Any]) -> None:
        """Send one request without waiting for an answer."""
        try:
            write_message(self.proc.stdin, message)
        except (BrokenPipeError, OSError) as exc:
            raise WorkerDied(str(exc)) from exc

    def receive(self, timeout: float) -> dict[str, Any]:
        """Wait at most ``timeout`` seconds for the next answer."""
        return self._receive(time.monotonic() + timeout)

    def _receive(self, deadline: float) -> dict[str, Any]:
        header = self._read_exact(HEADER.size, deadline)
        return json.loads(self._read_exact(HEADER.unpack(header)[0], deadline))

    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        chunks = []
        while n > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise JobTimeout
            chunk = os.read(fd, n)
            if not chunk:
                raise WorkerDied(f"exit code {self.proc.poll()}")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def kill(self) -> None:
        """Kill the subprocess and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.close_pipes()

    def close(self) -> None:
        """Ask the subprocess to exit (EOF on its stdin); kill it if it does not."""
        self.close_pipes()
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.kill()

    def close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class WorkerPool:
    """At most ``size`` worker subprocesses, shared by all threads of this process, started lazily."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._idle: list[Worker] = []
        self._live = 0

    def after_fork_in_child(self) -> None:
        # The workers belong to the parent: drop our copies of their pipes, never signal them.
        for worker in self._idle:
            worker.close_pipes()
        self._reset()

    def _acquire(self) -> Worker:
        with self._cond:
            while not self._idle and self._live >= self.size:
                self._cond.wait()
            while self._idle:
                worker = self._idle.pop()
                if worker.proc.poll() is None:
                    return worker
                worker.kill()  # died while idle (e.g. killed from outside): replace it, not the job's fault
                self._live -= 1
            self._live += 1
        try:
            return Worker()
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def _release(self, worker: Worker | None) -> None:
        with self._cond:
            if worker is None:
                self._live -= 1
            else:
                self._idle.append(worker)
            self._cond.notify()

    def run(self, message: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """Run one job: the worker's answer, an ``error`` answer if the worker died, or None on timeout.

        A worker that timed out or died is killed and replaced on the next call.
        """
        if os.getpid() != self._pid:  # forked without os.register_at_fork having run (should not happen)
            self._reset()
        worker = self._acquire()
        try:
            response = worker.request(message, timeout)
        except JobTimeout:
            worker.kill()
            self._release(None)
            return None
        except WorkerDied as exc:
            worker.kill()
            self._release(None)
            return {"ok": False, "error": f"worker died ({exc})"}
        except BaseException:  # e.g. KeyboardInterrupt mid-job: the worker's state is unknown
            worker.kill()
            self._release(None)
            raise
        self._release(worker)
        return response

    def run_batch(
        self,
        request: Callable[[list[Any]], dict[str, Any]],
        jobs: Sequence[Any],
        timeout: float,
        setup: tuple[str, dict[str, Any]] | None = None,
    ) -> list[dict[str, Any] | None]:
        """Run jobs sent together: one answer per job, as :meth:`run` gives, each within ``timeout`` seconds.

        ``request(pending_jobs)`` builds the one message that asks for all of them; the worker answers each
        job in order as it finishes. Job i's deadline runs from the answer to job i-1, so every job gets
        the whole ``timeout``; on a timeout (None) or a dead worker (an ``error`` answer) the worker is
        killed, and the jobs after it go to a fresh one.

        ``setup`` is ``(key, message)``: a request that each worker must have answered, under the start-up
        deadline, before its first batch with that key (e.g. importing a library and building a scorer).

        Raises:
            RuntimeError: if a worker cannot start or its setup fails (an environment problem, not a job's).
        """
        if os.getpid() != self._pid:
            self._reset()
        results: list[dict[str, Any] | None] = []
        while len(results) < len(jobs):
            pending = list(jobs[len(results) :])
            worker = self._acquire()
            try:
                if setup is not None and setup[0] not in worker.loaded:
                    self._setup(worker, *setup)
                worker.send(request(pending))
                for _ in pending:
                    results.append(worker.receive(timeout))
            except JobTimeout:
                worker.kill()
                self._release(None)
                results.append(None)
                continue
            except WorkerDied as exc:
                worker.kill()
                self._release(None)
                results.append({"error": f"worker died ({exc})"})
                continue
            except BaseException:
                worker.kill()
                self._release(None)
                raise
            self._release(worker)
        return results

    @staticmethod
    def _setup(worker: Worker, key: str, message: dict[str, Any]) -> None:
        try:
            response = worker.request(message, STARTUP_TIMEOUT)
        except (JobTimeout, WorkerDied) as exc:
            response = {"error": type(exc).__name__}
        if "error" in response:
            raise RuntimeError(
                f"the verifier worker subprocess could not set up {key!r}: {response['error']}"
            )
        worker.loaded.add(key)

    def shutdown(self) -> None:
        """Stop the idle workers (busy ones are stopped by the threads using them)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for worker in idle:
            worker.close()


_POOLS: dict[int, WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def get_pool(num_workers: int) -> WorkerPool:
    with _POOLS_LOCK:
        if num_workers not in _POOLS:
            _POOLS[num_workers] = WorkerPool(num_workers)
        return _POOLS[num_workers]


def _after_fork_in_child() -> None:
    # Another thread may have held these locks at the fork; the child gets fresh ones.
    global _POOLS_LOCK
    _POOLS_LOCK = threading.Lock()
    _STATS.after_fork_in_child()
    for pool in _POOLS.values():
        pool.after_fork_in_child()


def shutdown_workers() -> None:
    """Stop this process's idle verifier subprocesses (they restart on the next call). Runs at exit."""
    for pool in list(_POOLS.values()):
        pool.shutdown()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(shutdown_workers)


# --------------------------------------------------------------------------------------------------------
# Helpers shared by the verifiers


def validate_timeout(timeout: float) -> float:
    """``timeout`` as a float; ValueError unless it is a positive, finite number of seconds."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def preview(text: str, n: int = 80) -> str:
    """``text`` for a log line: its repr, cut to its last ``n`` characters."""
    return repr(text if len(text) <= n else "..." + text[-n:])


__all__ = [
    "STARTUP_TIMEOUT",
    "JobTimeout",
    "Outcome",
    "VerifierStats",
    "Worker",
    "WorkerDied",
    "WorkerPool",
    "count_job",
    "get_pool",
    "preview",
    "reset_verifier_stats",
    "shutdown_workers",
    "timeout_count",
    "validate_timeout",
    "verifier_stats",
]
