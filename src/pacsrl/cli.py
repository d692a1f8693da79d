"""The ``pacsrl`` command line: a thin dispatcher over subcommands.

Each subcommand lives next to the code it drives and exposes ``main(argv: list[str]) -> int``; it is
imported only when called, so ``pacsrl --help`` stays fast and a missing optional dependency of one
command never breaks another. Only this module configures logging.

A user's mistake is raised as :class:`UsageError` (or reported by an :class:`ArgumentParser`) and printed
as one or two lines, ``pacsrl <command>: error: ...``, with exit status 2; Ctrl-C exits with 130. The
traceback is shown only with ``pacsrl --debug <command> ...`` or ``PACSRL_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

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


class UsageError(Exception):
    """A mistake in a command's arguments or inputs; its message says what is wrong and how to fix it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the choices closest to ``word``, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(dict.fromkeys(choices)), n=3, cutoff=0.75)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument raises :class:`UsageError` (one line, with did-you-mean for an
    unknown option) instead of printing the whole usage."""

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            options = [o for action in self._actions for o in action.option_strings]
            flags = [w for w in unknown.group(1).split() if w.startswith("-")] or unknown.group(1).split()
            message = "; ".join(f"unknown option {w}{did_you_mean(w.split('=')[0], options)}" for w in flags)
        raise UsageError(f"{message} ({self.prog} --help lists the options)")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model(name: str, option: str) -> None:
    """Refuse, before anything is loaded, a model argument that is neither a checkpoint folder nor a
    possible Hugging Face Hub id (``org/name``) that is cached or, online, exists on the Hub."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"{option} {name}: the folder has no config.json, so it is not a model checkpoint "
                "(pass the folder save_pretrained wrote, e.g. a training run's output_dir)"
            )
        return
    if path.exists():
        raise UsageError(
            f"{option} {name}: is a file; expected a checkpoint folder or a Hub id such as Qwen/Qwen2.5-0.5B"
        )
    if not _HUB_ID.match(name) or name.startswith((".", "~")):
        raise UsageError(
            f"{option} {name}: no such folder (a checkpoint folder or a Hub id such as Qwen/Qwen2.5-0.5B)"
        )
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    where = f"{option} {name}: no such folder here, and no Hub model of that name"
    if HF_HUB_OFFLINE:
        raise UsageError(
            f"{where} in the local cache (HF_HUB_OFFLINE is set); check the path or download it first"
        )
    from huggingface_hub import repo_exists

    try:
        exists = repo_exists(name)
    except Exception:  # noqa: BLE001 - no network, rate limits, ...: the loader will try and report
        return
    if not exists:
        raise UsageError(f"{where} on the Hub; check the path (a local folder must exist) or the Hub id")


def remove_if_empty(path: str | Path, existed: bool) -> None:
    """Remove ``path`` if this run created it (``existed`` is False) and left nothing but empty folders in it,
    so a failed run leaves no empty output folder behind."""
    path = Path(path)
    if existed or not path.is_dir() or any(p.is_file() or p.is_symlink() for p in path.rglob("*")):
        return
    for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        sub.rmdir()
    path.rmdir()


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
    lines += [
        "",
        "options:",
        "  -h, --help     show this message and exit",
        "  --version      print the version",
        "  --debug        show the traceback of an error (also PACSRL_DEBUG=1)",
    ]
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
    debug = os.environ.get("PACSRL_DEBUG", "") not in ("", "0")
    if argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"pacsrl {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"pacsrl: unknown command {name!r}{did_you_mean(name, COMMANDS)}; expected one of: "
            f"{', '.join(COMMANDS)} (pacsrl --help)",
            file=sys.stderr,
        )
        return 2
    setup_logging()
    # Idle OpenMP threads sleep instead of spinning: on a busy machine a spinning torch thread takes the core
    # that another torch thread waits for, and CPU steps slow down many times more than the load explains.
    # Set before torch is imported (the OpenMP runtime reads it once); a value the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except UsageError as err:
        if debug:
            raise
        print(f"pacsrl {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"pacsrl {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
