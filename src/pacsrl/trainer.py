"""``PACSTrainer``: TRL's ``GRPOTrainer`` trained with the PACS objective of ``pacsrl.objective``."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.initialization import no_init_weights
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import (
    add_fused_lm_head,
    split_pixel_values_by_grid,
    split_tensor_dict,
    unsplit_pixel_values_by_grid,
    use_adapter,
)

from pacsrl.config import PACSConfig
from pacsrl.objective import (
    class_weights,
    group_centre,
    group_outcomes,
    implicit_reward,
    on_policy_advantage,
    pacs_loss,
    pacs_on_policy_loss,
)
from pacsrl.sharded import copy_buffers, copy_module, copy_tensors, full_state_dict, load_full_state_dict

logger = logging.getLogger(__name__)

# keys of a GRPO batch that hold per-sample images; the fast path does not subset rows when present
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "num_images", "num_tiles", "image_position_ids")
_REF_STATE_FILE = "pacs_reference_state.json"
_REF_WEIGHTS_FILE = "pacs_reference_model.pt"
_REF_ADAPTER = "pacs_ref"


def labels_from_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """0/1 labels from the rewards of K reward functions, shape (N,).

    ``label = 1`` iff ``sum_k w_k r_k / sum_k w_k >= threshold`` over the functions that scored the completion
    (TRL lets a function return None, i.e. NaN here, for a completion it does not apply to). A completion that
    no function scored gets label 0. Rewards must lie in [0, 1].

    Args:
        rewards_per_func: (N, K) rewards, NaN where a function returned None.
        weights: (K,) non-negative weights.
    """
    finite = rewards_per_func[~torch.isnan(rewards_per_func)]
    if finite.numel() and (finite.min() < 0 or finite.max() > 1):
        bad = finite[(finite < 0) | (finite > 1)][:5].tolist()
        raise ValueError(
            f"PACS needs rewards in [0, 1] to turn them into correct/wrong labels, got {bad}. Rescale the reward "
            "function, or make it a verifier that returns 1.0 for correct and 0.0 for wrong."
        )
    scored = ~torch.isnan(rewards_per_func)  # (N, K)
    w = weights.to(rewards_per_func.device, rewards_per_func.dtype).expand_as(rewards_per_func) * scored  # (N, K)
    total = torch.nan_to_num(rewards_per_func, nan=0.0).mul(w).sum(dim=1)  # (N,)
    norm = w.sum(dim=1)  # (N,)
    mean = torch.where(norm > 0, total / norm.clamp(min=1e-12), torch.zeros_like(total))  # (N,)
    return (mean >= threshold - 1e-6).to(rewards_per_func.dtype)


class _ReferenceResetCallback(TrainerCallback):
    """Resets the fixed PACS reference (and the optimizer state) every ``pacs_ref_reset_steps`` optimizer steps."""

    def __init__(self, trainer: PACSTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._init_pending_reference()  # after accelerate has prepared (sharded) the policy

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.pacs_ref_reset_steps == 0:
            self.trainer._reset_reference()


class PACSTrainer(GRPOTrainer):
    """PACS (arXiv 2509.02522) on TRL's ``GRPOTrainer``: same constructor, datasets, reward functions and launchers.

    The verifier's reward becomes a 0/1 label; the loss is the weighted BCE of ``pacsrl.objective.pacs_loss`` on the
    group-centred implicit reward ``beta * sum_t log(pi_theta / pi_ref)``. Generation (transformers or vLLM),
    reward computation, accelerate / DeepSpeed / FSDP, PEFT, logging and checkpoints are TRL's.

    Overrides, and why:

    - ``__init__``: checks that ``args`` is a ``PACSConfig``; builds the frozen reference for
      ``pacs_reference="fixed"`` (a copy of the model with the policy's dtypes, prepared for DeepSpeed / FSDP2
      like TRL's own reference model, or with PEFT a frozen copy of the adapter, named ``pacs_ref``) and
      registers the callback that resets it. Copies, saves and loads of the reference go through
      ``pacsrl.sharded``, which handles ZeRO-3 and FSDP2 shards one tensor at a time.
    - ``_calculate_rewards``: keeps the rewards of every reward function (gathered across processes), from which
      the 0/1 labels are made; TRL itself only keeps its GRPO advantages.
    - ``_generate_and_score_completions``: adds ``pacs_labels`` and ``pacs_group_ids`` to the batch, checks that
      every group of G rows on this process holds one prompt, and logs the group outcome metrics.
    - ``_prepare_inputs``: GRPO shuffles single rows of the generation batch before cutting it into
      micro-batches; PACS shuffles whole groups instead, so a group is never split across micro-batches
      (the loss of a completion depends on every member of its group). Otherwise the same buffering.
    - ``_compute_loss``: the PACS loss, with the on-policy fast path (see below) and the ``pacs/*`` metrics.
    - ``_save_checkpoint`` / ``_load_optimizer_and_scheduler``: save and restore the fixed reference and its
      reset counter, so a resumed run continues the same schedule.

    Whole groups across processes come from TRL's own sampler: it yields the G copies of a prompt contiguously and
    each process receives ``per_device_train_batch_size * steps_per_generation`` consecutive rows, a multiple of
    G (``PACSConfig`` enforces ``per_device_train_batch_size % num_generations == 0``). Both properties are
    asserted at run time on every batch.

    On-policy fast path: while ``pi_theta == pi_ref`` (the first optimizer step after a rollout with
    ``pacs_reference="old"``, or after a reset with ``"fixed"``), every psi is 0 and the gradient is exactly
    ``-(beta/N) sum_k A_k grad S_k`` (``pacsrl.objective.on_policy_advantage``). Groups whose advantage is 0
    (all labels equal) then carry no gradient and are left out of the forward/backward (``pacs/skipped_groups``).
    A process whose groups are all skipped still runs a zero-weighted forward/backward on one group, so that
    gradient synchronisation (DDP, ZeRO, FSDP) sees the same collective calls on every process.
    """

    _tag_names = ["trl", "pacs"]
    _name = "PACS"

    def __init__(self, model, reward_funcs, args: PACSConfig | None = None, *pargs, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = PACSConfig(f"{str(model_name).split('/')[-1]}-PACS")
        if not isinstance(args, PACSConfig):
            raise TypeError(
                f"PACSTrainer needs a pacsrl.PACSConfig, got {type(args).__name__}; PACSConfig accepts every "
                "GRPOConfig field plus the pacs_* fields"
            )
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        self._pacs_rewards_per_func: torch.Tensor | None = None  # (N_all, K) of the last rollout
        self._pacs_generation = 0  # rollouts so far, part of the group ids
        self._pacs_old_step = -1  # optimizer step at which the buffered rollout was generated (pi_old)
        self._pacs_aux_loss: torch.Tensor | None = None
        self._pacs_ref_step = 0  # optimizer step at which pi_ref was last set equal to pi_theta
        self._pacs_ref_version = 0  # number of resets of the fixed reference
        self.pacs_ref_model = None  # the frozen copy (full fine-tuning); with PEFT, an adapter named "pacs_ref"
        self._pacs_ref_adapter: str | None = None
        self._pacs_ref_pending = False  # the reference still has to be given the policy's weights
        if args.pacs_reference == "fixed":
            self._build_fixed_reference()
            self.add_callback(_ReferenceResetCallback(self))

    # ------------------------------------------------------------------------------------------------
    # fixed reference
    # ------------------------------------------------------------------------------------------------
    def _build_fixed_reference(self) -> None:
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise NotImplementedError(
                "pacs_reference='fixed' with FSDP needs FSDP2 (fsdp_config version 2, transformers' default; FSDP1 "
                "is deprecated); or use pacs_reference='old'"
            )
        policy = self._policy_module()
        if is_peft_model(policy):
            # the reference is the base model plus a frozen copy of the trained adapter
            active = policy.active_adapter
            policy.add_adapter(_REF_ADAPTER, policy.peft_config[active])
            policy.set_adapter(active)  # keep training the user's adapter
            self._pacs_ref_adapter = _REF_ADAPTER
            for name, param in policy.named_parameters():
                if f".{_REF_ADAPTER}." in name:
                    param.requires_grad_(False)
            self._init_reference()  # deferred under FSDP too: the adapters may not hold their weights yet
            return
        # a second model of the same architecture (partitioned at construction under ZeRO-3, as TRL's own
        # reference), with the policy's dtypes, sharded like TRL's reference model, then given the policy's weights.
        # Under FSDP2 it is built on the meta device and materialised shard by shard.
        fsdp_meta = (self.is_fsdp_enabled and not _fsdp_offloads(self.accelerator)
                     and not getattr(self.accelerator.state.fsdp_plugin, "ignored_modules", None))
        with no_init_weights(), torch.device("meta") if fsdp_meta else contextlib.nullcontext():
            ref = AutoModelForCausalLM.from_config(copy.deepcopy(policy.config), dtype=_main_dtype(policy))
        ref.tie_weights()  # skipped along with the initialisation
        if self.args.cast_lm_head_to_fp32:
            _cast_lm_head_to_fp32(ref)  # as GRPOTrainer casts the policy and its own reference
        ref.requires_grad_(False).eval()
        add_fused_lm_head(ref, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            self.pacs_ref_model = prepare_deepspeed(ref, self.accelerator)
        elif self.is_fsdp_enabled:
            self.pacs_ref_model = prepare_fsdp(ref, self.accelerator)
            if fsdp_meta:
                self.pacs_ref_model.to_empty(device=self.accelerator.device)  # shards, filled at train start
        else:
            self.pacs_ref_model = self.accelerator.prepare_model(ref, evaluation_mode=True)
        self._init_reference()

    def _init_reference(self) -> None:
        """pi_ref <- pi_theta now, or under FSDP when training (or evaluation) starts: accelerate prepares the policy
        then, and with fsdp_cpu_ram_efficient_loading only the first process's weights count before: accelerate
        broadcasts them as it shards the policy, and the others may hold uninitialised or meta tensors until then."""
        if self.is_fsdp_enabled:  # the same decision on every process: the copy is a collective
            self._pacs_ref_pending = True
        else:
            self._copy_policy_to_reference()

    def _init_pending_reference(self) -> None:
        """Give the reference the policy's weights if that was deferred and no checkpoint provided them."""
        if self._pacs_ref_pending:
            self._copy_policy_to_reference()
            self._pacs_ref_pending = False

    def _copy_policy_to_reference(self) -> None:
        if self._pacs_ref_adapter is not None:
            self._copy_adapter(self._policy_module().active_adapter, self._pacs_ref_adapter)
        else:
            copy_module(self._policy_module(), self._ref_module())

    def _policy_module(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _ref_module(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.pacs_ref_model)

    def _copy_adapter(self, source: str, target: str) -> None:
        tensors = self._policy_module().state_dict(keep_vars=True)  # (FSDP2: the registered, sharded parameters)
        copy_tensors((t, tensors[n.replace(f".{source}.", f".{target}.")]) for n, t in tensors.items()
                     if f".{source}." in n)

    def _reference_state(self) -> dict[str, torch.Tensor]:
        """Whole CPU tensors of the reference on process 0 (empty elsewhere); every process must call it."""
        if self._pacs_ref_adapter is not None:
            policy = self._policy_module()
            return full_state_dict(policy, keep=lambda name: f".{self._pacs_ref_adapter}." in name)
        return full_state_dict(self._ref_module())

    def _load_reference_state(self, weights: dict[str, torch.Tensor]) -> None:
        if self._pacs_ref_adapter is not None:
            policy = self._policy_module()
            ours = [k for k in policy.state_dict(keep_vars=True) if f".{self._pacs_ref_adapter}." in k]
            if sorted(ours) != sorted(weights):
                raise RuntimeError("the checkpoint's PACS reference adapter does not match this model")
            load_full_state_dict(policy, weights, strict=False)
            return
        load_full_state_dict(self._ref_module(), weights)

    def _reset_reference(self) -> None:
        """Hard reset: pi_ref <- pi_theta, and the optimizer's moments and step counts cleared (paper v2)."""
        self._copy_policy_to_reference()
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps the torch optimizer
        optimizer.state.clear()
        self._pacs_ref_version += 1
        self._pacs_ref_step = self.state.global_step
        self._metrics["train"]["pacs/ref_resets"].append(float(self._pacs_ref_version))
        logger.info("PACS reference reset #%d at step %d", self._pacs_ref_version, self.state.global_step)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.pacs_reference != "fixed":
            return
        state = self._reference_state()  # a collective under ZeRO-3 / FSDP: every process takes part
        if not self.accelerator.is_main_process:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        with open(os.path.join(folder, _REF_STATE_FILE), "w") as f:
            json.dump({"ref_version": self._pacs_ref_version, "ref_step": self._pacs_ref_step}, f)
        torch.save(state, os.path.join(folder, _REF_WEIGHTS_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.args.pacs_reference != "fixed" or checkpoint is None:
            return
        path = os.path.join(checkpoint, _REF_STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {_REF_STATE_FILE}: it was not saved by a PACSTrainer with "
                "pacs_reference='fixed', so the reference schedule cannot be resumed"
            )
        with open(path) as f:
            state = json.load(f)
        self._pacs_ref_version, self._pacs_ref_step = state["ref_version"], state["ref_step"]
        weights = torch.load(os.path.join(checkpoint, _REF_WEIGHTS_FILE), map_location="cpu", weights_only=True,
                             mmap=True)  # read tensor by tensor as they are loaded, not all at once
        self._load_reference_state(weights)
        if self._pacs_ref_adapter is None:  # buffers outside the state dict: never saved, built empty under FSDP2
            copy_buffers(self._policy_module(), self._ref_module())
        self._pacs_ref_pending = False

    # ------------------------------------------------------------------------------------------------
    # rollouts: labels and group ids
    # ------------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._pacs_rewards_per_func = rewards_per_func  # (N_all, K), gathered across processes
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        n_local = len(inputs)
        if n_local % G != 0:
            raise RuntimeError(f"this process received {n_local} rows, not a multiple of the group size {G}")
        for start in range(0, n_local, G):  # the sampler's G copies of a prompt must be contiguous here
            first = inputs[start]["prompt"]
            if any(inputs[i]["prompt"] != first for i in range(start + 1, start + G)):
                raise RuntimeError(
                    f"rows {start}..{start + G - 1} of this process are not {G} copies of one prompt: the batch does "
                    "not hold whole groups (check per_device_train_batch_size and the sampler)"
                )
        output = super()._generate_and_score_completions(inputs)

        device = self.accelerator.device
        weights = self.reward_weights.to(device)
        all_labels = labels_from_rewards(self._pacs_rewards_per_func.float(), weights, self.args.pacs_label_threshold)
        rank = self.accelerator.process_index
        output["pacs_labels"] = all_labels[rank * n_local : (rank + 1) * n_local]  # (N_local,)
        # a unique id per group: rank, generation counter and position make it unique across processes and batches
        self._pacs_generation += 1
        local_group = torch.arange(n_local, device=device) // G  # (N_local,)
        base = (self._pacs_generation * self.accelerator.num_processes + rank) * (n_local // G)
        output["pacs_group_ids"] = base + local_group  # (N_local,)

        outcomes = group_outcomes(all_labels, G)
        for key, value in outcomes.items():
            self._metrics[mode][f"pacs/groups/{key}"].append(value)
        self._metrics[mode]["pacs/label_mean"].append(all_labels.mean().item())
        if mode == "train":
            self._pacs_old_step = self.state.global_step
        return output

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:  # evaluation: one batch, no buffering, no shuffling (TRL's behaviour)
            return super()._prepare_inputs(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = split_pixel_values_by_grid(batch)
            batch = _shuffle_groups(batch, self.num_generations)  # GRPO shuffles rows; PACS shuffles groups
            batches = split_tensor_dict(batch, self.args.steps_per_generation)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in batches]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    # ------------------------------------------------------------------------------------------------
    # the loss
    # ------------------------------------------------------------------------------------------------
    def _is_on_policy(self) -> bool:
        """pi_theta == pi_ref for the current micro-batch: no optimizer step since pi_ref was set."""
        if self.args.pacs_reward_form != "sum":
            return False  # the reference-free form has psi != 0 even on-policy
        if self.args.pacs_reference == "old":
            return self.state.global_step == self._pacs_old_step
        return self.state.global_step == self._pacs_ref_step

    def _forward(self, model, inputs: dict[str, Any], rows: torch.Tensor | None = None, compute_entropy: bool = True):
        """Per-token log-probs (N, T) and entropies of the completions, for all rows or only ``rows``."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        extra = {k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                            "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                            "mm_token_type_ids", "image_position_ids")}
        if rows is not None:
            input_ids, attention_mask = input_ids[rows], attention_mask[rows]
            for k in ("token_type_ids", "mm_token_type_ids"):
                if extra[k] is not None:
                    extra[k] = extra[k][rows]
        aux = compute_entropy and self.aux_loss_enabled  # the policy's MoE router loss, as in GRPOTrainer
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=compute_entropy,
            compute_aux_loss=aux, **extra
        )
        if compute_entropy:  # the policy's forward (the reference's must not overwrite it)
            self._pacs_aux_loss = aux_loss
        return logps, entropies

    def _compute_loss(self, model, inputs):
        args = self.args
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        labels = inputs["pacs_labels"]  # (N,)
        mask = inputs["completion_mask"]  # (N, T)
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        N = labels.shape[0]
        _check_whole_groups(inputs["pacs_group_ids"], G)
        loss_kwargs = dict(beta=args.pacs_beta, baseline=args.pacs_baseline, weight_mode=args.pacs_weight_mode)

        on_policy = mode == "train" and self._is_on_policy()
        skipped = 0
        weight_sum = class_weights(labels, G, args.pacs_weight_mode).sum()  # for the on-policy value and the metrics
        if on_policy and args.pacs_on_policy_fast_path:
            adv = on_policy_advantage(labels, G, baseline=args.pacs_baseline, weight_mode=args.pacs_weight_mode)
            keep_group = adv.view(-1, G).ne(0).any(dim=1)  # (B,)
            if any(inputs.get(k) is not None for k in _MULTIMODAL_KEYS):
                keep_group = torch.ones_like(keep_group)  # image tensors are not row-aligned: no subsetting
            skipped = int((~keep_group).sum())
            placeholder = not bool(keep_group.any())
            if placeholder:  # still forward/backward one group with weight 0: every process must join the sync
                keep_group[0] = True
            rows = keep_group.repeat_interleave(G).nonzero(as_tuple=True)[0]  # (N',)
            logps, entropies = self._forward(model, inputs, rows)  # (N', T)
            loss = pacs_on_policy_loss(logps, mask[rows], labels[rows], G, num_rows=N, **loss_kwargs)
            # the loss value on-policy is (1/N) sum_i w_i log 2 over all rows, skipped ones included
            loss_value = weight_sum * math.log(2.0) / N
            if placeholder:  # zero gradient, true value
                loss = loss * 0.0 + loss_value
                if self._pacs_aux_loss is not None:
                    self._pacs_aux_loss = self._pacs_aux_loss * 0.0
            else:
                loss = loss - loss.detach() + loss_value
            psi = torch.zeros_like(labels)
            rewards = torch.zeros_like(labels)
            ent_mask = mask[rows]
        else:
            logps, entropies = self._forward(model, inputs)  # (N, T)
            ref = self._reference_logps(inputs, logps, on_policy)
            loss = pacs_loss(logps, ref, mask, labels, G, reward_form=args.pacs_reward_form, **loss_kwargs)
            loss_value = loss.detach()
            with torch.no_grad():
                rewards = implicit_reward(logps, ref, mask, beta=args.pacs_beta, reward_form=args.pacs_reward_form)
                psi = group_centre(rewards, G, args.pacs_baseline)
            ent_mask = mask
        if self.aux_loss_enabled and self._pacs_aux_loss is not None:  # MoE load balancing, as in GRPOTrainer
            loss = loss + self.router_aux_loss_coef * self._pacs_aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather(self._pacs_aux_loss.detach()).mean().item())
        if mode == "train":
            loss = loss / self.current_gradient_accumulation_steps  # TRL turns off HF's own loss scaling
        self._log_pacs_metrics(mode, loss_value, labels, rewards, psi, weight_sum, entropies, ent_mask, skipped, N,
                               on_policy)
        return loss

    def _reference_logps(self, inputs: dict[str, Any], logps: torch.Tensor, on_policy: bool) -> torch.Tensor | None:
        """(N, T) log-probs of pi_ref for this micro-batch (None for the reference-free form)."""
        args = self.args
        if args.pacs_reward_form == "mean_logp":
            return None
        if args.pacs_reference == "old":
            old = inputs.get("old_per_token_logps")
            if old is not None:
                return old
            if on_policy or not self.model.training:
                # pi_old == pi_theta: TRL skips recomputing it then (and in evaluation the rollout policy is
                # the current one, so every psi is 0 and only the loss value is reported)
                return logps.detach()
            raise RuntimeError(
                "off-policy PACS micro-batch without pi_old log-probs: TRL did not recompute them for this "
                "configuration (please report this with your steps_per_generation, num_iterations and "
                "gradient_accumulation_steps)"
            )
        # fixed reference: computed once per micro-batch and reference version, cached in the buffered batch
        self._init_pending_reference()  # evaluation before any training
        cached = inputs.get("pacs_ref_logps")
        if cached is None or inputs.get("pacs_ref_version") != self._pacs_ref_version:
            with torch.no_grad():
                if self._pacs_ref_adapter is not None:
                    with use_adapter(self.accelerator.unwrap_model(self.model), self._pacs_ref_adapter):
                        cached, _ = self._forward(self.model, inputs, compute_entropy=False)
                else:
                    cached, _ = self._forward(self.pacs_ref_model, inputs, compute_entropy=False)
            inputs["pacs_ref_logps"] = cached
            inputs["pacs_ref_version"] = self._pacs_ref_version
        return cached

    def _log_pacs_metrics(self, mode, loss_value, labels, rewards, psi, weight_sum, entropies, ent_mask, skipped, N,
                          on_policy):
        device = labels.device
        acc = self.accelerator
        self._metrics[mode]["pacs/loss"].append(acc.gather(loss_value.detach().reshape(1)).mean().item())
        # sums reduced across processes, then moments
        local = torch.stack([
            torch.tensor(float(N), device=device),
            rewards.sum(), (rewards ** 2).sum(), psi.sum(), (psi ** 2).sum(),
            weight_sum,
            torch.tensor(float(skipped), device=device),
        ]).float()
        n, r1, r2, p1, p2, wsum, skip = acc.reduce(local, reduction="sum").tolist()
        self._metrics[mode]["pacs/implicit_reward/mean"].append(r1 / n)
        self._metrics[mode]["pacs/implicit_reward/std"].append(math.sqrt(max(r2 / n - (r1 / n) ** 2, 0.0)))
        self._metrics[mode]["pacs/psi/mean"].append(p1 / n)
        self._metrics[mode]["pacs/psi/std"].append(math.sqrt(max(p2 / n - (p1 / n) ** 2, 0.0)))
        self._metrics[mode]["pacs/class_weight/mean"].append(wsum / n)
        if mode == "train":
            self._metrics[mode]["pacs/skipped_groups"].append(skip)
            self._metrics[mode]["pacs/on_policy"].append(float(on_policy))
        informative = not on_policy and (mode == "train" or self.args.pacs_reference == "fixed")
        if informative:
            # the implicit critic sigma(psi) is informative only when pi_theta != pi_ref (else psi = 0, sigma = 1/2);
            # in evaluation that is the case with the fixed reference only
            prob = torch.sigmoid(psi.float())
            correct = ((prob > 0.5).float() == labels.float()).float().sum()
            brier = ((prob - labels.float()) ** 2).sum()
            c, b, m = acc.reduce(torch.stack([correct, brier, torch.tensor(float(N), device=device)]),
                                 reduction="sum").tolist()
            self._metrics[mode]["pacs/critic_accuracy"].append(c / m)
            self._metrics[mode]["pacs/critic_brier"].append(b / m)
        if entropies is not None:
            ent = torch.stack([(entropies * ent_mask).sum(), ent_mask.sum()]).float()
            e_sum, e_cnt = acc.reduce(ent, reduction="sum").tolist()
            # when the fast path skipped groups, only the forwarded (mixed-label) groups have an entropy: that is
            # logged under its own name so TRL's `entropy` always covers every completion it reports on
            key = "pacs/entropy_forwarded_groups" if skip > 0 else "entropy"
            self._metrics[mode][key].append(e_sum / max(e_cnt, 1.0))


def _main_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype holding most of the parameters outside the embeddings (``model.dtype`` is the first parameter's:
    fp32 once a tied LM head was cast to fp32, and a tied embedding can hold most of a small model)."""
    embeddings = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            embeddings.update(id(p) for p in module.parameters())
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if id(p) not in embeddings:
            sizes[p.dtype] = sizes.get(p.dtype, 0) + int(getattr(p, "ds_numel", p.numel()))
    return max(sizes, key=sizes.get) if sizes else next(model.parameters()).dtype


def _fsdp_offloads(accelerator) -> bool:
    """Whether FSDP keeps the sharded parameters on the CPU."""
    offload = getattr(accelerator.state.fsdp_plugin, "cpu_offload", None)
    if offload is True or type(offload).__name__ == "CPUOffloadPolicy":  # FSDP2
        return True
    return bool(getattr(offload, "offload_params", False))  # FSDP1's CPUOffload


def _cast_lm_head_to_fp32(model: torch.nn.Module) -> None:
    """The LM head in fp32, weights and matmul, as GRPOTrainer makes the policy's with ``cast_lm_head_to_fp32``;
    with tied embeddings the embedding output is cast back to the model's dtype."""
    dtype = model.lm_head.weight.dtype
    head = model.lm_head.float()

    def fp32_forward(hidden_states):
        bias = None if head.bias is None else head.bias.float()
        return torch.nn.functional.linear(hidden_states.float(), head.weight.float(), bias)

    head.forward = fp32_forward
    if model.config.get_text_config().tie_word_embeddings:
        model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.to(dtype))


def _check_whole_groups(group_ids: torch.Tensor, G: int) -> None:
    """Raise unless the rows are whole groups: G contiguous rows per group id, each id once."""
    if group_ids.numel() % G != 0:
        raise RuntimeError(f"micro-batch of {group_ids.numel()} rows is not made of whole groups of {G}")
    ids = group_ids.view(-1, G)  # (B, G)
    if not bool((ids == ids[:, :1]).all()) or ids[:, 0].unique().numel() != ids.shape[0]:
        raise RuntimeError(
            f"a group of {G} completions was split across micro-batches or processes (group ids "
            f"{group_ids.tolist()[: 4 * G]}...): PACS needs whole groups"
        )


def _shuffle_groups(batch: dict[str, Any], G: int) -> dict[str, Any]:
    """Shuffle the rows of a generation batch in whole groups of G (GRPO's shuffle permutes single rows)."""
    n = len(batch["pacs_labels"])
    order = torch.randperm(n // G)
    perm = (order[:, None] * G + torch.arange(G)[None, :]).reshape(-1)  # (N,)

    def permute(v):
        if v is None or (isinstance(v, torch.Tensor) and v.ndim == 0):
            return v
        if isinstance(v, torch.Tensor):
            return v[perm.to(v.device)]
        if isinstance(v, (list, tuple)) and len(v) == n:
            return [v[i] for i in perm.tolist()]
        return v

    return {key: permute(value) for key, value in batch.items()}
