"""FSDP2 and DeepSpeed ZeRO-3 on CPU processes (torchrun + gloo), for tests and benchmarks.

torch's FSDP2 runs on CPU, but accelerate enables FSDP only on accelerators: a CPU run given an FSDP plugin falls back
to DDP. ``allow_fsdp_on_cpu`` lifts that one check, with the FSDP settings of the recipe; accelerate's FSDP2
preparation, transformers' FSDP handling and the trainers' code are the real ones. For ZeRO-3, accelerate sets up
torch.distributed on CPU but not DeepSpeed's comm (``init_deepspeed_comm_on_cpu``)."""

import os
import sys
from pathlib import Path

import torch
import yaml

# a trainer's DeepSpeed ZeRO-3 config; transformers fills in the "auto" values from the TrainingArguments
ZERO3_TRAINER = {
    "zero_optimization": {"stage": 3},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
}

FSDP2_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "fsdp2.yaml"


def recipe_fsdp_config() -> dict:
    """The recipe's accelerate ``fsdp_config`` in TrainingArguments' spelling."""
    names = {
        "fsdp_version": "version",
        "fsdp_auto_wrap_policy": "auto_wrap_policy",
        "fsdp_cpu_ram_efficient_loading": "cpu_ram_efficient_loading",
        "fsdp_offload_params": "cpu_offload",
        "fsdp_reshard_after_forward": "reshard_after_forward",
        "fsdp_state_dict_type": "state_dict_type",
        "fsdp_activation_checkpointing": "activation_checkpointing",
    }
    recipe = yaml.safe_load(FSDP2_RECIPE.read_text())["fsdp_config"]
    unknown = set(recipe) - set(names)
    if unknown:
        raise ValueError(f"{FSDP2_RECIPE}: no TrainingArguments spelling for {sorted(unknown)}")
    return {names[k]: v for k, v in recipe.items()}


def allow_fsdp_on_cpu() -> None:
    """accelerate enables FSDP only on accelerators (a CPU run with an FSDP plugin falls back to DDP); torch's
    FSDP2 itself works on CPU with gloo. Keep the plugin on CPU processes, before anything builds the state."""
    import accelerate.state
    from accelerate.utils import DistributedType

    init = accelerate.state.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":  # as accelerate does when it enables FSDP
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate.state.AcceleratorState.__init__ = patched
    os.environ["ACCELERATE_USE_FSDP"] = (
        "true"  # what `accelerate launch` sets; transformers' loading reads it
    )


def full(param: torch.Tensor) -> torch.Tensor:
    """A parameter whole: an FSDP2 shard (DTensor) gathered, anything else as it is (a collective under FSDP2)."""
    from torch.distributed.tensor import DTensor

    return param.full_tensor() if isinstance(param, DTensor) else param


def init_deepspeed_comm_on_cpu() -> None:
    """DeepSpeed's comm over gloo: on CPU accelerate does not set it up, and DeepSpeed would count a world of 1.

    Without DeepSpeed's shared-memory op: on CPU its comm backend compiles that C++ op on first use (minutes on 2
    cores, once per machine, so in every CI run), and only ``inference_all_reduce`` uses it; training's collectives
    go through torch.distributed (gloo) either way."""
    import importlib

    import deepspeed

    # the module, not the attribute: ``deepspeed.comm.torch`` is the torch package
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")


def exit_without_teardown(code: int) -> None:
    """Leave once the results are written, skipping the interpreter's teardown, where CPU process groups (gloo, and
    DeepSpeed's comm when it is installed) sometimes abort ("terminate called without an active exception")."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
