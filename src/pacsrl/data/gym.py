"""Procedural reasoning tasks from reasoning-gym, as datasets in pacsrl's record schema.

A reasoning-gym task (``chain_sum``, ``countdown``, ...) generates problems from a seed and scores an
answer with its own checker. This module turns one into a ``datasets.Dataset`` with the columns every
pacsrl dataset has (``prompt``, ``answer``, ``source``) plus what the task's scorer needs (``question``,
``metadata`` as a JSON string, since Arrow cannot hold arbitrary nested dicts faithfully) and the task
options it was generated with (``gym_config``). The matching
reward function, :func:`pacsrl.rewards.gym.make_gym_reward`, lives with the other rewards (and is
importable from here too).

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

from pacsrl.rewards.gym import GymReward, extract_last_answer, make_gym_reward

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


def _record(task: str, entry: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    try:
        metadata = json.dumps(entry.get("metadata", {}), sort_keys=True)
    except TypeError as err:
        raise TypeError(
            f"metadata of a {task!r} problem is not JSON-serialisable: {entry.get('metadata')!r}"
        ) from err
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
        "gym_config": json.dumps(config, sort_keys=True),
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
        (``gym:<task>``: the task whose scorer checks the row), ``question`` (raw question text), ``metadata``
        (JSON string) and ``gym_config`` (the task options it was generated with, a JSON string; the scorer
        reads ``metadata``, which also records the task's difficulty).

        ``answer`` is ``""`` for tasks whose problems have no single gold answer (reasoning-gym gives
        None: ``graph_color``, ``propositional_logic``, ``rush_hour``, ...): their scorer checks an
        answer's validity against ``metadata``, and :func:`pacsrl.rewards.gym.make_gym_reward` passes it None as the gold,
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
            records.append(_record(task, entry, config))
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


# GymReward, extract_last_answer and make_gym_reward live in pacsrl.rewards.gym; importable from here, where
# they used to live
__all__ = [
    "ANSWER_INSTRUCTION",
    "GymReward",
    "extract_last_answer",
    "format_prompt",
    "format_solution",
    "make_gym_dataset",
    "make_gym_reward",
    "make_gym_splits",
    "normalize_question",
]
