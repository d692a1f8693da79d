"""``pacsrl train``: train a model with PACS (or GRPO, RLOO, PPO) from a YAML recipe plus command-line overrides.

    pacsrl train --config recipes/qwen2.5-0.5b-lora-gsm8k.yaml [--field value ...]
    pacsrl train --config recipe.yaml --algorithm grpo      # same data, rewards and logging, TRL's GRPOTrainer
    pacsrl train --config recipe.yaml --algorithm rloo      # TRL's RLOOTrainer
    pacsrl train --config recipe.yaml --algorithm ppo       # pacsrl's PPOTrainer (a critic, GAE)

Arguments are parsed the TRL way (``TrlParser``): the YAML sets the defaults of three dataclasses
(``TrainArguments`` below, the algorithm's config (``pacsrl.algorithms``), and TRL's ``ModelConfig``) and any
``--field value`` on the command line overrides them. ``pacsrl train --help`` lists every field.
Launch it under ``accelerate launch`` for several processes, DeepSpeed or FSDP, as any TRL script.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field

import yaml

from pacsrl.algorithms import ALGORITHMS

logger = logging.getLogger(__name__)


@dataclass
class TrainArguments:
    """Data, rewards and algorithm of a ``pacsrl train`` run."""

    algorithm: str = field(
        default="pacs",
        metadata={"help": "'pacs' (PACSTrainer), or a baseline on the same data, rewards and logging: 'grpo' (TRL's "
                  "GRPOTrainer), 'rloo' (TRL's RLOOTrainer, beta=0 by default) or 'ppo' (pacsrl's PPOTrainer). A "
                  "recipe's fields of another algorithm are ignored with a notice.",
                  "choices": list(ALGORITHMS)},
    )
    train_dataset: str = field(
        default="deepscaler",
        metadata={"help": "Training data: a preparer name (deepscaler, math500, amc23, aime24, aime25, gsm8k; "
                  "loaded from the Hub), NAME=FILE (the source's own file, offline), a prepared parquet/jsonl "
                  "(`pacsrl prepare`), or gym:TASK (a reasoning-gym task generated on the fly)."},
    )
    train_split: str | None = field(default=None, metadata={"help": "Split of a hub dataset (preparer default)."})
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training problems."})
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Optional evaluation data, same forms as train_dataset, comma-separated for several "
                  "(e.g. 'math500,aime24': metrics per dataset); evaluated every eval_steps with TRL's evaluation "
                  "loop (mean reward = pass@1 over num_generations_eval samples, and the PACS loss). For gym:TASK "
                  "training data, 'heldout' uses the task's held-out problems."},
    )
    eval_limit: int | None = field(default=None, metadata={"help": "Use only the first N evaluation problems."})
    reward: str = field(
        default="auto",
        metadata={"help": "Reward function: 'math' (math-verify on the last \\boxed{}), 'gym' (the reasoning-gym "
                  "task's own scorer) or 'auto' (gym for gym:TASK data, math otherwise).",
                  "choices": ["auto", "math", "gym"]},
    )
    gym_size: int = field(default=2000, metadata={"help": "gym:TASK: number of training problems to generate."})
    gym_eval_size: int = field(default=200, metadata={"help": "gym:TASK: held-out problems (never in training)."})
    gym_seed: int = field(default=0, metadata={"help": "gym:TASK: seed of the problem generator."})
    verifier_timeout: float = field(default=5.0, metadata={"help": "Seconds allowed per math verification."})


def _pre_scan(argv: list[str]) -> str:
    """The algorithm, from the command line or the YAML, before the dataclasses are chosen."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--algorithm")
    known, _ = pre.parse_known_args(argv)
    algorithm = known.algorithm
    if algorithm is None and known.config:
        with open(known.config) as f:
            algorithm = (yaml.safe_load(f) or {}).get("algorithm")
    algorithm = algorithm or "pacs"
    if algorithm not in ALGORITHMS:
        raise SystemExit(f"pacsrl train: --algorithm {algorithm!r} is not one of {', '.join(map(repr, ALGORITHMS))}")
    return algorithm


def parse_train_args(argv: list[str]):
    """(TrainArguments, the algorithm's config, ModelConfig) from ``argv`` (YAML via --config, then overrides)."""
    from trl import ModelConfig, TrlParser

    from pacsrl.algorithms import config_class, config_fields

    algorithm = _pre_scan(argv)
    config_cls = config_class(algorithm)
    parser = TrlParser((TrainArguments, config_cls, ModelConfig), prog="pacsrl train",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    *parsed, from_yaml, from_cli = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    if from_cli:
        parser.error(f"unrecognized arguments: {' '.join(from_cli)}")
    # a recipe may hold the fields of another algorithm (one recipe for a PACS-vs-baselines comparison): those are
    # ignored with a notice; a field of no algorithm is a mistake
    others = set().union(*(config_fields(a) for a in ALGORITHMS if a != algorithm))
    names = [s[2:] for s in from_yaml if s.startswith("--")]
    unknown = [n for n in names if n not in others]
    if unknown:
        parser.error(f"unknown fields in the config file: {', '.join(unknown)}")
    if names:
        logger.warning("--algorithm %s ignores the recipe's fields of other algorithms: %s", algorithm, ", ".join(sorted(names)))
    train_args, config, model_args = parsed
    train_args.algorithm = algorithm
    return train_args, config, model_args


def _load_data(train_args: TrainArguments):
    from pacsrl.data import prepare_dataset, resolve_dataset

    spec = train_args.train_dataset
    if spec.startswith("gym:"):
        from pacsrl.data.gym import make_gym_splits

        task = spec.split(":", 1)[1]
        train, held_out = make_gym_splits(task, train_args.gym_size, train_args.gym_eval_size, train_args.gym_seed)
        eval_ds = held_out if train_args.eval_dataset in (None, "heldout") else None
    else:
        if train_args.train_split is not None:
            name, _, path = spec.partition("=")
            train = prepare_dataset(name, path or None, split=train_args.train_split, limit=train_args.train_limit)
        else:
            train = resolve_dataset(spec, limit=train_args.train_limit)
        eval_ds = None
    if train_args.eval_dataset not in (None, "heldout"):
        specs = [s.strip() for s in train_args.eval_dataset.split(",") if s.strip()]
        if len(specs) == 1:
            eval_ds = resolve_dataset(specs[0], limit=train_args.eval_limit)
        else:  # TRL evaluates a dict of datasets separately: metrics are prefixed with each name
            eval_ds = {_eval_name(s): resolve_dataset(s, limit=train_args.eval_limit) for s in specs}
    elif eval_ds is not None and train_args.eval_limit is not None:
        eval_ds = eval_ds.select(range(min(train_args.eval_limit, len(eval_ds))))
    return train, eval_ds


def _eval_name(spec: str) -> str:
    name = spec.split("=", 1)[0]
    return os.path.splitext(os.path.basename(name))[0]


def _reward_funcs(train_args: TrainArguments):
    kind = train_args.reward
    if kind == "auto":
        kind = "gym" if train_args.train_dataset.startswith("gym:") else "math"
    if kind == "gym":
        if not train_args.train_dataset.startswith("gym:"):
            raise SystemExit("pacsrl train: reward='gym' needs train_dataset=gym:TASK")
        from pacsrl.data.gym import make_gym_reward

        return [make_gym_reward(train_args.train_dataset.split(":", 1)[1])]
    from pacsrl.rewards import make_math_reward

    return [make_math_reward(timeout=train_args.verifier_timeout)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args, config, model_args = parse_train_args(argv)

    from trl import get_peft_config

    from pacsrl.algorithms import trainer_class

    if model_args.model_name_or_path is None:
        raise SystemExit("pacsrl train: set model_name_or_path (a hub id or a local folder) in the recipe or "
                         "with --model_name_or_path")
    init_kwargs = dict(config.model_init_kwargs or {})
    if model_args.dtype not in (None, "auto"):
        init_kwargs.setdefault("dtype", model_args.dtype)
    if model_args.attn_implementation is not None:
        init_kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    config.model_init_kwargs = init_kwargs

    train_ds, eval_ds = _load_data(train_args)
    if eval_ds is None and config.eval_strategy != "no":
        raise SystemExit("pacsrl train: eval_strategy is set but no eval_dataset was given")
    trainer_cls = trainer_class(train_args.algorithm)
    logger.info("training %s with %s on %d prompts (%s)", model_args.model_name_or_path, trainer_cls.__name__,
                len(train_ds), train_args.train_dataset)
    trainer = trainer_cls(
        model=model_args.model_name_or_path,
        reward_funcs=_reward_funcs(train_args),
        args=config,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        peft_config=get_peft_config(model_args),
    )
    if trainer.accelerator.is_main_process:
        accelerator = trainer.accelerator
        logger.info("%d process(es), %s, on %s", accelerator.num_processes,
                    str(accelerator.distributed_type).split(".")[-1], accelerator.device.type)
    resume = config.resume_from_checkpoint
    if resume in ("true", "True", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(config.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    if trainer.accelerator.is_main_process:
        logger.info("saved the trained model to %s", os.path.abspath(config.output_dir))
    return 0


if __name__ == "__main__":
    from pacsrl.cli import setup_logging

    setup_logging()
    sys.exit(main())
