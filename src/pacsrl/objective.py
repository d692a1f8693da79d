"""The PACS objective as pure functions over tensors.

Shape symbols, used in every docstring and shape comment of this module:

- ``B``: prompts in a batch, ``G``: completions sampled per prompt (the group size),
- ``N = B * G``: completions (rows); group ``b`` is the ``G`` contiguous rows ``b*G ... b*G+G-1``,
- ``T``: completion tokens (padded).

The equations follow ``PAPER.md`` (arXiv 2509.02522):

1. implicit reward  ``r_i = beta * sum_t m_it (log pi_theta(o_it) - log pi_ref(o_it))``          (Eq. 1)
2. group centring   ``psi_i = r_i - mean_{j != i} r_j`` (RLOO; or GRPO / mean / none)         (Eq. 2)
3. class weights    ``w_i = G / (2 n_{R_i})`` in groups with both labels, else 1               (Eq. 4)
4. loss             ``L = (1/N) sum_i w_i BCEWithLogits(psi_i, R_i)``                         (Eq. 3)

and, on-policy (``pi_theta == pi_ref``, so every ``psi_i = 0``), the exact gradient
``dL/dtheta = -(beta/N) sum_k A_k grad S_k`` with ``S_k = sum_t m_kt log pi_theta(o_kt)`` and, for the
RLOO baseline, ``A_k = w_k (R_k - 1/2) - 1/(G-1) sum_{i != k} w_i (R_i - 1/2)``.

Nothing here knows about configs, trainers or I/O: ``pacsrl.trainer`` calls these functions.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, get_args

import torch
import torch.nn.functional as F

Baseline = Literal["rloo", "grpo", "mean", "none"]
WeightMode = Literal["question", "none", "only_positive", "only_negative"]
RewardForm = Literal["sum", "mean_logp"]

GRPO_STD_EPS = 1e-6

__all__ = [
    "GRPO_STD_EPS",
    "Baseline",
    "RewardForm",
    "WeightMode",
    "class_weights",
    "group_centre",
    "group_outcomes",
    "implicit_reward",
    "on_policy_advantage",
    "pacs_loss",
    "pacs_on_policy_loss",
]


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def _check_mode(name: str, value: str, literal) -> None:
    allowed = get_args(literal)
    if value not in allowed:
        raise ValueError(f"unknown {name}={value!r}; expected one of {', '.join(map(repr, allowed))}")


def _check_groups(n: int, group_size: int) -> None:
    if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    group_size = int(group_size)
    if group_size < 2:
        raise ValueError(
            f"group_size={group_size}: PACS centres each reward against the other members of its group, "
            "so a group needs at least 2 completions"
        )
    if n % group_size != 0:
        raise ValueError(
            f"N={n} rows is not a multiple of group_size={group_size}: groups must be whole "
            "(G contiguous rows per prompt)"
        )


def _check_mask(mask: torch.Tensor, logps: torch.Tensor) -> None:
    if mask.shape != logps.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from logps shape {tuple(logps.shape)}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold 0 (padding) or 1 (completion token) only; got other values")


def _check_labels(labels: torch.Tensor, n: int) -> None:
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape (N,)=({n},), got {tuple(labels.shape)}")
    if labels.is_floating_point() and not torch.isfinite(labels).all():
        raise ValueError("labels contain NaN or inf; expected verifier outcomes in {0, 1}")
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        values = sorted({float(v) for v in labels[bad].tolist()})[:5]
        raise ValueError(
            f"labels must be verifier outcomes in {{0, 1}}, got {values}; threshold or round graded rewards "
            "before calling the PACS loss"
        )


# --------------------------------------------------------------------------------------------------
# the pieces
# --------------------------------------------------------------------------------------------------
def implicit_reward(
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    beta: float = 1.0,
    reward_form: RewardForm = "sum",
) -> torch.Tensor:
    """Implicit reward of each completion (Eq. 1), shape (N,).

    Args:
        logps: (N, T) per-token log-probabilities of the current policy.
        ref_logps: (N, T) per-token log-probabilities of the reference (pi_old or a frozen pi_ref);
            unused (may be None) when ``reward_form="mean_logp"``.
        mask: (N, T) 1 on completion tokens, 0 on padding.
        beta: scale of the implicit reward.
        reward_form: ``"sum"``: ``beta * sum_t m (logps - ref_logps)``, the paper's log-ratio.
            ``"mean_logp"``: ``beta * sum_t m logps / sum_t m``, the reference code's reference-free form.

    Padding positions are excluded with ``torch.where`` rather than multiplied by 0, so that values
    there (even ``-inf`` or NaN) can never leak into the reward or its gradient. The reference code
    sums the log-ratio without a mask (PAPER.md, pitfalls); this does not.

    The sum is computed in fp32 (fp64 stays fp64) whatever the dtype of the inputs: bf16 or fp16 log-probs are
    cast first, and the reward is returned in fp32.
    """
    _check_mode("reward_form", reward_form, RewardForm)
    if logps.dim() != 2:
        raise ValueError(f"logps must have shape (N, T), got {tuple(logps.shape)}")
    _check_mask(mask, logps)
    if ref_logps is not None and ref_logps.shape != logps.shape:
        raise ValueError(
            f"ref_logps shape {tuple(ref_logps.shape)} differs from logps shape {tuple(logps.shape)}"
        )
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta}")
    # a sum over thousands of tokens: accumulate in fp32 at least, whatever the input (in bf16 both the per-token
    # differences and the rounding of a sum near -5000, to a multiple of 32, would swamp the signal)
    acc = torch.promote_types(logps.dtype, torch.float32)
    logps = logps.to(acc)  # (N, T)
    ref_logps = None if ref_logps is None else ref_logps.to(acc)  # (N, T)
    keep = mask.bool()  # (N, T)
    zero = torch.zeros((), dtype=acc, device=logps.device)
    if reward_form == "sum":
        if ref_logps is None:
            raise ValueError('reward_form="sum" needs ref_logps (the log-probs of pi_old or pi_ref)')
        log_ratio = torch.where(keep, logps - ref_logps, zero)  # (N, T)
        return beta * log_ratio.sum(dim=1)  # (N,)
    token_count = keep.sum(dim=1).clamp(min=1).to(logps.dtype)  # (N,)
    return beta * torch.where(keep, logps, zero).sum(dim=1) / token_count  # (N,)


def group_centre(rewards: torch.Tensor, group_size: int, baseline: Baseline = "rloo") -> torch.Tensor:
    """Centre each reward within its group (Eq. 2): the "critic" score psi, shape (N,).

    - ``"rloo"``: ``psi_i = r_i - mean_{j != i} r_j`` (leave-one-out; the paper's default).
    - ``"grpo"``: ``psi_i = (r_i - mean_j r_j) / (std_j r_j + 1e-6)`` with the unbiased std of the group.
      The std is treated as a constant (detached) in the backward pass. On-policy every ``r_i`` is
      exactly 0, so the std is exactly 0 and its derivative ``(r_i - mean) / ((G-1) std)`` is 0/0: with
      the std in the graph the gradient is NaN, which is the reference code's pitfall. Detaching it
      (as GRPO itself treats its reward std, which does not depend on theta) keeps loss and gradient
      finite. Be aware that this divides the centred rewards by ``1e-6`` in such groups, so an
      on-policy update is ``1e6`` times the ``"mean"`` baseline's; keep gradient clipping on, or prefer
      ``"rloo"``/``"mean"``. ``"grpo"`` exists for ablations against the reference code.
    - ``"mean"``: ``psi_i = r_i - mean_j r_j`` (Dr. GRPO).
    - ``"none"``: ``psi_i = r_i``.

    Args:
        rewards: (N,) implicit rewards, groups of ``group_size`` contiguous rows.
    """
    _check_mode("baseline", baseline, Baseline)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (N,), got {tuple(rewards.shape)}")
    _check_groups(rewards.shape[0], group_size)
    group_size = int(group_size)
    if baseline == "none":
        return rewards
    r = rewards.view(-1, group_size)  # (B, G)
    mean = r.mean(dim=1, keepdim=True)  # (B, 1)
    if baseline == "rloo":
        # mean of the others = (sum - r_i) / (G - 1), so psi_i = G / (G - 1) * (r_i - mean)
        psi = r - (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)  # (B, G)
    elif baseline == "mean":
        psi = r - mean  # (B, G)
    else:  # grpo
        std = r.detach().std(dim=1, keepdim=True, unbiased=True)  # (B, 1), a constant: see docstring
        psi = (r - mean) / (std + GRPO_STD_EPS)  # (B, G)
    return psi.reshape(-1)  # (N,)


def class_weights(
    labels: torch.Tensor, group_size: int, weight_mode: WeightMode = "question"
) -> torch.Tensor:
    """Per-completion weights of the BCE (Eq. 4), shape (N,), float.

    - ``"question"``: class balance within each group: ``w_i = G / (2 n_{R_i})`` in a group holding both
      labels (so each class carries half the group's weight), ``w_i = 1`` in a group whose labels are
      all equal.
    - ``"none"``: ``w_i = 1``.
    - ``"only_positive"``: ``w_i = R_i``; ``"only_negative"``: ``w_i = 1 - R_i``.
    """
    _check_mode("weight_mode", weight_mode, WeightMode)
    n = labels.shape[0] if labels.dim() == 1 else -1
    _check_labels(labels, n)
    _check_groups(n, group_size)
    group_size = int(group_size)
    y = labels.to(torch.float64)  # exact counts in float64, cast at the end
    dtype = labels.dtype if labels.is_floating_point() else torch.float32
    if weight_mode == "none":
        return torch.ones_like(y, dtype=dtype)
    if weight_mode == "only_positive":
        return y.to(dtype)
    if weight_mode == "only_negative":
        return (1.0 - y).to(dtype)
    y = y.view(-1, group_size)  # (B, G)
    n_pos = y.sum(dim=1, keepdim=True)  # (B, 1)
    n_neg = group_size - n_pos  # (B, 1)
    mixed = (n_pos > 0) & (n_neg > 0)  # (B, 1)
    n_same = torch.where(y > 0.5, n_pos, n_neg).clamp(min=1)  # (B, G) size of each member's class
    w = torch.where(mixed, group_size / (2.0 * n_same), torch.ones_like(y))  # (B, G)
    return w.reshape(-1).to(dtype)  # (N,)


# --------------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------------
def pacs_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    mask: torch.Tensor,
    labels: torch.Tensor,
    group_size: int,
    *,
    beta: float = 1.0,
    baseline: Baseline = "rloo",
    weight_mode: WeightMode = "question",
    reward_form: RewardForm = "sum",
) -> torch.Tensor:
    """The PACS loss ``(1/N) sum_i w_i BCEWithLogits(psi_i, R_i)`` (Eq. 3), a scalar.

    Args:
        logps: (N, T) per-token log-probs of the current policy (carry the gradient).
        ref_logps: (N, T) per-token log-probs of the reference: pi_old (recomputed before the update)
            or a frozen pi_ref. Treated as constants. May be None when ``reward_form="mean_logp"``.
        mask: (N, T) 1 on completion tokens, 0 on padding.
        labels: (N,) verifier outcomes in {0, 1}.
        group_size: G; rows ``b*G ... b*G+G-1`` are the completions of prompt ``b``.
        beta, baseline, weight_mode, reward_form: see ``implicit_reward``, ``group_centre`` and
            ``class_weights``.

    The BCE sees psi as the logit of "this completion is correct": sigma(psi) is the implicit critic's
    estimate. It is computed with ``binary_cross_entropy_with_logits`` (log-sum-exp), so extreme psi
    (log-probs of -1e4, long sequences) give finite values. Whatever the dtype of ``logps`` (bf16 too),
    the token sum and the loss are computed in fp32 (see ``implicit_reward``); the gradient comes back in
    the dtype of ``logps``.
    """
    n = logps.shape[0] if logps.dim() == 2 else -1
    if logps.dim() != 2:
        raise ValueError(f"logps must have shape (N, T), got {tuple(logps.shape)}")
    _check_groups(n, group_size)
    _check_labels(labels, n)
    _check_mode("baseline", baseline, Baseline)
    _check_mode("weight_mode", weight_mode, WeightMode)
    if ref_logps is not None:
        ref_logps = ref_logps.detach()  # the reference is a constant of the update

    r = implicit_reward(logps, ref_logps, mask, beta=beta, reward_form=reward_form)  # (N,)
    psi = group_centre(r, group_size, baseline)  # (N,)
    y = labels.to(psi.dtype)  # (N,)
    w = class_weights(y, group_size, weight_mode)  # (N,)
    # reduction="mean" is (1/N) sum_i w_i * bce_i, exactly Eq. 3
    return F.binary_cross_entropy_with_logits(psi, y, weight=w, reduction="mean")


# --------------------------------------------------------------------------------------------------
# on-policy fast path
# --------------------------------------------------------------------------------------------------
def on_policy_advantage(
    labels: torch.Tensor,
    group_size: int,
    *,
    baseline: Baseline = "rloo",
    weight_mode: WeightMode = "question",
) -> torch.Tensor:
    """Exact advantage ``A_k`` of the on-policy PACS gradient, shape (N,).

    When ``pi_theta == pi_ref`` every implicit reward is 0, so ``psi = 0``, ``sigma(psi) = 1/2`` and
    ``dL/dpsi_i = (1/N) w_i (1/2 - R_i)``. Chaining through the centring ``psi = C r`` and ``dr_k = beta dS_k``:

        dL/dtheta = -(beta/N) sum_k A_k grad S_k,    A_k = sum_i C_ik u_i,    u_i = w_i (R_i - 1/2)

    which for ``"rloo"`` is PAPER.md's ``A_k = u_k - 1/(G-1) sum_{i != k} u_i``; ``"mean"``: ``u_k - mean(u)``;
    ``"none"``: ``u_k``; ``"grpo"``: ``(u_k - mean(u)) / 1e-6`` (the std of all-zero rewards is 0 and is
    treated as a constant, see ``group_centre``).

    With ``"rloo"``, ``"mean"`` or ``"grpo"``, a group whose labels are all equal has ``A = 0`` exactly
    (its weights are all 1 and its ``u`` constant): it carries no gradient on-policy.

    Only valid for ``reward_form="sum"``, where on-policy means ``r = 0``.
    """
    _check_mode("baseline", baseline, Baseline)
    w = class_weights(labels, group_size, weight_mode)  # (N,)
    group_size = int(group_size)
    u = w * (labels.to(w.dtype) - 0.5)  # (N,)
    if baseline == "none":
        return u
    ug = u.view(-1, group_size)  # (B, G)
    if baseline == "rloo":
        a = ug - (ug.sum(dim=1, keepdim=True) - ug) / (group_size - 1)  # (B, G)
    else:
        a = ug - ug.mean(dim=1, keepdim=True)  # (B, G)
        if baseline == "grpo":
            a = a / GRPO_STD_EPS
    return a.reshape(-1)  # (N,)


def pacs_on_policy_loss(
    logps: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    group_size: int,
    *,
    beta: float = 1.0,
    baseline: Baseline = "rloo",
    weight_mode: WeightMode = "question",
    num_rows: int | None = None,
) -> torch.Tensor:
    """``pacs_loss`` at ``pi_theta == pi_ref``, computed without the reference log-probs.

    Returns a scalar whose value is the PACS loss on-policy, ``(1/N) sum_i w_i log 2`` (every psi is 0),
    and whose gradient is the exact on-policy gradient ``-(beta/N) sum_k A_k sum_t m_kt grad logps_kt``.
    The two are joined with a straight-through term ``g - g.detach()``, which is 0 in value.

    Args:
        logps: (N', T) per-token log-probs of the current policy, for N' rows (whole groups).
        mask: (N', T); labels: (N',).
        num_rows: the N of the ``1/N`` normalisation, when these rows are a subset of a batch of N rows
            (e.g. the trainer dropped groups whose advantage is 0). Defaults to N'.
    """
    n = logps.shape[0] if logps.dim() == 2 else -1
    if logps.dim() != 2:
        raise ValueError(f"logps must have shape (N, T), got {tuple(logps.shape)}")
    _check_mask(mask, logps)
    _check_groups(n, group_size)
    group_size = int(group_size)
    denom = n if num_rows is None else num_rows
    if denom < n or denom <= 0:
        raise ValueError(f"num_rows={num_rows} must be >= the number of rows given ({n})")
    _check_labels(labels, n)
    # summed in fp32, as in implicit_reward
    logps = logps.to(torch.promote_types(logps.dtype, torch.float32))  # (N', T)
    y = labels.to(logps.dtype)  # (N',)
    adv = on_policy_advantage(y, group_size, baseline=baseline, weight_mode=weight_mode)  # (N',)
    w = class_weights(y, group_size, weight_mode)  # (N',)
    seq_logp = torch.where(mask.bool(), logps, torch.zeros((), dtype=logps.dtype, device=logps.device)).sum(1)
    surrogate = -(beta / denom) * (adv * seq_logp).sum()  # gradient of Eq. 3 on-policy
    value = w.sum() * math.log(2.0) / denom  # Eq. 3 at psi = 0: BCE(0, y) = log 2
    return value + (surrogate - surrogate.detach())


def group_outcomes(labels: torch.Tensor, group_size: int) -> dict[str, float]:
    """Fractions of groups that are all-correct, all-wrong and mixed (keys ``all_correct``, ``all_wrong``,
    ``mixed``), from (N,) labels in {0, 1}."""
    n = labels.shape[0] if labels.dim() == 1 else -1
    _check_labels(labels, n)
    _check_groups(n, group_size)
    n_pos = labels.to(torch.float64).view(-1, group_size).sum(dim=1)  # (B,)
    b = n_pos.numel()
    all_correct = float((n_pos == group_size).sum()) / b
    all_wrong = float((n_pos == 0).sum()) / b
    return {"all_correct": all_correct, "all_wrong": all_wrong, "mixed": 1.0 - all_correct - all_wrong}
