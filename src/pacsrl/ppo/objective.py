"""PPO's math for verifiable rewards, as pure functions over tensors.

Shape symbols: ``N`` completions (rows), ``T`` completion tokens (padded). ``mask`` is 1 on the tokens the
policy generated (and is trained on) and 0 elsewhere: right padding, and with tools the tool's output. The time
steps of PPO are the valid tokens of a row, in order; masked tokens are skipped, never counted as steps.

1. token rewards   ``r_t = -kl_coef * kl_t`` on every valid token, plus the verifier's score on the last one
2. GAE             ``delta_t = r_t + gamma * V_{t+1} - V_t``,  ``A_t = delta_t + gamma * lam * A_{t+1}``,
                   ``V`` after the last valid token = 0 (the episode ends); returns ``R_t = A_t + V_t``
3. whitening       ``A <- (A - mean) / sqrt(var + 1e-8)`` over the valid tokens of the whole batch
4. policy loss     ``max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))``, ``rho = pi_theta / pi_old``
5. value loss      ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``

(Schulman et al. 2017, "Proximal Policy Optimization"; Schulman et al. 2016, "High-Dimensional Continuous Control
Using Generalized Advantage Estimation"; the LLM conventions of verl and OpenRLHF: outcome reward on the last token,
per-token KL in the reward, ``gamma = lam = 1`` for verifiable rewards.)

Nothing here knows about configs, trainers or processes: ``pacsrl.ppo.trainer`` reduces the moments of
step 3 across processes and normalises the per-token losses of steps 4 and 5.
"""

from __future__ import annotations

import torch

WHITEN_EPS = 1e-8

__all__ = ["WHITEN_EPS", "gae", "policy_loss_terms", "token_rewards", "value_loss_terms", "whiten"]


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"tensors must have the same (N, T) shape, got {shapes}")


def token_rewards(
    scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0
) -> torch.Tensor:
    """Per-token rewards (N, T): the score of each completion on its last valid token, minus ``kl_coef * kl``.

    Args:
        scores: (N,) the verifier's reward of each completion (any finite float).
        mask: (N, T) 1 on valid completion tokens.
        kl: (N, T) per-token KL estimate ``log pi_old - log pi_ref`` (unused when ``kl_coef == 0``).
    A row without a valid token gets no reward (it has no step to carry one).
    """
    mask = mask.to(scores.dtype)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (N, T)
    last = (positions * mask).argmax(dim=1)  # (N,) index of the last valid token
    has_token = mask.sum(dim=1) > 0  # (N,)
    rewards = torch.zeros_like(mask)  # (N, T)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] = torch.where(has_token, scores, 0.0)
    if kl_coef != 0.0:
        rewards = (
            rewards - kl_coef * kl * mask
        )  # (N, T) the KL penalty in the reward, as verl's use_kl_in_reward
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the valid tokens of each row (Eq. 2).

    Returns ``(advantages, returns)``, both (N, T) and 0 on masked tokens. A masked token between two valid ones is
    skipped: the valid token before it bootstraps from the value of the valid token after it, with one factor
    ``gamma`` (one step), so a tool's output inside a completion is not a time step of the policy.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    mask = mask.to(values.dtype)
    N, T = values.shape
    next_value = values.new_zeros(N)  # (N,) V of the next valid token; 0 after the last one (terminal)
    running = values.new_zeros(N)  # (N,) A of the next valid token
    advantages = torch.zeros_like(values)  # (N, T)
    for t in reversed(range(T)):
        m = mask[:, t]  # (N,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (N,)
        advantage = delta + gamma * lam * running  # (N,)
        advantages[:, t] = advantage * m
        running = m * advantage + (1 - m) * running  # masked tokens pass the next step's values through
        next_value = m * values[:, t] + (1 - m) * next_value
    returns = (advantages + values) * mask  # (N, T)
    return advantages, returns


def whiten(
    x: torch.Tensor, mask: torch.Tensor, mean: float | torch.Tensor, var: float | torch.Tensor
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` on valid tokens, 0 elsewhere (Eq. 3); ``mean`` and ``var`` (unbiased) are
    the moments over the valid tokens of the whole batch, across processes, computed by the caller."""
    return (x - mean) * torch.rsqrt(torch.as_tensor(var, dtype=x.dtype, device=x.device) + WHITEN_EPS) * mask


def policy_loss_terms(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Eq. 4): ``(loss, clipped, approx_kl)``, each (N, T), unmasked.

    ``clipped`` is 1 where the clipped term is the larger loss (the ratio is outside the trust region in the
    direction the advantage pushes, so the token carries no gradient). ``approx_kl`` is the estimator
    ``(rho - 1) - log rho`` of KL(pi_old || pi_theta), >= 0 (Schulman's "k3").
    """
    _check_same_shape(logps=logps, old_logps=old_logps, advantages=advantages)
    log_ratio = logps - old_logps  # (N, T)
    ratio = torch.exp(log_ratio)  # (N, T)
    unclipped = -advantages * ratio  # (N, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # (N, T)
    loss = torch.maximum(unclipped, clipped)  # (N, T) pessimistic bound
    with torch.no_grad():
        clip_active = (clipped > unclipped).to(logps.dtype)  # (N, T)
        approx_kl = (ratio - 1.0) - log_ratio  # (N, T)
    return loss, clip_active, approx_kl


def value_loss_terms(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss per token (Eq. 5): ``(loss, clipped)``, each (N, T), unmasked.

    The new value may move at most ``clip`` from the rollout's value before its error stops counting (the larger
    of the two squared errors is kept); ``clip=None`` gives the plain ``0.5 * (V - R)^2``.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns)
    plain = (values - returns) ** 2  # (N, T)
    if clip is None:
        return 0.5 * plain, torch.zeros_like(plain)
    moved = old_values + torch.clamp(values - old_values, -clip, clip)  # (N, T)
    bounded = (moved - returns) ** 2  # (N, T)
    with torch.no_grad():
        clip_active = (bounded > plain).to(values.dtype)  # (N, T)
    return 0.5 * torch.maximum(plain, bounded), clip_active
