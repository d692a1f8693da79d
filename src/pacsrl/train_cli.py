"""``pacsrl train``: train a model with PACS (or GRPO, RLOO, PPO) from a YAML recipe plus command-line overrides.

    pacsrl train --config recipes/tiny-demo-cpu.yaml      # the shipped tiny model on a CPU, no GPU needed
    pacsrl train --config recipes/qwen2.5-0.5b-lora-gsm8k.yaml [--field value ...]
    pacsrl train --config recipe.yaml --algorithm grpo      # same data, rewards and logging, TRL's GRPOTrainer
    pacsrl train --config recipe.yaml --algorithm rloo      # TRL's RLOOTrainer
    pacsrl train --config recipe.yaml --algorithm ppo       # pacsrl's PPOTrainer (a critic, GAE)

Arguments are parsed the TRL way (``TrlParser``): the YAML sets the defaults of three dataclasses
(``TrainArguments`` below, the algorithm's config (``pacsrl.algorithms``), and TRL's ``ModelConfig``) and any
``--field value`` on the command line overrides them. ``--help`` lists the data, reward and PACS fields and
the common training ones; ``--help-all`` also every other field of TRL's GRPOConfig and ModelConfig.
Launch it under ``accelerate launch`` for several processes, DeepSpeed or FSDP, as any TRL script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field

import yaml

from pacsrl.algorithms import ALGORITHMS

logger = logging.getLogger(__name__)


@dataclass
class TrainArguments:
    """Data, rewards and algorithm of a ``pacsrl train`` run."""

    algorithm: str = field(
        default="pacs",
        metadata={
            "help": "'pacs' (PACSTrainer), or a baseline on the same data, rewards and logging: 'grpo' (TRL's "
            "GRPOTrainer), 'rloo' (TRL's RLOOTrainer, beta=0 by default) or 'ppo' (pacsrl's PPOTrainer). A "
            "recipe's fields of another algorithm are ignored with a notice.",
            "choices": list(ALGORITHMS),
        },
    )
    train_dataset: str = field(
        default="deepscaler",
        metadata={
            "help": "Training data: a preparer name (deepscaler, math500, amc23, aime24, aime25, gsm8k; "
            "loaded from the Hub), NAME=FILE (the source's own file, offline), a prepared parquet/jsonl "
            "(`pacsrl prepare`), or gym:TASK (a reasoning-gym task generated on the fly)."
        },
    )
    train_split: str | None = field(
        default=None, metadata={"help": "Split of a hub dataset (preparer default)."}
    )
    train_limit: int | None = field(
        default=None, metadata={"help": "Use only the first N training problems."}
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Optional evaluation data, same forms as train_dataset, comma-separated for several "
            "(e.g. 'math500,aime24': metrics per dataset); evaluated every eval_steps with TRL's evaluation "
            "loop (mean reward = pass@1 over num_generations_eval samples, and the PACS loss). For gym:TASK "
            "training data, 'heldout' uses the task's held-out problems."
        },
    )
    eval_limit: int | None = field(
        default=None, metadata={"help": "Use only the first N evaluation problems."}
    )
    reward: str = field(
        default="auto",
        metadata={
            "help": "Reward function: 'auto' (per row, by its source: a reasoning-gym row, from gym:TASK or "
            "a file `pacsrl prepare gym:TASK` wrote, is scored by its task's own scorer, any other row by "
            "math-verify), 'math' (math-verify on the last \\boxed{}) or 'gym' (the gym:TASK scorer).",
            "choices": ["auto", "math", "gym"],
        },
    )
    gym_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "gym:TASK: task options, a mapping in YAML (gym_config: {min_terms: 3, max_terms: 3}) or "
            "JSON on the command line (--gym_config '{\"min_terms\": 3}'); default: the task's defaults."
        },
    )
    gym_size: int = field(
        default=2000, metadata={"help": "gym:TASK: number of training problems to generate."}
    )
    gym_eval_size: int = field(
        default=200, metadata={"help": "gym:TASK: held-out problems (never in training)."}
    )
    gym_seed: int = field(default=0, metadata={"help": "gym:TASK: seed of the problem generator."})
    verifier_timeout: float = field(default=5.0, metadata={"help": "Seconds allowed per math verification."})

    def __post_init__(self) -> None:
        from pacsrl.cli import UsageError

        if isinstance(self.gym_config, str):
            try:
                self.gym_config = json.loads(self.gym_config)
            except json.JSONDecodeError as err:
                raise UsageError(
                    f"gym_config {self.gym_config!r} is not valid JSON ({err.msg}); e.g. "
                    "--gym_config '{\"min_terms\": 3}'"
                ) from None
        if self.gym_config is not None and not isinstance(self.gym_config, dict):
            raise UsageError(f"gym_config must be a mapping of task options, got {self.gym_config!r}")
        if self.gym_config and not self.train_dataset.startswith("gym:"):
            raise UsageError(f"gym_config applies to train_dataset=gym:TASK, not {self.train_dataset!r}")


USAGE = "pacsrl train --config RECIPE.yaml [--field value ...]"

# The TRL / transformers fields most recipes set, shown by --help after the data and PACS fields.
COMMON_FIELDS = (
    "model_name_or_path",
    "output_dir",
    "max_steps",
    "num_train_epochs",
    "learning_rate",
    "num_generations",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "max_completion_length",
    "temperature",
    "use_cpu",
    "bf16",
    "dtype",
    "use_peft",
    "use_vllm",
    "logging_steps",
    "save_steps",
    "report_to",
    "resume_from_checkpoint",
    "seed",
)


class _Parser:
    """Builds TRL's parser with errors as :class:`~pacsrl.cli.UsageError` (one line, no usage dump)."""

    @staticmethod
    def make(dataclass_types):
        from trl import TrlParser

        from pacsrl.cli import UsageError

        class Parser(TrlParser):
            def error(self, message):
                raise UsageError(f"{message} (pacsrl train --help lists the fields)")

        return Parser(dataclass_types, prog="pacsrl train", usage=USAGE, add_help=False)


def _pre_scan(argv: list[str]) -> tuple[str | None, str]:
    """The config path and the algorithm, from the command line or the YAML, before the dataclasses are chosen."""
    from pacsrl.cli import UsageError

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--algorithm")
    known, _ = pre.parse_known_args(argv)
    algorithm = known.algorithm
    if known.config is not None:
        try:
            with open(known.config) as f:
                recipe = yaml.safe_load(f)
        except OSError as err:
            raise UsageError(
                f"--config {known.config}: {err.strerror} (pass a YAML recipe, e.g. "
                "recipes/tiny-demo-cpu.yaml)"
            ) from None
        except yaml.YAMLError as err:
            raise UsageError(
                f"--config {known.config} is not valid YAML: {str(err).splitlines()[0]}"
            ) from None
        if not isinstance(recipe, dict):
            raise UsageError(
                f"--config {known.config}: expected a YAML mapping of field: value, got "
                f"{type(recipe).__name__}"
            )
        algorithm = algorithm or recipe.get("algorithm")
    algorithm = algorithm or "pacs"
    if algorithm not in ALGORITHMS:
        raise UsageError(f"--algorithm {algorithm!r} is not one of {', '.join(map(repr, ALGORITHMS))}")
    return known.config, algorithm


def _unknown(strings: list[str], names: list[str], where: str) -> str:
    from pacsrl.cli import did_you_mean

    fields = [s[2:].split("=")[0] for s in strings if s.startswith("--")] or strings
    return "; ".join(f"unknown field {f!r}{where}{did_you_mean(f, names)}" for f in fields)


def parse_train_args(argv: list[str]):
    """(TrainArguments, the algorithm's config, ModelConfig) from ``argv`` (YAML via --config, then overrides).

    Raises:
        pacsrl.cli.UsageError: on an unknown field (with did-you-mean), a bad value, or settings the
            config classes refuse (their one-line message).
    """
    from trl import ModelConfig

    from pacsrl.algorithms import config_class, config_fields
    from pacsrl.cli import UsageError

    config_path, algorithm = _pre_scan(argv)
    config_cls = config_class(algorithm)
    parser = _Parser.make((TrainArguments, config_cls, ModelConfig))
    others = set().union(*(config_fields(a) for a in ALGORITHMS if a != algorithm))
    names = [a.dest for a in parser._actions] + sorted(others)
    try:
        with warnings.catch_warnings():  # transformers' deprecation notices about fields the user did not set
            warnings.simplefilter("ignore", FutureWarning)
            *parsed, from_yaml, from_cli = parser.parse_args_and_config(
                argv, return_remaining_strings=True, separate_remaining_strings=True
            )
    except ValueError as err:  # refused by a config's __post_init__
        raise UsageError(_refusal(err)) from err
    if from_cli:
        raise UsageError(_unknown(from_cli, names, " on the command line"))
    # a recipe may hold the fields of another algorithm (one recipe for a PACS-vs-baselines comparison): those are
    # ignored with a notice; a field of no algorithm is a mistake
    ignored = [s[2:] for s in from_yaml if s.startswith("--")]
    unknown = [f"--{n}" for n in ignored if n not in others]
    if unknown:
        raise UsageError(_unknown(unknown, names, f" in {config_path}"))
    if ignored:
        logger.warning(
            "--algorithm %s ignores the recipe's fields of other algorithms: %s",
            algorithm,
            ", ".join(sorted(ignored)),
        )
    train_args, config, model_args = parsed
    train_args.algorithm = algorithm
    return train_args, config, model_args


def _refusal(err: ValueError) -> str:
    """A config's refusal as one or two lines; transformers' bf16-without-GPU check gets the fix spelled out."""
    text = str(err).strip()
    if "bf16" in text and "use_cpu" in text:
        return (
            "bf16 needs a GPU (or an Intel XPU/NPU) and none is visible: set `use_cpu: true` in the recipe "
            "(or --use_cpu true) to train on the CPU, or `bf16: false` for fp32 on this device"
        )
    lines = [line for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2]) if len(lines) <= 2 else f"{lines[0]} {lines[1]} ..."


def format_help(everything: bool = False, algorithm: str = "pacs") -> str:
    """``--help``: the description, usage, --config, the data fields, ``algorithm``'s own fields (those TRL's
    GRPOConfig lacks; PACS's by default) and the common TRL fields; with ``everything`` (``--help-all``) also
    every other algorithm's own fields and every other field of TRL's GRPOConfig and ModelConfig."""
    from trl import GRPOConfig, ModelConfig

    from pacsrl.algorithms import config_class

    actions: dict[str, list[argparse.Action]] = {}
    for name in ALGORITHMS:  # one parser each: two configs may share a field name
        for action in _Parser.make((TrainArguments, config_class(name), ModelConfig))._actions:
            if action.dest not in actions or name == algorithm:
                actions.setdefault(action.dest, [])
                if not any(a.option_strings == action.option_strings for a in actions[action.dest]):
                    actions[action.dest].append(action)
    grpo = {f.name for f in dataclasses.fields(GRPOConfig)}
    model = [f.name for f in dataclasses.fields(ModelConfig)]

    def own(name: str) -> list[str]:
        return [f.name for f in dataclasses.fields(config_class(name)) if f.name not in grpo]

    shown = [algorithm] + ([a for a in ALGORITHMS if a != algorithm] if everything else [])
    groups = [("data and rewards", [f.name for f in dataclasses.fields(TrainArguments)])]
    groups += [
        (f"{name} fields (--algorithm {name}; other algorithms ignore them)", own(name))
        for name in shown
        if own(name)
    ]
    groups.append(("common training fields (TRL's GRPOConfig and ModelConfig)", list(COMMON_FIELDS)))
    if everything:
        groups += [
            (
                "every other field of TRL's GRPOConfig (and transformers' TrainingArguments)",
                sorted(grpo - set(COMMON_FIELDS)),
            ),
            ("every other field of TRL's ModelConfig", [n for n in model if n not in COMMON_FIELDS]),
        ]
    view = argparse.ArgumentParser(prog="pacsrl train", usage=USAGE, add_help=False)
    recipe = view.add_argument_group("recipe and help")
    recipe.add_argument(
        "--config",
        metavar="FILE",
        help="YAML recipe: field: value lines, as in recipes/*.yaml; "
        "fields given on the command line override it",
    )
    recipe.add_argument(
        "-h", "--help", action="store_true", help="this help (with --algorithm NAME: its fields)"
    )
    recipe.add_argument(
        "--help-all",
        action="store_true",
        help="also every other field: TRL's GRPOConfig and ModelConfig, and the other algorithms' own fields",
    )
    done: set[str] = set()
    for title, dests in groups:
        group = view.add_argument_group(title)
        for dest in dests:
            if dest not in done:
                done.add(dest)
                group._group_actions.extend(actions.get(dest, []))
    text = __doc__.strip() + "\n\n" + view.format_help()
    if not everything:
        text += "\nEvery other field (TRL's GRPOConfig, ModelConfig; other algorithms): pacsrl train --help-all.\n"
    return text


def _load_data(train_args: TrainArguments):
    from pacsrl.data import prepare_dataset, resolve_dataset

    spec = train_args.train_dataset
    if spec.startswith("gym:"):
        from pacsrl.data.gym import make_gym_splits

        task = spec.split(":", 1)[1]
        train, held_out = make_gym_splits(
            task,
            train_args.gym_size,
            train_args.gym_eval_size,
            train_args.gym_seed,
            config=train_args.gym_config,
        )
        eval_ds = held_out if train_args.eval_dataset in (None, "heldout") else None
    else:
        if train_args.train_split is not None:
            name, _, path = spec.partition("=")
            train = prepare_dataset(
                name, path or None, split=train_args.train_split, limit=train_args.train_limit
            )
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
    from pacsrl.cli import UsageError

    kind, spec = train_args.reward, train_args.train_dataset
    if kind == "gym" or (kind == "auto" and spec.startswith("gym:")):
        if not spec.startswith("gym:"):
            raise UsageError(
                f"reward='gym' needs train_dataset=gym:TASK, got {spec!r}; use reward: auto to score a "
                "prepared reasoning-gym file by its rows' tasks"
            )
        from pacsrl.rewards.gym import make_gym_reward

        reward = make_gym_reward(spec.split(":", 1)[1])
        logger.info("reward: %s's own scorer (reasoning-gym)", spec)
    elif kind == "auto":
        from pacsrl.rewards.auto import make_auto_reward

        reward = make_auto_reward(timeout=train_args.verifier_timeout)
        logger.info(
            "reward: auto, per row by its source: reasoning-gym rows by their task's scorer, others by "
            "math-verify"
        )
    else:
        from pacsrl.rewards import make_math_reward

        reward = make_math_reward(timeout=train_args.verifier_timeout)
        logger.info("reward: math-verify on the last \\boxed{} of each completion")
    return [GroupSignalWatch(reward)]


class GroupSignalWatch:
    """A reward function that scores with ``reward`` and watches the learning signal of each rollout.

    A group (the completions of one prompt) whose answers are all right or all wrong carries no gradient,
    for PACS as for GRPO; a rollout without a single mixed group teaches nothing. For each call (one
    rollout, on each process) it logs ``rollout/no_mixed_group`` (1.0 when no group of the call has both a
    higher and a lower reward; TRL averages it over the logging window: the fraction of such rollouts),
    and warns once when it happens. Groups are told apart by prompt.
    """

    def __init__(self, reward) -> None:
        self.reward = reward
        self.__name__ = getattr(reward, "__name__", type(reward).__name__)
        self.warned = False

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        scores = self.reward(prompts=prompts, completions=completions, **columns)
        groups: dict[str, set] = {}
        for prompt, score in zip(prompts, scores):
            groups.setdefault(json.dumps(prompt, sort_keys=True, default=str), set()).add(score)
        none_mixed = bool(groups) and all(len(values) == 1 for values in groups.values())
        log_metric = columns.get("log_metric")
        if callable(log_metric):
            log_metric("rollout/no_mixed_group", float(none_mixed))
        if none_mixed and not self.warned:
            self.warned = True
            logger.warning(
                "a whole rollout had no group with both right and wrong answers (all rewards %s): nothing can be "
                "learned from it; if this goes on (metric rollout/no_mixed_group), make the task easier (gym_config) "
                "or start from a stronger model",
                sorted({s for v in groups.values() for s in v}),
            )
        return scores


def _distributed_type(accelerator) -> str:
    kind = str(accelerator.distributed_type).split(".")[-1]
    return "single process" if kind == "NO" else kind


def main(argv: list[str] | None = None) -> int:
    from pacsrl.cli import UsageError, check_model, remove_if_empty

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help-all" in argv or "-h" in argv or "--help" in argv:
        print(format_help(everything="--help-all" in argv, algorithm=_pre_scan(argv)[1]))
        return 0
    if "--config" not in argv and not any(a.startswith("--model_name_or_path") for a in argv):
        raise UsageError(
            "no recipe: pass --config RECIPE.yaml (e.g. recipes/tiny-demo-cpu.yaml runs on a CPU "
            "without a GPU), or the fields on the command line; pacsrl train --help lists them"
        )
    train_args, config, model_args = parse_train_args(argv)
    if model_args.model_name_or_path is None:
        raise UsageError(
            "set model_name_or_path (a local checkpoint folder or a Hub id) in the recipe or with "
            "--model_name_or_path"
        )
    check_model(model_args.model_name_or_path, "model_name_or_path")
    if (
        config.eval_strategy != "no"
        and train_args.eval_dataset is None
        and not train_args.train_dataset.startswith("gym:")
    ):
        raise UsageError(
            f"eval_strategy={config.eval_strategy} but no eval_dataset: set eval_dataset (e.g. math500) "
            "or eval_strategy: 'no'"
        )
    reward_funcs = _reward_funcs(train_args)

    from trl import get_peft_config

    from pacsrl.algorithms import trainer_class

    init_kwargs = dict(config.model_init_kwargs or {})
    if model_args.dtype not in (None, "auto"):
        init_kwargs.setdefault("dtype", model_args.dtype)
    if model_args.attn_implementation is not None:
        init_kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    config.model_init_kwargs = init_kwargs

    try:
        train_ds, eval_ds = _load_data(train_args)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err).strip().splitlines()[0]) from err
    if eval_ds is None and config.eval_strategy != "no":
        raise UsageError("eval_strategy is set but no eval_dataset was given")
    trainer_cls = trainer_class(train_args.algorithm)
    logger.info(
        "training %s with %s on %d prompts (%s)",
        model_args.model_name_or_path,
        trainer_cls.__name__,
        len(train_ds),
        train_args.train_dataset,
    )
    existed = os.path.exists(config.output_dir)
    try:
        try:
            trainer = trainer_cls(
                model=model_args.model_name_or_path,
                reward_funcs=reward_funcs,
                args=config,
                train_dataset=train_ds,
                eval_dataset=eval_ds,
                peft_config=get_peft_config(model_args),
            )
        except OSError as err:  # the model or its tokenizer could not be loaded
            first = (str(err).strip() or type(err).__name__).splitlines()[0]
            raise UsageError(
                f"cannot load model_name_or_path {model_args.model_name_or_path}: {first}"
            ) from err
        if trainer.accelerator.is_main_process:
            accelerator = trainer.accelerator
            logger.info(
                "%d process(es), %s, on %s",
                accelerator.num_processes,
                _distributed_type(accelerator),
                accelerator.device.type,
            )
        resume = config.resume_from_checkpoint
        if resume in ("true", "True", "last"):
            from transformers.trainer_utils import get_last_checkpoint

            resume = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
            if resume is None:
                raise UsageError(
                    f"resume_from_checkpoint={config.resume_from_checkpoint}: no checkpoint in "
                    f"{config.output_dir} yet; drop the option to start a new run"
                )
        trainer.train(resume_from_checkpoint=resume)
    except BaseException:  # a failed or interrupted run leaves no empty output folder behind
        remove_if_empty(config.output_dir, existed)
        raise
    trainer.save_model(config.output_dir)
    if trainer.accelerator.is_main_process:
        logger.info("saved the trained model to %s", os.path.abspath(config.output_dir))
    return 0


if __name__ == "__main__":
    from pacsrl.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
