"""The record schema shared by every training and evaluation dataset, and its checks.

One row is one problem::

    {"prompt": [{"role": "user", "content": "<question> Please reason step by step, ..."}],
     "answer": "<gold answer, a string>",
     "source": "<benchmark name>",
     ...}                              # optional columns, e.g. "id", "problem"

``prompt`` is in TRL's conversational format, so ``GRPOTrainer`` applies the model's chat template.
Every column other than ``prompt`` reaches the reward functions as a keyword argument (TRL's
reward-function contract), which is how the verifier receives ``answer``.
"""

from __future__ import annotations

import logging

import datasets

logger = logging.getLogger(__name__)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""The instruction the paper appends to every question (PAPER.md, "Prompt")."""

SCHEMA_COLUMNS: tuple[str, ...] = ("prompt", "answer", "source")
"""Columns every prepared dataset has; any others are optional and passed through to reward functions."""

GYM_SOURCE_PREFIX = "gym:"
"""``source`` prefix of reasoning-gym rows (``gym:<task>``), which are not verified by math-verify."""

_MAX_LISTED = 10  # unparseable gold answers quoted in one log message


def make_prompt(question: str) -> list[dict[str, str]]:
    """Wrap a question in the paper's instruction as a one-turn conversation (TRL's conversational format)."""
    return [{"role": "user", "content": f"{question.strip()} {INSTRUCTION}"}]


def validate_records(ds: datasets.Dataset, *, origin: str = "dataset") -> None:
    """Check that ``ds`` follows the record schema; raise ``ValueError`` naming what is wrong.

    Checks the column names and their types: ``prompt`` a list of ``{"role", "content"}`` messages,
    ``answer`` and ``source`` strings. ``origin`` (e.g. a file name) is quoted in the error.
    """
    found = list(ds.column_names)
    missing = [c for c in SCHEMA_COLUMNS if c not in found]
    if missing:
        raise ValueError(
            f"{origin} is not a prepared pacsrl dataset: missing column(s) {missing}; "
            f"found {found}, expected at least {list(SCHEMA_COLUMNS)}. "
            "Prepare a raw benchmark file with `pacsrl prepare NAME --path FILE --output out.parquet` "
            "or pass it as NAME=FILE."
        )
    for column in ("answer", "source"):
        feature = ds.features[column]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(f"{origin}: column {column!r} must hold strings, found type {feature}")
    prompt = ds.features["prompt"]
    message = getattr(prompt, "feature", None)
    if not (isinstance(message, dict) and {"role", "content"} <= set(message)):
        raise ValueError(
            f"{origin}: column 'prompt' must be a conversation, a list of {{'role', 'content'}} messages "
            f"(TRL's conversational format), found type {prompt}"
        )


def check_gold(ds: datasets.Dataset) -> list[tuple[int, str]]:
    """Return ``(row, gold text)`` for every gold ``answer`` that math-verify cannot parse.

    Such a row can never be rewarded (except by exact string match), so it should be fixed or dropped.
    The parsing itself is the verifier's (``pacsrl.rewards.find_unparseable_gold``), so this check and
    the reward can never disagree. Costs about a millisecond per row.
    """
    from pacsrl.rewards import find_unparseable_gold

    if "answer" not in ds.column_names:
        raise ValueError(f"cannot check gold answers: no 'answer' column; found {list(ds.column_names)}")
    return find_unparseable_gold(list(ds["answer"]))


def report_unparseable_gold(ds: datasets.Dataset, label: str) -> list[tuple[int, str]]:
    """Run :func:`check_gold` and log a warning listing the unparseable rows; return them.

    Rows of reasoning-gym tasks (``source`` starting with ``gym:``) are skipped: their own scorer, not
    math-verify, judges them, so a gold answer like ``"apple"`` is fine there.
    """
    if "source" in ds.column_names:
        math_rows = [i for i, source in enumerate(ds["source"]) if not source.startswith(GYM_SOURCE_PREFIX)]
    else:
        math_rows = list(range(len(ds)))
    if not math_rows:
        logger.info("%s: reasoning-gym rows only, scored by their task's checker; gold not checked", label)
        return []
    if len(math_rows) < len(ds):
        bad = [(math_rows[i], gold) for i, gold in check_gold(ds.select(math_rows))]
    else:
        bad = check_gold(ds)
    if bad:
        listed = ", ".join(f"row {i}: {gold!r}" for i, gold in bad[:_MAX_LISTED])
        more = f" (and {len(bad) - _MAX_LISTED} more)" if len(bad) > _MAX_LISTED else ""
        logger.warning(
            "%s: %d of %d gold answers cannot be parsed by math-verify and can never be rewarded: %s%s",
            label,
            len(bad),
            len(math_rows),
            listed,
            more,
        )
    else:
        logger.info("%s: all %d gold answers parse with math-verify", label, len(math_rows))
    return bad
