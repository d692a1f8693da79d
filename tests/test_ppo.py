"""PPO: the math against plain loops and hand-worked values, config checks, and PPOTrainer on a tiny offline model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

import pacsrl
from pacsrl import PPOConfig, PPOTrainer
from pacsrl.ppo.critic import critic_values
from pacsrl.ppo.objective import gae, policy_loss_terms, token_rewards, value_loss_terms, whiten
from test_sharded import _free_port
from tiny import build_tokenizer, save_tiny


# --------------------------------------------------------------------------------------------------
# the math
# --------------------------------------------------------------------------------------------------
def gae_loop(rewards, values, mask, gamma, lam):
    """Textbook GAE on the valid tokens of each row, written as plain Python lists (the independent reference)."""
    N, T = len(mask), len(mask[0])
    adv = [[0.0] * T for _ in range(N)]
    for i in range(N):
        steps = [t for t in range(T) if mask[i][t]]
        r = [rewards[i][t] for t in steps]
        v = [values[i][t] for t in steps] + [0.0]  # V after the last step = 0
        a = 0.0
        for k in reversed(range(len(steps))):
            a = r[k] + gamma * v[k + 1] - v[k] + gamma * lam * a
            adv[i][steps[k]] = a
    ret = [[(adv[i][t] + values[i][t]) if mask[i][t] else 0.0 for t in range(T)] for i in range(N)]
    return adv, ret


MASKS = {
    "right_padding": [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]],
    "holes": [
        [1, 0, 0, 1, 1, 0],
        [1, 1, 0, 1, 0, 1],
        [0, 1, 1, 1, 1, 1],
    ],  # e.g. tool output inside a completion
    "empty_and_single": [[0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]],
}


@pytest.mark.parametrize("pattern", list(MASKS))
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.9, 0.95), (1.0, 0.0), (0.5, 1.0), (0.0, 0.7)])
def test_gae_matches_a_plain_loop(pattern, gamma, lam):
    torch.manual_seed(0)
    mask = torch.tensor(MASKS[pattern], dtype=torch.float64)
    rewards = torch.randn(3, 6, dtype=torch.float64) * mask
    values = torch.randn(3, 6, dtype=torch.float64) * mask
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards.tolist(), values.tolist(), MASKS[pattern], gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64), rtol=0, atol=1e-12)


def test_gae_with_gamma_lam_one_is_score_minus_value():
    # one score 1.0 on the last token, gamma = lam = 1: A_t = 1 - V_t on every valid token, R_t = 1
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.5, 0.9, 0.0]])
    rewards = token_rewards(torch.tensor([1.0]), mask)
    adv, ret = gae(rewards, values, mask)
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.5, 0.1, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_token_rewards_put_the_score_on_the_last_valid_token_and_subtract_the_kl():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    scores = torch.tensor([2.5, -1.0, 7.0])
    kl = torch.tensor([[0.1, 0.2, 9.0], [0.3, 9.0, -0.4], [9.0, 9.0, 9.0]])
    assert token_rewards(scores, mask).tolist() == [[0.0, 2.5, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]]
    # kl_coef 0.5: -0.5 * kl on valid tokens only; the empty row has no token to hold its score
    expected = torch.tensor([[-0.05, 2.5 - 0.1, 0.0], [-0.15, 0.0, -1.0 + 0.2], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(token_rewards(scores, mask, kl, kl_coef=0.5), expected)


def test_whiten_uses_the_valid_tokens_moments():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, var = valid.mean(), valid.var(unbiased=True)  # 2.5, 5/3
    out = whiten(x, mask, mean, var)
    expected = (torch.tensor([[1.0, 2.0, 2.5], [3.0, 4.0, 2.5]]) - 2.5) / math.sqrt(5 / 3 + 1e-8)
    torch.testing.assert_close(out, expected)


def test_policy_loss_against_hand_computed_values():
    # rows: (log ratio, advantage) -> ratio rho; loss = max(-A rho, -A clip(rho, 0.8, 1.2))
    log_ratio = torch.tensor([[0.5, math.log(0.5), math.log(0.5), math.log(1.1), math.log(1.25)]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -2.0, 1.0]])
    old = torch.zeros_like(log_ratio)
    loss, clipped, approx_kl = policy_loss_terms(old + log_ratio, old, adv, clip_low=0.2, clip_high=0.2)
    # rho=1.6487, A=1:  max(-1.6487, -1.2) = -1.2 (clipped: no gain beyond 1 + eps)
    # rho=0.5, A=-1:    max(0.5, 0.8) = 0.8 (clipped)
    # rho=0.5, A=1:     max(-0.5, -0.8) = -0.5 (not clipped: the pessimistic term is the ratio's)
    # rho=1.1, A=-2:    inside the range: 2.2
    # rho=1.25, A=1:    max(-1.25, -1.2) = -1.2 (clipped)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, -0.5, 2.2, -1.2]]))
    assert clipped.tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0]]
    rho = log_ratio.exp()
    torch.testing.assert_close(approx_kl, rho - 1 - log_ratio)  # (rho - 1) - log rho
    # asymmetric clipping: clip_high 0.28 lets rho = 1.25 through with A > 0
    loss_hi, clipped_hi, _ = policy_loss_terms(old + log_ratio, old, adv, clip_low=0.2, clip_high=0.28)
    assert loss_hi[0, 4].item() == pytest.approx(-1.25)
    assert clipped_hi[0, 4].item() == 0.0
    # the gradient of a clipped token is 0, of an unclipped one -A rho (d/dlogp of -A exp(logp - old))
    logps = (old + log_ratio).requires_grad_(True)
    policy_loss_terms(logps, old, adv, clip_low=0.2, clip_high=0.2)[0].sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.0, -0.5, 2.2, 0.0]]))


def test_value_loss_against_hand_computed_values():
    old = torch.tensor([[0.0, 0.0, 1.0]])
    new = torch.tensor([[1.0, 1.0, 0.8]])
    ret = torch.tensor([[0.2, 2.0, 0.0]])
    loss, clipped = value_loss_terms(new, old, ret, clip=0.5)
    # v=1, old=0, R=0.2: plain (0.8)^2 = 0.64; moved 0.5 -> (0.3)^2 = 0.09; 0.5 * max = 0.32, not clipped
    # v=1, old=0, R=2:   plain 1; moved 0.5 -> (1.5)^2 = 2.25; 0.5 * 2.25 = 1.125, clipped
    # v=0.8, old=1, R=0: inside the range, 0.5 * 0.64 = 0.32
    torch.testing.assert_close(loss, torch.tensor([[0.32, 1.125, 0.32]]))
    assert clipped.tolist() == [[0.0, 1.0, 0.0]]
    plain, none_clipped = value_loss_terms(new, old, ret, clip=None)
    torch.testing.assert_close(plain, 0.5 * (new - ret) ** 2)
    assert none_clipped.sum() == 0


def test_critic_values_are_read_at_the_state_before_each_completion_token():
    # a stand-in critic whose "value" at position j is j: with P = 4 prompt and T = 3 completion tokens, the value of
    # completion token t is the output at position P + t - 1 (the state in which the policy chose it): 3, 4, 5
    class PositionCritic(torch.nn.Module):
        def forward(self, input_ids, attention_mask, use_cache=False):
            positions = torch.arange(input_ids.shape[1], dtype=torch.float32)
            return SimpleNamespace(logits=positions.expand(input_ids.shape[0], -1)[..., None])

    ids = torch.zeros(5, 7, dtype=torch.long)
    values = critic_values(PositionCritic(), ids, torch.ones_like(ids), num_completion_tokens=3, batch_size=2)
    assert values.tolist() == [[3.0, 4.0, 5.0]] * 5


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"epsilon": 0.3}, "cliprange"),
        ({"beta": 0.1}, "kl_coef=0.1"),
        ({"loss_type": "dapo"}, "loss_type"),
        ({"gamma": 1.5}, "gamma"),
        ({"cliprange": 1.0}, "cliprange"),
        ({"cliprange_value": 0.0}, "cliprange_value"),
        ({"kl_coef": -0.1}, "kl_coef"),
        ({"critic_warmup_steps": -1}, "critic_warmup_steps"),
    ],
)
def test_config_rejects(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **overrides)


def test_config_kl_coef_loads_the_reference():
    args = PPOConfig(output_dir="x", use_cpu=True, report_to=[], kl_coef=0.05, cliprange_high=0.28)
    assert args.beta == 0.05 and args.clip_high == 0.28  # TRL builds the reference model when beta != 0


# --------------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------------
def any_digit(completions, **kwargs):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if any(ch.isdigit() for ch in t) else 0.0 for t in texts]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "model"))


SMALL_RUN = {
    "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 6, "max_steps": 2,
    "steps_per_generation": 2, "report_to": [], "use_cpu": True, "logging_steps": 1, "save_strategy": "no",
    "learning_rate": 1e-2, "critic_learning_rate": 1e-2, "disable_tqdm": True, "bf16": False, "seed": 0,
}  # fmt: skip


def make_trainer(path, out, reward=any_digit, n_prompts=16, peft_config=None, **overrides):
    kwargs = {**SMALL_RUN, "output_dir": str(out), **overrides}
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(n_prompts)])
    return PPOTrainer(model=path, reward_funcs=reward, args=PPOConfig(**kwargs), train_dataset=ds,
                      processing_class=build_tokenizer(), peft_config=peft_config)  # fmt: skip


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_short_run_trains_policy_and_critic_and_logs_ppo_metrics(tiny_path, tmp_path):
    trainer = make_trainer(tiny_path, tmp_path, max_steps=3)
    policy, critic = _params(trainer.model), _params(trainer.critic)
    trainer.train()
    assert _changed(policy, trainer.model) and _changed(critic, trainer.critic)
    logs = [h for h in trainer.state.log_history if "critic/value_loss" in h]
    keys = ["ppo/policy_loss", "ppo/clipfrac", "ppo/approx_kl", "critic/value_loss", "critic/vf_clipfrac",
            "critic/explained_variance", "critic/values_mean", "critic/returns_mean", "critic/grad_norm"]  # fmt: skip
    for key in keys:
        assert any(key in h for h in logs), key
    assert all(math.isfinite(v) for h in logs for v in h.values() if isinstance(v, float))
    # the second optimizer step of a rollout is off-policy: the ratio has moved
    assert logs[1]["ppo/approx_kl"] > 0


@pytest.mark.slow
def test_lora_policy_with_gradient_checkpointing_trains_adapter_and_full_critic(tiny_path, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(
        tiny_path, tmp_path, peft_config=lora, gradient_checkpointing=True, learning_rate=5e-2
    )
    assert trainer.critic.is_gradient_checkpointing
    named = dict(trainer.model.named_parameters())
    adapter = {n: p.detach().clone() for n, p in named.items() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
    critic = _params(trainer.critic)
    trainer.train()
    named = dict(trainer.model.named_parameters())
    assert any(not torch.equal(adapter[n], named[n]) for n in adapter)  # the adapter trained
    assert all(torch.equal(base[n], named[n]) for n in base)  # the base model did not
    assert _changed(critic, trainer.critic)  # the critic is a full model with its own optimizer


def test_kl_coef_loads_the_reference_and_puts_the_kl_in_the_reward(tiny_path, tmp_path):
    # one optimizer step per rollout: the first rollout's policy is the reference (KL exactly 0), the second's has moved
    trainer = make_trainer(tiny_path, tmp_path, kl_coef=0.5, steps_per_generation=1, learning_rate=5e-2)
    assert trainer.ref_model is not None  # TRL's reference model, loaded because beta = kl_coef > 0
    trainer.train()
    kls = [h["ppo/kl"] for h in trainer.state.log_history if "ppo/kl" in h]
    assert len(kls) == 2 and kls[0] == 0.0 and kls[1] != 0.0 and math.isfinite(kls[1])


@pytest.mark.parametrize("bad", [float("inf"), None])
def test_non_finite_reward_names_the_function(tiny_path, tmp_path, bad):
    def flaky_verifier(completions, **kwargs):
        return [bad] + [1.0] * (len(completions) - 1)

    trainer = make_trainer(tiny_path, tmp_path, reward=flaky_verifier, max_steps=1)
    with pytest.raises(ValueError, match="reward function 'flaky_verifier' returned 1 non-finite"):
        trainer.train()


def test_any_finite_reward_is_accepted(tiny_path, tmp_path):
    def graded(completions, **kwargs):  # outside [0, 1], negative too: fine for PPO
        return [5.0 * (i % 3) - 4.0 for i in range(len(completions))]

    trainer = make_trainer(tiny_path, tmp_path, reward=graded, max_steps=1)
    trainer.train()
    assert trainer.state.log_history[0]["reward"] == pytest.approx((-4 + 1 + 6 + -4 + 1 + 6 + -4 + 1) / 8)


def test_deepspeed_and_fsdp_are_refused_before_loading(tiny_path, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(NotImplementedError, match="DeepSpeed.*DDP"):
        make_trainer(tiny_path, tmp_path)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(NotImplementedError, match="FSDP.*DDP"):
        make_trainer(tiny_path, tmp_path)


@pytest.mark.slow
def test_resume_restores_the_critic_and_its_optimizer(tiny_path, tmp_path):
    # a run of 3 steps saving at step 2, and a second run resumed from that checkpoint: the third step (a new rollout,
    # from the restored RNG state) must give the same critic and critic optimizer as the uninterrupted run
    first = make_trainer(tiny_path, tmp_path, max_steps=3, save_strategy="steps", save_steps=2)
    first.train()
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "critic" / "config.json").exists()
    second = make_trainer(tiny_path, tmp_path / "again", max_steps=3, save_strategy="steps", save_steps=2)
    fresh = _params(second.critic)
    second.train(resume_from_checkpoint=str(ckpt))
    assert _changed(fresh, second.critic)
    for a, b in zip(first.critic.parameters(), second.critic.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    s1, s2 = first.critic_optimizer.state_dict(), second.critic_optimizer.state_dict()
    assert s1["state"].keys() == s2["state"].keys() and len(s1["state"]) > 0
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(s1["state"][k][name], s2["state"][k][name], rtol=0, atol=1e-6)
    assert second.critic_lr_scheduler.state_dict()["last_epoch"] == 3


@pytest.mark.slow
def test_one_token_bandit_critic_learns_the_expected_reward_and_policy_moves_to_the_rewarded_tokens(
    tiny_path, tmp_path
):
    # one completion token, reward 1 when it is a digit (10 of 49 tokens: P(digit) = 0.20 at the start). The exact
    # expected reward of the policy for a prompt is P(digit | prompt) from its logits (temperature 1). The critic's
    # value of the state before the token must learn it while the policy is frozen (critic warm-up), then the policy
    # must move to the digits.
    tok = build_tokenizer()
    digits = [tok.convert_tokens_to_ids(c) for c in "0123456789"]

    def digit(completion_ids, **kwargs):
        return [1.0 if ids and ids[0] in digits else 0.0 for ids in completion_ids]

    trainer = make_trainer(tiny_path, tmp_path, reward=digit, n_prompts=8, per_device_train_batch_size=32,
                           num_generations=8, max_completion_length=1, max_steps=14, steps_per_generation=1,
                           learning_rate=0.03, critic_learning_rate=0.01, critic_warmup_steps=8,
                           lr_scheduler_type="constant", gradient_checkpointing=False)  # fmt: skip
    texts = [[{"role": "user", "content": f"{i}"}] for i in range(8)]
    enc = tok(tok.apply_chat_template(texts, tokenize=False, add_generation_prompt=True), return_tensors="pt",
              padding=True, padding_side="left")  # fmt: skip
    ids = torch.cat(
        [enc.input_ids, torch.full((8, 1), tok.pad_token_id)], dim=1
    )  # any token: V reads before it
    mask = torch.cat([enc.attention_mask, torch.ones(8, 1, dtype=torch.long)], dim=1)

    def probe():
        with torch.no_grad():
            p_digit = trainer.model(**enc).logits[:, -1].softmax(-1)[:, digits].sum(-1)  # (8,)
            value = trainer.critic(input_ids=ids, attention_mask=mask).logits[
                :, -2, 0
            ]  # (8,) at the last prompt token
        return p_digit, value

    seen = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (8, 14):
                seen[state.global_step] = probe()

    trainer.add_callback(Probe())
    start, _ = probe()
    trainer.train()
    p_warm, v_warm = seen[8]
    torch.testing.assert_close(p_warm, start)  # the policy is frozen while the critic warms up
    assert (v_warm - p_warm).abs().max() < 0.1, (v_warm, p_warm)  # V = E[reward] = P(digit), per prompt
    p_end, v_end = seen[14]
    assert p_end.min() > 0.8 > start.max() + 0.5  # the policy moved to the rewarded tokens
    assert (v_end - p_end).abs().max() < 0.2  # and the critic followed


@pytest.mark.slow
def test_two_processes_ddp_keep_policy_and_critic_in_sync(tiny_path, tmp_path):
    # the two processes score their rows differently; only synchronised gradients (the policy's DDP and the critic's,
    # including the no-sync micro-batch of gradient accumulation) keep the two replicas identical
    script = Path(__file__).with_name("dist_ppo_script.py")
    src = Path(pacsrl.__file__).parent.parent  # this checkout's pacsrl, whichever is installed
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{script.parent}:{src}",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
           str(script), str(tmp_path), tiny_path]  # fmt: skip
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for data in ranks:
        assert data["world"] == 2 and data["ddp"] == "DistributedDataParallel"
        assert data["changed"] == [True, True]  # policy and critic trained
        assert all(math.isfinite(v) for h in data["logs"] for v in h.values() if isinstance(v, float))
    assert ranks[0]["policy"] == ranks[1]["policy"]
    assert ranks[0]["critic"] == ranks[1]["critic"]
    # metrics are reduced across processes: both ranks log the same values
    for key in ("critic/value_loss", "critic/explained_variance", "ppo/policy_loss", "ppo/clipfrac"):
        assert [h.get(key) for h in ranks[0]["logs"]] == [h.get(key) for h in ranks[1]["logs"]]
