"""GPU check: PACS with ``pacs_reference="fixed"`` under DeepSpeed ZeRO-3 or FSDP2, through the recipes' accelerate
configs, including a reset, a checkpoint and a resume.

    accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 1 bench/sharded_reference.py
    accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 1 bench/sharded_reference.py
    python bench/sharded_reference.py            # no sharding (CPU or one GPU): the same checks, as a baseline
    torchrun --nproc_per_node 1 bench/sharded_reference.py --zero3   # ZeRO-3 without accelerate (also on a CPU)
    torchrun --nproc_per_node 2 bench/sharded_reference.py --fsdp2-cpu [--peft]   # FSDP2 on CPU processes

``--fsdp2-cpu`` runs FSDP2 on CPU processes (gloo) with the FSDP settings of ``recipes/accelerate/fsdp2.yaml``.
torch's FSDP2 runs on CPU, but accelerate only enables FSDP on accelerators, so this mode lifts that one check
(``tests/cpu_sharding.py``); everything else (accelerate's FSDP2 preparation, transformers' loading with
``cpu_ram_efficient_loading``, after which only the first process's weights count: accelerate broadcasts them
when it prepares the model, and the other processes may hold uninitialised or meta tensors before) is the real
code path. This mode sets the other processes' weights to NaN until then, the worst case that contract allows. ``--peft`` trains a LoRA adapter, so the reference is the frozen adapter copy.

What it checks, from the trainer's own ``pacs/implicit_reward/*`` metrics (the on-policy fast path is off, so
every step runs the reference's forward; no extra forward is added to the training loop):
1. on the first step (the reference is the initial policy) and right after the step-2 reset (step 3),
   pi_ref == pi_theta: every implicit reward is 0 (mean and std within --tol);
2. one optimizer step after a reset (steps 2 and 4) they differ (the reference is a copy, not the policy);
3. a run resumed from the checkpoint saved at step 3 (its reference is the policy of step 2, neither the initial
   model nor the policy of step 3) replays step 4 with the same implicit rewards as the first run, and continues
   the reset counter;
4. evaluation after every step (``eval_pacs/implicit_reward/*``, the reference's forward in eval mode): after
   steps 1 and 3 the policy has moved away from the reference, after the resets at steps 2 and 4 it has not.
Prints one JSON line (the checks under "ok") and writes it to
--output/sharded_reference_{none,zero3,fsdp2}[_peft].json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cpu_sharding import (
    ZERO3_TRAINER,
    allow_fsdp_on_cpu,
    exit_without_teardown,
    init_deepspeed_comm_on_cpu,
    recipe_fsdp_config,
)
from pacsrl import PACSConfig, PACSTrainer
from tiny import build_tokenizer


def every_third(completions, **kwargs):
    """Mixed groups on every batch, so every step has a gradient."""
    return [float(i % 3 == 0) for i in range(len(completions))]


def build(tok, output_dir: str, max_steps: int, save: bool, args) -> tuple[PACSTrainer, bool]:
    """The trainer, and whether this process's weights were NaN until accelerate prepared the model."""
    gpu = torch.cuda.is_available()
    cfg = PACSConfig(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=16,
        max_steps=max_steps,
        steps_per_generation=1,
        report_to=[],
        logging_steps=1,
        save_strategy="steps" if save else "no",
        save_steps=3,
        learning_rate=1e-3,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=8,
        bf16=gpu,
        use_cpu=not gpu,
        disable_tqdm=True,
        seed=0,
        pacs_reference="fixed",
        pacs_ref_reset_steps=2,
        pacs_on_policy_fast_path=False,
        deepspeed=ZERO3_TRAINER if args.zero3 else None,
        fsdp=bool(args.fsdp2_cpu),
        fsdp_config=recipe_fsdp_config() if args.fsdp2_cpu else None,
    )
    # saved and loaded from disk like a real model, through transformers' loading (its FSDP / ZeRO-3 paths)
    model_dir = os.path.join(args.output, "initial-model")
    state = PartialState()
    if args.zero3 and not gpu:
        init_deepspeed_comm_on_cpu()  # on GPUs accelerate does it
    if state.is_main_process and not os.path.exists(os.path.join(model_dir, "config.json")):  # new each run
        torch.manual_seed(0)
        config = Qwen2Config(
            vocab_size=len(tok),
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True,
        )
        Qwen2ForCausalLM(config).save_pretrained(model_dir)
    state.wait_for_everyone()
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    garbage = (
        args.fsdp2_cpu and cfg.fsdp_config.get("cpu_ram_efficient_loading") and not state.is_main_process
    )
    if garbage:
        # with cpu_ram_efficient_loading only the first process's weights count: accelerate broadcasts them when it
        # prepares the model (at train start), and the other processes may hold uninitialised memory until then.
        # NaN here makes a reference copied before that moment visible in the checks.
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(float("nan"))
    peft_config = None
    if args.peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
    ds = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"what is {i} + {i} ?"}]} for i in range(72)]
    )
    return PACSTrainer(
        model=model,
        reward_funcs=every_third,
        args=cfg,
        train_dataset=ds.select(range(64)),
        eval_dataset=ds.select(range(64, 72)),
        processing_class=tok,
        peft_config=peft_config,
    ), bool(garbage)


def sharded(module: torch.nn.Module | None) -> bool:
    """Whether the module's parameters are FSDP2 shards (DTensors) or ZeRO-3 partitions."""
    from torch.distributed.tensor import DTensor

    params = list(module.parameters()) if module is not None else []
    return bool(params) and all(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in params)


def record_resets(trainer: PACSTrainer) -> list[int]:
    """The optimizer steps at which the trainer resets its reference, filled in as it trains."""
    steps = []
    reference = trainer.fixed_reference
    real = reference.reset
    reference.reset = lambda: (real(), steps.append(trainer.state.global_step))
    return steps


def step_logs(trainer: PACSTrainer, prefix: str = "") -> dict[int, dict]:
    """The training (or, with prefix "eval_", evaluation) logs by optimizer step."""
    return {h["step"]: h for h in trainer.state.log_history if f"{prefix}pacs/implicit_reward/std" in h}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="outputs/bench-sharded-reference")
    parser.add_argument(
        "--zero3", action="store_true", help="DeepSpeed ZeRO-3 through TrainingArguments.deepspeed"
    )
    parser.add_argument(
        "--fsdp2-cpu",
        action="store_true",
        help="FSDP2 on CPU processes with the recipe's FSDP settings (see above)",
    )
    parser.add_argument(
        "--peft", action="store_true", help="train a LoRA adapter (the reference: a frozen copy)"
    )
    parser.add_argument("--tol", type=float, default=1e-3, help="|implicit reward| counted as 0")
    args = parser.parse_args()
    if args.fsdp2_cpu:
        allow_fsdp_on_cpu()
    tok = build_tokenizer()
    run_dir = os.path.join(args.output, "run")
    if int(os.environ.get("RANK", "0")) == 0:  # the others wait in build() before they read the initial model
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(os.path.join(args.output, "initial-model"), ignore_errors=True)

    trainer, nan_until_prepared = build(tok, run_dir, max_steps=4, save=True, args=args)
    kind = "zero3" if trainer.is_deepspeed_enabled else "fsdp2" if trainer.is_fsdp_enabled else "none"
    resets = record_resets(trainer)
    trainer.train()
    logs, eval_logs = step_logs(trainer), step_logs(trainer, "eval_")
    # checkpoint-3 holds a reference (the policy of step 2) that is neither the initial model nor the policy
    resumed, _ = build(tok, os.path.join(args.output, "resumed"), max_steps=4, save=False, args=args)
    resumed_resets = record_resets(resumed)
    resumed.train(resume_from_checkpoint=os.path.join(run_dir, "checkpoint-3"))
    resumed_logs = step_logs(resumed)

    def size(h: dict, prefix: str = "") -> float:  # how far beta * sum_t log(pi_theta / pi_ref) is from 0
        return abs(h[f"{prefix}pacs/implicit_reward/mean"]) + h[f"{prefix}pacs/implicit_reward/std"]

    ok = {
        "resets_at_2_and_4": resets == [2, 4] and trainer.fixed_reference.version == 2,
        "ref_equals_policy_after_reset": size(logs[1]) <= args.tol and size(logs[3]) <= args.tol,
        "ref_differs_one_step_later": size(logs[2]) > args.tol and size(logs[4]) > args.tol,
        # step 4 replayed (same data and sampling after the restored RNG): same implicit rewards as the first run,
        # which neither a reference copied from the policy (0) nor the initial model would give
        "resume_restores_reference": 4 in resumed_logs
        and abs(size(resumed_logs[4]) - size(logs[4])) <= args.tol * max(1.0, size(logs[4]))
        and size(resumed_logs[4]) > args.tol,
        # the counter saved at step 3 (1 reset) continues: the step-4 reset is the second
        "resume_continues_counter": resumed_resets == [4] and resumed.fixed_reference.version == 2,
        "eval_ref_differs_before_reset": all(size(eval_logs[k], "eval_") > args.tol for k in (1, 3)),
        "eval_ref_equals_policy_after_reset": all(size(eval_logs[k], "eval_") <= args.tol for k in (2, 4)),
        "finite_losses": all(
            math.isfinite(h["pacs/loss"]) for h in list(logs.values()) + list(resumed_logs.values())
        ),
    }
    result = {
        "sharding": kind,
        "peft": args.peft,
        "world": trainer.accelerator.num_processes,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        # per process: the weights were NaN until accelerate's preparation (so the reference copy had to
        # wait for it), and the policy's and the reference's parameters are shards
        "nan_until_prepared": gather_object([nan_until_prepared]),
        "policy_sharded": gather_object([sharded(trainer.model)]),
        "reference_sharded": gather_object([sharded(trainer.fixed_reference.model)]),
        "implicit_reward_size": {step: size(h) for step, h in logs.items()},
        "resumed_implicit_reward_size": {step: size(h) for step, h in resumed_logs.items()},
        "eval_implicit_reward_size": {step: size(h, "eval_") for step, h in eval_logs.items()},
        "ok": ok,
        "all_ok": all(ok.values()),
    }
    if trainer.accelerator.is_main_process:
        print(json.dumps(result))
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, f"sharded_reference_{kind}{'_peft' * args.peft}.json"), "w") as f:
            json.dump(result, f, indent=2)
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    exit_without_teardown(main())
