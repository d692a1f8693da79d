"""``PPOTrainer``: PPO with a critic for verifiable rewards, on TRL's ``GRPOTrainer`` (TRL 1.16 ships no PPO)."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import ClassVar

import torch
from transformers import TrainerCallback, get_scheduler
from trl import GRPOTrainer

from pacsrl.ppo.config import PPOConfig
from pacsrl.ppo.critic import CRITIC_DIR, build_critic, critic_values, load_critic, save_critic
from pacsrl.ppo.objective import gae, policy_loss_terms, token_rewards, value_loss_terms, whiten

logger = logging.getLogger(__name__)

_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "num_images", "image_sizes")
_WORKS = (
    "PPOTrainer runs on one process or with DDP (several GPUs or CPU processes: accelerate launch "
    "--multi_gpu, recipes/accelerate/multi_gpu.yaml), with gradient checkpointing and LoRA on the policy"
)


class _CriticStepCallback(TrainerCallback):
    """Steps the critic's optimizer right after the policy's, so both see the same mini-batches."""

    def __init__(self, trainer: PPOTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._step_critic()


class PPOTrainer(GRPOTrainer):
    """PPO with a separate critic (Schulman et al. 2017; verl's and OpenRLHF's conventions for LLMs) on TRL's
    ``GRPOTrainer``: same constructor, datasets, reward functions, generation (transformers or vLLM), logging,
    checkpoints and launchers as ``PACSTrainer`` and TRL's GRPO, so the three compare on one pipeline.

    Why ``GRPOTrainer``: everything PPO needs besides its loss and critic (sampling from the policy, vLLM and its
    weight sync, rewards, the rollout buffer cut into mini-batches and reused ``num_iterations`` times, pi_old
    log-probs when the update is off-policy, the KL reference model) is already there; TRL 1.16 has no PPO trainer.

    The critic is a value model with its own AdamW optimizer and schedule (``pacsrl.ppo.critic``), DDP-wrapped by
    accelerate like the policy. Its loss is added to the policy's, so one backward fills both gradients; its
    optimizer steps right after the policy's (a callback), with its own gradient clipping at ``max_grad_norm``.

    Overrides, and why:

    - ``__init__``: checks ``args``, refuses DeepSpeed and FSDP (see below), builds the critic.
    - ``_calculate_rewards``: keeps every function's rewards and rejects NaN / inf / None with the function's name
      (PPO needs a finite score for every completion; any finite value is fine).
    - ``_generate_and_score_completions``: after TRL's rollout, the critic's values, token rewards (score on the
      last token, optional KL), GAE, whitening over all processes; replaces TRL's (N,) advantages by (N, T) ones
      (and, in the completions table, each completion's GRPO advantage by its mean PPO advantage).
    - ``_compute_loss``: PPO's clipped surrogate plus the clipped value loss, token-mean over the mini-batch
      (TRL's "dapo" normalisation); the policy's term is left out during ``critic_warmup_steps``.
    - ``create_scheduler``: also creates the critic's optimizer and scheduler (before a resume loads them).
    - ``_save_checkpoint`` / ``_load_optimizer_and_scheduler`` / ``save_model``: the critic's weights
      (``critic/``), optimizer and scheduler go with each checkpoint and are restored on resume.

    Not supported (refused at start-up): DeepSpeed (its engine runs the backward and step of the policy only) and
    FSDP (the critic would need its own sharded optimizer and checkpoints); fp16 (loss scaling of one optimizer);
    vision-language models (the critic reads token ids only).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "ppo"]
    _name = "PPO"

    def __init__(self, model, reward_funcs, args: PPOConfig | None = None, *pargs, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = PPOConfig(f"{str(model_name).split('/')[-1]}-PPO")
        if not isinstance(args, PPOConfig):
            raise TypeError(
                f"PPOTrainer needs a pacsrl.PPOConfig, got {type(args).__name__}; PPOConfig accepts "
                "every GRPOConfig field plus the critic and PPO fields"
            )
        _refuse_sharding(args)
        source = args.critic_model_name_or_path or (
            model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
        )
        if not source:
            raise ValueError(
                "PPOTrainer builds its critic from a checkpoint: pass the policy as a hub id or folder, "
                "or set critic_model_name_or_path"
            )
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError(
                f"PPOTrainer does not support {'DeepSpeed' if self.is_deepspeed_enabled else 'FSDP'}"
                f" yet. {_WORKS}."
            )
        policy = self.accelerator.unwrap_model(self.model)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        critic = build_critic(
            source,
            dtype=_main_dtype(policy),
            vocab_size=len(tokenizer),
            gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        )
        self.critic = self.accelerator.prepare_model(
            critic
        )  # DDP under several processes, else moved to device
        self.critic_optimizer: torch.optim.Optimizer | None = None
        self.critic_lr_scheduler = None
        self._ppo_rewards_per_func: torch.Tensor | None = None
        self.add_callback(_CriticStepCallback(self))

    def _critic_module(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.critic)

    # ------------------------------------------------------------------------------------------------
    # optimizer, checkpoints
    # ------------------------------------------------------------------------------------------------
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.critic_optimizer is None:
            args, critic = self.args, self._critic_module()
            decay = set(self.get_decay_parameter_names(critic))
            named = [(n, p) for n, p in critic.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            self.critic_optimizer = torch.optim.AdamW(
                groups,
                lr=args.critic_learning_rate,
                eps=args.adam_epsilon,
                betas=(args.adam_beta1, args.adam_beta2),
            )
            self.critic_lr_scheduler = get_scheduler(
                args.lr_scheduler_type,
                self.critic_optimizer,
                num_warmup_steps=args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=args.lr_scheduler_kwargs,
            )
        return scheduler

    def _step_critic(self) -> None:
        params = [p for p in self.critic.parameters() if p.requires_grad]
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
            self._metrics["train"]["critic/grad_norm"].append(float(norm))
        self.critic_optimizer.step()
        self.critic_lr_scheduler.step()
        self.critic_optimizer.zero_grad(set_to_none=True)
        self._metrics["train"]["critic/lr"].append(self.critic_lr_scheduler.get_last_lr()[0])

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        save_critic(
            self._critic_module(),
            self.critic_optimizer,
            self.critic_lr_scheduler,
            folder,
            self.accelerator.is_main_process,
        )

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            load_critic(self._critic_module(), self.critic_optimizer, self.critic_lr_scheduler, checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.accelerator.is_main_process:  # the final model: the critic next to it
            self._critic_module().save_pretrained(
                os.path.join(output_dir or self.args.output_dir, CRITIC_DIR)
            )

    # ------------------------------------------------------------------------------------------------
    # rollout: rewards, values, advantages
    # ------------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )  # (N_all, K)
        for i, name in enumerate(self.reward_func_names):
            bad = ~torch.isfinite(rewards_per_func[:, i])
            if bad.any():
                values = rewards_per_func[:, i][bad][:3].tolist()
                raise ValueError(
                    f"reward function {name!r} returned {int(bad.sum())} non-finite rewards ({values}; None is NaN "
                    "here): PPO needs a finite reward for every completion (any finite float is fine)"
                )
        self._ppo_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if any(k in output for k in _MULTIMODAL_KEYS):
            raise NotImplementedError("PPOTrainer trains text-only models: the critic reads token ids only")
        args, acc = self.args, self.accelerator
        mode = "train" if self.model.training else "eval"
        mask = output["completion_mask"] * output.get("tool_mask", 1)  # (N, T)
        n_local, T = mask.shape
        weights = self.reward_weights.to(mask.device)
        scores = (self._ppo_rewards_per_func * weights).sum(dim=1)  # (N_all,)
        scores = scores[acc.process_index * n_local : (acc.process_index + 1) * n_local]  # (N,)
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        critic = self._critic_module()
        with torch.no_grad():
            with acc.autocast():
                values = critic_values(critic, input_ids, attention_mask, T, args.per_device_train_batch_size)
            values = values * mask  # (N, T)
            kl = None
            if args.kl_coef > 0:
                old = output.get("old_per_token_logps")
                if old is None:  # on-policy configuration: TRL skipped pi_old, which equals the policy now
                    old, _, _ = self._get_per_token_logps_and_entropies(
                        self.model, input_ids, attention_mask, T, batch_size=args.per_device_train_batch_size
                    )
                kl = old - output["ref_per_token_logps"]  # (N, T)
        rewards = token_rewards(scores.float(), mask, kl, args.kl_coef)  # (N, T)
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)  # (N, T) each
        m = mask.float()
        # moments over every process's valid tokens: advantages, values, returns, residuals
        resid = returns - values
        sums = acc.reduce(
            torch.stack(
                [
                    m.sum(),
                    (advantages * m).sum(),
                    (advantages**2 * m).sum(),
                    (values * m).sum(),
                    (returns * m).sum(),
                    (returns**2 * m).sum(),
                    (resid * m).sum(),
                    (resid**2 * m).sum(),
                ]
            ),
            reduction="sum",
        )
        n, a1, a2, v1, r1, r2, e1, e2 = sums.tolist()
        n = max(n, 1.0)
        var = lambda s1, s2: max(s2 - s1 * s1 / n, 0.0) / max(n - 1.0, 1.0)
        if args.whiten_advantages:
            advantages = whiten(advantages, m, a1 / n, var(a1, a2))  # (N, T)
        output["advantages"] = advantages
        # the completions table (log_completions) shows each completion's mean PPO advantage, not TRL's GRPO one
        per_completion = acc.gather((advantages * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0))  # (N_all,)
        logged = self._logs["advantages"]
        for _ in range(min(len(per_completion), len(logged))):
            logged.pop()
        logged.extend(per_completion.tolist())
        output["ppo_values"] = values
        output["ppo_returns"] = returns
        metrics = self._metrics[mode]
        metrics["critic/values_mean"].append(v1 / n)
        metrics["critic/returns_mean"].append(r1 / n)
        return_var = var(r1, r2)
        metrics["critic/explained_variance"].append(1.0 - var(e1, e2) / return_var if return_var > 0 else 0.0)
        metrics["ppo/advantages_mean_raw"].append(a1 / n)
        if kl is not None:  # the mean per-token KL estimate log pi_old - log pi_ref in the reward
            k = acc.reduce(torch.stack([(kl * m).sum(), m.sum()]), reduction="sum").tolist()
            metrics["ppo/kl"].append(k[0] / max(k[1], 1.0))
        return output

    # ------------------------------------------------------------------------------------------------
    # the loss
    # ------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        args, acc = self.args, self.accelerator
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)  # (N, T)
        m = mask.float()
        T = mask.shape[1]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        # token-mean over the mini-batch, every process's tokens counted (TRL's "dapo" normalisation)
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / acc.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / args.steps_per_generation
        train_policy = mode == "eval" or self.state.global_step >= args.critic_warmup_steps
        loss = torch.zeros((), device=mask.device)
        stats = [m.sum()]
        if train_policy:
            logps, entropies, aux = self._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                T,
                compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled,
            )
            old = inputs.get("old_per_token_logps")
            old = logps.detach() if old is None else old  # on-policy: TRL skipped recomputing pi_old
            per_token, clipped, approx_kl = policy_loss_terms(
                logps, old, inputs["advantages"], args.cliprange, args.clip_high
            )
            loss = (per_token * m).sum() / normalizer
            if self.aux_loss_enabled:  # MoE load balancing, as in GRPOTrainer
                steps = self.current_gradient_accumulation_steps if mode == "train" else 1.0
                loss = loss + self.router_aux_loss_coef * aux / steps
            stats += [
                (per_token.detach() * m).sum(),
                (clipped * m).sum(),
                (approx_kl * m).sum(),
                (entropies.detach() * m).sum(),
            ]
        # DDP syncs the critic's gradients on the last micro-batch of an optimizer step only, as the policy's
        sync = mode == "eval" or acc.sync_gradients or not hasattr(self.critic, "no_sync")
        with contextlib.nullcontext() if sync else self.critic.no_sync():
            values = critic_values(self.critic, input_ids, attention_mask, T)  # (N, T) with grad
        per_token_v, v_clipped = value_loss_terms(
            values, inputs["ppo_values"], inputs["ppo_returns"], args.cliprange_value
        )
        value_loss = (per_token_v * m).sum() / normalizer
        loss = loss + args.vf_coef * value_loss
        stats += [(per_token_v.detach() * m).sum(), (v_clipped * m).sum()]
        totals = acc.reduce(torch.stack(stats).float(), reduction="sum").tolist()
        count = max(totals[0], 1.0)
        metrics = self._metrics[mode]
        if train_policy:
            for key, total in zip(
                ("ppo/policy_loss", "ppo/clipfrac", "ppo/approx_kl", "entropy"), totals[1:5]
            ):
                metrics[key].append(total / count)
        metrics["critic/value_loss"].append(totals[-2] / count)
        metrics["critic/vf_clipfrac"].append(totals[-1] / count)
        return loss


def _refuse_sharding(args: PPOConfig) -> None:
    """Refuse DeepSpeed and FSDP before any model is loaded (from the config or accelerate's launcher)."""
    env = os.environ.get
    if (
        args.deepspeed
        or getattr(args, "deepspeed_plugin", None) is not None
        or env("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    ):
        raise NotImplementedError(f"PPOTrainer does not support DeepSpeed yet. {_WORKS}.")
    if args.fsdp or env("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise NotImplementedError(f"PPOTrainer does not support FSDP yet. {_WORKS}.")


def _main_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of most of the policy's parameters (the critic is built in it)."""
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get)
