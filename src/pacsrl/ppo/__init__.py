"""PPO with a critic for verifiable rewards, on TRL's GRPOTrainer: the baseline of the PACS paper's comparison.

``objective`` holds the math (GAE, whitening, clipped losses), ``critic`` the value model and its checkpoint files,
``config`` ``PPOConfig`` and ``trainer`` ``PPOTrainer``. The trainer is imported lazily (``import pacsrl.ppo`` stays
light).
"""

from __future__ import annotations

__all__ = ["PPOConfig", "PPOTrainer"]


def __getattr__(name: str):
    if name == "PPOConfig":
        from pacsrl.ppo.config import PPOConfig

        return PPOConfig
    if name == "PPOTrainer":
        from pacsrl.ppo.trainer import PPOTrainer

        return PPOTrainer
    raise AttributeError(f"module 'pacsrl.ppo' has no attribute {name!r}")
