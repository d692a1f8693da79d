"""The fixed reference of ``pacs_reference="fixed"`` (paper v2): built, reset, saved and loaded.

pi_ref is a frozen copy of the policy, hard-reset to the current policy, together with the optimizer state, every
``pacs_ref_reset_steps`` optimizer steps. One ``FixedReference`` belongs to one ``PACSTrainer``:

- full fine-tuning: a second model of the policy's architecture with the policy's dtypes (an fp32 LM head with
  ``cast_lm_head_to_fp32`` included), prepared for DeepSpeed / FSDP2 like TRL's own reference model;
- PEFT: a frozen copy of the trained adapter, named ``pacs_ref``, on the same base model.

Under FSDP the copy of the policy's weights waits until training (or evaluation) starts: accelerate prepares the
policy then, and with ``fsdp_cpu_ram_efficient_loading`` only the first process holds real weights before.
Copies, saves and loads go through ``pacsrl.sharded``, one tensor at a time under ZeRO-3 and FSDP2; they are
collectives, so every process calls them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import is_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.initialization import no_init_weights
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import add_fused_lm_head, use_adapter

from pacsrl.sharded import copy_buffers, copy_module, copy_tensors, full_state_dict, load_full_state_dict

if TYPE_CHECKING:
    from pacsrl.trainer import PACSTrainer

logger = logging.getLogger(__name__)

STATE_FILE = "pacs_reference_state.json"
WEIGHTS_FILE = "pacs_reference_model.pt"
ADAPTER = "pacs_ref"


class FixedReference:
    """The frozen pi_ref of one ``PACSTrainer`` and its reset schedule.

    Attributes:
        model: the frozen copy (full fine-tuning), prepared like TRL's reference model; None with PEFT.
        adapter: with PEFT, the name of the frozen adapter copy (``"pacs_ref"``); None otherwise.
        version: resets so far (saved in checkpoints, so a resumed run continues the schedule).
        step: the optimizer step at which pi_ref was last set equal to pi_theta.
    """

    def __init__(self, trainer: PACSTrainer):
        self.trainer = trainer
        self.model: torch.nn.Module | None = None
        self.adapter: str | None = None
        self.version = 0
        self.step = 0
        self.pending = False  # the reference still has to be given the policy's weights
        accelerator = trainer.accelerator
        if trainer.is_fsdp_enabled and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise NotImplementedError(
                "pacs_reference='fixed' with FSDP needs FSDP2 (fsdp_config version 2, transformers' default; FSDP1 "
                "is deprecated); or use pacs_reference='old'"
            )
        policy = self.policy()
        if is_peft_model(policy):
            # the reference is the base model plus a frozen copy of the trained adapter
            active = policy.active_adapter
            policy.add_adapter(ADAPTER, policy.peft_config[active])
            policy.set_adapter(active)  # keep training the user's adapter
            self.adapter = ADAPTER
            for name, param in policy.named_parameters():
                if f".{ADAPTER}." in name:
                    param.requires_grad_(False)
            self._initialise()  # deferred under FSDP too: the adapters may not hold their weights yet
            return
        # a second model of the same architecture (partitioned at construction under ZeRO-3, as TRL's own
        # reference), with the policy's dtypes, sharded like TRL's reference model, then given the policy's weights.
        # Under FSDP2 it is built on the meta device and materialised shard by shard.
        fsdp_meta = (
            trainer.is_fsdp_enabled
            and not _fsdp_offloads(accelerator)
            and not getattr(accelerator.state.fsdp_plugin, "ignored_modules", None)
        )
        with no_init_weights(), torch.device("meta") if fsdp_meta else contextlib.nullcontext():
            ref = AutoModelForCausalLM.from_config(copy.deepcopy(policy.config), dtype=_main_dtype(policy))
        ref.tie_weights()  # skipped along with the initialisation
        if trainer.args.cast_lm_head_to_fp32:
            _cast_lm_head_to_fp32(ref)  # as GRPOTrainer casts the policy and its own reference
        ref.requires_grad_(False).eval()
        add_fused_lm_head(
            ref, temperature=trainer.temperature, cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32
        )
        if trainer.is_deepspeed_enabled:
            self.model = prepare_deepspeed(ref, accelerator)
        elif trainer.is_fsdp_enabled:
            self.model = prepare_fsdp(ref, accelerator)
            if fsdp_meta:
                self.model.to_empty(device=accelerator.device)  # shards, filled at train start
        else:
            self.model = accelerator.prepare_model(ref, evaluation_mode=True)
        self._initialise()

    # ------------------------------------------------------------------------------------------------
    # pi_ref <- pi_theta
    # ------------------------------------------------------------------------------------------------
    def policy(self) -> torch.nn.Module:
        return self.trainer.accelerator.unwrap_model(self.trainer.model, keep_torch_compile=False)

    def module(self) -> torch.nn.Module:
        """The unwrapped reference model (full fine-tuning only)."""
        return self.trainer.accelerator.unwrap_model(self.model)

    def _initialise(self) -> None:
        """pi_ref <- pi_theta now, or under FSDP when training (or evaluation) starts: accelerate prepares the policy
        then, and with fsdp_cpu_ram_efficient_loading only the first process's weights count before: accelerate
        broadcasts them as it shards the policy, and the others may hold uninitialised or meta tensors until then."""
        if self.trainer.is_fsdp_enabled:  # the same decision on every process: the copy is a collective
            self.pending = True
        else:
            self._copy_policy()

    def initialise_if_pending(self) -> None:
        """Give the reference the policy's weights if that was deferred and no checkpoint provided them."""
        if self.pending:
            self._copy_policy()
            self.pending = False

    def _copy_policy(self) -> None:
        if self.adapter is None:
            copy_module(self.policy(), self.module())
            return
        source = self.policy().active_adapter
        tensors = self.policy().state_dict(keep_vars=True)  # (FSDP2: the registered, sharded parameters)
        copy_tensors(
            (t, tensors[n.replace(f".{source}.", f".{self.adapter}.")])
            for n, t in tensors.items()
            if f".{source}." in n
        )

    def reset(self) -> None:
        """Hard reset: pi_ref <- pi_theta, and the optimizer's moments and step counts cleared (paper v2)."""
        trainer = self.trainer
        self._copy_policy()
        # accelerate wraps the torch optimizer
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        optimizer.state.clear()
        self.version += 1
        self.step = trainer.state.global_step
        trainer._metrics["train"]["pacs/ref_resets"].append(float(self.version))
        logger.info("PACS reference reset #%d at step %d", self.version, trainer.state.global_step)

    # ------------------------------------------------------------------------------------------------
    # log-probs
    # ------------------------------------------------------------------------------------------------
    def logps(self, inputs: dict[str, Any], forward: Callable[..., tuple[torch.Tensor, Any]]) -> torch.Tensor:
        """(N, T) log-probs of pi_ref for a micro-batch, computed once per reference version and cached in the
        (buffered) batch. ``forward(model, inputs, compute_entropy=False)`` is the trainer's forward."""
        self.initialise_if_pending()  # evaluation before any training
        cached = inputs.get("pacs_ref_logps")
        if cached is None or inputs.get("pacs_ref_version") != self.version:
            with torch.no_grad():
                if self.adapter is not None:
                    with use_adapter(self.policy(), self.adapter):
                        cached, _ = forward(self.trainer.model, inputs, compute_entropy=False)
                else:
                    cached, _ = forward(self.model, inputs, compute_entropy=False)
            inputs["pacs_ref_logps"] = cached
            inputs["pacs_ref_version"] = self.version
        return cached

    # ------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        """Write the reference's whole tensors and its reset counter into a checkpoint folder (main process; every
        process must call it: gathering the shards is a collective)."""
        if self.adapter is not None:
            state = full_state_dict(self.policy(), keep=lambda name: f".{self.adapter}." in name)
        else:
            state = full_state_dict(self.module())
        if not self.trainer.accelerator.is_main_process:
            return
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump({"ref_version": self.version, "ref_step": self.step}, f)
        torch.save(state, os.path.join(folder, WEIGHTS_FILE))

    def load(self, checkpoint: str) -> None:
        """Restore the reference and its reset counter from a checkpoint folder written by ``save``."""
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {STATE_FILE}: it was not saved by a PACSTrainer with "
                "pacs_reference='fixed', so the reference schedule cannot be resumed"
            )
        with open(path) as f:
            state = json.load(f)
        self.version, self.step = state["ref_version"], state["ref_step"]
        # read tensor by tensor as they are loaded, not all at once
        weights = torch.load(
            os.path.join(checkpoint, WEIGHTS_FILE), map_location="cpu", weights_only=True, mmap=True
        )
        if self.adapter is not None:
            policy = self.policy()
            ours = [k for k in policy.state_dict(keep_vars=True) if f".{self.adapter}." in k]
            if sorted(ours) != sorted(weights):
                raise RuntimeError("the checkpoint's PACS reference adapter does not match this model")
            load_full_state_dict(policy, weights, strict=False)
        else:
            load_full_state_dict(self.module(), weights)
            # buffers outside the state dict: never saved, empty on meta
            copy_buffers(self.policy(), self.module())
        self.pending = False


class ResetCallback(TrainerCallback):
    """Gives the reference the policy's weights at train start if that was deferred, and resets it (with the
    optimizer state) every ``pacs_ref_reset_steps`` optimizer steps."""

    def __init__(self, reference: FixedReference):
        self.reference = reference

    def on_train_begin(self, args, state, control, **kwargs):
        self.reference.initialise_if_pending()  # after accelerate has prepared (sharded) the policy

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.pacs_ref_reset_steps == 0:
            self.reference.reset()


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
