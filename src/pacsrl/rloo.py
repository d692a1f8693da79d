"""``RLOOConfig``: TRL's ``RLOOConfig`` with the KL penalty off by default, for ``--algorithm rloo``.

TRL's ``RLOOTrainer`` (REINFORCE with the leave-one-out baseline of the group, the baseline PACS generalises) is used
as it is; only ``beta`` changes default, from TRL's 0.05 to 0: the paper's PACS, GRPO and PPO runs have no KL
penalty, nor has ``GRPOConfig`` by default, so ``--algorithm rloo`` on the same recipe changes only the algorithm.
Set ``beta`` in the recipe for TRL's KL-regularised RLOO.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import RLOOConfig as _TRLRLOOConfig


@dataclass
class RLOOConfig(_TRLRLOOConfig):
    beta: float = field(
        default=0.0,
        metadata={
            "help": "KL coefficient of RLOO's reward (TRL's default is 0.05; 0 here, as PACS, GRPO and PPO)."
        },
    )
