"""``pacsrl warmstart``: rebuild the demo's warm-started tiny checkpoint from a seed.

A tiny Qwen2 (``pacsrl.demo.tiny``) is trained by supervised fine-tuning on gym problems and their
solutions in the format the reward expects (``<answer>...</answer>``; loss on the completion only),
on CPU, for a fixed number of steps, optionally stopping as soon as a validation estimate of pass@1
(sampling at temperature 1) reaches ``--stop-at-pass1``. The goal is a model that is *partly* right, so
that RL has something to sharpen. Warm-start problems never include the demo's held-out pool
(``pacsrl.demo.held_out_pool``), from which the RL-train and eval splits are drawn.

The output directory gets the model and tokenizer (``save_pretrained``, safetensors), ``warmstart.json``
(how it was made and what it scores on the held-out eval split) and ``WARMSTART.md`` (the same, for
people).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from pacsrl.demo import DEMO_SEED, DEMO_TASK, DEMO_TASK_CONFIG, held_out_pool
from pacsrl.demo.evaluation import rng_restored

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)


def sample_pass_at_k(
    model: Any,
    tokenizer: Any,
    dataset: Dataset,
    reward_fn: Callable[..., list[float]],
    *,
    num_samples: int = 8,
    ks: tuple[int, ...] = (1, 8),
    seed: int = 0,
    max_new_tokens: int = 32,
) -> dict[str, float]:
    """Mean pass@k over ``dataset`` from ``num_samples`` completions per problem at temperature 1 with no
    truncation, scored by ``reward_fn``: ``pacsrl.eval.evaluate_model``, leaving the global torch RNG as it
    found it (the same evaluation as the demo's)."""
    from pacsrl.eval import evaluate_model

    with rng_restored():
        result = evaluate_model(
            model,
            tokenizer,
            dataset,
            n=num_samples,
            ks=ks,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            batch_size=256,
            seed=seed,
            reward_fn=reward_fn,
            name="warmstart",
            progress=False,
        )
    return {f"pass@{k}": result.metrics["all"][f"pass@{k}"] for k in ks}


def warmstart_data(
    task: str, config: dict, seed: int, sft_size: int, val_size: int
) -> tuple[Dataset, Dataset]:
    """The warm-start (SFT) and validation problems: one deduplicated stream from ``seed`` that excludes
    the demo's held-out pool, validation first."""
    from pacsrl.data.gym import make_gym_dataset

    pool = held_out_pool(task, config)
    data = make_gym_dataset(task, val_size + sft_size, seed, exclude=pool["question"], config=config)
    return data.select(range(val_size, len(data))), data.select(range(val_size))


def worked_solution(task: str, answer: str, metadata: str) -> str:
    """The completion the warm-start teaches: for ``chain_sum``, the running total one operation at a
    time ("7 - 3 + 9 = 4 + 9 = 13"), then the answer tag; for other tasks, the answer tag alone."""
    from pacsrl.data.gym import format_solution

    if task != "chain_sum":
        return format_solution(answer)
    terms = json.loads(metadata)["expression"].split()  # "7 - 3 + 9" -> ["7", "-", "3", "+", "9"]
    steps, total = [], int(terms[0])
    for i in range(1, len(terms), 2):
        total = total + int(terms[i + 1]) if terms[i] == "+" else total - int(terms[i + 1])
        steps.append(" ".join([str(total), *terms[i + 2 :]]))
    if str(total) != answer:
        raise ValueError(
            f"worked solution of {' '.join(terms)!r} gives {total}, but the gold answer is {answer!r}"
        )
    return f"{' '.join(terms)} = {' = '.join(steps)}\n{format_solution(answer)}"


def _encode(tokenizer, prompt: list[dict[str, str]], completion: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion + eos, and labels that mask the prompt (loss on the completion)."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pacsrl warmstart", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--output", required=True, type=Path, help="directory to write the checkpoint and its record to"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the warm-start data, initialisation and sampling"
    )
    p.add_argument("--steps", type=int, default=600, help="maximum number of optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="problems per optimizer step")
    p.add_argument(
        "--lr", type=float, default=3e-3, help="peak AdamW learning rate (linear warm-up, then constant)"
    )
    p.add_argument("--sft-size", type=int, default=2900, help="distinct warm-start problems (cycled through)")
    p.add_argument("--task", default=DEMO_TASK, help="reasoning-gym task")
    p.add_argument(
        "--task-config",
        type=json.loads,
        default=None,
        help=f"task options as JSON (default for the demo task: {json.dumps(DEMO_TASK_CONFIG)})",
    )
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument(
        "--stop-at-pass1",
        type=float,
        default=None,
        help="stop once validation pass@1 reaches this (e.g. 0.25)",
    )
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation estimates of pass@1")
    p.add_argument(
        "--val-size", type=int, default=32, help="validation problems (warm-start stream, not trained on)"
    )
    p.add_argument(
        "--eval-size", type=int, default=64, help="held-out demo eval problems to measure pass@k on"
    )
    p.add_argument(
        "--samples", type=int, default=8, help="completions per eval problem (pass@1 and pass@samples)"
    )
    p.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (the demo targets a shared laptop)"
    )
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from pacsrl.demo.tiny import build_model, build_tokenizer
    from pacsrl.eval.report import write_json
    from pacsrl.rewards.gym import make_gym_reward

    torch.set_num_threads(args.threads)
    started = time.time()
    task = args.task
    config = (
        args.task_config if args.task_config is not None else (DEMO_TASK_CONFIG if task == DEMO_TASK else {})
    )
    random.seed(args.seed)

    pool = held_out_pool(task, config)
    eval_split = pool.select(range(min(args.eval_size, len(pool))))
    sft_split, val_split = warmstart_data(task, config, args.seed, args.sft_size, args.val_size)
    logger.info(
        "%s %s: %d warm-start, %d validation problems; %d held out",
        task,
        config,
        len(sft_split),
        len(val_split),
        len(pool),
    )

    solutions = [worked_solution(task, a, m) for a, m in zip(sft_split["answer"], sft_split["metadata"])]
    tokenizer = build_tokenizer(
        tokenizer_text(p, s) for p, s in zip(sft_split["prompt"][:4096], solutions[:4096])
    )
    model = build_model(tokenizer, hidden_size=args.hidden_size, num_layers=args.layers, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %d parameters, vocabulary %d", n_params, len(tokenizer))

    examples = [_encode(tokenizer, p, s) for p, s in zip(sft_split["prompt"], solutions)]
    reward_fn = make_gym_reward(task)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    order = list(range(len(examples)))
    rng = random.Random(args.seed)
    rng.shuffle(order)
    torch.manual_seed(args.seed)
    model.train()
    history: list[dict[str, float]] = []
    steps_done = 0
    progress = tqdm(range(args.steps), desc="warmstart", unit="step")
    for step in progress:
        start = (step * args.batch_size) % len(order)
        batch = _collate(
            [examples[i] for i in (order + order)[start : start + args.batch_size]], tokenizer.pad_token_id
        )
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        steps_done = step + 1
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if steps_done % args.eval_every == 0 or steps_done == args.steps:
            val = sample_pass_at_k(
                model, tokenizer, val_split, reward_fn, num_samples=4, ks=(1,), seed=args.seed
            )
            history.append(
                {"step": steps_done, "loss": round(loss.item(), 4), "val_pass@1": round(val["pass@1"], 4)}
            )
            logger.info("step %d: loss %.3f, validation pass@1 %.3f", steps_done, loss.item(), val["pass@1"])
            if args.stop_at_pass1 is not None and val["pass@1"] >= args.stop_at_pass1:
                logger.info(
                    "validation pass@1 reached %.3f >= %.3f: stopping", val["pass@1"], args.stop_at_pass1
                )
                break
    progress.close()
    train_seconds = time.time() - started

    metrics = sample_pass_at_k(
        model,
        tokenizer,
        eval_split,
        reward_fn,
        num_samples=args.samples,
        ks=(1, args.samples),
        seed=args.seed,
    )
    logger.info("held-out eval (%d problems x %d samples, T=1): %s", len(eval_split), args.samples, metrics)

    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, safe_serialization=True)
    tokenizer.save_pretrained(args.output)
    record = {
        "command": "pacsrl warmstart " + shlex.join(argv),
        "seed": args.seed,
        "steps": steps_done,
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "stop_at_pass1": args.stop_at_pass1,
        "task": task,
        "task_config": config,
        "sft_problems": len(sft_split),
        "val_problems": len(val_split),
        "held_out_pool": {"seed": DEMO_SEED, "size": len(pool)},
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "architecture": {"hidden_size": args.hidden_size, "layers": args.layers},
        "eval": {"problems": len(eval_split), "samples": args.samples, "temperature": 1.0, **metrics},
        "history": history,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - started, 1),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    write_json(args.output / "warmstart.json", record)
    (args.output / "WARMSTART.md").write_text(_markdown(record))
    logger.info("wrote %s in %.0f s", args.output, record["wall_seconds"])
    return 0


def tokenizer_text(prompt: list[dict[str, str]], completion: str) -> str:
    """A prompt and its completion rendered as the chat template will show them (tokenizer corpus)."""
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in prompt)
    return f"{body}<|im_start|>assistant\n{completion}<|im_end|>\n"


def _markdown(r: dict[str, Any]) -> str:
    e = r["eval"]
    k = e["samples"]
    stop = "" if r["stop_at_pass1"] is None else f", stop at validation pass@1 >= {r['stop_at_pass1']}"
    return f"""# Demo warm-start checkpoint

A {r["parameters"]:,}-parameter Qwen2 ({r["architecture"]["layers"]} layers, hidden {r["architecture"]["hidden_size"]},
vocabulary {r["vocab_size"]}), trained from scratch by supervised fine-tuning on reasoning-gym
`{r["task"]}` problems ({json.dumps(r["task_config"])}) with solutions `<answer>...</answer>`
(loss on the completion only), so that it is partly right and RL has something to sharpen.

Rebuild it with:

    {r["command"]}

| | |
|---|---|
| seed | {r["seed"]} |
| optimizer steps | {r["steps"]} (max {r["max_steps"]}{stop}) |
| batch size, lr | {r["batch_size"]}, {r["lr"]} |
| warm-start problems | {r["sft_problems"]} distinct (+{r["val_problems"]} validation) |
| held-out pool (never trained on) | {r["held_out_pool"]["size"]} problems, seed {r["held_out_pool"]["seed"]} |
| held-out eval | {e["problems"]} problems x {k} samples, temperature 1.0 |
| **pass@1 / pass@{k}** | **{e["pass@1"]:.3f} / {e[f"pass@{k}"]:.3f}** |
| wall time | {r["wall_seconds"]:.0f} s on {r["threads"]} CPU threads (torch {r["torch"]}) |

Validation history (pass@1 from 4 samples per problem):

| step | loss | val pass@1 |
|---|---|---|
""" + "".join(f"| {h['step']} | {h['loss']} | {h['val_pass@1']} |\n" for h in r["history"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
