"""Run by test_distributed.py under torchrun with 2 CPU processes (gloo): trains PACS and records each
micro-batch's group ids and prompts, per rank, to OUT/rank{R}.json. SHARDING=fsdp2 shards the model with FSDP2 (the
settings of recipes/accelerate/fsdp2.yaml), SHARDING=zero3 with DeepSpeed ZeRO-3; otherwise DDP replicates it."""

import json
import os
import sys

import torch
from datasets import Dataset

sys.path.insert(0, os.path.dirname(__file__))
from cpu_sharding import (
    ZERO3_TRAINER,
    allow_fsdp_on_cpu,
    exit_without_teardown,
    full,
    init_deepspeed_comm_on_cpu,
    recipe_fsdp_config,
)
from pacsrl import PACSConfig, PACSTrainer
from tiny import build_model, build_tokenizer


def every_third(completions, **kwargs):
    """Mixed groups on every process; with SKIP_RANK0=1, rank 0's groups are all-correct (all skipped on-policy)."""
    if os.environ.get("SKIP_RANK0") == "1" and os.environ.get("RANK") == "0":
        return [1.0] * len(completions)
    return [float(i % 3 == 0) for i in range(len(completions))]


def local_fraction(model: torch.nn.Module) -> float:
    """The fraction of the parameters' elements this process holds: 1 when replicated, about 1/2 when sharded."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_id"):  # ZeRO-3 partition
            held, total = held + p.ds_tensor.numel(), total + p.ds_numel
        elif isinstance(p, DTensor):  # FSDP2 shard
            held, total = held + p.to_local().numel(), total + p.numel()
        else:
            held, total = held + p.numel(), total + p.numel()
    return held / total


def whole_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter whole, gathered from its ZeRO-3 partitions or FSDP2 shards (a collective then)."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [full(p).detach() for p in params]


def main(out_dir: str) -> None:
    sharding = os.environ.get("SHARDING", "ddp")
    fsdp = sharding == "fsdp2"
    if fsdp:
        allow_fsdp_on_cpu()
    tok = build_tokenizer()
    model = build_model(tok, seed=0)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(32)])
    args = PACSConfig(
        output_dir=os.path.join(out_dir, "run"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        steps_per_generation=2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-2,
        disable_tqdm=True,
        # fp32, so that the sharded runs can be compared with DDP to float precision (TRL's default
        # bf16 autocasts under DDP and FSDP2, while ZeRO-3 then stores the weights in bf16)
        bf16=False,
        fsdp=fsdp,
        fsdp_config=recipe_fsdp_config() if fsdp else None,
        deepspeed=ZERO3_TRAINER if sharding == "zero3" else None,
    )
    if sharding == "zero3":
        init_deepspeed_comm_on_cpu()
    trainer = PACSTrainer(
        model=model, reward_funcs=every_third, args=args, train_dataset=ds, processing_class=tok
    )
    seen = []
    original = trainer._compute_loss

    def record(m, inputs):
        prompts = inputs["prompt_ids"].tolist()
        seen.append({"group_ids": inputs["pacs_group_ids"].tolist(), "prompts": prompts})
        return original(m, inputs)

    trainer._compute_loss = record
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    fraction = local_fraction(trainer.model)
    after = whole_parameters(trainer.model)
    changed = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    rank = trainer.accelerator.process_index
    logs = [h for h in trainer.state.log_history if "pacs/loss" in h]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        params = torch.cat([p.flatten() for p in after]).tolist()
        sharded_as = (
            "fsdp2" if trainer.is_fsdp_enabled else "zero3" if trainer.is_deepspeed_enabled else "ddp"
        )
        json.dump(
            {
                "world": trainer.accelerator.num_processes,
                "sharding": sharded_as,
                "local_fraction": fraction,
                "seen": seen,
                "changed": changed,
                "logs": logs,
                "params": params,
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1])
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process has written its results
    exit_without_teardown(0)
