"""PACS inside verl's per-micro-batch policy-loss interface: the label estimator and the loss.

verl calls a registered policy loss once per micro-batch with per-token ``advantages`` and nothing else
about the samples (no uid, no labels). The ``pacs_label`` estimator therefore writes, on every response
token, one number that carries both the verifier label ``R_i`` and a tag of the completion's group:

    advantages_it = R_i + 2 * tag_b      tag_b = 1, 2, ...: the group's rank of first appearance in the batch

The loss decodes it back, checks that the micro-batch holds whole groups of ``G`` contiguous rows (one tag
per block of ``G`` rows, a different tag in each block) and calls ``pacsrl.objective.pacs_loss``: the
same code as the TRL trainer. Shape symbols as in ``pacsrl.objective``: ``N`` rows, ``G`` per group,
``T`` response tokens.

Normalisation: ``pacs_loss`` is ``(1/n) sum_i w_i BCE_i`` over the ``n`` rows of one micro-batch; scaling it
by ``n * dp_size / global_batch_size`` (verl's mini-batch size in rows, summed over ranks) makes the sum
of micro-batch gradients, averaged over data-parallel ranks, the gradient of PACS's ``(1/N) sum_i`` over
the whole mini-batch, whatever the micro-batch / rank split (as verl's ``agg_loss`` does for its modes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from verl.workers.config import PolicyLossConfig

from pacsrl.objective import Baseline, RewardForm, WeightMode, group_centre, implicit_reward, pacs_loss

logger = logging.getLogger(__name__)

LOSS_NAME = "pacs"
ESTIMATOR_NAME = "pacs_label"


@dataclass
class PACSPolicyLossConfig(PolicyLossConfig):
    """verl's ``actor_rollout_ref.actor.policy_loss`` section for PACS (``loss_mode=pacs``).

    Select it with ``actor_rollout_ref.actor.policy_loss._target_=pacsrl.verl.PACSPolicyLossConfig`` and set
    the fields below with ``+actor_rollout_ref.actor.policy_loss.<field>=...`` (``+``: verl's YAML lacks them).

    Parameters:
        pacs_beta (`float`, *optional*, defaults to `1.0`):
            Scale beta of the implicit reward (PAPER.md Eq. 1; the paper uses 1, best 0.5 to 1).
        pacs_baseline (`str`, *optional*, defaults to `"rloo"`):
            Group centring of the implicit rewards: `"rloo"`, `"grpo"`, `"mean"` or `"none"`.
        pacs_weight_mode (`str`, *optional*, defaults to `"question"`):
            Class weights of the BCE: `"question"` (class balance per group), `"none"`, `"only_positive"`,
            `"only_negative"`.
        pacs_reward_form (`str`, *optional*, defaults to `"sum"`):
            `"sum"`: beta * sum of log-ratios to pi_old; `"mean_logp"`: beta * mean log-prob (no reference).
        pacs_reference (`str`, *optional*, defaults to `"old"`):
            Reference policy of the log-ratio. Only `"old"` (pi_old, verl's recomputed `old_log_prob`): verl's
            policy-loss interface passes no reference log-probs, so the paper's v2 fixed reference cannot be
            served here (use `pacsrl train --pacs_reference fixed`).
    """

    loss_mode: str = LOSS_NAME
    pacs_beta: float = 1.0
    pacs_baseline: str = "rloo"
    pacs_weight_mode: str = "question"
    pacs_reward_form: str = "sum"
    pacs_reference: str = "old"

    def __post_init__(self):
        for name, literal in (
            ("pacs_baseline", Baseline),
            ("pacs_weight_mode", WeightMode),
            ("pacs_reward_form", RewardForm),
        ):
            allowed = literal.__args__
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"actor_rollout_ref.actor.policy_loss.{name}={getattr(self, name)!r}: expected one of "
                    f"{', '.join(map(repr, allowed))}"
                )
        if self.pacs_reference != "old":
            raise ValueError(
                f"actor_rollout_ref.actor.policy_loss.pacs_reference={self.pacs_reference!r}: the verl plugin "
                "supports only 'old' (pi_old); verl's policy-loss interface passes no reference log-probs. "
                "Use `pacsrl train --pacs_reference fixed` for the paper's fixed reference."
            )
        if not self.pacs_beta > 0:
            raise ValueError(f"actor_rollout_ref.actor.policy_loss.pacs_beta={self.pacs_beta}: must be > 0")


# --------------------------------------------------------------------------------------------------
# the estimator: label and group tag on every response token
# --------------------------------------------------------------------------------------------------
def encode_labels(labels: torch.Tensor, tags: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) advantages ``R_i + 2 tag_i`` on response tokens, 0 on padding, from (N,) labels and tags."""
    value = labels.to(torch.float32) + 2.0 * tags.to(torch.float32)  # (N,)
    return value[:, None] * response_mask.to(torch.float32)  # (N, T)


def decode_labels(advantages: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) labels and (N,) tags from the (N, T) advantages written by ``pacs_label``.

    Raises ValueError when the advantages are not that encoding (another estimator, or a row whose
    tokens disagree).
    """
    keep = response_mask.bool()  # (N, T)
    if not bool(keep.any(dim=1).all()):
        raise ValueError("a row has no response token: PACS needs at least one token per completion")
    first = advantages.gather(1, keep.float().argmax(dim=1, keepdim=True)).squeeze(1)  # (N,)
    same = torch.where(keep, advantages == first[:, None], torch.ones_like(keep)).all(dim=1)  # (N,)
    code = first.round()
    if not bool(same.all()) or not bool((code == first).all()) or not bool((code >= 2).all()):
        raise ValueError(
            f"loss_mode={LOSS_NAME!r} reads labels written by algorithm.adv_estimator={ESTIMATOR_NAME!r}, but "
            "the advantages are not that encoding: set algorithm.adv_estimator=pacs_label"
        )
    code = code.long()
    return code % 2, code // 2  # (N,), (N,)


def pacs_label_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``pacs_label``: the verifier label and group tag, see the module docstring.

    Args:
        token_level_rewards: (N, T) verl's rewards (the score on the last response token); their row sum
            must be a verifier outcome in {0, 1}.
        response_mask: (N, T).
        index: (N,) uid of each row's prompt; all groups must have the same size G >= 2.
    Returns (advantages, returns), both (N, T).
    """
    if index is None:
        raise ValueError(f"{ESTIMATOR_NAME} needs the prompt uid of each row (verl's `index`); got none")
    scores = token_level_rewards.sum(dim=1)  # (N,)
    bad = (scores != 0) & (scores != 1)
    if bool(bad.any()):
        values = sorted({float(v) for v in scores[bad].tolist()})[:5]
        raise ValueError(
            f"{ESTIMATOR_NAME}: PACS needs verifier outcomes in {{0, 1}}, got scores {values}; use a 0/1 reward "
            "function (e.g. custom_reward_function.path=<pacsrl>/verl/reward.py) or threshold yours"
        )
    uids = [str(u) for u in index]
    rank: dict[str, int] = {}
    for u in uids:
        rank.setdefault(u, len(rank) + 1)
    sizes = {u: 0 for u in rank}
    for u in uids:
        sizes[u] += 1
    if len(set(sizes.values())) != 1 or min(sizes.values()) < 2:
        raise ValueError(
            f"{ESTIMATOR_NAME}: groups of unequal size or of one completion ({sorted(set(sizes.values()))}); PACS "
            "needs every prompt's G >= 2 completions (a failed rollout session? set "
            "trainer.v1.sampler.sync_refill_failed_groups=true)"
        )
    tags = torch.tensor([rank[u] for u in uids], device=scores.device)  # (N,)
    advantages = encode_labels(scores, tags, response_mask)  # (N, T)
    return advantages, advantages


# --------------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------------
def check_whole_groups(tags: torch.Tensor, group_size: int) -> None:
    """Raise unless the rows are whole groups: each block of ``G`` contiguous rows has one tag, and no two
    blocks share a tag (which would mean a group split across blocks)."""
    n = tags.shape[0]
    if n % group_size != 0:
        raise RuntimeError(
            f"PACS group check: a micro-batch of {n} rows is not a multiple of G={group_size}; a group was split "
            "across micro-batches or ranks (see the pacsrl README, verl section)"
        )
    blocks = tags.view(-1, group_size)  # (B, G)
    whole = bool((blocks == blocks[:, :1]).all())
    distinct = blocks[:, 0].unique().numel() == blocks.shape[0]
    if not (whole and distinct):
        raise RuntimeError(
            f"PACS group check: the {n} rows of this micro-batch are not whole groups of G={group_size} "
            f"contiguous completions (group tags {tags.tolist()[:16]}...); rows were reordered or a group was "
            "split: run with trainer.v1.trainer_mode=pacs_sync and actor_rollout_ref.actor.shuffle=false"
        )


def pacs_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss ``pacs``: PACS's loss on one micro-batch, scaled to the mini-batch (module docstring).

    ``loss_agg_mode`` is ignored: PACS's (1/N) over completions is the only aggregation of its objective.
    """
    if config is None or not isinstance(config.policy_loss, PACSPolicyLossConfig):
        raise ValueError(
            f"loss_mode={LOSS_NAME!r} needs actor_rollout_ref.actor.policy_loss._target_="
            "pacsrl.verl.PACSPolicyLossConfig (it carries pacs_beta, pacs_baseline, pacs_weight_mode)"
        )
    if rollout_is_weights is not None:
        raise ValueError(
            "PACS does not use rollout importance weights: set algorithm.rollout_correction.rollout_is=null"
        )
    pc = config.policy_loss
    group_size = int(config.rollout_n)
    labels, tags = decode_labels(advantages, response_mask)  # (n,), (n,)
    check_whole_groups(tags, group_size)

    ref = None if pc.pacs_reward_form == "mean_logp" else old_log_prob
    local = pacs_loss(
        log_prob,
        ref,
        response_mask,
        labels,
        group_size,
        beta=pc.pacs_beta,
        baseline=pc.pacs_baseline,
        weight_mode=pc.pacs_weight_mode,
        reward_form=pc.pacs_reward_form,
    )

    info = config.global_batch_info
    dp_size = int(info.get("dp_size", 1) or 1)
    global_rows = info.get("global_batch_size")
    if global_rows is None:
        if dp_size > 1:
            raise ValueError(
                "pacs: verl passed no global_batch_size with dp_size > 1; cannot normalise over N"
            )
        global_rows = labels.shape[0]
    loss = local * (labels.shape[0] * dp_size / float(global_rows))

    with torch.no_grad():
        r = implicit_reward(log_prob, ref, response_mask, beta=pc.pacs_beta, reward_form=pc.pacs_reward_form)
        psi = group_centre(r, group_size, pc.pacs_baseline)  # (n,)
        accuracy = ((psi > 0) == labels.bool()).float().mean()
    metrics = {"pacs/critic_accuracy": accuracy.item(), "pacs/psi_abs_mean": psi.abs().mean().item()}
    return loss, metrics
