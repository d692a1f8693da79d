"""The algorithms ``pacsrl`` trains, each a (config, trainer) pair on TRL's generation and reward pipeline.

| name | config | trainer |
|---|---|---|
| ``pacs`` | ``pacsrl.PACSConfig`` | ``pacsrl.PACSTrainer`` |
| ``grpo`` | TRL's ``GRPOConfig`` | TRL's ``GRPOTrainer`` |
| ``rloo`` | ``pacsrl.rloo.RLOOConfig`` (TRL's, with ``beta=0``) | TRL's ``RLOOTrainer`` |
| ``ppo`` | ``pacsrl.PPOConfig`` | ``pacsrl.PPOTrainer`` |

Classes are imported when asked for, so ``import pacsrl.algorithms`` stays light.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Algorithm = Literal["pacs", "grpo", "rloo", "ppo"]
ALGORITHMS: tuple[str, ...] = ("pacs", "grpo", "rloo", "ppo")


def config_class(name: str) -> type:
    """The configuration dataclass of algorithm ``name``."""
    _check(name)
    if name == "pacs":
        from pacsrl.config import PACSConfig

        return PACSConfig
    if name == "grpo":
        from trl import GRPOConfig

        return GRPOConfig
    if name == "rloo":
        from pacsrl.rloo import RLOOConfig

        return RLOOConfig
    from pacsrl.ppo.config import PPOConfig

    return PPOConfig


def trainer_class(name: str) -> type:
    """The trainer of algorithm ``name`` (same constructor: model, reward_funcs, args, datasets, peft_config)."""
    _check(name)
    if name == "pacs":
        from pacsrl.trainer import PACSTrainer

        return PACSTrainer
    if name == "grpo":
        from trl import GRPOTrainer

        return GRPOTrainer
    if name == "rloo":
        from trl import RLOOTrainer

        return RLOOTrainer
    from pacsrl.ppo.trainer import PPOTrainer

    return PPOTrainer


def config_fields(name: str) -> set[str]:
    """Names of the fields of algorithm ``name``'s config."""
    return {f.name for f in dataclasses.fields(config_class(name))}


def _check(name: str) -> None:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {', '.join(map(repr, ALGORITHMS))}")
