"""The ``pacs_sync`` trainer's group handling, against verl 0.9.1's own batching code on CPU.

verl's trainer needs a Ray cluster and GPU workers; these tests build the trainer object without its
``__init__`` and give it a stub worker group, then run the real ``_balance_batch`` (ours and verl's) and
the real ``prepare_micro_batches`` on the data the trainer hands to the workers.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl", reason="the verl test install: see the README's test command")

from omegaconf import OmegaConf
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import tensordict_utils as tu
from verl.workers.engine.utils import prepare_micro_batches

from pacsrl.verl.trainer import PACSTrainerSync, uid_of

G = 4
UIDS = ["3f2a", "0b7c", "9e41", "5d03"]  # verl's uids are uuid4 strings (no underscore)
# per-row sequence lengths, very unequal inside groups so that a per-row length balance mixes groups
LENGTHS = [900, 100, 120, 880, 500, 510, 490, 505, 1000, 60, 70, 950, 300, 310, 290, 700]


class StubWorkerGroup:
    def __init__(self, dp_size):
        self._dispatch_info = {"actor": list(range(dp_size))}
        self.extra_info_seen = None

    def update_actor(self, batch):
        self.extra_info_seen = dict(batch.extra_info)
        return {"metrics": {"mfu": 0.0, "pg_loss": 0.0}}


class StubTokenizer:
    eos_token_id = 0


def make_trainer(cls, dp_size=2, mini_prompts=2, dynamic=True):
    trainer = object.__new__(cls)  # verl's __init__ builds Ray workers; set what the methods read
    trainer.config = OmegaConf.create(
        {
            "actor_rollout_ref": {
                "rollout": {"n": G, "temperature": 1.0},
                "actor": {
                    "ppo_mini_batch_size": mini_prompts,
                    "use_dynamic_bsz": dynamic,
                    "calculate_entropy": False,
                    "entropy_coeff": 0.0,
                    "ppo_epochs": 1,
                    "data_loader_seed": 42,
                    "shuffle": False,
                },
            },
            "trainer": {"critic_warmup": 0},
        }
    )
    trainer.use_critic = False
    trainer.global_steps = 1
    trainer.actor_rollout_wg = StubWorkerGroup(dp_size)
    trainer.tokenizer = StubTokenizer()
    return trainer


def make_batch(lengths=LENGTHS, uids=UIDS):
    """Rows in the order sessions finish: session 0 of every prompt, then session 1, ... (groups interleaved);
    ``lengths`` are listed group by group."""
    rows = [(uid, s, lengths[g * G + s]) for s in range(G) for g, uid in enumerate(uids)]
    keys = [f"{uid}_{s}_0" for uid, s, _ in rows]
    tags = [{"seq_len": n, "status": "success"} for _, _, n in rows]
    return KVBatchMeta(partition_id="train", keys=keys, tags=tags)


def ranks_of_each_group(keys, dp_size):
    """{uid: set of ranks holding its rows}, for verl's contiguous equal split of the batch over ranks."""
    share = len(keys) // dp_size
    held = {}
    for i, key in enumerate(keys):
        held.setdefault(uid_of(key), set()).add(i // share)
    return held


def test_group_aware_balance_keeps_groups_whole_and_verls_own_does_not():
    """Catches: a per-row partition (verl's), groups not contiguous inside a rank, lost or repeated rows."""
    ours = make_trainer(PACSTrainerSync)
    batch = make_batch()
    original = list(batch.keys)
    ours._balance_batch(batch, metrics := {})
    keys = list(batch.keys)
    assert sorted(keys) == sorted(original)  # a permutation
    assert all(len(ranks) == 1 for ranks in ranks_of_each_group(keys, 2).values())
    for start in range(0, len(keys), G):  # each block of G rows is one group, so mini-batches are whole
        assert len({uid_of(k) for k in keys[start : start + G]}) == 1
    # both ranks get the same number of rows and a workload closer than the worst split
    assert any(k.startswith("global_seqlen") for k in metrics)

    verls = make_trainer(PPOTrainerSync)
    batch = make_batch()
    PPOTrainerSync._balance_batch(verls, batch, {})
    split = [uid for uid, ranks in ranks_of_each_group(list(batch.keys), 2).items() if len(ranks) > 1]
    assert split, "verl's own balance kept every group whole on this batch: the test lost its point"


def test_balance_refuses_incomplete_groups_and_indivisible_mini_batches():
    """Catches: a group with a failed session trained short, a rank share of a mini-batch cutting a group."""
    batch = make_batch()
    batch.keys[-1] = "ffff_9_0"  # the last group lost a completion to another uid
    with pytest.raises(RuntimeError, match="do not have rollout.n=4"):
        make_trainer(PACSTrainerSync)._balance_batch(batch, {})
    with pytest.raises(RuntimeError, match="ppo_mini_batch_size=3"):
        make_trainer(PACSTrainerSync, mini_prompts=3)._balance_batch(make_batch(), {})


def micro_batch_groups(force_group_size):
    """Group ids of the rows of each micro-batch verl's prepare_micro_batches makes with dynamic bsz."""
    width = max(LENGTHS)
    n = len(LENGTHS)
    attention = (torch.arange(width)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    data = TensorDict(
        {
            "input_ids": torch.ones(n, width, dtype=torch.long),
            "attention_mask": attention,
            "group": torch.arange(n) // G,
        },
        batch_size=[n],
    )
    tu.assign_non_tensor(
        data, use_dynamic_bsz=True, max_token_len_per_gpu=3000, force_group_size=force_group_size
    )
    micro_batches, _ = prepare_micro_batches(data)
    return [mb["group"].tolist() for mb in micro_batches]


def test_force_group_size_from_pacs_sync_keeps_groups_whole_in_micro_batches():
    """Catches: pacs_sync not sending force_group_size, so verl's dynamic micro-batching splits groups."""
    trainer = make_trainer(PACSTrainerSync)
    trainer._update_actor(KVBatchMeta(partition_id="train", keys=[], tags=[]), {})
    sent = trainer.actor_rollout_wg.extra_info_seen
    assert sent["force_group_size"] == G and sent["dataloader_kwargs"] == {"shuffle": False}

    for groups in micro_batch_groups(sent["force_group_size"]):
        assert len(groups) % G == 0
        for start in range(0, len(groups), G):  # contiguous whole groups, as the loss's check needs
            assert groups[start : start + G] == [groups[start]] * G
    split = [g for g in range(len(LENGTHS) // G) if sum(g in mb for mb in micro_batch_groups(1)) > 1]
    assert split, "verl split no group without force_group_size on this batch: the test lost its point"


def test_fixed_micro_batch_size_sends_no_force_group_size():
    """With a fixed micro-batch size, force_group_size would multiply it by n; pacs_sync must not send it."""
    trainer = make_trainer(PACSTrainerSync, dynamic=False)
    trainer._update_actor(KVBatchMeta(partition_id="train", keys=[], tags=[]), {})
    assert "force_group_size" not in trainer.actor_rollout_wg.extra_info_seen
