"""Procedural reasoning tasks from reasoning-gym, as datasets and verifiers in pacsrl's record schema.

A reasoning-gym task (``chain_sum``, ``countdown``, ...) generates problems from a seed and scores an
answer with its own checker. This module turns one into:

- a ``datasets.Dataset`` with the columns every pacsrl dataset has (``prompt``, ``answer``, ``source``)
  plus what the task's scorer needs (``question``, ``metadata`` as a JSON string, since Arrow cannot
  hold arbitrary nested dicts faithfully);
- a reward function with TRL's contract (``f(completions, **columns) -> list[float]``) that extracts
  the answer from ``<answer>...</answer>`` and calls the task's scorer, binary: 1.0 only when the
  scorer gives full marks. The scorer runs in a worker subprocess under a per-answer deadline
  (:func:`pacsrl.rewards.gym.score_gym_answers`), since some scorers run SymPy on the model's text.

Problems are deduplicated by normalised question text, inside a dataset and across train / eval
splits: generators repeat problems (and ``seed`` + ``idx`` streams overlap between seeds), so distinct
seeds alone do not make disjoint splits.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from typing import Any

import reasoning_gym
from datasets import Dataset

from pacsrl.rewards._pool import validate_timeout
from pacsrl.rewards.gym import DEFAULT_TIMEOUT, score_gym_answers

logger = logging.getLogger(__name__)

# The answer format every gym prompt asks for, and the only one the reward accepts.
ANSWER_INSTRUCTION = "Put the final answer in <answer></answer>."

# How far ``make_gym_dataset`` lets the generator run, relative to the number of distinct problems
# asked for, before concluding that it cannot produce that many.
_MAX_OVERSAMPLING = 16

_WHITESPACE = re.compile(r"\s+")


def normalize_question(text: str) -> str:
    """The key under which two problems count as the same: case-folded, whitespace collapsed."""
    return _WHITESPACE.sub(" ", text).strip().casefold()


def format_prompt(question: str) -> list[dict[str, str]]:
    """The conversational prompt of a gym problem: one user turn, the question then the answer format."""
    return [{"role": "user", "content": f"{question} {ANSWER_INSTRUCTION}"}]


def format_solution(answer: str) -> str:
    """A completion in the format the reward expects (used to build warm-start data and in tests)."""
    return f"<answer>{answer}</answer>"


def _create(task: str, size: int, seed: int, config: dict[str, Any]):
    if "size" in config or "seed" in config:
        raise ValueError(
            f"config for {task!r} sets 'size' or 'seed' ({config}); pass them as make_gym_dataset arguments"
        )
    try:
        return reasoning_gym.create_dataset(task, size=size, seed=seed, **config)
    except ValueError as err:
        if "not registered" in str(err):
            raise ValueError(f"unknown reasoning-gym task {task!r}; e.g. 'chain_sum', 'countdown'") from err
        raise


def _record(task: str, entry: dict[str, Any]) -> dict[str, Any]:
    try:
        metadata = json.dumps(entry.get("metadata", {}), sort_keys=True)
    except TypeError as err:
        raise TypeError(f"metadata of a {task!r} problem is not JSON-serialisable: {entry.get('metadata')!r}") from err
    gold = entry["answer"]
    if gold == "":
        # "" stands for "no single gold answer" (None) in the answer column, so a literal "" cannot be kept.
        raise ValueError(
            f"a {task!r} problem has the empty string as its gold answer, which this schema reserves for "
            f"tasks without a single gold answer (None); question: {entry['question']!r}"
        )
    return {
        "prompt": format_prompt(entry["question"]),
        "answer": "" if gold is None else str(gold),
        "source": f"gym:{task}",
        "question": entry["question"],
        "metadata": metadata,
    }


def make_gym_dataset(
    task: str,
    size: int,
    seed: int,
    *,
    exclude: Iterable[str] = (),
    config: dict | None = None,
) -> Dataset:
    """``size`` distinct problems of a reasoning-gym task, none of them in ``exclude``.

    Args:
        task: reasoning-gym task name (``reasoning_gym.create_dataset``'s ``name``).
        size: number of distinct problems wanted.
        seed: generator seed. For a generator that is deterministic per index (most are), the first
            k problems are the same whatever ``size`` is.
        exclude: questions that must not appear (compared after ``normalize_question``), e.g. the
            questions of another split.
        config: task options, e.g. ``{"min_terms": 2, "max_terms": 3}`` (not ``size``/``seed``).

    Returns:
        A Dataset with columns ``prompt`` (one user turn), ``answer`` (gold string), ``source``
        (``gym:<task>``), ``question`` (raw question text) and ``metadata`` (JSON string).

        ``answer`` is ``""`` for tasks whose problems have no single gold answer (reasoning-gym gives
        None: ``graph_color``, ``propositional_logic``, ``rush_hour``, ...): their scorer checks an
        answer's validity against ``metadata``, and :func:`make_gym_reward` passes it None as the gold,
        as reasoning-gym's own entries have. Such rows cannot be checked by math-verify, nor turned into
        a worked solution by :func:`format_solution`.

    Raises:
        ValueError: if the generator cannot produce ``size`` distinct, non-excluded problems within
            ``16 * size`` draws (the task's problem space is too small for the request), or if a
            problem's gold answer is the empty string (``""`` is reserved for "no single gold answer").
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    config = dict(config or {})
    excluded = {normalize_question(q) for q in exclude}
    draws = size
    while True:
        # Regenerate from index 0 with a larger budget: generators may pre-compute per dataset size.
        generator = _create(task, draws, seed, config)
        seen: set[str] = set()
        records = []
        for idx in range(draws):
            entry = generator[idx]
            key = normalize_question(entry["question"])
            if key in seen or key in excluded:
                continue
            seen.add(key)
            records.append(_record(task, entry))
            if len(records) == size:
                return Dataset.from_list(records)
        if draws >= _MAX_OVERSAMPLING * size:
            raise ValueError(
                f"reasoning-gym task {task!r} with config {config} produced only {len(records)} distinct problems "
                f"(excluding {len(excluded)} given questions) in {draws} draws, fewer than the {size} asked for; "
                "ask for fewer problems or widen the config (more terms, digits, ...)"
            )
        draws = min(2 * draws, _MAX_OVERSAMPLING * size)
        logger.debug("%s: %d/%d distinct problems, drawing %d", task, len(records), size, draws)


def make_gym_splits(
    task: str,
    train_size: int,
    eval_size: int,
    seed: int,
    config: dict | None = None,
) -> tuple[Dataset, Dataset]:
    """Train and eval splits of a reasoning-gym task that share no problem (nor repeat one).

    Both come from one deduplicated stream: eval is its first ``eval_size`` problems, train the next
    ``train_size``; so, for a per-index deterministic generator, the eval split does not change when
    ``train_size`` does.
    """
    if train_size < 1 or eval_size < 1:
        raise ValueError(f"train_size and eval_size must be >= 1, got {train_size} and {eval_size}")
    both = make_gym_dataset(task, train_size + eval_size, seed, config=config)
    eval_split = both.select(range(eval_size))
    train_split = both.select(range(eval_size, eval_size + train_size))
    return train_split, eval_split


def completion_text(completion: Any) -> str | None:
    """The text of a completion as TRL passes it: a string, or a conversational list of messages
    (the last assistant message's content). None when there is no text to read."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        for message in reversed(completion):
            if isinstance(message, dict) and message.get("role", "assistant") == "assistant":
                content = message.get("content")
                return content if isinstance(content, str) else None
    return None


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
    deadline (:func:`pacsrl.rewards.gym.score_gym_answers`). Instances are picklable.
    """

    def __init__(self, task: str, timeout: float, num_workers: int) -> None:
        self.task = task
        self.timeout = timeout
        self.num_workers = num_workers
        self.__name__ = self.__qualname__ = f"{task}_accuracy"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(task={self.task!r}, timeout={self.timeout}, num_workers={self.num_workers})"
        )

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
            text = completion_text(completion)
            extracted = extract_last_answer(text) if text is not None else None
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
