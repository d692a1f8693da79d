"""Step time and peak memory of PACS and PPO against TRL's GRPO, in one run, on a random-init model.

    python bench/step_time.py                                    # GPU: Qwen2.5-0.5B's shape, bf16
    python bench/step_time.py --tiny --steps 3                   # CPU smoke run (a few-million-parameter model)

Every algorithm trains the same random-init model (same seed, prompts, rollout sizes) for --steps optimizer
steps; the script prints a Markdown table of the mean step time (first step excluded as warm-up), its ratios to
GRPO and to PACS, and the peak GPU memory. PPO also trains its critic (a second model of the same size, built from
the same checkpoint), so its step includes the critic's forward and backward. No download: the model is built from
a config (saved once to OUTPUT/init-model, which PPO's critic reads) and the tokenizer from a small local
vocabulary, so it runs on machines without network.
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


def init_model(args) -> str:
    """The random-init model, saved once: every algorithm starts from it (PPO's critic too)."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    shape = TINY if args.tiny else QWEN25_05B
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **shape
        )
    )
    if torch.cuda.is_available():
        model = model.to(torch.bfloat16)
    path = os.path.join(args.output, "init-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run(algorithm: str, args, path: str) -> dict:
    from transformers import AutoModelForCausalLM

    from pacsrl.algorithms import config_class, trainer_class

    tok = build_tokenizer()
    gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if gpu else torch.float32)
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
    extra = {"grpo": {"beta": 0.0}, "pacs": {}, "ppo": {"critic_model_name_or_path": path}}[algorithm]
    config = config_class(algorithm)(**common, **extra)
    trainer = trainer_class(algorithm)(
        model=model, reward_funcs=any_digit, args=config, train_dataset=ds, processing_class=tok
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
    path = init_model(args)
    results = [run(a, args, path) for a in ("grpo", "pacs", "ppo")]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"\ndevice: {device}; model: {results[0]['params_m']:.1f}M params; batch {args.batch}, G={args.group}, "
        f"{args.completion_length} new tokens, {args.steps} steps\n"
    )
    print(
        "| algorithm | step time (s) | vs GRPO | vs PACS | peak GPU memory (GiB) |\n|---|---:|---:|---:|---:|"
    )
    for r in results:
        grpo, pacs = (r["step_time_s"] / results[i]["step_time_s"] for i in (0, 1))
        print(
            f"| {r['algorithm']} | {r['step_time_s']:.3f} | {grpo:.2f}x | {pacs:.2f}x | {r['peak_memory_gib']:.2f} |"
        )
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "step_time.json"), "w") as f:
        json.dump({"device": device, "args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
