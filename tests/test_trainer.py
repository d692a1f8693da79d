"""PACSTrainer on a tiny offline model: training, whole groups, loss equivalence, fast path, references."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

import pacsrl.config as config_mod
import pacsrl.reference as reference_mod
import pacsrl.trainer as trainer_mod
from pacsrl import PACSConfig, PACSTrainer
from pacsrl.objective import pacs_loss
from pacsrl.trainer import _check_whole_groups, _shuffle_groups, labels_from_rewards
from tiny import build_model, build_tokenizer


def any_digit(completions, **kwargs):
    """1.0 when the completion holds a digit: a random tiny model gets mixed groups."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if any(ch.isdigit() for ch in t) else 0.0 for t in texts]


def every_third(completions, **kwargs):
    """1.0 for rows 0, 3, 6, ... of the batch: every group of 4 is mixed ([1,0,0,1], [0,0,1,0], [0,1,0,0], ...)."""
    return [float(i % 3 == 0) for i in range(len(completions))]


def make_dataset(n=16):
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"{i}+{i}="}], "answer": str(2 * i)} for i in range(n)]
    )


def make_trainer(tmp_path, seed=0, reward=any_digit, **overrides):
    tok = build_tokenizer()
    model = build_model(tok, seed=seed)
    kwargs = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 8,
        "max_steps": 3,
        "report_to": [],
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "learning_rate": 1e-2,
        "seed": seed,
        "disable_tqdm": True,
    }
    kwargs.update(overrides)
    args = PACSConfig(**kwargs)
    return PACSTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=make_dataset(), processing_class=tok
    )


# --------------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------------
def test_labels_from_rewards():
    # two functions, weights (1, 3): weighted means (1*1 + 3*1)/4 = 1, (1*1 + 3*0)/4 = 0.25, (0 + 3*1)/4 = 0.75
    r = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [float("nan"), 1.0], [float("nan"), float("nan")]])
    w = torch.tensor([1.0, 3.0])
    # NaN rows: only the scoring function counts
    assert labels_from_rewards(r, w, 1.0).tolist() == [1, 0, 0, 1, 0]
    assert labels_from_rewards(r, w, 0.7).tolist() == [1, 0, 1, 1, 0]
    with pytest.raises(ValueError, match=r"rewards in \[0, 1\]"):
        labels_from_rewards(torch.tensor([[2.0]]), torch.tensor([1.0]), 0.5)


def test_check_whole_groups_detects_split_groups():
    _check_whole_groups(torch.tensor([5, 5, 2, 2]), 2)
    with pytest.raises(RuntimeError, match="split"):
        _check_whole_groups(torch.tensor([5, 2, 5, 2]), 2)
    with pytest.raises(RuntimeError, match="split"):
        # the same group twice: half of it came from elsewhere
        _check_whole_groups(torch.tensor([5, 5, 5, 5]), 2)
    with pytest.raises(RuntimeError, match="whole groups"):
        _check_whole_groups(torch.tensor([1, 1, 1]), 2)


def test_shuffle_groups_keeps_groups_contiguous():
    torch.manual_seed(0)
    batch = {
        "pacs_labels": torch.arange(12),
        "names": [f"r{i}" for i in range(12)],
        "scalar": torch.tensor(3),
    }
    out = _shuffle_groups(batch, 4)
    rows = out["pacs_labels"].view(3, 4)
    assert (rows - rows[:, :1] == torch.arange(4)).all()  # each block is one original group, in order
    assert sorted(out["pacs_labels"].tolist()) == list(range(12))
    assert out["names"] == [f"r{i}" for i in out["pacs_labels"].tolist()]
    assert out["scalar"].item() == 3


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_three_steps_train_and_keep_groups_whole(tmp_path, monkeypatch):
    calls = []
    real_check = trainer_mod._check_whole_groups

    def spy(group_ids, G):
        calls.append(group_ids.clone())
        real_check(group_ids, G)

    monkeypatch.setattr(trainer_mod, "_check_whole_groups", spy)
    trainer = make_trainer(tmp_path, steps_per_generation=2, num_iterations=2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    after = list(trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "training did not change the parameters"
    assert len(calls) == 3  # one check per micro-batch, all passed
    # the rollout's 4 groups are cut into 2 micro-batches of 2 whole groups, each group in exactly one of them; the
    # second iteration (num_iterations=2) reuses the first buffered micro-batch
    first, second = (set(ids.view(-1, 4)[:, 0].tolist()) for ids in calls[:2])
    assert len(first) == len(second) == 2 and not first & second
    assert torch.equal(calls[2], calls[0])
    logs = [h for h in trainer.state.log_history if "pacs/loss" in h]
    assert len(logs) == 3
    for h in logs:
        for key in ("pacs/loss", "pacs/implicit_reward/mean", "pacs/psi/std", "pacs/class_weight/mean"):
            assert math.isfinite(h[key]), (key, h)
    assert logs[0]["pacs/on_policy"] == 1.0 and logs[1]["pacs/on_policy"] == 0.0
    assert "pacs/critic_accuracy" in logs[1] and 0.0 <= logs[1]["pacs/critic_accuracy"] <= 1.0


def _manual_logps(model, inputs, temperature):
    """Per-token log-probs of the completion, computed directly from the logits (independent of TRL's fused head)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1] / temperature
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    T = inputs["completion_ids"].shape[1]
    return logps[:, -T:]


@pytest.mark.slow
def test_loss_matches_pacs_loss_with_independent_logps(tmp_path):
    trainer = make_trainer(tmp_path, steps_per_generation=2, max_steps=1, pacs_beta=0.7)
    trainer.train()  # one step: the buffered second micro-batch is now off-policy
    inputs = trainer._buffered_inputs[1]
    assert trainer._is_on_policy() is False and "old_per_token_logps" in inputs
    model = trainer.model
    model.train()
    got = trainer._compute_loss(model, inputs) * trainer.current_gradient_accumulation_steps
    with torch.no_grad():
        logps = _manual_logps(model, inputs, trainer.temperature)
    expected = pacs_loss(
        logps, inputs["old_per_token_logps"], inputs["completion_mask"], inputs["pacs_labels"], 4, beta=0.7
    )
    assert got.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def _grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), [
        p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        for p in trainer.model.parameters()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("baseline", ["rloo", "grpo"])
def test_fast_path_gradients_equal_full_loss(tmp_path, baseline):
    # pacs_beta != 1: a fast path that ignored pacs_beta would give other gradients
    trainer = make_trainer(
        tmp_path, max_steps=1, learning_rate=0.0, pacs_baseline=baseline, reward=every_third, pacs_beta=0.5
    )
    trainer.train()  # lr 0: the policy is unchanged, so the buffered batch is on-policy again
    trainer.state.global_step = trainer._pacs_old_step
    inputs = trainer._buffered_inputs[0]
    assert trainer._is_on_policy()
    labels = inputs["pacs_labels"].view(-1, 4)
    trainer.model.train()
    trainer.args.pacs_on_policy_fast_path = True
    fast_loss, fast = _grads(trainer, inputs)
    trainer.args.pacs_on_policy_fast_path = False
    full_loss, full = _grads(trainer, inputs)
    assert fast_loss.item() == pytest.approx(full_loss.item(), rel=1e-5)
    scale = max(g.abs().max().item() for g in full)
    assert bool((labels.min(1).values != labels.max(1).values).any()), "the batch needs a mixed group"
    assert scale > 0
    for a, b in zip(fast, full):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * max(scale, 1e-12))


def first_group_mixed(completions, **kwargs):
    """Rows 0..3 (the first group of each call) get [1, 0, 0, 1]; every later group is all-correct."""
    return [float(i % 3 == 0) if i < 4 else 1.0 for i in range(len(completions))]


@pytest.mark.slow
@pytest.mark.parametrize("baseline", ["rloo", "mean"])
def test_fast_path_with_some_groups_skipped_equals_full_loss(tmp_path, baseline):
    trainer = make_trainer(
        tmp_path,
        max_steps=1,
        learning_rate=0.0,
        pacs_baseline=baseline,
        reward=first_group_mixed,
        pacs_beta=2.0,
    )
    trainer.train()
    trainer.state.global_step = trainer._pacs_old_step
    inputs = trainer._buffered_inputs[0]
    labels = inputs["pacs_labels"].view(-1, 4)
    mixed = labels.min(1).values != labels.max(1).values
    assert bool(mixed.any()) and not bool(mixed.all()), (
        "the micro-batch needs one mixed and one uniform group"
    )
    trainer.model.train()
    trainer.args.pacs_on_policy_fast_path = True
    trainer._metrics["train"].clear()
    fast_loss, fast = _grads(trainer, inputs)
    assert trainer._metrics["train"]["pacs/skipped_groups"] == [float((~mixed).sum())]
    trainer.args.pacs_on_policy_fast_path = False
    full_loss, full = _grads(trainer, inputs)
    assert fast_loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    scale = max(g.abs().max().item() for g in full)
    assert scale > 0
    for a, b in zip(fast, full):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.slow
def test_mean_logp_loss_and_gradients_match_an_independent_computation(tmp_path):
    """The reference-free form is never 'on-policy' (its psi is not 0 when pi_theta == pi_old): the trainer must use
    the full mean_logp loss there, not the fast path's, and pass reward_form on to the loss."""
    trainer = make_trainer(
        tmp_path,
        max_steps=1,
        learning_rate=0.0,
        reward=every_third,
        pacs_reward_form="mean_logp",
        pacs_beta=0.5,
    )
    trainer.train()  # lr 0: the buffered batch is what pi_theta generated, as on the first update of a rollout
    trainer.state.global_step = trainer._pacs_old_step
    inputs = trainer._buffered_inputs[0]
    trainer.model.train()
    loss, grads = _grads(trainer, inputs)
    trainer.model.zero_grad()
    logps = _manual_logps(trainer.model, inputs, trainer.temperature)
    expected = pacs_loss(
        logps, None, inputs["completion_mask"], inputs["pacs_labels"], 4, beta=0.5, reward_form="mean_logp"
    )
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    scale = max(p.grad.abs().max().item() for p in trainer.model.parameters())
    assert scale > 0
    # TRL's fused LM head and the plain logits differ in their gradient by up to 0.3% of its scale on this model
    for p, g in zip(trainer.model.parameters(), grads):
        assert torch.allclose(g, p.grad, rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.slow
def test_fast_path_skips_groups_with_equal_labels(tmp_path):
    def first_half_correct(prompts, completions, **kwargs):
        # prompts 0..7 always right, 8..15 always wrong: every group has equal labels
        return [1.0 if int(p[-1]["content"].split("+")[0]) < 8 else 0.0 for p in prompts]

    trainer = make_trainer(tmp_path, max_steps=1, reward=first_half_correct)
    trainer.train()
    log = next(h for h in trainer.state.log_history if "pacs/skipped_groups" in h)
    assert log["pacs/skipped_groups"] == 2.0  # both groups of the micro-batch
    assert log["grad_norm"] == 0.0


# --------------------------------------------------------------------------------------------------
# fixed reference: resets and resume
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fixed_reference_resets_on_schedule_and_resumes(tmp_path):
    trainer = make_trainer(
        tmp_path,
        max_steps=4,
        pacs_reference="fixed",
        pacs_ref_reset_steps=2,
        save_strategy="steps",
        save_steps=2,
        pacs_beta=0.5,
        reward=every_third,
    )
    events = []
    real_reset = trainer.fixed_reference.reset

    def spy():
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        had_state = len(opt.state) > 0
        real_reset()
        policy = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        ref = trainer.fixed_reference.module().state_dict()
        same = all(torch.equal(policy[k], ref[k]) for k in policy)
        events.append((trainer.state.global_step, had_state, len(opt.state), same))

    trainer.fixed_reference.reset = spy
    trainer.train()
    assert [e[0] for e in events] == [2, 4]
    assert all(e[1] and e[2] == 0 and e[3] for e in events)  # optimizer state cleared, reference == policy
    assert trainer.fixed_reference.version == 2

    # resume from the step-2 checkpoint: the reference is the one saved there, the counter continues
    resumed = make_trainer(
        tmp_path,
        max_steps=3,
        pacs_reference="fixed",
        pacs_ref_reset_steps=2,
        save_strategy="no",
        pacs_beta=0.5,
        reward=every_third,
    )
    resumed_events = []
    real = resumed.fixed_reference.reset
    resumed.fixed_reference.reset = lambda: (real(), resumed_events.append(resumed.state.global_step))
    ckpt = tmp_path / "out" / "checkpoint-2"
    saved_ref = torch.load(ckpt / "pacs_reference_model.pt", weights_only=True)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed_events == []  # the next reset is due at step 4, after this run's last step
    assert resumed.fixed_reference.version == 1 and resumed.fixed_reference.step == 2  # the counter came back
    ref_now = resumed.fixed_reference.module().state_dict()
    assert saved_ref and all(torch.equal(ref_now[k], v) for k, v in saved_ref.items())  # the saved reference
    fresh = build_model(build_tokenizer(), seed=0).state_dict()
    # ... which is not the initial model
    assert any(not torch.equal(fresh[k], v) for k, v in saved_ref.items())

    # a run resumed to step 4 resets on schedule there
    again = make_trainer(
        tmp_path,
        max_steps=4,
        pacs_reference="fixed",
        pacs_ref_reset_steps=2,
        save_strategy="no",
        pacs_beta=0.5,
        reward=every_third,
    )
    again_events = []
    real_again = again.fixed_reference.reset
    again.fixed_reference.reset = lambda: (real_again(), again_events.append(again.state.global_step))
    again.train(resume_from_checkpoint=str(ckpt))
    assert again_events == [4] and again.fixed_reference.version == 2


# --------------------------------------------------------------------------------------------------
# config validation
# --------------------------------------------------------------------------------------------------
BASE = {
    "output_dir": "/tmp/pacs-cfg-test",
    "report_to": [],
    "use_cpu": True,
    "per_device_train_batch_size": 8,
    "num_generations": 4,
}


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            {"per_device_train_batch_size": 12, "num_generations": 8},
            r"per_device_train_batch_size=12 is not a multiple",
        ),
        ({"num_generations": 1, "per_device_train_batch_size": 2}, r"at least 2"),
        ({"loss_type": "dapo"}, r"loss_type='dapo'"),
        ({"beta": 0.04}, r"beta=0.04 is a GRPO option.*KL"),
        ({"scale_rewards": "none"}, r"scale_rewards='none'.*pacs_baseline"),
        ({"importance_sampling_level": "sequence"}, r"importance_sampling_level='sequence'"),
        ({"top_entropy_quantile": 0.2}, r"top_entropy_quantile=0.2"),
        ({"mask_truncated_completions": True}, r"mask_truncated_completions=True"),
        ({"vllm_importance_sampling_correction": True}, r"vllm_importance_sampling_correction=True"),
        ({"entropy_coef": 0.01}, r"entropy_coef=0.01"),
        ({"epsilon_high": 0.28}, r"epsilon_high=0.28"),
        ({"off_policy_mask_threshold": 0.5}, r"off_policy_mask_threshold"),
        ({"sync_ref_model": True}, r"sync_ref_model=True"),
        ({"pacs_baseline": "ppo"}, r"pacs_baseline='ppo'"),
        ({"pacs_weight_mode": "x"}, r"pacs_weight_mode='x'"),
        ({"pacs_reward_form": "x"}, r"pacs_reward_form='x'"),
        ({"pacs_reference": "x"}, r"pacs_reference='x'"),
        ({"pacs_beta": 0.0}, r"pacs_beta=0.0"),
        ({"pacs_reference": "fixed", "pacs_ref_reset_steps": 0}, r"pacs_ref_reset_steps=0"),
        ({"pacs_label_threshold": 0.0}, r"pacs_label_threshold=0.0"),
        ({"reward_weights": [1.0, -1.0]}, r"weights must be >= 0"),
        ({"reward_weights": [0.0, 0.0]}, r"positive sum"),
        ({"pacs_label_threshold": 1.5}, r"pacs_label_threshold=1.5"),
        ({"pacs_reference": "fixed", "pacs_reward_form": "mean_logp"}, r"mean_logp.*uses no reference"),
        (
            {"pacs_reference": "fixed", "save_on_each_node": True},
            r"save_on_each_node=True with pacs_reference='fixed'",
        ),
        ({"epsilon": 0.3}, r"epsilon=0.3 is a GRPO option"),
        ({"delta": 1.5}, r"delta=1.5 is a GRPO option"),
        ({"use_adaptive_entropy": True}, r"use_adaptive_entropy=True"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, r"multi_objective_aggregation"),
        (
            {"eval_strategy": "steps", "per_device_eval_batch_size": 6},
            r"per_device_eval_batch_size=6 is not a multiple",
        ),
    ],
)
def test_config_rejections(overrides, match):
    with pytest.raises(ValueError, match=match):
        PACSConfig(**{**BASE, **overrides})


def test_config_accepts_defaults():
    cfg = PACSConfig(**BASE)
    assert (
        cfg.pacs_beta == 1.0 and cfg.pacs_baseline == "rloo" and cfg.loss_type == "pacs" and cfg.beta == 0.0
    )


def test_config_checks_grpo_options_after_trl_normalises_them():
    # GRPOConfig turns scale_rewards=True into "group" (PACS's value) and False into "none"
    assert PACSConfig(**BASE, scale_rewards=True).scale_rewards == "group"
    with pytest.raises(
        ValueError, match=r"scale_rewards=False \(which TRL reads as 'none'\).*set scale_rewards='group'"
    ):
        PACSConfig(**BASE, scale_rewards=False)


@pytest.mark.parametrize("name", sorted(config_mod._GRPO_ONLY))
def test_each_grpo_only_rejection_names_the_option_and_the_fix(name):
    expected = config_mod._GRPO_ONLY[name][0]
    wrong = {bool: lambda v: not v, float: lambda v: v + 0.5, str: lambda v: v + "x"}.get(
        type(expected), lambda v: 0.5
    )
    with pytest.raises(ValueError) as info:
        PACSConfig(**BASE, **{name: wrong(expected)})
    message = str(info.value)
    assert message.startswith(f"{name}=") and f"set {name}={expected!r}" in message, message
    assert "\n" not in message  # one line, no traceback-like dump


def test_trainer_rejects_grpo_config(tmp_path):
    from trl import GRPOConfig

    tok = build_tokenizer()
    with pytest.raises(TypeError, match="PACSConfig"):
        PACSTrainer(
            model=build_model(tok),
            reward_funcs=any_digit,
            processing_class=tok,
            args=GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True),
            train_dataset=make_dataset(),
        )


# --------------------------------------------------------------------------------------------------
# usual TRL features
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lora_training_updates_only_the_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    tok = build_tokenizer()
    model = build_model(tok)
    args = PACSConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        steps_per_generation=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    trainer = PACSTrainer(
        model=model,
        reward_funcs=every_third,
        args=args,
        train_dataset=make_dataset(),
        processing_class=tok,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    named = dict(trainer.model.named_parameters())
    lora_before = {k: v.detach().clone() for k, v in named.items() if "lora_B" in k}
    base_before = {k: v.detach().clone() for k, v in named.items() if "lora_" not in k}
    trainer.train()
    named = dict(trainer.model.named_parameters())
    assert any(not torch.equal(named[k], v) for k, v in lora_before.items())
    assert all(torch.equal(named[k], v) for k, v in base_before.items())
    logs = [h for h in trainer.state.log_history if "pacs/loss" in h]
    assert logs and all(math.isfinite(h["pacs/loss"]) for h in logs)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    params = []
    for checkpointing in (False, True):
        trainer = make_trainer(
            tmp_path / str(checkpointing),
            max_steps=1,
            reward=every_third,
            gradient_checkpointing=checkpointing,
        )
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["old", "fixed"])
def test_evaluation_logs_pacs_metrics(tmp_path, reference):
    tok = build_tokenizer()
    args = PACSConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-2,
        disable_tqdm=True,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=8,
        num_generations_eval=4,
        pacs_reference=reference,
    )
    trainer = PACSTrainer(
        model=build_model(tok),
        reward_funcs=every_third,
        args=args,
        train_dataset=make_dataset(),
        eval_dataset=make_dataset(8),
        processing_class=tok,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_pacs/loss" in h]
    assert len(evals) == 1 and math.isfinite(evals[0]["eval_pacs/loss"])
    assert "eval_pacs/groups/mixed" in evals[0]
    # the implicit critic is only scored in evaluation when pi_ref differs from the policy (fixed reference)
    assert ("eval_pacs/critic_accuracy" in evals[0]) == (reference == "fixed")


@pytest.mark.slow
def test_fixed_reference_with_lora_is_a_frozen_adapter_copy(tmp_path):
    peft = pytest.importorskip("peft")
    tok = build_tokenizer()
    common = {
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 6,
        "max_steps": 3,
        "report_to": [],
        "use_cpu": True,
        "learning_rate": 5e-2,
        "disable_tqdm": True,
        "pacs_reference": "fixed",
        "pacs_ref_reset_steps": 2,
        "logging_steps": 1,
    }
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    trainer = PACSTrainer(
        model=build_model(tok),
        reward_funcs=every_third,
        processing_class=tok,
        args=PACSConfig(output_dir=str(tmp_path / "a"), save_strategy="steps", save_steps=2, **common),
        train_dataset=make_dataset(),
        peft_config=peft.LoraConfig(**lora),
    )

    def adapters(model):
        named = dict(model.named_parameters())
        pairs = [(k, k.replace(".default.", ".pacs_ref.")) for k in named if ".default." in k]
        assert pairs and all(b in named for _, b in pairs)
        return [
            (named[a].detach().clone(), named[b].detach().clone(), named[b].requires_grad) for a, b in pairs
        ]

    start = adapters(trainer.model)
    assert all(torch.equal(a, b) and not frozen for a, b, frozen in start)  # a frozen copy of the adapter
    snapshots = {}
    real = trainer.fixed_reference.reset

    def spy():
        snapshots[trainer.state.global_step] = ("before", adapters(trainer.model))
        real()
        snapshots[trainer.state.global_step] = ("after", adapters(trainer.model))

    trainer.fixed_reference.reset = spy
    trainer.train()
    _, after_reset = snapshots[2]
    assert all(torch.equal(a, b) for a, b, _ in after_reset)  # reset: reference adapter == trained adapter
    end = adapters(trainer.model)
    assert any(not torch.equal(a, b) for a, b, _ in end)  # step 3 moved the policy away from the reference
    assert all(torch.equal(b_end, b_reset) for (_, b_end, _), (_, b_reset, _) in zip(end, after_reset))
    log = [h for h in trainer.state.log_history if "pacs/implicit_reward/std" in h]
    # step 2: one update away from the reference (the implicit reward moves); step 3: just reset, on-policy again
    assert [h["pacs/on_policy"] for h in log] == [1.0, 0.0, 1.0]
    assert log[1]["pacs/implicit_reward/std"] > 0

    # resume from checkpoint-2: the reference adapter saved there comes back
    resumed = PACSTrainer(
        model=build_model(tok),
        reward_funcs=every_third,
        processing_class=tok,
        args=PACSConfig(output_dir=str(tmp_path / "b"), save_strategy="no", **common),
        train_dataset=make_dataset(),
        peft_config=peft.LoraConfig(**lora),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.fixed_reference.version == 1
    assert all(
        torch.equal(b_res, b_saved)
        for (_, b_res, _), (_, b_saved, _) in zip(adapters(resumed.model), after_reset)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fixed_reference_is_the_policy_right_after_it_is_built(tmp_path, dtype):
    """The fixed reference is the same model as the policy, down to dtypes: with a bf16 model and TRL's fp32 LM
    head (cast_lm_head_to_fp32), and with an fp32 model, the trainer's pi_ref log-probs equal its pi_theta
    log-probs exactly (psi = 0 right after a reset)."""
    tok = build_tokenizer()
    model = build_model(tok).to(dtype)
    args = PACSConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        pacs_reference="fixed",
        cast_lm_head_to_fp32=dtype == torch.bfloat16,
        bf16=True,
    )
    trainer = PACSTrainer(
        model=model, reward_funcs=every_third, args=args, train_dataset=make_dataset(), processing_class=tok
    )
    policy = trainer.accelerator.unwrap_model(trainer.model)
    ref = trainer.fixed_reference.module()
    if dtype == torch.bfloat16:
        assert policy.lm_head.weight.dtype == torch.float32  # TRL's cast (tied: the embedding too)
    assert policy.model.layers[0].mlp.up_proj.weight.dtype == dtype
    p_sd, r_sd = policy.state_dict(), ref.state_dict()
    assert list(p_sd) == list(r_sd)
    for k, v in p_sd.items():
        assert r_sd[k].dtype == v.dtype and torch.equal(r_sd[k], v), k
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    inputs = {
        "prompt_ids": ids[:, :3],
        "prompt_mask": torch.ones(2, 3, dtype=torch.long),
        "completion_ids": ids[:, 3:],
        "completion_mask": torch.ones(2, 3, dtype=torch.long),
    }
    with torch.no_grad():
        logps, _ = trainer._forward(trainer.model, inputs)
        ref_logps = trainer._reference_logps(inputs, logps, on_policy=False)
    assert torch.equal(ref_logps, logps)


def test_deferred_reference_gets_the_policy_at_train_start_unless_resumed(tmp_path):
    """Under FSDP the reference's weights are copied when training starts (the policy may still be on the meta
    device in __init__); a reference restored from a checkpoint must not be overwritten then."""
    from transformers import TrainerCallback

    def start(trainer):
        ref = trainer.fixed_reference.module()
        with torch.no_grad():
            for p in ref.parameters():
                p.zero_()  # what the reference holds before it is given weights
            for b in ref.buffers():
                # non-persistent buffers (rotary frequencies) too: never in a checkpoint
                b.fill_(float("nan"))
        trainer.fixed_reference.pending = True
        seen = {}

        class AtFirstStep(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if "ref" not in seen:
                    seen["ref"] = {k: v.clone() for k, v in ref.state_dict().items()}
                    policy = trainer.accelerator.unwrap_model(trainer.model)
                    seen["buffers"] = all(torch.equal(a, b) for a, b in zip(ref.buffers(), policy.buffers()))
                    seen["policy"] = {
                        k: v.clone()
                        for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
                    }

        trainer.add_callback(AtFirstStep())
        return seen

    # reset every 3 steps: the step-2 checkpoint holds the initial reference while the policy has moved
    kwargs = {"pacs_reference": "fixed", "pacs_ref_reset_steps": 3, "reward": every_third, "pacs_beta": 0.5}
    trainer = make_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, **kwargs)
    seen = start(trainer)
    trainer.train()
    assert all(torch.equal(seen["ref"][k], v) for k, v in seen["policy"].items())  # filled from the policy
    assert seen["buffers"] and not trainer.fixed_reference.pending

    resumed = make_trainer(tmp_path, max_steps=3, save_strategy="no", **kwargs)
    seen = start(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    saved = torch.load(tmp_path / "out" / "checkpoint-2" / "pacs_reference_model.pt", weights_only=True)
    assert all(torch.equal(seen["ref"][k], v) for k, v in saved.items())  # the checkpoint's reference ...
    assert any(not torch.equal(seen["ref"][k], v) for k, v in seen["policy"].items())  # ... not the policy
    assert seen["buffers"]  # and the buffers outside the checkpoint come from the policy


def test_reference_dtype_ignores_a_dominant_fp32_embedding():
    """A small model whose tied embedding (cast to fp32 with the LM head) outweighs its bf16 body: the reference
    must still be built in bf16."""
    tok = build_tokenizer()
    model = build_model(tok, hidden=4, layers=1).to(torch.bfloat16)
    model.lm_head.float()  # tied: the embedding too, as TRL's cast_lm_head_to_fp32 does
    embedding = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - embedding
    # fp32 has the majority
    assert model.get_input_embeddings().weight.dtype == torch.float32 and embedding > body
    assert reference_mod._main_dtype(model) == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# drop-in for GRPOTrainer: constructor, environments, evaluation with one generation
# --------------------------------------------------------------------------------------------------
def test_constructor_signature_is_grpo_trainers():
    import inspect

    from trl import GRPOTrainer

    def params(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls.__init__).parameters.values()]

    assert params(PACSTrainer) == params(GRPOTrainer)


class ScoredEnv:
    """A TRL environment that owns the reward (``get_reward``): every rollout scores 1."""

    def reset(self, **kwargs):
        return None

    def get_reward(self):
        return 1.0


def tool_tokenizer():
    """The tiny tokenizer with a chat template that renders tool calls, as TRL requires with environments."""
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}:{{ m['content'] }}"
        "{% for c in m.get('tool_calls', []) or [] %}{{ c['function']['name'] }}"
        "({{ c['function']['arguments'] | tojson }}){% endfor %}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}"
    )
    return tok


@pytest.mark.slow
def test_environment_provides_the_reward_and_no_reward_source_is_trls_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    tok = tool_tokenizer()
    args = PACSConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    trainer = PACSTrainer(
        model=build_model(tok),
        args=args,
        train_dataset=make_dataset(),
        processing_class=tok,
        environment_factory=ScoredEnv,
    )
    assert trainer.reward_func_names == ["ScoredEnv"]
    trainer.train()
    log = next(h for h in trainer.state.log_history if "pacs/label_mean" in h)
    # labels from the environment
    assert log["rewards/ScoredEnv/mean"] == 1.0 and log["pacs/label_mean"] == 1.0
    with pytest.raises(ValueError, match="No reward source provided"):
        PACSTrainer(model=build_model(tok), args=args, train_dataset=make_dataset(), processing_class=tok)


@pytest.mark.slow
def test_evaluation_with_one_generation_logs_rewards_and_leaves_out_group_metrics(tmp_path):
    tok = build_tokenizer()
    args = PACSConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=4,
        num_generations_eval=1,
    )
    trainer = PACSTrainer(
        model=build_model(tok),
        reward_funcs=every_third,
        args=args,
        train_dataset=make_dataset(),
        eval_dataset=make_dataset(8),
        processing_class=tok,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_reward" in h]
    assert len(evals) == 1
    log = evals[0]
    # 8 prompts, one completion each, scored 1 at rows 0, 3 (every_third per batch of 4): 2 of 4 per batch
    assert log["eval_rewards/every_third/mean"] == pytest.approx(0.5) and log["eval_pacs/label_mean"] == 0.5
    assert math.isfinite(log["eval_entropy"]) and log["eval_loss"] == 0.0
    assert [k for k in log if k.startswith("eval_pacs/")] == ["eval_pacs/label_mean"]


# --------------------------------------------------------------------------------------------------
# dropout: pi_old and pi_ref are computed without it; PACS turns it off by default
# --------------------------------------------------------------------------------------------------
def lora_trainer(tmp_path, **overrides):
    peft = pytest.importorskip("peft")
    tok = build_tokenizer()
    kwargs = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 6,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "logging_steps": 1,
        "pacs_reference": "fixed",
        "pacs_ref_reset_steps": 1,
        "learning_rate": 0.0,
        "pacs_on_policy_fast_path": False,
    }
    kwargs.update(overrides)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.5, init_lora_weights=False
    )
    return PACSTrainer(
        model=build_model(tok),
        reward_funcs=every_third,
        args=PACSConfig(**kwargs),
        train_dataset=make_dataset(),
        processing_class=tok,
        peft_config=lora,
    )


@pytest.mark.slow
def test_lora_dropout_leaves_psi_exactly_zero_right_after_a_reset(tmp_path):
    """lr 0 and a reset after every step: every update sees pi_theta == pi_ref, so psi must be exactly 0 (with
    dropout in either forward it was 0.3)."""
    trainer = lora_trainer(tmp_path, max_steps=2)
    assert trainer.args.disable_dropout  # PACS's default
    trainer.train()
    logs = [h for h in trainer.state.log_history if "pacs/psi/std" in h]
    assert len(logs) == 2
    assert all(h["pacs/psi/std"] == 0.0 and h["pacs/implicit_reward/std"] == 0.0 for h in logs)


@pytest.mark.slow
def test_reference_and_old_log_probs_have_no_dropout_even_when_the_policy_has(tmp_path):
    trainer = lora_trainer(
        tmp_path, max_steps=1, disable_dropout=False, steps_per_generation=2, pacs_reference="old"
    )
    trainer.train()  # steps_per_generation=2: TRL recomputes pi_old for the buffered micro-batches
    inputs = trainer._buffered_inputs[1]
    model = trainer.model
    model.train()
    modes = [m.training for m in model.modules()]
    with torch.no_grad():
        first, _ = trainer._forward(model, inputs, compute_entropy=False)
        second, _ = trainer._forward(model, inputs, compute_entropy=False)
        model.eval()
        no_dropout, _ = trainer._forward(model, inputs, compute_entropy=False)
        model.train()
    assert [m.training for m in model.modules()] == modes  # modes restored
    mask = inputs["completion_mask"].bool()
    assert torch.equal(first[mask], second[mask]) and torch.equal(first[mask], no_dropout[mask])
    # TRL's pi_old too
    assert torch.allclose(inputs["old_per_token_logps"][mask], no_dropout[mask], atol=1e-5)
    # with gradient (the policy's forward): dropout as configured, on
    noisy, _ = trainer._forward(model, inputs)
    assert (noisy.detach() - no_dropout)[mask].abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# MoE: the router's load-balancing loss and the fast path
# --------------------------------------------------------------------------------------------------
def build_moe(tok, seed=0):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        output_router_logits=True,
        router_aux_loss_coef=0.5,
    )
    return Qwen2MoeForCausalLM(config)


@pytest.mark.slow
def test_moe_router_loss_gets_the_same_gradients_with_the_fast_path_on(tmp_path):
    """The router loss depends on every forwarded token: skipping groups would change its gradient (by 1e-2 against
    a scale of 0.56 here), so the fast path must not skip any."""
    tok = build_tokenizer()
    args = PACSConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=0.0,
        disable_tqdm=True,
        pacs_beta=0.5,
    )
    trainer = PACSTrainer(
        model=build_moe(tok),
        reward_funcs=first_group_mixed,
        args=args,
        train_dataset=make_dataset(),
        processing_class=tok,
    )
    assert trainer.aux_loss_enabled
    trainer.train()
    trainer.state.global_step = trainer._pacs_old_step
    inputs = trainer._buffered_inputs[0]
    labels = inputs["pacs_labels"].view(-1, 4)
    mixed = labels.min(1).values != labels.max(1).values
    assert bool(mixed.any()) and not bool(mixed.all()), (
        "the micro-batch needs one mixed and one uniform group"
    )
    trainer.model.train()
    trainer.args.pacs_on_policy_fast_path = True
    trainer._metrics["train"].clear()
    fast_loss, fast = _grads(trainer, inputs)
    assert trainer._metrics["train"]["aux_loss"] and trainer._metrics["train"]["pacs/skipped_groups"] == [0.0]
    trainer.args.pacs_on_policy_fast_path = False
    full_loss, full = _grads(trainer, inputs)
    assert fast_loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    scale = max(g.abs().max().item() for g in full)
    assert scale > 0
    for a, b in zip(fast, full):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7 * scale)
