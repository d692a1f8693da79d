"""Math verifier: a completion earns 1.0 when its last ``\\boxed{}`` answer equals the gold answer.

Equivalence is math-verify's (https://github.com/huggingface/Math-Verify), with the gold answer wrapped in
``\\boxed{}`` as in the PACS paper. Which answer is judged is decided here, not by math-verify: a completion
with a box is judged on its last box alone (math-verify, given the whole text, would merge boxes written
within about 70 characters of each other, "\\boxed{3}, \\boxed{5}", into one set answer); one without a box
is judged by math-verify's fallbacks ("answer is ...", last ``$...$``, last number).

Every check runs in a worker subprocess (:mod:`pacsrl.rewards._worker`) that is killed when it overruns
its deadline, so a reward call never raises on completion text, never hangs, and works from any thread or
process (math-verify's own ``signal.alarm`` timeouts do not).

A check that times out or crashes scores 0.0 and is counted in :func:`verifier_stats`; the reward
function also reports the fraction per batch through TRL's ``log_metric`` hook.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from pacsrl.rewards._worker import HEADER, write_message

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_CHARS = 10_000
# Spawning a worker imports SymPy (about a second, more on a loaded machine); not part of any job's budget.
_STARTUP_TIMEOUT = 120.0
# The box commands math-verify reads (latex2sympy2_extended's extract_boxed_content handles both).
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BOX_OPENING = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACES = re.compile(r"[{}]")


# --------------------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class VerifierStats:
    """Counts of verifier jobs in this process since start-up (or :func:`reset_verifier_stats`).

    Args:
        calls: jobs run (one per completion, per gold answer in :func:`find_unparseable_gold`, or per
            answer given to a reasoning-gym scorer by :func:`pacsrl.rewards.gym.score_gym_answers`).
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


class _JobTimeout(Exception):
    pass


class _WorkerDied(Exception):
    pass


class _Worker:
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
            ready = self._receive(time.monotonic() + _STARTUP_TIMEOUT)
        except (_JobTimeout, _WorkerDied) as exc:
            self.kill()
            raise RuntimeError(
                f"the math-verify worker subprocess ({sys.executable}, pacsrl.rewards._worker) did not start "
                f"({type(exc).__name__.lstrip('_')}); its stderr above says why (is math-verify installed?)"
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
            raise _WorkerDied(str(exc)) from exc

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
                raise _JobTimeout
            chunk = os.read(fd, n)
            if not chunk:
                raise _WorkerDied(f"exit code {self.proc.poll()}")
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


class _WorkerPool:
    """At most ``size`` worker subprocesses, shared by all threads of this process, started lazily."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._live = 0

    def after_fork_in_child(self) -> None:
        # The workers belong to the parent: drop our copies of their pipes, never signal them.
        for worker in self._idle:
            worker.close_pipes()
        self._reset()

    def _acquire(self) -> _Worker:
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
            return _Worker()
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def _release(self, worker: _Worker | None) -> None:
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
        except _JobTimeout:
            worker.kill()
            self._release(None)
            return None
        except _WorkerDied as exc:
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
            except _JobTimeout:
                worker.kill()
                self._release(None)
                results.append(None)
                continue
            except _WorkerDied as exc:
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
    def _setup(worker: _Worker, key: str, message: dict[str, Any]) -> None:
        try:
            response = worker.request(message, _STARTUP_TIMEOUT)
        except (_JobTimeout, _WorkerDied) as exc:
            response = {"error": type(exc).__name__.lstrip("_")}
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


_POOLS: dict[int, _WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def _get_pool(num_workers: int) -> _WorkerPool:
    with _POOLS_LOCK:
        if num_workers not in _POOLS:
            _POOLS[num_workers] = _WorkerPool(num_workers)
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
# Jobs


def _validate_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _answer_text(text: str, max_chars: int) -> str:
    """The text math-verify is given for a completion: its last box alone, or, without a box, its tail.

    * The last ``\\boxed{...}`` (or ``\\fbox{...}``) is found by its command's last occurrence and a
      brace-matching scan, and sent as ``\\boxed{<its content>}``: earlier boxes, however close, are never
      seen. Braces are counted as math-verify counts them (``\\{`` and ``\\}`` included).
    * A last box with no opening brace (``\\boxed 5``) or whose braces do not close within ``max_chars``
      characters (a truncated completion) is sent as the text from its command on, at most ``max_chars``
      characters: earlier boxes still never count, and math-verify reads what it can from that text.
    * Without a box, the last ``max_chars`` characters, where math-verify's fallbacks look ("answer is ...",
      last ``$...$``, last number); texts up to ``max_chars`` are unchanged.

    Linear in ``len(text)``, and the scan reads at most ``max_chars`` characters, so any input is cheap.
    """
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start == -1:
        return text[-max_chars:]
    tail = text[start : start + max_chars]
    opening = _BOX_OPENING.match(tail)
    if opening is not None:
        depth = 0
        for brace in _BRACES.finditer(tail, opening.end() - 1):
            depth += 1 if brace.group() == "{" else -1
            if depth == 0:
                return "\\boxed{" + tail[opening.end() : brace.start()] + "}"
    return tail


Outcome = Literal["ok", "timeout", "error"]


def _check(pool: _WorkerPool, message: dict[str, Any], timeout: float, what: str) -> tuple[bool, Outcome]:
    """Run one job; (answer, outcome). Timeouts and errors answer False and are counted and logged."""
    response = pool.run(message, timeout)
    if response is None:
        stats = _STATS.add(calls=1, timeouts=1)
        logger.warning(
            "math verification of %s timed out after %.3g s and scores 0.0 (%d timeouts in %d checks so far)",
            what,
            timeout,
            stats.timeouts,
            stats.calls,
        )
        return False, "timeout"
    if "error" in response:
        stats = _STATS.add(calls=1, errors=1)
        logger.warning(
            "math verification of %s failed and scores 0.0: %s (%d errors in %d checks so far)",
            what,
            response["error"],
            stats.errors,
            stats.calls,
        )
        return False, "error"
    _STATS.add(calls=1)
    return bool(response["ok"]), "ok"


def _short(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else "..." + text[-n:])


def _verify(text: str, gold: str, timeout: float, max_chars: int, pool: _WorkerPool) -> tuple[bool, Outcome]:
    pred = _answer_text(text, max_chars)
    message = {"op": "verify", "pred": pred, "gold": gold}
    return _check(pool, message, timeout, f"completion {_short(pred)} against gold {_short(gold)}")


def verify_answer(completion_text: str, gold: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether the final answer of ``completion_text`` equals ``gold`` (the math reward as a bool).

    The final answer is the last ``\\boxed{...}`` alone, or math-verify's fallback when there is no box.
    Never raises on the text itself and returns within about ``timeout`` seconds (plus the start-up of a
    worker subprocess, about a second, on first use and after a timeout); a timeout counts as False.
    """
    if not isinstance(completion_text, str) or not isinstance(gold, str):
        raise TypeError(
            "verify_answer expects two strings, got "
            f"{type(completion_text).__name__} and {type(gold).__name__}"
        )
    return _verify(completion_text, gold, _validate_timeout(timeout), DEFAULT_MAX_CHARS, _get_pool(1))[0]


def find_unparseable_gold(answers: Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> list[tuple[int, str]]:
    """Return ``(row index, gold text)`` for every gold answer math-verify cannot parse into a math object.

    Call it once when a dataset is prepared. Such a gold answer (empty, malformed LaTeX, ...) could only
    match a completion by exact string equality, so those rows should be fixed or dropped. A gold answer
    whose parsing times out is reported too.

    Raises:
        TypeError: if an answer is not a string.
    """
    timeout = _validate_timeout(timeout)
    pool = _get_pool(1)
    bad = []
    for i, gold in enumerate(answers):
        if not isinstance(gold, str):
            raise TypeError(f"gold answer at row {i} is a {type(gold).__name__}, expected str: {gold!r}")
        ok, _ = _check(pool, {"op": "gold", "gold": gold}, timeout, f"gold answer at row {i} {_short(gold)}")
        if not ok:
            bad.append((i, gold))
    return bad


# --------------------------------------------------------------------------------------------------------
# TRL reward function


def _completion_text(completion: Any, index: int) -> str:
    """The text of a TRL completion: a string, or the content of the last assistant message of a list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)):
        for message in reversed(completion):
            if isinstance(message, dict) and message.get("role") == "assistant":
                content = message.get("content")
                if content is None:
                    return ""
                if isinstance(content, str):
                    return content
                if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
                    parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
                    return "".join(p.get("text") or "" for p in parts)
                raise TypeError(
                    f"completion {index}: assistant content is a {type(content).__name__}, "
                    "expected str or a list of content parts"
                )
        roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in completion]
        raise ValueError(f"completion {index} has no assistant message (roles: {roles})")
    raise TypeError(
        f"completion {index} is a {type(completion).__name__}; expected a string or a list of chat messages"
    )


class MathReward:
    """TRL reward function: 1.0 when a completion's last ``\\boxed{}`` equals the row's gold answer, else 0.0.

    Only the last box is judged, even when boxes are listed together ("\\boxed{3}, \\boxed{5}" answers 5);
    a completion without a box is judged by math-verify's fallbacks ("answer is ...", last ``$...$``, last
    number). Build it with :func:`make_math_reward`. Called by TRL as ``func(prompts=..., completions=...,
    completion_ids=..., answer=[...], ...)``; it reads ``completions`` and the dataset column ``answer``.
    Instances are picklable and can be shared by threads.
    """

    def __init__(self, timeout: float, num_workers: int, max_chars: int, name: str) -> None:
        self.timeout = timeout
        self.num_workers = num_workers
        self.max_chars = max_chars
        self.__name__ = name

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.__name__!r}, timeout={self.timeout}, "
            f"num_workers={self.num_workers}, max_chars={self.max_chars})"
        )

    def __call__(self, completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
        """Score each completion against its gold answer.

        Args:
            completions: N completions, strings or chat-message lists (the last assistant message is read).
            answer: N gold answers (LaTeX without ``\\boxed{}``), the dataset column ``answer``.
            **kwargs: other TRL columns; ``log_metric``, when TRL passes it, receives
                ``<name>/timeout_frac``, the fraction of this batch that timed out.

        Returns:
            N rewards in {0.0, 1.0}.
        """
        if len(completions) != len(answer):
            raise ValueError(
                f"{self.__name__}: got {len(completions)} completions but {len(answer)} gold answers "
                "(column 'answer'); they must match one to one"
            )
        texts = [_completion_text(c, i) for i, c in enumerate(completions)]
        for i, gold in enumerate(answer):
            if not isinstance(gold, str):
                raise TypeError(
                    f"{self.__name__}: gold answer {i} is a {type(gold).__name__} ({gold!r}); "
                    "the 'answer' column must hold strings"
                )
        pool = _get_pool(self.num_workers)

        def check(i: int) -> tuple[bool, Outcome]:
            return _verify(texts[i], answer[i], self.timeout, self.max_chars, pool)

        if self.num_workers == 1 or len(texts) <= 1:
            results = [check(i) for i in range(len(texts))]
        else:
            with ThreadPoolExecutor(max_workers=min(self.num_workers, len(texts))) as executor:
                results = list(executor.map(check, range(len(texts))))

        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and texts:
            timeouts = sum(outcome == "timeout" for _, outcome in results)
            log_metric(f"{self.__name__}/timeout_frac", timeouts / len(texts))
        return [float(ok) for ok, _ in results]


def make_math_reward(
    timeout: float = DEFAULT_TIMEOUT,
    num_workers: int = 1,
    max_chars: int = DEFAULT_MAX_CHARS,
    name: str = "math_reward",
) -> MathReward:
    """Build a math reward function for TRL.

    Args:
        timeout: seconds allowed per completion (parse + compare); a timeout scores 0.0 and is counted.
        num_workers: verifier subprocesses used per process (a batch is spread over them). Each holds a
            Python interpreter with SymPy, about 100 MB.
        max_chars: the longest box content read (a last box that does not close within it is read as
            the text from it on, cut to ``max_chars``); completions without a box are cut to their last
            ``max_chars`` characters before parsing. Real answers are unaffected.
        name: the function's ``__name__``, which TRL uses to name the reward in its logs.

    Raises:
        ValueError: on a non-positive timeout, num_workers < 1 or max_chars < 1000.
    """
    timeout = _validate_timeout(timeout)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1000:
        raise ValueError(f"max_chars must be an integer >= 1000 (room for an answer), got {max_chars!r}")
    if not name.isidentifier():
        raise ValueError(f"name must be a Python identifier (TRL logs it as a metric name), got {name!r}")
    return MathReward(timeout, num_workers, max_chars, name)


math_reward = make_math_reward()
"""The math reward with default settings (5 s per completion, one worker subprocess per process)."""
