"""``pacs_sync``: verl's synchronous v1 trainer with whole PACS groups on every rank and micro-batch.

Overrides of ``verl.trainer.ppo.v1.PPOTrainerSync``, and why:

- ``__init__``: refuses, before anything is built, every setting that would split a group or silently
  change the PACS objective (``pacsrl.verl.checks``).
- ``_balance_batch``: verl's own partitions single completions by length across data-parallel ranks and
  runs whatever ``trainer.balance_batch`` says, which scatters a group over ranks (upstream issue 7758).
  This one balances whole groups (rows of one uid, kept contiguous, sorted by uid within a rank) and
  refuses instead of appending verl's filler rows.
- ``_update_actor``: with ``use_dynamic_bsz`` sends ``force_group_size=n`` to the workers, so that
  ``prepare_micro_batches`` packs whole groups into each micro-batch.

Everything else (rollouts, rewards, pi_old recomputation, checkpoints, logging) is verl's.
"""

from __future__ import annotations

import logging

import torch
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.seqlen_balancing import (
    calculate_workload,
    get_seqlen_balanced_partitions,
    log_seqlen_unbalance,
)

from pacsrl.verl.checks import check_config

logger = logging.getLogger(__name__)


def uid_of(key: str) -> str:
    """The prompt uid of a verl v1 trajectory key ``{uid}_{session_id}_{index}`` (verl's own reading)."""
    return key.split("_")[0]


def group_balanced_order(
    keys: list[str], seq_lens: list[int], group_size: int, dp_size: int
) -> list[list[int]]:
    """Row indices for each of ``dp_size`` ranks: whole groups, equal counts, balanced workload.

    Groups are the rows sharing a uid; each must have ``group_size`` rows. Within a rank, groups are
    sorted by uid and their rows kept contiguous in their original order.
    """
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(uid_of(key), []).append(i)
    bad = {uid: len(rows) for uid, rows in groups.items() if len(rows) != group_size}
    if bad:
        raise RuntimeError(
            f"PACS: {len(bad)} prompt group(s) do not have rollout.n={group_size} completions "
            f"(e.g. {next(iter(bad.items()))}); set trainer.v1.sampler.sync_refill_failed_groups=true"
        )
    if len(groups) % dp_size != 0:
        raise RuntimeError(
            f"PACS: {len(groups)} groups cannot be shared equally by {dp_size} data-parallel ranks; make "
            f"data.train_batch_size and actor_rollout_ref.actor.ppo_mini_batch_size multiples of {dp_size}"
        )
    uids = sorted(groups)
    workload = calculate_workload(torch.tensor(seq_lens, dtype=torch.int64))
    group_load = [int(sum(workload[i] for i in groups[uid])) for uid in uids]
    parts = get_seqlen_balanced_partitions(group_load, k_partitions=dp_size, equal_size=True)
    return [[i for g in sorted(part, key=lambda g: uids[g]) for i in groups[uids[g]]] for part in parts]


class PACSTrainerSync(PPOTrainerSync):
    """verl's sync trainer for PACS; see the module docstring for what is overridden and why."""

    def __init__(self, config):
        check_config(config)
        super().__init__(config)

    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        role, worker_group = "actor", self.actor_rollout_wg
        if role not in worker_group._dispatch_info:
            worker_group._dispatch_info[role] = worker_group._query_dispatch_info(role)
        dp_size = max(worker_group._dispatch_info[role]) + 1

        n = int(self.config.actor_rollout_ref.rollout.n)
        mini_rows = int(self.config.actor_rollout_ref.actor.ppo_mini_batch_size) * n
        if mini_rows % (dp_size * n) != 0:
            raise RuntimeError(
                f"PACS: actor_rollout_ref.actor.ppo_mini_batch_size={mini_rows // n} prompts is not a multiple of "
                f"the {dp_size} data-parallel ranks, so a rank's share of a mini-batch would split a group; "
                f"use a multiple of {dp_size}"
            )
        multiple = self._get_required_batch_multiple(dp_size)
        if len(batch) % multiple != 0:
            raise RuntimeError(
                f"PACS: a batch of {len(batch)} completions is not a multiple of {multiple}; verl would append "
                "filler rows that break groups: make data.train_batch_size a multiple of ppo_mini_batch_size"
            )
        seq_lens = [int(tag["seq_len"]) for tag in batch.tags]
        parts = group_balanced_order(list(batch.keys), seq_lens, n, dp_size)
        batch.reorder([i for part in parts for i in part])
        metrics.update(log_seqlen_unbalance(seqlen_list=seq_lens, partitions=parts, prefix=logging_prefix))
        return batch

    def _update_actor(self, batch, metrics):
        if self.config.actor_rollout_ref.actor.use_dynamic_bsz:
            batch.extra_info["force_group_size"] = int(self.config.actor_rollout_ref.rollout.n)
        return super()._update_actor(batch, metrics)


__all__ = ["PACSTrainerSync", "group_balanced_order", "uid_of"]
