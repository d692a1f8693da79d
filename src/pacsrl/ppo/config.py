"""``PPOConfig``: TRL's ``GRPOConfig`` plus the critic and PPO fields, validated at start-up.

Everything of ``GRPOConfig`` that PPO shares keeps its meaning: generation, vLLM, batching, logging, checkpoints,
``num_generations`` (completions per prompt; PPO does not need groups but samples the same number of completions per
step as GRPO and PACS, for a like-for-like comparison) and ``num_iterations`` (epochs over each rollout). The PPO
mini-batches are TRL's optimizer steps: a rollout of ``steps_per_generation`` micro-batches is cut into
``steps_per_generation / gradient_accumulation_steps`` mini-batches, one optimizer step each, and the whole rollout
is used ``num_iterations`` times. GRPO's own loss options are rejected unless they hold the value PPO uses:

| GRPO option | PPO value | why |
|---|---|---|
| ``loss_type`` | ``"ppo"`` | the loss is PPO's clipped surrogate on GAE advantages plus the critic's value loss |
| ``beta`` | ``kl_coef`` (set for you) | the KL to the reference is a per-token reward (``kl_coef``), not a loss term |
| ``epsilon``, ``epsilon_high`` | TRL's defaults (unused) | PPO's clip range is ``cliprange`` / ``cliprange_high`` |
| ``scale_rewards`` | ``"group"`` (unused) | advantages come from GAE with the critic, whitened over the batch |
| ``importance_sampling_level`` | ``"token"`` | PPO's ratio is per token |
| ``delta``, ``off_policy_mask_threshold``, ``top_entropy_quantile`` | off | GRPO variants' loss options |
| ``entropy_coef``, ``use_adaptive_entropy`` | ``0.0``, ``False`` | the paper's PPO has no entropy bonus |
| ``vllm_importance_sampling_correction`` | ``False`` | the ratio is to the trainer's recomputed ``pi_old`` |
| ``sync_ref_model`` | ``False`` | the KL reference stays the initial model |
| ``multi_objective_aggregation`` | ``"sum_then_normalize"`` | the score is the weighted sum of the rewards |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

_GRPO_ONLY: dict[str, tuple[Any, str]] = {
    "epsilon": (0.2, "PPO's clip range is `cliprange`"),
    "epsilon_high": (None, "PPO's upper clip range is `cliprange_high`"),
    "scale_rewards": ("group", "PPO's advantages come from GAE and the critic, whitened over the batch"),
    "importance_sampling_level": ("token", "PPO's ratio is per token"),
    "delta": (None, "a GRPO variant's ratio cap; PPO clips with `cliprange`"),
    "off_policy_mask_threshold": (None, "a GRPO-specific token mask"),
    "top_entropy_quantile": (1.0, "PPO trains on every completion token"),
    "entropy_coef": (0.0, "the paper's PPO has no entropy bonus"),
    "use_adaptive_entropy": (False, "the paper's PPO has no entropy bonus"),
    "vllm_importance_sampling_correction": (False, "PPO's ratio is to the trainer's recomputed pi_old"),
    "sync_ref_model": (False, "the KL reference of `kl_coef` stays the initial model"),
    "multi_objective_aggregation": ("sum_then_normalize", "the score is the weighted sum of the rewards"),
}


@dataclass
class PPOConfig(GRPOConfig):
    r"""
    Configuration class for [`pacsrl.PPOTrainer`]: `GRPOConfig` plus a critic and PPO's loss.

    Parameters:
        critic_model_name_or_path (`str`, *optional*):
            Checkpoint of the critic's backbone; defaults to the policy's checkpoint.
        critic_learning_rate (`float`, *optional*, defaults to `1e-5`):
            Learning rate of the critic's AdamW optimizer (same schedule type and warmup as the policy's).
        critic_warmup_steps (`int`, *optional*, defaults to `0`):
            Optimizer steps at the start during which only the critic trains (the policy is frozen).
        gamma (`float`, *optional*, defaults to `1.0`): GAE discount.
        lam (`float`, *optional*, defaults to `1.0`): GAE lambda.
        kl_coef (`float`, *optional*, defaults to `0.0`): per-token KL penalty to the initial model, in the reward.
        cliprange (`float`, *optional*, defaults to `0.2`): clip range of the probability ratio.
        cliprange_high (`float`, *optional*): upper clip range (asymmetric clipping); defaults to `cliprange`.
        cliprange_value (`float`, *optional*, defaults to `0.5`): clip range of the value around the rollout's.
        vf_coef (`float`, *optional*, defaults to `1.0`): weight of the value loss.
        whiten_advantages (`bool`, *optional*, defaults to `True`): whiten advantages over the batch's valid tokens.
    """

    critic_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint (hub id or folder) of the critic's backbone; a scalar value head is added "
            "(AutoModelForTokenClassification, num_labels=1). Default: the policy's checkpoint. It must use "
            "the policy's tokenizer."
        },
    )
    critic_learning_rate: float = field(
        default=1e-5,
        metadata={
            "help": "Learning rate of the critic's own AdamW optimizer (verl's default 1e-5); the schedule "
            "type and warmup are the policy's (lr_scheduler_type, warmup_steps)."
        },
    )
    critic_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Optimizer steps at the start during which only the critic is trained and the policy is "
            "frozen (verl's critic_warmup); rollouts still come from the policy."
        },
    )
    gamma: float = field(
        default=1.0,
        metadata={"help": "GAE discount per completion token (1.0 for outcome rewards, as verl)."},
    )
    lam: float = field(
        default=1.0, metadata={"help": "GAE lambda (1.0: Monte-Carlo returns minus the value)."}
    )
    kl_coef: float = field(
        default=0.0,
        metadata={
            "help": "Per-token KL penalty to the initial model, subtracted from the reward "
            "(kl_coef * (log pi_old - log pi_ref)); 0 as in the paper's runs. > 0 loads a reference model."
        },
    )
    cliprange: float = field(
        default=0.2,
        metadata={"help": "Clip range of the probability ratio: [1 - cliprange, 1 + cliprange_high]."},
    )
    cliprange_high: float | None = field(
        default=None,
        metadata={"help": "Upper clip range (asymmetric clipping, e.g. 0.28); default: cliprange."},
    )
    cliprange_value: float | None = field(
        default=0.5,
        metadata={
            "help": "The critic's new value may move at most this far from the rollout's value before its "
            "error stops counting (verl's default 0.5); null for no value clipping."
        },
    )
    vf_coef: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the value loss. The critic has its own optimizer, so this scales its gradient "
            "only (which matters through gradient clipping at max_grad_norm)."
        },
    )
    whiten_advantages: bool = field(
        default=True,
        metadata={"help": "Whiten the advantages over the valid tokens of each rollout (all processes)."},
    )

    loss_type: str = field(default="ppo", metadata={"help": "Must be 'ppo'."})
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={"help": "Must be False with PPO: the ratio is to the trainer's recomputed pi_old."},
    )

    def __post_init__(self):
        self._check_ppo_fields()
        if self.beta not in (0.0, self.kl_coef):
            raise ValueError(
                f"beta={self.beta} is GRPO's KL loss coefficient; PPO puts the KL in the reward: set kl_coef="
                f"{self.beta} instead and leave beta out"
            )
        self.beta = self.kl_coef  # TRL loads the reference model and its log-probs when beta != 0
        given = {name: getattr(self, name) for name in _GRPO_ONLY}  # as the user wrote them
        super().__post_init__()
        for name, (
            expected,
            why,
        ) in _GRPO_ONLY.items():  # after TRL's normalisation (scale_rewards=True: "group")
            value = getattr(self, name)
            if value != expected:
                read_as = "" if given[name] == value else f" (which TRL reads as {value!r})"
                raise ValueError(
                    f"{name}={given[name]!r}{read_as} is a GRPO option that PPO does not use ({why}); set "
                    f"{name}={expected!r} or leave it out of the PPO config."
                )

    def _check_ppo_fields(self) -> None:
        if self.loss_type != "ppo":
            raise ValueError(
                f"loss_type={self.loss_type!r}: PPOTrainer trains with PPO's loss only; leave "
                "loss_type out (it is 'ppo'). For GRPO use `pacsrl train --algorithm grpo`."
            )
        ranges = {"gamma": self.gamma, "lam": self.lam}
        for name, value in ranges.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"{name}={value} must be in [0, 1] (1.0 is verl's default for verifiable rewards)"
                )
        positive = {"cliprange": self.cliprange, "critic_learning_rate": self.critic_learning_rate}
        if self.cliprange_high is not None:
            positive["cliprange_high"] = self.cliprange_high
        if self.cliprange_value is not None:
            positive["cliprange_value"] = self.cliprange_value
        for name, value in positive.items():
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value} must be a positive finite number")
        if self.cliprange >= 1.0:
            raise ValueError(
                f"cliprange={self.cliprange} must be < 1: the ratio is clipped to [1 - cliprange, ...]"
            )
        if not (self.kl_coef >= 0 and math.isfinite(self.kl_coef)):
            raise ValueError(f"kl_coef={self.kl_coef} must be >= 0 (0 turns the KL penalty off)")
        if not (self.vf_coef > 0 and math.isfinite(self.vf_coef)):
            raise ValueError(
                f"vf_coef={self.vf_coef} must be > 0: the critic learns from the value loss only"
            )
        if self.critic_warmup_steps < 0:
            raise ValueError(f"critic_warmup_steps={self.critic_warmup_steps} must be >= 0")
        if self.fp16:
            raise ValueError(
                "fp16=True: the critic has its own optimizer, which does not take part in the policy's "
                "fp16 loss scaling; use bf16=True (or fp32)"
            )

    @property
    def clip_high(self) -> float:
        """The upper clip range in use: ``cliprange_high``, or ``cliprange`` when unset."""
        return self.cliprange if self.cliprange_high is None else self.cliprange_high
