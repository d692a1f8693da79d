"""GPU check: PACS with ``pacs_reference="fixed"`` under DeepSpeed ZeRO-3 or FSDP2, through the recipes' accelerate
configs, including a reset, a checkpoint and a resume.

    accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 1 bench/sharded_reference.py
    accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 1 bench/sharded_reference.py
    python bench/sharded_reference.py            # no sharding (CPU or one GPU): the same checks, as a baseline
    torchrun --nproc_per_node 1 bench/sharded_reference.py --zero3   # ZeRO-3 without accelerate (also on a CPU)

What it checks, on a fixed probe sequence (log-probs through the trainer's own forward, so independent of how the
reference's weights were copied):
1. right after each reset, pi_ref == pi_theta (max |log pi_ref - log pi_theta| is 0 up to kernel noise);
2. one optimizer step after a reset, they differ (the reference is a copy, not the policy);
3. a run resumed from the checkpoint saved at the reset step has the saved reference (same probe log-probs as the
   first run had then) and continues the reset counter.
Prints one JSON line ``{"check": ..., "ok": ...}`` and writes it to --output/sharded_reference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import build_tokenizer  # noqa: E402

from pacsrl import PACSConfig, PACSTrainer  # noqa: E402


def every_third(completions, **kwargs):
    """Mixed groups on every batch, so every step has a gradient."""
    return [float(i % 3 == 0) for i in range(len(completions))]


ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
         "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"}}


def build(tok, output_dir: str, max_steps: int, save: bool, zero3: bool) -> PACSTrainer:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    gpu = torch.cuda.is_available()
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"what is {i} + {i} ?"}]} for i in range(64)])
    cfg = PACSConfig(output_dir=output_dir, per_device_train_batch_size=8, num_generations=4,
                     max_completion_length=16, max_steps=max_steps, steps_per_generation=1, report_to=[],
                     logging_steps=1, save_strategy="steps" if save else "no", save_steps=2, learning_rate=1e-3,
                     bf16=gpu, use_cpu=not gpu, disable_tqdm=True, seed=0, pacs_reference="fixed",
                     pacs_ref_reset_steps=2, deepspeed=ZERO3 if zero3 else None)
    return PACSTrainer(model=model, reward_funcs=every_third, args=cfg, train_dataset=ds, processing_class=tok)


def probe_gap(trainer: PACSTrainer) -> tuple[float, list[float]]:
    """max |log pi_ref - log pi_theta| on a fixed sequence, and the reference's log-probs there."""
    device = trainer.accelerator.device
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]], device=device)
    ones = torch.ones_like(ids)
    inputs = dict(prompt_ids=ids[:, :4], prompt_mask=ones[:, :4], completion_ids=ids[:, 4:],
                  completion_mask=ones[:, 4:])
    with torch.no_grad():
        logps, _ = trainer._forward(trainer.model, inputs, compute_entropy=False)
        ref = trainer._reference_logps(inputs, logps, on_policy=False)
    return (ref - logps).abs().max().item(), ref.float().flatten().tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/bench-sharded-reference")
    parser.add_argument("--zero3", action="store_true", help="DeepSpeed ZeRO-3 through TrainingArguments.deepspeed")
    args = parser.parse_args()
    tok = build_tokenizer()
    run_dir = os.path.join(args.output, "run")
    shutil.rmtree(run_dir, ignore_errors=True)

    trainer = build(tok, run_dir, max_steps=4, save=True, zero3=args.zero3)
    kind = ("zero3" if trainer.is_deepspeed_enabled else "fsdp2" if trainer.is_fsdp_enabled else "none")
    events = {}
    real = trainer._reset_reference

    def spy():
        real()
        events[trainer.state.global_step] = probe_gap(trainer)

    class GapAtStep3(TrainerCallback):  # step 3: one update after the step-2 reset (no reset at 3)
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 3:
                events["one_step_later"] = probe_gap(trainer)[0]

    trainer._reset_reference = spy
    trainer.add_callback(GapAtStep3())
    trainer.train()
    one_step_later = events.pop("one_step_later")
    resumed = build(tok, os.path.join(args.output, "resumed"), max_steps=3, save=False, zero3=args.zero3)
    resumed.train(resume_from_checkpoint=os.path.join(run_dir, "checkpoint-2"))
    ref_after_resume = probe_gap(resumed)[1]
    ref_at_2 = events[2][1]
    resume_diff = max(abs(a - b) for a, b in zip(ref_after_resume, ref_at_2))
    ok = {
        "resets_at_2_and_4": sorted(events) == [2, 4] and trainer._pacs_ref_version == 2,
        "ref_equals_policy_after_reset": all(gap <= 1e-3 for gap, _ in events.values()),
        "ref_differs_one_step_later": one_step_later > 1e-3,
        "resume_restores_reference": resume_diff <= 1e-3,
        "resume_continues_counter": resumed._pacs_ref_version == 1 and resumed._pacs_ref_step == 2,
        "finite_losses": all(h["pacs/loss"] == h["pacs/loss"] for h in trainer.state.log_history if "pacs/loss" in h),
    }
    result = {"sharding": kind, "world": trainer.accelerator.num_processes,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "gap_after_reset": {k: v[0] for k, v in events.items()}, "gap_one_step_later": one_step_later,
              "resume_max_diff": resume_diff, "ok": ok, "all_ok": all(ok.values())}
    if trainer.accelerator.is_main_process:
        print(json.dumps(result))
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, f"sharded_reference_{kind}.json"), "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
