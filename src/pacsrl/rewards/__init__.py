"""Verifiable rewards for RLVR, following TRL's reward-function contract."""

from pacsrl.rewards._pool import (
    VerifierStats,
    reset_verifier_stats,
    shutdown_workers,
    timeout_count,
    verifier_stats,
)
from pacsrl.rewards.gym import GymReward, make_gym_reward, score_gym_answers
from pacsrl.rewards.math import (
    MathReward,
    find_unparseable_gold,
    make_math_reward,
    math_reward,
    verify_answer,
)

__all__ = [
    "GymReward",
    "MathReward",
    "VerifierStats",
    "find_unparseable_gold",
    "make_gym_reward",
    "make_math_reward",
    "math_reward",
    "reset_verifier_stats",
    "score_gym_answers",
    "shutdown_workers",
    "timeout_count",
    "verifier_stats",
    "verify_answer",
]
