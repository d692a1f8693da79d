"""How far psi is from 0 where it must be 0: pi_old recomputed by TRL against the loss's own forward.

    python bench/psi_on_policy.py                       # GPU: Qwen2.5-0.5B's shape, bf16, completions of 256 and 2048
    python bench/psi_on_policy.py --cpu                 # CPU smoke run: a tiny model, completions of 32 and 128

With learning rate 0 the policy never moves, so pi_theta == pi_old exactly on every micro-batch and the implicit
reward ``sum_t log(pi_theta / pi_old)`` must be 0. The fast path is off, so the trainer computes it: pi_old comes
from TRL's recomputation (no gradient, on the unshuffled generation batch cut into chunks of
``per_device_train_batch_size``), pi_theta from the loss's forward (with gradient, on the group-shuffled
micro-batch). Any per-token difference between the two forwards adds up over the completion; this script
reports ``pacs/psi/std`` and ``pacs/implicit_reward/std`` per micro-batch, and the largest per-token difference.
Every completion has exactly the requested length (``min_new_tokens``). No download: random-init model, local
tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from step_time import QWEN25_05B, TINY  # the model shapes step_time.py measures (bench/ is on the path)

from tiny import build_tokenizer


def every_third(completions, **kwargs):
    """Mixed groups: 1.0 for rows 0, 3, 6, ... of each call."""
    return [float(i % 3 == 0) for i in range(len(completions))]


def run(length: int, args) -> dict:
    from pacsrl import PACSConfig, PACSTrainer

    tok = build_tokenizer()
    torch.manual_seed(0)
    gpu = torch.cuda.is_available() and not args.cpu
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **(TINY if args.cpu else QWEN25_05B),
        )
    )
    bf16 = gpu or args.bf16
    if bf16:
        model = model.to(torch.bfloat16)
    ds = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"what is {i} + {i} ?"}]} for i in range(256)]
    )
    config = PACSConfig(
        output_dir=os.path.join(args.output, str(length)),
        per_device_train_batch_size=args.batch,
        num_generations=args.group,
        max_completion_length=length,
        generation_kwargs={"min_new_tokens": length},
        steps_per_generation=2,
        max_steps=args.steps,
        learning_rate=0.0,
        pacs_on_policy_fast_path=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        bf16=bf16,
        use_cpu=not gpu,
        disable_tqdm=True,
        seed=0,
    )
    trainer = PACSTrainer(
        model=model, reward_funcs=every_third, args=config, train_dataset=ds, processing_class=tok
    )
    token_gap = []
    compute_loss = trainer._compute_loss

    def spy(model, inputs):  # the largest per-token |log pi_theta - log pi_old| of the micro-batch
        with torch.no_grad():
            model.train()
            logps, _ = trainer._forward(model, inputs, compute_entropy=False)
        mask = inputs["completion_mask"].bool()
        token_gap.append((logps - inputs["old_per_token_logps"])[mask].abs().max().item())
        return compute_loss(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    logs = [h for h in trainer.state.log_history if "pacs/psi/std" in h]
    return {
        "completion_length": length,
        "bf16": bf16,
        "on_policy": [h["pacs/on_policy"] for h in logs],
        "psi_std": [h["pacs/psi/std"] for h in logs],
        "implicit_reward_std": [h["pacs/implicit_reward/std"] for h in logs],
        "completion_mean_length": [h.get("completions/mean_length") for h in logs],
        "max_token_gap_no_grad": token_gap,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lengths",
        default=None,
        help="completion lengths, comma-separated (default 256,2048; 32,128 with --cpu)",
    )
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (micro-batches) per length")
    parser.add_argument(
        "--batch", type=int, default=16, help="per-device batch (completions), a multiple of --group"
    )
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--cpu", action="store_true", help="a tiny model on the CPU (smoke run)")
    parser.add_argument(
        "--bf16", action="store_true", help="with --cpu: the model in bf16 (the GPU run always is)"
    )
    parser.add_argument("--output", default="outputs/bench-psi-on-policy")
    args = parser.parse_args()
    lengths = [int(x) for x in (args.lengths or ("32,128" if args.cpu else "256,2048")).split(",")]
    results = [run(length, args) for length in lengths]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else "cpu"
    print(f"\ndevice: {device}; batch {args.batch}, G={args.group}, learning rate 0, fast path off\n")
    print(
        "| completion tokens | bf16 | pacs/psi/std per micro-batch | max per-token gap (no grad) |\n|---:|---|---|---|"
    )
    for r in results:
        psi = ", ".join(f"{v:.2e}" for v in r["psi_std"])
        gap = ", ".join(f"{v:.1e}" for v in r["max_token_gap_no_grad"])
        print(f"| {r['completion_length']} | {r['bf16']} | {psi} | {gap} |")
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "psi_on_policy.json"), "w") as f:
        json.dump({"device": device, "args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
