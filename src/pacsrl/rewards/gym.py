"""reasoning-gym rewards: a TRL reward function for any reasoning-gym task, and its scorers run under a deadline.

:func:`make_gym_reward` builds the reward of a task: 1.0 when the last ``<answer>...</answer>`` of a completion
gets full marks from the task's own scorer, else 0.0. The datasets it scores are made by
:mod:`pacsrl.data.gym`.

A reasoning-gym task scores an answer with its own Python code, and some of it runs the model's text
through SymPy (``countdown`` calls ``parse_expr`` on it: ``9**9**9**9`` never returns). So, as for
math-verify, the parent never calls a scorer itself (:func:`score_gym_answers`): the answers of one call go
to a verifier worker subprocess (:mod:`pacsrl.rewards._pool`) in one request, the worker imports
reasoning-gym and builds the task's scorer once, answers job by job, and is killed when a job overruns its
deadline (:meth:`pacsrl.rewards._pool.WorkerPool.run_batch`).

A job that times out or whose scorer raises scores 0.0 and is counted in
:func:`pacsrl.rewards.verifier_stats`, shared with the math verifier. Timeouts are logged as warnings
one by one; scorer errors are logged as warnings when a task's count reaches 1, 2, 4, 8, ...: a scorer
may reject odd answers by raising, but one that raises on every row is broken and must not go unseen.

The parent process imports reasoning-gym only to check a task name in :func:`make_gym_reward`; the workers
import it to score.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pacsrl.rewards._pool import Outcome, count_job, get_pool, preview, validate_timeout
from pacsrl.rewards.completions import completion_text

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


# --------------------------------------------------------------------------------------------------------
# TRL reward function


_OPEN_TAG, _CLOSE_TAG = "<answer>", "</answer>"


def extract_last_answer(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` of ``text``, stripped; None when there is none.

    The same answer as ``reasoning_gym.utils.extract_answer(text)`` (a left-to-right scan of
    non-overlapping tags, each closed by the first ``</answer>`` after it), but in linear time: that
    function's regex takes quadratic time on a text with many unclosed tags.
    """
    found = None
    pos = 0
    while (start := text.find(_OPEN_TAG, pos)) != -1:
        end = text.find(_CLOSE_TAG, start + len(_OPEN_TAG))
        if end == -1:
            break
        found = (start + len(_OPEN_TAG), end)
        pos = end + len(_CLOSE_TAG)
    return None if found is None else text[found[0] : found[1]].strip()


class GymReward:
    """TRL reward function for a reasoning-gym task: 1.0 when the last ``<answer>...</answer>`` of a
    completion gets full marks from the task's own scorer, else 0.0. Build it with :func:`make_gym_reward`.

    Called by TRL as ``func(prompts=..., completions=..., answer=[...], metadata=[...], ...)``; it reads
    ``completions`` and the dataset columns ``answer``, ``metadata`` and (when present) ``question``.
    The answers of one call are scored in one request to a worker subprocess, each under its own
    deadline (:func:`score_gym_answers`). Instances are picklable.
    """

    def __init__(self, task: str, timeout: float, num_workers: int) -> None:
        self.task = task
        self.timeout = timeout
        self.num_workers = num_workers
        self.__name__ = self.__qualname__ = f"{task}_accuracy"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, timeout={self.timeout}, num_workers={self.num_workers})"

    def __call__(
        self, completions: list, answer: list[str], metadata: list[str], **columns: Any
    ) -> list[float]:
        """Score each completion.

        Args:
            completions: N completions, strings or chat-message lists (the last assistant message is read).
            answer: N gold answers (``""``: the task has no single gold answer; the scorer gets None).
            metadata: N JSON strings, the task's metadata of each row.
            **columns: ``question`` is passed to the scorer when present; ``log_metric``, when TRL passes
                it, receives ``<name>/timeout_frac`` and ``<name>/error_frac``, the fractions of this batch
                whose scoring timed out or raised; other columns are ignored.

        Returns:
            N rewards in {0.0, 1.0}.

        Raises:
            TypeError, ValueError: on a completion that is neither a string nor a chat-message list with an
                assistant message (:func:`pacsrl.rewards.completions.completion_text`), misaligned columns,
                or metadata that is not JSON.
        """
        name = self.__name__
        if len(answer) != len(completions) or len(metadata) != len(completions):
            raise ValueError(
                f"{name} got {len(completions)} completions but {len(answer)} answers and "
                f"{len(metadata)} metadata rows"
            )
        questions = columns.get("question") or [""] * len(completions)
        scores = [0.0] * len(completions)
        rows, answers, entries = [], [], []
        for i, (completion, gold, meta, question) in enumerate(zip(completions, answer, metadata, questions)):
            extracted = extract_last_answer(completion_text(completion, i))
            if extracted is None:  # no answer tag: nothing to score
                continue
            try:
                parsed = json.loads(meta)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{name}: metadata of row {i} is not a JSON string: {meta!r:.200}") from err
            rows.append(i)
            answers.append(extracted)
            entries.append({"question": question, "answer": gold if gold != "" else None, "metadata": parsed})
        results = score_gym_answers(
            self.task, answers, entries, timeout=self.timeout, num_workers=self.num_workers
        )
        for i, (score, _) in zip(rows, results):
            scores[i] = 1.0 if score >= 1.0 else 0.0

        log_metric = columns.get("log_metric")
        if callable(log_metric) and completions:
            for outcome in ("timeout", "error"):
                count = sum(o == outcome for _, o in results)
                log_metric(f"{name}/{outcome}_frac", count / len(completions))
        return scores


def make_gym_reward(task: str, *, timeout: float = DEFAULT_TIMEOUT, num_workers: int = 1) -> GymReward:
    """A TRL reward function for a reasoning-gym task: 1.0 when the ``<answer>...</answer>`` (the last
    one) of a completion gets full marks from the task's own scorer, else 0.0.

    The function reads the dataset columns ``answer`` and ``metadata`` (and ``question`` when present)
    to rebuild the entry the scorer expects. Its ``__name__`` is ``<task>_accuracy``, which is what TRL
    logs it as. A completion without an answer tag scores 0.0; so does one whose answer the scorer
    raises on or takes more than ``timeout`` seconds over (the scorer runs in a worker subprocess that is
    killed then: some scorers run SymPy on the model's text). Timeouts and scorer errors are counted in
    :func:`pacsrl.rewards.verifier_stats` and logged as warnings. A missing column is an error.

    Args:
        task: reasoning-gym task name.
        timeout: seconds allowed to score one answer; a timeout scores 0.0 and is counted.
        num_workers: worker subprocesses one call's answers are spread over (each a Python interpreter
            with SymPy and reasoning-gym).

    Raises:
        ValueError: on an unknown task, a non-positive timeout or num_workers < 1.
    """
    import reasoning_gym  # here, not at import: the worker subprocesses import this module too

    try:
        reasoning_gym.get_score_answer_fn(task)
    except ValueError as err:
        if "not registered" in str(err):
            raise ValueError(f"unknown reasoning-gym task {task!r}; e.g. 'chain_sum', 'countdown'") from err
        raise
    timeout = validate_timeout(timeout)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    return GymReward(task, timeout, num_workers)


__all__ = ["DEFAULT_TIMEOUT", "GymReward", "extract_last_answer", "make_gym_reward", "score_gym_answers"]
