"""Step time and peak memory of PACS against TRL's GRPO, in one run, on a random-init model.

    python bench/step_time.py                                    # GPU: Qwen2.5-0.5B's shape, bf16
    python bench/step_time.py --tiny --steps 3                   # CPU smoke run (a few-million-parameter model)

Both algorithms train the same random-init model (same seed, prompts, rollout sizes) for --steps optimizer
steps; the script prints a Markdown table of the mean step time (first step excluded as warm-up), the
PACS/GRPO ratio, and the peak GPU memory. No download: the model is built from a config and the
tokenizer from a small local vocabulary, so it runs on machines without network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import build_tokenizer

QWEN25_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t0 = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)


def any_digit(completions, **kwargs):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if any(ch.isdigit() for ch in t) else 0.0 for t in texts]


def run(algorithm: str, args) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    from pacsrl import PACSConfig, PACSTrainer

    tok = build_tokenizer()
    torch.manual_seed(0)
    shape = TINY if args.tiny else QWEN25_05B
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **shape
        )
    )
    gpu = torch.cuda.is_available()
    if gpu:
        model = model.to(torch.bfloat16)
    ds = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"what is {i} + {i} ?"}]} for i in range(512)]
    )
    common = {
        "output_dir": os.path.join(args.output, algorithm),
        "per_device_train_batch_size": args.batch,
        "num_generations": args.group,
        "max_completion_length": args.completion_length,
        "max_steps": args.steps,
        "steps_per_generation": 2,
        "report_to": [],
        "logging_steps": 1,
        "save_strategy": "no",
        "learning_rate": 1e-6,
        "bf16": gpu,
        "use_cpu": not gpu,
        "disable_tqdm": True,
        "seed": 0,
        "gradient_checkpointing": args.checkpointing,
    }
    if algorithm == "pacs":
        trainer = PACSTrainer(
            model=model,
            reward_funcs=any_digit,
            args=PACSConfig(**common),
            train_dataset=ds,
            processing_class=tok,
        )
    else:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=any_digit,
            args=GRPOConfig(**common, beta=0.0),
            train_dataset=ds,
            processing_class=tok,
        )
    timer = StepTimer()
    trainer.add_callback(timer)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
    steady = timer.times[1:] or timer.times
    return {
        "algorithm": algorithm,
        "step_time_s": sum(steady) / len(steady),
        "steps": len(timer.times),
        "peak_memory_gib": peak,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--batch", type=int, default=16, help="per-device batch (completions), a multiple of --group"
    )
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run)")
    parser.add_argument("--output", default="outputs/bench-step-time")
    args = parser.parse_args()
    results = [run(a, args) for a in ("grpo", "pacs")]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"\ndevice: {device}; model: {results[0]['params_m']:.1f}M params; batch {args.batch}, G={args.group}, "
        f"{args.completion_length} new tokens, {args.steps} steps\n"
    )
    print("| algorithm | step time (s) | vs GRPO | peak GPU memory (GiB) |\n|---|---:|---:|---:|")
    for r in results:
        ratio = r["step_time_s"] / results[0]["step_time_s"]
        print(f"| {r['algorithm']} | {r['step_time_s']:.3f} | {ratio:.2f}x | {r['peak_memory_gib']:.2f} |")
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "step_time.json"), "w") as f:
        json.dump({"device": device, "args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
