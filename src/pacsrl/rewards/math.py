"""Math verifier: reward 1.0 when a completion's final answer equals the gold answer (math-verify)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from math_verify import parse
from sympy import Basic, MatrixBase

logger = logging.getLogger(__name__)


def _parse_gold(gold: str) -> list:
    # The paper wraps the gold answer in \boxed{} before parsing it.
    return parse("\\boxed{" + gold + "}", parsing_timeout=None)


def find_unparseable_gold(answers: Sequence[str]) -> list[tuple[int, str]]:
    """Return ``(row index, gold text)`` for every gold answer math-verify cannot parse into a math object.

    A gold answer that only survives as a raw string (or not at all) could only ever match a completion by exact
    string equality, so a dataset should drop or fix these rows before training.
    """
    bad = []
    for i, gold in enumerate(answers):
        if not isinstance(gold, str):
            raise TypeError(f"gold answer at row {i} is {type(gold).__name__}, expected str: {gold!r}")
        parsed = _parse_gold(gold)
        if not any(isinstance(p, (Basic, MatrixBase)) for p in parsed):
            bad.append((i, gold))
    return bad
