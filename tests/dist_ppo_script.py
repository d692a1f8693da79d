"""Run by test_ppo.py under torchrun with 2 CPU processes (gloo): trains PPOTrainer with DDP, gradient accumulation
(so the critic's no-sync micro-batch is exercised) and two optimizer steps per rollout, then writes each rank's
policy and critic parameters and logs to OUT/rank{R}.json. The tiny model's folder is argv[2]."""

import json
import os
import sys

import torch
from datasets import Dataset

sys.path.insert(0, os.path.dirname(__file__))
from cpu_sharding import exit_without_teardown
from pacsrl import PPOConfig, PPOTrainer
from tiny import build_tokenizer


def every_third(completions, **kwargs):
    """Different rewards on the two processes' rows: unsynchronised gradients would make the replicas diverge."""
    return [float(i % 3 == 0) + 0.5 * int(os.environ["RANK"]) for i in range(len(completions))]


def main(out_dir: str, model_path: str) -> None:
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(32)])
    args = PPOConfig(output_dir=os.path.join(out_dir, "run"), per_device_train_batch_size=4, num_generations=4,
                     gradient_accumulation_steps=2, steps_per_generation=4, max_completion_length=6, max_steps=2,
                     report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", learning_rate=1e-2,
                     critic_learning_rate=1e-2, disable_tqdm=True, bf16=False)  # fmt: skip
    trainer = PPOTrainer(model=model_path, reward_funcs=every_third, args=args, train_dataset=ds,
                         processing_class=build_tokenizer())  # fmt: skip
    before = [
        torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (trainer.model, trainer.critic)
    ]
    trainer.train()
    after = [
        torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (trainer.model, trainer.critic)
    ]
    rank = trainer.accelerator.process_index
    logs = [h for h in trainer.state.log_history if "critic/value_loss" in h]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world": trainer.accelerator.num_processes, "ddp": type(trainer.critic).__name__,
                   "changed": [not torch.equal(a, b) for a, b in zip(before, after)],
                   "policy": after[0].tolist(), "critic": after[1].tolist(), "logs": logs}, f)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process has written its results
    exit_without_teardown(0)
