"""The ``pacsrl`` command line: a thin dispatcher over subcommands.

Each subcommand lives next to the code it drives and exposes ``main(argv: list[str]) -> int``; it is
imported only when called, so ``pacsrl --help`` stays fast and a missing optional dependency of one
command never breaks another. Only this module configures logging.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from pacsrl import __version__

# name -> (module implementing ``main(argv)``, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("pacsrl.data.cli", "prepare a benchmark or reasoning-gym dataset and write it to parquet"),
    "train": ("pacsrl.train_cli", "train a model with PACS (or GRPO) from a YAML recipe"),
    "eval": ("pacsrl.eval.cli", "evaluate pass@k of one or more models on the math benchmarks"),
    "warmstart": ("pacsrl.demo.warmstart", "rebuild the demo's tiny warm-started checkpoint from a seed"),
    "demo": ("pacsrl.demo.cli", "offline CPU demo: PACS vs GRPO on a tiny model, in minutes"),
    "objective": ("pacsrl.worked_example", "print the PACS loss and gradients on a worked example"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"pacsrl {__version__}: RLVR training of reasoning LLMs with PACS on Hugging Face TRL",
        "",
        "usage: pacsrl <command> [options]    (pacsrl <command> --help for a command's options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help     show this message and exit", "  --version      print the version"]
    return "\n".join(lines)


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("PACSRL_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"pacsrl {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pacsrl: unknown command {name!r}; expected one of: {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    setup_logging()
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
