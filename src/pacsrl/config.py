"""``PACSConfig``: TRL's ``GRPOConfig`` plus the PACS fields, validated at start-up.

Everything of ``GRPOConfig`` that PACS shares (generation, vLLM, batching, logging, checkpoints) keeps
its meaning. GRPO's own loss options are rejected when set to anything but PACS's value, because the
PACS trainer does not use them and silently ignoring them would change the experiment the user thinks
they are running. They are checked after ``GRPOConfig.__post_init__`` has normalised them:

| GRPO option | PACS value | why |
|---|---|---|
| ``loss_type`` | ``"pacs"`` | the loss is PACS's weighted BCE, not a clipped surrogate |
| ``beta`` (KL coefficient) | ``0.0`` | the paper uses no KL penalty; the implicit reward's scale is ``pacs_beta`` |
| ``scale_rewards`` | ``"group"`` (TRL's default; ``True`` is read as ``"group"``; unused) | GRPO advantages are not used; PACS's centring is ``pacs_baseline`` |
| ``importance_sampling_level`` | ``"token"`` (unused) | PACS has no importance ratio: ``pi_old`` enters through the implicit reward |
| ``epsilon``, ``epsilon_high``, ``delta`` | TRL's defaults (unused) | no ratio clipping in PACS |
| ``top_entropy_quantile`` | ``1.0`` | PACS sums the log-ratio over every completion token |
| ``mask_truncated_completions`` | ``False`` | a masked completion would still sit in its group with reward 0; score truncated completions with the verifier instead (no final answer scores 0) |
| ``vllm_importance_sampling_correction`` | ``False`` | PACS uses the trainer's recomputed ``pi_old`` log-probs, not vLLM's, and has no ratio to correct |
| ``off_policy_mask_threshold`` | ``None`` | a GRPO-specific token mask |
| ``entropy_coef``, ``use_adaptive_entropy`` | ``0.0``, ``False`` | the paper uses no entropy bonus |
| ``sync_ref_model`` | ``False`` | that syncs GRPO's KL reference; PACS's reference is ``pacs_reference`` |
| ``multi_objective_aggregation`` | ``"sum_then_normalize"`` (unused) | labels come from the weighted mean of rewards |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, get_args

from trl import GRPOConfig

from pacsrl.objective import Baseline, RewardForm, WeightMode

# GRPO-only options and the only value PACS accepts (see the module docstring for why).
_GRPO_ONLY: dict[str, tuple[Any, str]] = {
    "beta": (0.0, "the paper trains without a KL penalty; the implicit reward's scale is `pacs_beta`"),
    "scale_rewards": (
        "group",
        "GRPO's advantages are not used; choose PACS's group centring with `pacs_baseline`",
    ),
    "importance_sampling_level": (
        "token",
        "PACS has no importance ratio; pi_old enters through the implicit reward",
    ),
    "epsilon": (0.2, "PACS does not clip a probability ratio"),
    "epsilon_high": (None, "PACS does not clip a probability ratio"),
    "delta": (None, "PACS does not clip a probability ratio"),
    "top_entropy_quantile": (1.0, "PACS sums the log-ratio over every completion token"),
    "mask_truncated_completions": (
        False,
        (
            "a masked completion would stay in its group with implicit reward 0; let the verifier score truncated "
            "completions (no final answer scores 0)"
        ),
    ),
    "vllm_importance_sampling_correction": (
        False,
        "PACS computes pi_old with the trainer's model and has no ratio to correct",
    ),
    "off_policy_mask_threshold": (None, "a GRPO-specific token mask"),
    "entropy_coef": (0.0, "the paper uses no entropy bonus"),
    "use_adaptive_entropy": (False, "the paper uses no entropy bonus"),
    "sync_ref_model": (False, "that syncs GRPO's KL reference; PACS's reference is `pacs_reference`"),
    "multi_objective_aggregation": (
        "sum_then_normalize",
        "PACS labels come from the weighted mean of the rewards (`reward_weights`, `pacs_label_threshold`)",
    ),
}


@dataclass
class PACSConfig(GRPOConfig):
    r"""
    Configuration class for [`pacsrl.PACSTrainer`].

    Extends TRL's `GRPOConfig` with the PACS objective's fields. Every GRPO option that PACS shares keeps
    its meaning; GRPO's own loss options are rejected unless they hold PACS's value (see the docstring
    of `pacsrl.config`).

    Parameters:
        pacs_beta (`float`, *optional*, defaults to `1.0`):
            Scale of the implicit reward `r = pacs_beta * sum_t log(pi_theta / pi_ref)`.
        pacs_baseline (`str`, *optional*, defaults to `"rloo"`):
            Group centring of the implicit reward: `"rloo"`, `"grpo"`, `"mean"` or `"none"`.
        pacs_weight_mode (`str`, *optional*, defaults to `"question"`):
            BCE weights: `"question"` (class-balanced per group), `"none"`, `"only_positive"`, `"only_negative"`.
        pacs_reward_form (`str`, *optional*, defaults to `"sum"`):
            `"sum"` (log-ratio summed over tokens) or `"mean_logp"` (mean log-prob, reference-free).
        pacs_reference (`str`, *optional*, defaults to `"old"`):
            `"old"`: pi_ref is the rollout policy pi_old. `"fixed"`: a frozen copy of the policy, hard-reset
            to the current policy (with the optimizer state) every `pacs_ref_reset_steps` optimizer steps.
        pacs_ref_reset_steps (`int`, *optional*, defaults to `100`):
            Optimizer steps between two resets of the fixed reference.
        pacs_label_threshold (`float`, *optional*, defaults to `1.0`):
            A completion's label is 1 when the weighted mean of its rewards reaches this threshold.
        pacs_on_policy_fast_path (`bool`, *optional*, defaults to `True`):
            Use the exact on-policy gradient, and skip groups with zero advantage, when pi_theta == pi_ref.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            GRPOConfig's field with PACS's default: dropout off, because its noise adds up in the token sum of the
            implicit reward.
    """

    pacs_beta: float = field(
        default=1.0,
        metadata={
            "help": "Scale of the implicit reward r = pacs_beta * sum_t log(pi_theta/pi_ref) (the paper's beta; "
            "best 0.5 to 1). Not GRPOConfig's `beta`, which is the KL coefficient and must stay 0."
        },
    )
    pacs_baseline: str = field(
        default="rloo",
        metadata={
            "help": "Group centring of the implicit reward (the implicit critic): 'rloo' (r_i - mean of the others, "
            "the paper's default), 'grpo' ((r - mean)/(std + 1e-6), std treated as a constant), 'mean' (r - mean), "
            "'none'.",
            "choices": list(get_args(Baseline)),
        },
    )
    pacs_weight_mode: str = field(
        default="question",
        metadata={
            "help": "Weights of the BCE: 'question' (class-balanced within each group: w = G/(2 n_label) in groups "
            "with both labels, 1 otherwise), 'none', 'only_positive' (w = label), 'only_negative' (w = 1 - label).",
            "choices": list(get_args(WeightMode)),
        },
    )
    pacs_reward_form: str = field(
        default="sum",
        metadata={
            "help": "Implicit reward: 'sum' (beta * sum of log(pi_theta/pi_ref) over completion tokens) or "
            "'mean_logp' (beta * mean log pi_theta, reference-free, the reference code's second form).",
            "choices": list(get_args(RewardForm)),
        },
    )
    pacs_reference: str = field(
        default="old",
        metadata={
            "help": "pi_ref of the implicit reward: 'old' (the rollout policy pi_old, log-probs recomputed before "
            "the update, as in the reference code) or 'fixed' (a frozen copy of the policy, hard-reset to the "
            "current policy together with the optimizer state every `pacs_ref_reset_steps` optimizer steps, as in "
            "the paper's v2).",
            "choices": ["old", "fixed"],
        },
    )
    pacs_ref_reset_steps: int = field(
        default=100,
        metadata={
            "help": "With pacs_reference='fixed': optimizer steps between two hard resets of the reference."
        },
    )
    pacs_label_threshold: float = field(
        default=1.0,
        metadata={
            "help": "Labels from rewards: every reward function must return a value in [0, 1]; a completion's label "
            "is 1 when the weighted mean sum_k w_k r_k / sum_k w_k (w = reward_weights, default 1) is >= this "
            "threshold, else 0. With one binary verifier any value in (0, 1] gives label = reward."
        },
    )
    pacs_on_policy_fast_path: bool = field(
        default=True,
        metadata={
            "help": "When pi_theta == pi_ref for a micro-batch (the first update after a rollout), compute the exact "
            "on-policy gradient and skip the forward/backward of groups whose advantage is exactly 0 (all labels "
            "equal). Same gradients as the full loss. On micro-batches where groups were skipped, the entropy of "
            "the forwarded groups is logged as `pacs/entropy_forwarded_groups` instead of `entropy`; turn the fast "
            "path off to have `entropy` over every group on every step (e.g. to compare with GRPO's). Always off "
            "for MoE models that train their router loss (router_aux_loss_coef != 0), which depends on every token."
        },
    )

    # GRPOConfig defaults that PACS changes (see the module docstring).
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Turn the model's dropout off (GRPOConfig's default is False). PACS's implicit reward sums "
            "log(pi_theta/pi_ref) over every token of a completion, so dropout noise in the policy's forward adds up "
            "over thousands of tokens, makes psi non-zero where pi_theta == pi_ref, and breaks the on-policy fast "
            "path's equality with the full loss. pi_old and the fixed pi_ref are computed without dropout either way."
        },
    )
    loss_type: str = field(
        default="pacs",
        metadata={"help": "Must be 'pacs': the PACS trainer's loss is its weighted BCE (pacs_* fields)."},
    )
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={"help": "Must be False with PACS: pi_old is recomputed by the trainer; there is no ratio."},
    )

    def __post_init__(self):
        self._check_pacs_fields()
        self._check_whole_groups()  # before GRPOConfig's own, less specific, divisibility checks
        given = {name: getattr(self, name) for name in _GRPO_ONLY}  # as the user wrote them
        super().__post_init__()
        self._check_grpo_options(given)  # after TRL's normalisation: scale_rewards=True is "group" there

    def _check_grpo_options(self, given: dict[str, Any]) -> None:
        """Each GRPO-only option must hold PACS's value once GRPOConfig has normalised it."""
        for name, (expected, why) in _GRPO_ONLY.items():
            value = getattr(self, name)
            if value != expected:
                read_as = "" if given[name] == value else f" (which TRL reads as {value!r})"
                raise ValueError(
                    f"{name}={given[name]!r}{read_as} is a GRPO option that PACS does not use ({why}); set "
                    f"{name}={expected!r} or leave it out of the PACS config."
                )

    def _check_pacs_fields(self) -> None:
        if self.loss_type != "pacs":
            raise ValueError(
                f"loss_type={self.loss_type!r}: PACSTrainer trains with the PACS loss only; leave loss_type='pacs' "
                "and choose the variant with pacs_baseline / pacs_weight_mode / pacs_reward_form. To train GRPO, "
                "use TRL's GRPOTrainer (`pacsrl train --algorithm grpo`)."
            )
        choices = {  # the objective's modes, one source of truth
            "pacs_baseline": get_args(Baseline),
            "pacs_weight_mode": get_args(WeightMode),
            "pacs_reward_form": get_args(RewardForm),
            "pacs_reference": ("old", "fixed"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not one of {', '.join(map(repr, allowed))}"
                )
        if not (self.pacs_beta > 0 and self.pacs_beta < float("inf")):
            raise ValueError(
                f"pacs_beta={self.pacs_beta} must be a positive finite number (the paper uses 1.0)"
            )
        if self.pacs_reference == "fixed" and self.pacs_ref_reset_steps < 1:
            raise ValueError(
                f"pacs_ref_reset_steps={self.pacs_ref_reset_steps} must be >= 1 with pacs_reference='fixed'"
            )
        if self.pacs_reference == "fixed" and self.pacs_reward_form == "mean_logp":
            raise ValueError(
                "pacs_reward_form='mean_logp' uses no reference, so pacs_reference='fixed' would only cost memory; "
                "use pacs_reference='old' with it"
            )
        if self.pacs_reference == "fixed" and self.save_on_each_node:
            raise ValueError(
                "save_on_each_node=True with pacs_reference='fixed': the fixed reference is saved by the main "
                "process only, so the other nodes' checkpoints could not resume it; save to a filesystem that "
                "every node reads (save_on_each_node=False)"
            )
        if not 0.0 < self.pacs_label_threshold <= 1.0:
            raise ValueError(
                f"pacs_label_threshold={self.pacs_label_threshold} must be in (0, 1]: rewards are in [0, 1] and "
                "the label is 1 when their weighted mean reaches the threshold"
            )
        if self.reward_weights is not None and any(w < 0 for w in self.reward_weights):
            raise ValueError(
                f"reward_weights={self.reward_weights}: PACS turns the weighted mean of rewards into a 0/1 label, "
                "so weights must be >= 0"
            )
        if self.reward_weights is not None and sum(self.reward_weights) <= 0:
            raise ValueError(f"reward_weights={self.reward_weights} must have a positive sum")
        if self.num_generations is not None and self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations}: PACS centres each completion's implicit reward against "
                "the other completions of its prompt, so it needs at least 2 (the paper uses 8)"
            )

    def _check_whole_groups(self) -> None:
        g = self.num_generations
        if self.per_device_train_batch_size % g != 0:
            multiples = ", ".join(str(g * k) for k in (1, 2, 3))
            raise ValueError(
                f"per_device_train_batch_size={self.per_device_train_batch_size} is not a multiple of "
                f"num_generations={g}: PACS needs whole groups of completions on each device and in each "
                f"micro-batch (the loss of a completion depends on every member of its group); use {multiples}..."
            )
        g_eval = self.num_generations_eval or g
        if self.eval_strategy != "no" and self.per_device_eval_batch_size % g_eval != 0:
            raise ValueError(
                f"per_device_eval_batch_size={self.per_device_eval_batch_size} is not a multiple of "
                f"num_generations_eval={g_eval}: PACS evaluates its loss on whole groups on each device"
            )
