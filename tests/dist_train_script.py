"""Run by test_distributed.py under torchrun with 2 CPU processes (gloo): trains PACS and records each
micro-batch's group ids and prompts, per rank, to OUT/rank{R}.json."""

import json
import os
import sys

import torch
from datasets import Dataset

sys.path.insert(0, os.path.dirname(__file__))
from tiny import build_model, build_tokenizer  # noqa: E402

from pacsrl import PACSConfig, PACSTrainer  # noqa: E402


def every_third(completions, **kwargs):
    """Mixed groups on every process; with SKIP_RANK0=1, rank 0's groups are all-correct (all skipped on-policy)."""
    if os.environ.get("SKIP_RANK0") == "1" and os.environ.get("RANK") == "0":
        return [1.0] * len(completions)
    return [float(i % 3 == 0) for i in range(len(completions))]


def main(out_dir: str) -> None:
    tok = build_tokenizer()
    model = build_model(tok, seed=0)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(32)])
    args = PACSConfig(output_dir=os.path.join(out_dir, "run"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=3, steps_per_generation=2, report_to=[], use_cpu=True,
                      logging_steps=1, save_strategy="no", learning_rate=1e-2, disable_tqdm=True)
    trainer = PACSTrainer(model=model, reward_funcs=every_third, args=args, train_dataset=ds, processing_class=tok)
    seen = []
    original = trainer._compute_loss

    def record(m, inputs):
        prompts = inputs["prompt_ids"].tolist()
        seen.append({"group_ids": inputs["pacs_group_ids"].tolist(), "prompts": prompts})
        return original(m, inputs)

    trainer._compute_loss = record
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))
    rank = trainer.accelerator.process_index
    logs = [h for h in trainer.state.log_history if "pacs/loss" in h]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()]).tolist()
        json.dump({"world": trainer.accelerator.num_processes, "seen": seen, "changed": changed, "logs": logs,
                   "params": params}, f)


if __name__ == "__main__":
    main(sys.argv[1])
