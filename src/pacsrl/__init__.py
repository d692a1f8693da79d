"""pacsrl: RLVR training of reasoning language models with PACS on top of Hugging Face TRL.

PACS (arXiv 2509.02522) turns the verifier's outcome reward into a label and trains the policy by
binary cross-entropy on an implicit reward computed from the policy's own log-probabilities, centred
within each group of sampled answers. See ``pacsrl.objective`` for the math.

``PPOTrainer`` / ``PPOConfig`` (``pacsrl.ppo``) train the PPO baseline on the same pipeline.
The trainers and configs are imported lazily so that ``import pacsrl`` (and the objective,
verifier and evaluation modules) stay light.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["PACSConfig", "PACSTrainer", "PPOConfig", "PPOTrainer", "__version__"]


def __getattr__(name: str):
    if name == "PACSConfig":
        from pacsrl.config import PACSConfig

        return PACSConfig
    if name == "PACSTrainer":
        from pacsrl.trainer import PACSTrainer

        return PACSTrainer
    if name in ("PPOConfig", "PPOTrainer"):
        import pacsrl.ppo

        return getattr(pacsrl.ppo, name)
    raise AttributeError(f"module 'pacsrl' has no attribute {name!r}")
