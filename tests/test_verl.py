"""PACS as a verl plugin, checked against verl 0.9.1's real code on CPU (no Ray cluster, no GPU, no vLLM).

Each check compares with an independent computation: a plain-Python PACS loss, whole-batch autograd,
group membership counted by hand.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

verl = pytest.importorskip("verl", reason="the verl test install: see the README's test command")

from omegaconf import OmegaConf
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig

from pacsrl.verl import PACSPolicyLossConfig, config_problems, encode_labels, pacs_label_advantage
from pacsrl.verl.loss import decode_labels, pacs_policy_loss

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "verl" / "paper-qwen2.5-7b-deepscaler-pacs.yaml"
G = 4


# --------------------------------------------------------------------------------------------------
# an independent PACS: plain Python over lists (PAPER.md Eqs. 1-4, rloo baseline, question weights)
# --------------------------------------------------------------------------------------------------
def reference_pacs(logps, old, mask, labels, group_size, beta=1.0):
    n = len(labels)
    r = [beta * sum((a - b) * m for a, b, m in zip(logps[i], old[i], mask[i])) for i in range(n)]
    total = 0.0
    for start in range(0, n, group_size):
        idx = range(start, start + group_size)
        n_pos = sum(labels[i] for i in idx)
        for i in idx:
            psi = r[i] - sum(r[j] for j in idx if j != i) / (group_size - 1)
            mixed = 0 < n_pos < group_size
            w = group_size / (2 * (n_pos if labels[i] == 1 else group_size - n_pos)) if mixed else 1.0
            y = labels[i]
            bce = -(y * math.log(1 / (1 + math.exp(-psi))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-psi))))
            total += w * bce
    return total / n


def make_batch(num_groups=4, group_size=G, width=5, seed=0):
    """(N, T) log-probs, pi_old log-probs, 0/1 mask (ragged lengths), labels with mixed and uniform groups."""
    gen = torch.Generator().manual_seed(seed)
    n = num_groups * group_size
    logps = -torch.rand(n, width, generator=gen, dtype=torch.float64) * 2
    old = logps + 0.3 * torch.randn(n, width, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).to(torch.float64)
    labels = torch.tensor(([1, 0, 0, 1] * num_groups + [1] * group_size)[:n], dtype=torch.float64)
    labels[-group_size:] = 1.0  # the last group all correct
    return logps, old, mask, labels


def actor_config(global_rows, dp_size=1, **pacs):
    cfg = ActorConfig(
        strategy="fsdp",
        rollout_n=G,
        ppo_micro_batch_size_per_gpu=G,
        policy_loss=PACSPolicyLossConfig(**pacs),
    )
    cfg.global_batch_info.update(dp_size=dp_size, global_batch_size=global_rows, batch_num_tokens=None)
    return cfg


def adv_for(labels, mask):
    tags = torch.arange(labels.shape[0]) // G + 1
    return encode_labels(labels, tags, mask)


def call_loss(logps, old, mask, labels, cfg):
    return pacs_policy_loss(old, logps, adv_for(labels, mask), mask.bool(), config=cfg)


# --------------------------------------------------------------------------------------------------
# verl's own ppo_loss path
# --------------------------------------------------------------------------------------------------
def test_verl_ppo_loss_path_equals_pacs_loss_and_a_plain_loop():
    """Catches: wrong label decoding, loss_mode not dispatched to pacs, a mis-scaled or unmasked loss."""
    from verl.trainer.ppo import core_algos
    from verl.workers.utils.losses import ppo_loss

    import pacsrl.verl.plugin  # noqa: F401 - registers, as the entry point does

    assert core_algos.get_policy_loss_fn("pacs") is pacs_policy_loss
    logps, old, mask, labels = make_batch()
    n, width = logps.shape
    prompt_len = 3
    # verl's padded layout: prompts (no padding) then responses; model output is the flat (total_nnz,)
    # per-token log-prob, left-shifted by one token (position p predicts token p+1)
    lengths = mask.sum(1).long()
    flat = []
    for i in range(n):
        seq = torch.zeros(prompt_len + int(lengths[i]), dtype=torch.float64)
        seq[prompt_len - 1 : prompt_len - 1 + int(lengths[i])] = logps[i, : int(lengths[i])]
        flat.append(seq)
    flat = torch.cat(flat).requires_grad_(True)
    attention = torch.cat([torch.ones(n, prompt_len), mask.float()], dim=1).long()
    data = TensorDict(
        {
            "prompts": torch.ones(n, prompt_len, dtype=torch.long),
            "responses": torch.ones(n, width, dtype=torch.long),
            "attention_mask": attention,
            "response_mask": mask.long(),
            "old_log_probs": old,
            "advantages": adv_for(labels, mask).to(torch.float64),
        },
        batch_size=[n],
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=n)
    cfg = ActorConfig(
        strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=G, policy_loss=PACSPolicyLossConfig()
    )
    loss, metrics = ppo_loss(cfg, {"log_probs": flat}, data)

    expected = reference_pacs(logps.tolist(), old.tolist(), mask.tolist(), labels.long().tolist(), G)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    from pacsrl.objective import pacs_loss

    direct = pacs_loss(logps, old, mask, labels, G)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-12)
    assert "pacs/critic_accuracy" in metrics


def test_label_decoding_rejects_other_estimators():
    """Catches: GRPO-style advantages silently read as labels."""
    mask = torch.ones(4, 3)
    with pytest.raises(ValueError, match="adv_estimator=pacs_label"):
        decode_labels(torch.full((4, 3), 0.37), mask)


# --------------------------------------------------------------------------------------------------
# split invariance: micro-batches and ranks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dp_size", [1, 2])
def test_same_gradient_for_any_micro_batch_and_rank_split(dp_size):
    """Catches: normalising per micro-batch (mean of means) or forgetting the dp_size factor.

    A mini-batch of 4 groups; each rank gets 2 groups when dp_size=2; micro-batches of 1 and 3 / 1 and 1
    groups. verl sums micro-batch gradients on a rank and averages ranks; the result must equal the
    autograd gradient of the plain-loop PACS loss of the whole mini-batch."""
    logps, old, mask, labels = make_batch(num_groups=4)
    n = logps.shape[0]
    whole = logps.clone().requires_grad_(True)
    ref = pacs_whole = None
    # independent: autograd through PACS written with torch ops on the whole batch (rloo, question weights)
    r = ((whole - old) * mask).sum(1).view(-1, G)
    psi = r - (r.sum(1, keepdim=True) - r) / (G - 1)
    y = labels.view(-1, G)
    n_pos = y.sum(1, keepdim=True)
    mixed = (n_pos > 0) & (n_pos < G)
    w = torch.where(mixed, G / (2 * torch.where(y > 0, n_pos, G - n_pos)), torch.ones_like(y))
    ref = (w * torch.nn.functional.binary_cross_entropy_with_logits(psi, y, reduction="none")).sum() / n
    ref.backward()
    pacs_whole = whole.grad.clone()

    rank_rows = torch.arange(n).view(dp_size, -1)  # contiguous shares of whole groups
    splits = {1: [[0, G], [G, 4 * G]], 2: [[0, G], [G, 2 * G]]}[dp_size]
    grad = torch.zeros_like(logps)
    for rows in rank_rows:
        rank_grad = torch.zeros_like(logps)
        for lo, hi in splits:
            idx = rows[lo:hi]
            x = logps[idx].clone().requires_grad_(True)
            loss, _ = call_loss(x, old[idx], mask[idx], labels[idx], actor_config(n, dp_size))
            loss.backward()
            rank_grad[idx] += x.grad
        grad += rank_grad / dp_size  # DDP/FSDP average over ranks
    torch.testing.assert_close(grad, pacs_whole, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# the group check
# --------------------------------------------------------------------------------------------------
def test_group_check_fires_on_shuffled_rows_and_on_a_split_group():
    """Catches: a loss that trains on rows whose group was reordered or cut."""
    logps, old, mask, labels = make_batch(num_groups=2)
    adv = adv_for(labels, mask)
    cfg = actor_config(2 * G)
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # interleave the two groups
    with pytest.raises(RuntimeError, match="not whole groups"):
        pacs_policy_loss(old[perm], logps[perm], adv[perm], mask[perm].bool(), config=cfg)
    with pytest.raises(RuntimeError, match="not a multiple of G"):
        pacs_policy_loss(old[:6], logps[:6], adv[:6], mask[:6].bool(), config=cfg)
    pacs_policy_loss(old, logps, adv, mask.bool(), config=cfg)  # the intact batch passes


# --------------------------------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------------------------------
def test_pacs_label_estimator_writes_label_and_group_tag():
    """Catches: labels taken from the wrong token, tags shared by groups, non-0/1 scores accepted."""
    rewards = torch.zeros(6, 4)
    rewards[0, 1] = 1.0  # verl puts the score on the last response token
    rewards[4, 3] = 1.0
    mask = torch.tensor([[1, 1, 0, 0]] * 3 + [[1, 1, 1, 1]] * 3)
    uid = ["a", "a", "a", "b", "b", "b"]
    adv, returns = pacs_label_advantage(rewards, mask, index=uid)
    # row 0: label 1, group "a" -> tag 1 -> 1 + 2*1 = 3 on its 2 tokens; row 4: label 1, tag 2 -> 5
    assert adv[0].tolist() == [3.0, 3.0, 0.0, 0.0]
    assert adv[1].tolist() == [2.0, 2.0, 0.0, 0.0]
    assert adv[4].tolist() == [5.0, 5.0, 5.0, 5.0]
    assert adv[5].tolist() == [4.0, 4.0, 4.0, 4.0]
    labels, tags = decode_labels(adv, mask)
    assert labels.tolist() == [1, 0, 0, 0, 1, 0] and tags.tolist() == [1, 1, 1, 2, 2, 2]
    torch.testing.assert_close(returns, adv)
    with pytest.raises(ValueError, match="verifier outcomes"):
        pacs_label_advantage(rewards * 0.5, mask, index=uid)
    with pytest.raises(ValueError, match="unequal size"):
        pacs_label_advantage(rewards, mask, index=["a", "a", "b", "b", "b", "b"])


# --------------------------------------------------------------------------------------------------
# Hydra composition of the recipe and the start-up refusals
# --------------------------------------------------------------------------------------------------
def compose_recipe(overrides=()):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPE.parent), version_base=None):
        return compose(config_name=RECIPE.stem, overrides=list(overrides))


def test_recipe_composes_with_verls_config_and_builds_pacs_configs():
    """Catches: a recipe key verl does not know or its main_ppo refuses, a policy_loss section that does not build
    the PACS config."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    cfg = compose_recipe()
    assert config_problems(cfg) == []
    assert not need_critic(cfg) and not need_reference_policy(cfg)
    validate_config(cfg, use_reference_policy=False, use_critic=False)  # what verl's main_ppo runs first
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, PACSPolicyLossConfig)
    assert (actor.policy_loss.loss_mode, actor.policy_loss.pacs_beta, actor.rollout_n) == ("pacs", 1.0, 8)
    assert cfg.trainer.v1.trainer_mode == "pacs_sync" and cfg.algorithm.adv_estimator == "pacs_label"
    assert cfg.actor_rollout_ref.actor.optim.lr == 1e-6 and cfg.data.train_batch_size == 1024


@pytest.fixture(scope="module")
def recipe_config():
    return compose_recipe()


def with_setting(config, key, value):
    config = copy.deepcopy(config)
    OmegaConf.update(config, key, value, force_add=True)
    return config


REFUSED = [
    ("actor_rollout_ref.actor.shuffle", True),
    ("actor_rollout_ref.actor.use_kl_loss", True),
    ("algorithm.use_kl_in_reward", True),
    ("actor_rollout_ref.actor.entropy_coeff", 0.001),
    ("algorithm.filter_groups.enable", True),
    ("algorithm.rollout_correction.rollout_is", "token"),
    ("algorithm.rollout_correction.bypass_mode", True),
    ("actor_rollout_ref.actor.megatron.dynamic_context_parallel", True),
    ("trainer.use_v1", False),
    ("trainer.v1.sampler.sync_refill_failed_groups", False),
    ("actor_rollout_ref.actor.ppo_mini_batch_size", 384),
    ("actor_rollout_ref.rollout.n", 1),
    ("algorithm.adv_estimator", "grpo"),
    ("actor_rollout_ref.actor.policy_loss.loss_mode", "vanilla"),
    ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu", 16384),
]


@pytest.mark.parametrize("key,value", REFUSED, ids=[k for k, _ in REFUSED])
def test_each_refused_setting_is_refused_naming_its_key(recipe_config, key, value):
    """Catches: a setting that splits groups or changes the objective passing start-up unnoticed."""
    problems = config_problems(with_setting(recipe_config, key, value))
    assert len(problems) == 1 and problems[0].startswith(f"{key}="), problems


def test_fixed_micro_batch_must_hold_whole_groups(recipe_config):
    fixed = with_setting(recipe_config, "actor_rollout_ref.actor.use_dynamic_bsz", False)
    problems = config_problems(
        with_setting(fixed, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", 12)
    )
    assert len(problems) == 1 and "ppo_micro_batch_size_per_gpu=12" in problems[0]
    assert (
        config_problems(with_setting(fixed, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", 16)) == []
    )


def test_check_config_lists_every_problem_in_one_error(recipe_config):
    from pacsrl.verl import check_config

    bad = with_setting(
        with_setting(recipe_config, "actor_rollout_ref.actor.shuffle", True),
        "algorithm.use_kl_in_reward",
        True,
    )
    with pytest.raises(
        ValueError, match=r"(?s)actor_rollout_ref.actor.shuffle=True.*algorithm.use_kl_in_reward=True"
    ):
        check_config(bad)


def test_policy_loss_config_refuses_fixed_reference_and_unknown_modes():
    with pytest.raises(ValueError, match="pacs_reference='fixed'"):
        PACSPolicyLossConfig(pacs_reference="fixed")
    with pytest.raises(ValueError, match="pacs_baseline='loo'"):
        PACSPolicyLossConfig(pacs_baseline="loo")


# --------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------
def test_a_failed_registration_is_a_warning(monkeypatch, caplog):
    """Catches: a plugin failure swallowed at DEBUG (verl's own handling) instead of a WARNING."""
    from verl.trainer.ppo import core_algos

    from pacsrl.verl import plugin

    def broken(name):
        raise RuntimeError("registry is gone")

    monkeypatch.setattr(core_algos, "register_policy_loss", broken)
    with caplog.at_level("WARNING", logger="pacsrl.verl.plugin"):
        plugin.register()
    assert any("registry is gone" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


@pytest.mark.slow
def test_entry_point_registers_all_three_in_a_fresh_process():
    """Catches: a missing or wrong entry point, a plugin that fails to import inside `import verl`."""
    code = (
        "import verl\n"
        "from verl.trainer.ppo import core_algos\n"
        "from verl.trainer.ppo.v1 import get_trainer_cls\n"
        "import pacsrl.verl.loss as L, pacsrl.verl.trainer as T\n"
        "assert core_algos.get_policy_loss_fn('pacs') is L.pacs_policy_loss\n"
        "assert core_algos.get_adv_estimator_fn('pacs_label') is L.pacs_label_advantage\n"
        "assert get_trainer_cls('pacs_sync') is T.PACSTrainerSync\n"
        "print('registered')\n"
    )
    from importlib.metadata import entry_points

    names = [ep.value for ep in entry_points(group="verl.plugins")]
    assert "pacsrl.verl.plugin" in names, f"reinstall pacsrl (pip install -e .): verl.plugins has {names}"
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0 and "registered" in out.stdout, out.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# data for verl
# --------------------------------------------------------------------------------------------------
def test_records_map_onto_verls_rl_dataset_columns():
    """Catches: a column verl's RLHFDataset / reward loop reads (prompt, data_source, reward_model.ground_truth)
    missing or renamed."""
    import datasets

    from pacsrl.data.records import make_prompt
    from pacsrl.verl.data import to_verl_rows

    records = datasets.Dataset.from_list(
        [
            {
                "prompt": make_prompt("What is 1+1?"),
                "answer": "2",
                "source": "math500",
                "id": "m/0",
                "problem": "x",
            }
        ]
    )
    row = to_verl_rows(records)[0]
    assert row["prompt"] == [{"role": "user", "content": make_prompt("What is 1+1?")[0]["content"]}]
    assert (row["data_source"], row["reward_model"]["ground_truth"], row["extra_info"]["id"]) == (
        "math500",
        "2",
        "m/0",
    )
