"""The automatic scorer: each row is scored by the verifier its ``source`` calls for.

A row whose ``source`` is ``gym:TASK`` (``pacsrl prepare gym:TASK`` writes it, as does ``gym:TASK``
training data) is scored by that reasoning-gym task's own scorer (:func:`pacsrl.rewards.gym.make_gym_reward`);
any other row by math-verify (:func:`pacsrl.rewards.math.make_math_reward`). So a prepared gym file, or a
dataset mixing gym tasks and math benchmarks, is never scored by the wrong verifier. The first time a
scorer is used it is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

GYM_PREFIX = "gym:"


class AutoReward:
    """TRL reward function that routes each row to its source's scorer; build it with :func:`make_auto_reward`.

    Called as ``f(prompts=..., completions=..., answer=[...], source=[...], **columns)``; a row's columns
    are passed on to its scorer (gym rows need ``metadata``, as every prepared gym file has). Rows of one
    scorer are scored in one call, in their original order.
    """

    __name__ = "auto_reward"

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._scorers: dict[str, Callable[..., list[float]]] = {}

    def scorer(self, source: str) -> Callable[..., list[float]]:
        """The scorer of a row from ``source``, built and logged on first use."""
        key = source if source.startswith(GYM_PREFIX) else "math"
        if key not in self._scorers:
            if key == "math":
                from pacsrl.rewards.math import make_math_reward

                self._scorers[key] = make_math_reward(timeout=self.timeout)
                logger.info(
                    "scoring rows of source %r (and every other non-gym source) with math-verify", source
                )
            else:
                from pacsrl.rewards.gym import make_gym_reward

                self._scorers[key] = make_gym_reward(key[len(GYM_PREFIX) :], timeout=self.timeout)
                logger.info("scoring rows of source %r with the reasoning-gym task's own scorer", source)
        return self._scorers[key]

    def __call__(self, completions: Sequence[Any], source: Sequence[str], **columns: Any) -> list[float]:
        if len(source) != len(completions):
            raise ValueError(f"auto_reward got {len(completions)} completions but {len(source)} sources")
        rows_of: dict[str, list[int]] = {}
        for i, s in enumerate(source):
            rows_of.setdefault(s if str(s).startswith(GYM_PREFIX) else "math", []).append(i)
        per_row = {k: v for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)}
        shared = {k: v for k, v in columns.items() if k not in per_row}
        scores = [0.0] * len(completions)
        for rows in rows_of.values():
            picked = {k: [v[i] for i in rows] for k, v in per_row.items()}
            got = self.scorer(source[rows[0]])(
                completions=[completions[i] for i in rows],
                source=[source[i] for i in rows],
                **picked,
                **shared,
            )
            for i, score in zip(rows, got, strict=True):
                scores[i] = score
        return scores


def make_auto_reward(timeout: float = 5.0) -> AutoReward:
    """A reward that scores ``gym:TASK`` rows with the task's own scorer and every other row with math-verify;
    ``timeout`` is the seconds allowed per check, for both."""
    return AutoReward(timeout)
