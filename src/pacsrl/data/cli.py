"""``pacsrl prepare``: build a dataset in the record schema and write it to parquet (or jsonl).

    pacsrl prepare NAME [--path FILE] [--split S] [--limit N] --output out.parquet
    pacsrl prepare gym:TASK --size N [--seed S] [--eval-size M] [--config JSON] --output train.parquet

Prints a summary: rows, sources, and the gold answers math-verify cannot parse.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import datasets

from pacsrl.data.benchmarks import PREPARERS, prepare_dataset
from pacsrl.data.records import GYM_SOURCE_PREFIX, report_unparseable_gold

_OUTPUT_SUFFIXES = (".parquet", ".jsonl")
_MAX_SHOWN = 5  # unparseable gold answers quoted in the summary


class UsageError(ValueError):
    """Arguments that do not fit together."""


def build_parser() -> argparse.ArgumentParser:
    from pacsrl.cli import ArgumentParser

    parser = ArgumentParser(
        prog="pacsrl prepare",
        description="Prepare a benchmark or a reasoning-gym task as prompt/answer/source records and write "
        "them to a file. A benchmark question gets the paper's instruction (reason step by step, answer in "
        "\\boxed{}); a reasoning-gym question asks for the answer in <answer></answer>, which its task's own "
        "scorer checks (rows keep the task's name in `source` and its options in `gym_config`).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="datasets:\n"
        + "\n".join(f"  {name:<11} {p.hub_id} ({p.description})" for name, p in PREPARERS.items())
        + "\n  gym:TASK    a reasoning-gym task, e.g. gym:basic_arithmetic (needs --size)",
    )
    parser.add_argument("name", help=f"one of {', '.join(PREPARERS)}, or gym:TASK")
    parser.add_argument(
        "--output", "-o", metavar="FILE", required=True, help="file to write: .parquet (or .jsonl)"
    )
    source = parser.add_argument_group("benchmarks")
    source.add_argument(
        "--path",
        metavar="FILE",
        help="local parquet/jsonl/json file with the source's columns (default: the hub)",
    )
    source.add_argument(
        "--split", metavar="S", help="hub split (default: the dataset's usual one, e.g. test for math500)"
    )
    source.add_argument("--limit", metavar="N", type=int, help="keep only the first N rows")
    gym = parser.add_argument_group("reasoning-gym tasks")
    gym.add_argument("--size", metavar="N", type=int, help="number of training problems to generate")
    gym.add_argument(
        "--seed",
        metavar="S",
        type=int,
        help="generator seed (same seed, same problems; default 0, as train's gym_seed)",
    )
    gym.add_argument(
        "--eval-size",
        metavar="M",
        type=int,
        help="also write M held-out problems, disjoint from the training ones",
    )
    gym.add_argument(
        "--eval-output",
        metavar="FILE",
        help="file for the held-out problems (default: OUTPUT with an _eval suffix)",
    )
    gym.add_argument("--config", metavar="JSON", help="task options as JSON, e.g. '{\"min_terms\": 2}'")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 if any gold answer is unparseable"
    )
    return parser


def _check_output(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() not in _OUTPUT_SUFFIXES:
        raise UsageError(f"--output {path!r}: expected a file ending in {' or '.join(_OUTPUT_SUFFIXES)}")
    return out


def _write(ds: datasets.Dataset, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        ds.to_parquet(str(out))
    else:
        ds.to_json(str(out), lines=True, force_ascii=False)


def _summarize(ds: datasets.Dataset, out: Path, bad: list[tuple[int, str]]) -> None:
    sources = Counter(ds["source"]) if "source" in ds.column_names else Counter()
    print(f"wrote {len(ds)} rows to {out}")
    print("  sources: " + (", ".join(f"{s} ({n})" for s, n in sources.most_common()) or "-"))
    print("  columns: " + ", ".join(ds.column_names))
    if sources and all(s.startswith(GYM_SOURCE_PREFIX) for s in sources):
        print("  gold answers: scored by the reasoning-gym task's own checker (no math-verify check)")
        return
    line = f"  unparseable gold answers: {len(bad)}"
    if bad:
        line += " (" + ", ".join(f"row {i}: {gold!r}" for i, gold in bad[:_MAX_SHOWN])
        line += f", ... {len(bad) - _MAX_SHOWN} more)" if len(bad) > _MAX_SHOWN else ")"
    print(line)


def _prepare_gym(args: argparse.Namespace, out: Path) -> list[tuple[datasets.Dataset, Path, str]]:
    task = args.name[len(GYM_SOURCE_PREFIX) :]
    if not task:
        raise UsageError("gym:TASK needs a task name, e.g. gym:basic_arithmetic")
    for flag in ("path", "split", "limit"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} applies to benchmarks, not to reasoning-gym tasks ({args.name})")
    if args.size is None:
        raise UsageError(f"{args.name} needs --size N, the number of problems to generate")
    seed = 0 if args.seed is None else args.seed
    if args.size < 1 or (args.eval_size is not None and args.eval_size < 1):
        raise UsageError(f"--size and --eval-size must be positive, got {args.size} and {args.eval_size}")
    config = None
    if args.config is not None:
        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as err:
            raise UsageError(f"--config {args.config!r} is not valid JSON: {err}") from None
        if not isinstance(config, dict):
            raise UsageError(f"--config must be a JSON object, got {args.config!r}")

    if args.eval_size is None and args.eval_output is not None:
        raise UsageError("--eval-output needs --eval-size")
    if args.eval_size is not None:
        default_eval_out = out.with_name(f"{out.stem}_eval{out.suffix}")
        eval_out = _check_output(args.eval_output) if args.eval_output else default_eval_out
        if eval_out.resolve() == out.resolve():
            raise UsageError(f"--eval-output {str(eval_out)!r} is the same file as --output")

    from pacsrl.data import gym  # imported only when asked for: reasoning-gym is slow to import

    if args.eval_size is None:
        return [(gym.make_gym_dataset(task, size=args.size, seed=seed, config=config), out, args.name)]
    train, held_out = gym.make_gym_splits(task, args.size, args.eval_size, seed, config=config)
    return [(train, out, f"{args.name} (train)"), (held_out, eval_out, f"{args.name} (eval)")]


def _prepare_benchmark(args: argparse.Namespace, out: Path) -> list[tuple[datasets.Dataset, Path, str]]:
    for flag in ("size", "seed", "eval_size", "eval_output", "config"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} applies to gym:TASK datasets, not to {args.name!r}")
    if args.name not in PREPARERS:
        raise UsageError(
            f"unknown dataset {args.name!r}; expected one of {', '.join(PREPARERS)}, or gym:TASK"
        )
    ds = prepare_dataset(args.name, args.path, split=args.split, limit=args.limit, check=False)
    return [(ds, out, args.name)]


def main(argv: list[str]) -> int:
    """Run ``pacsrl prepare``; return the exit status (0 ok, 1 failed, 2 bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # a bad argument raises pacsrl.cli.UsageError: one line, status 2
    try:
        out = _check_output(args.output)
        build = _prepare_gym if args.name.startswith(GYM_SOURCE_PREFIX) else _prepare_benchmark
        results = build(args, out)
    except UsageError as err:
        print(f"pacsrl prepare: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, ImportError, OSError) as err:  # OSError: missing files, no network
        hint = ""
        if isinstance(err, ConnectionError) and args.path is None:
            hint = " (offline? download the source file elsewhere and pass it with --path FILE)"
        print(f"pacsrl prepare: error: {err}{hint}", file=sys.stderr)
        return 1

    any_bad = False
    for ds, path, label in results:
        bad = report_unparseable_gold(ds, label)
        any_bad = any_bad or bool(bad)
        _write(ds, path)
        _summarize(ds, path, bad)
    if any_bad and args.strict:
        print("pacsrl prepare: error: unparseable gold answers (--strict)", file=sys.stderr)
        return 1
    return 0
