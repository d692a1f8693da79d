"""Verifiable rewards for RLVR (TRL reward-function contract)."""

from pacsrl.rewards.math import find_unparseable_gold

__all__ = ["find_unparseable_gold"]
