"""``pacsrl demo``: PACS vs GRPO from the shipped warm-started tiny model, offline, on a laptop CPU, in minutes.

    pacsrl demo                       # minutes on an idle 2-core machine (README): base, PACS, GRPO, a report folder
    pacsrl demo --quick               # a smoke test of the whole pipeline (far slower on a busy machine: README)
    pacsrl demo --algorithms pacs,grpo,rloo,ppo    # the baselines too: TRL's RLOO, pacsrl's PPO (with a critic)
    pacsrl demo --algorithms pacs --steps 100 --lr 5e-4 --output runs/my-demo
    pacsrl demo --model ./my-chat-checkpoint --task chain_sum

The shipped checkpoint is evaluated on held-out problems (pass@k), trained with PACS and with TRL's GRPO on the
same prompts with the same seed and sample budget, and evaluated again; the comparison table is printed at the
end and written, with metrics.json and the plots, to the report folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from pacsrl.demo.config import ALGORITHMS, DemoConfig

logger = logging.getLogger(__name__)

# command-line flag -> DemoConfig field (flags are shorter than field names where the field name is long)
_FLAGS: dict[str, str] = {
    "--model": "model",
    "--task": "task",
    "--task-config": "task_config",
    "--algorithms": "algorithms",
    "--steps": "steps",
    "--prompts-per-step": "prompts_per_step",
    "--num-generations": "num_generations",
    "--updates-per-rollout": "updates_per_rollout",
    "--lr": "learning_rate",
    "--beta": "pacs_beta",
    "--weight-mode": "pacs_weight_mode",
    "--grpo-loss-type": "grpo_loss_type",
    "--critic-lr": "critic_learning_rate",
    "--temperature": "temperature",
    "--max-completion-length": "max_completion_length",
    "--train-size": "train_size",
    "--eval-size": "eval_size",
    "--eval-samples": "eval_samples",
    "--eval-temperature": "eval_temperature",
    "--eval-top-p": "eval_top_p",
    "--curve-every": "curve_every",
    "--curve-size": "curve_size",
    "--curve-samples": "curve_samples",
    "--seed": "seed",
    "--threads": "threads",
}


def _algorithms(text: str) -> tuple[str, ...]:
    names = tuple(a.strip().lower() for a in text.split(",") if a.strip())
    bad = [a for a in names if a not in ALGORITHMS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a comma-separated list of {', '.join(ALGORITHMS)}"
        )
    return names


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object such as '{{\"min_terms\": 2}}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser; every option defaults to None so that --quick's sizes apply unless a flag overrides them."""
    parser = argparse.ArgumentParser(
        prog="pacsrl demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test size: 6 steps, 32 eval problems",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="report folder (default: runs/demo-<timestamp>)"
    )
    parser.add_argument(
        "--save-models", action="store_true", help="also save each trained model in the report"
    )
    fields = {f.name: f for f in dataclasses.fields(DemoConfig)}
    defaults = DemoConfig()
    for flag, name in _FLAGS.items():
        f = fields[name]
        default = getattr(defaults, name)
        kwargs: dict = {"default": None, "dest": name}
        if name == "algorithms":
            kwargs.update(type=_algorithms, metavar="LIST")
            shown = ",".join(default)
        elif name == "task_config":
            kwargs.update(type=_json_object, metavar="JSON")
            shown = None
        elif name == "model":
            kwargs.update(metavar="PATH")
            shown = None
        else:
            kwargs["type"] = type(default)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            shown = default
        help_text = f.metadata["help"] + ("" if shown is None else f" (default: {shown})")
        parser.add_argument(flag, help=help_text.replace("%", "%%"), **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The ``DemoConfig`` of parsed arguments: --quick's sizes, then every flag that was given."""
    given = {name: getattr(args, name) for name in _FLAGS.values() if getattr(args, name) is not None}
    if args.save_models:
        given["save_models"] = True
    return DemoConfig.quick(**given) if args.quick else DemoConfig(**given)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))

    from pacsrl.demo.report import comparison_table
    from pacsrl.demo.run import default_output_dir, run_demo

    output = args.output or default_output_dir()
    try:
        report = run_demo(config, output)
    except (FileNotFoundError, ValueError) as err:
        print(f"pacsrl demo: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\npacsrl demo: interrupted; what finished is in {output}/metrics.json", file=sys.stderr)
        return 130
    print()
    print(comparison_table(report))
    print(
        f"Report: {Path(output).resolve()}/report.md (metrics.json, pass_at_k.png, curve_*.png) "
        f"in {report['wall_seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    from pacsrl.cli import setup_logging

    setup_logging()
    sys.exit(main())
