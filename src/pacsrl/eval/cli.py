"""``pacsrl eval``: evaluate models, recompute metrics of a finished run, or compare runs.

    pacsrl eval --model PATH_OR_ID --datasets math500,aime24 --n 32 [--k 1,2,4] [--output DIR] ...
    pacsrl eval --recompute DIR [--k ...] [--rescore [--reward math]]
    pacsrl eval --compare DIR1 DIR2 ... [--output DIR] [--k ...]

The options of a run are the fields of ``EvalConfig``; their help texts are the documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from pacsrl.eval.config import EvalConfig

logger = logging.getLogger(__name__)


def _comma_list(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [item(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list, got {text!r} ({err})"
            ) from err

    return parse


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per ``EvalConfig`` field, typed from its annotation, with its help text.

    Every option defaults to None ("not given"), so the dataclass keeps the one set of defaults and
    ``--recompute`` can tell an explicit ``--reward``/``--threshold`` from the default.
    """
    hints = typing.get_type_hints(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
            hint = next(t for t in typing.get_args(hint) if t is not type(None))
        base = hint
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": None, "dest": f.name}
        if base is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(base) is list:
            kwargs["type"] = _comma_list(typing.get_args(base)[0])
            kwargs["metavar"] = "A,B,..."
        elif typing.get_origin(base) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(base))
        else:
            kwargs["type"] = base
        if default is not None and "action" not in kwargs:
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from pacsrl.cli import ArgumentParser

    parser = ArgumentParser(
        prog="pacsrl eval",
        description="Evaluate pass@k of a model (sampling n completions per problem, scored by a verifier); "
        "or recompute a finished run's metrics; or compare several runs in one table and plot. "
        "Rerunning the same command resumes an interrupted run.",
    )
    modes = parser.add_argument_group("other modes (no model needed)")
    modes.add_argument(
        "--recompute", metavar="DIR", help="Recompute metrics, table and plot of a run folder."
    )
    modes.add_argument(
        "--rescore",
        action="store_true",
        help="With --recompute: score the stored completions again (see --reward).",
    )
    modes.add_argument(
        "--compare",
        metavar="DIR",
        nargs="+",
        help="Build one comparison table and plot from finished run folders.",
    )
    _add_config_options(parser.add_argument_group("evaluation run"))
    return parser


def main(argv: list[str]) -> int:
    """Entry point of ``pacsrl eval``; prints the Markdown table and where the files are.

    Every argument is checked before a model is loaded; a mistake raises ``pacsrl.cli.UsageError``
    (one line, exit status 2); Ctrl-C says where the finished problems are and how to resume."""
    from pacsrl.cli import UsageError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.recompute and args.compare:
        parser.error("--recompute and --compare are separate modes: use one")
    if args.rescore and not args.recompute:
        parser.error("--rescore only applies with --recompute DIR")

    try:
        return _run(args, parser)
    except (ValueError, TypeError, FileNotFoundError) as err:  # bad settings or files: one line
        logger.debug("pacsrl eval failed", exc_info=True)
        raise UsageError(str(err)) from err


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pacsrl.cli import UsageError, check_model, remove_if_empty

    if args.compare:
        from pacsrl.eval import run

        output = args.output or "outputs/eval/comparison"
        table, _, results = run.compare_runs(args.compare, output=output, ks=args.k)
        print(table)
        print(f"compared {len(results)} runs; table, metrics and plot in {output}/comparison.{{md,json,png}}")
        return 0
    if args.recompute:
        from pacsrl.eval import run

        result = run.recompute(
            args.recompute, ks=args.k, rescore=args.rescore, reward=args.reward, threshold=args.threshold
        )
    else:
        fields = (f.name for f in dataclasses.fields(EvalConfig))
        values = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
        try:
            config = EvalConfig(**values)
        except ValueError as err:
            parser.error(str(err))
        if not config.model:
            parser.error("--model is required (or use --recompute DIR / --compare DIR ...)")
        if not config.datasets:
            parser.error("--datasets is required, e.g. --datasets math500,aime24 or a prepared .parquet file")
        check_model(config.model, "--model")

        from pacsrl.eval import run

        output_dir = run.run_folder(config)
        existed = output_dir.exists()
        try:
            result = run.run_eval(config)
        except KeyboardInterrupt:
            path = output_dir / run.ROLLOUTS_FILE
            done = len(run.read_rollouts(path)) if path.exists() else 0
            remove_if_empty(output_dir, existed)
            print(
                f"pacsrl eval: interrupted; {done} finished problems are saved in {path}: rerun the same "
                "command to resume from them",
                file=sys.stderr,
            )
            return 130
        except OSError as err:  # the model or tokenizer could not be loaded
            remove_if_empty(output_dir, existed)
            if isinstance(err, FileNotFoundError) and err.filename:
                raise UsageError(f"{err.filename}: no such file") from err
            first = (str(err).strip() or type(err).__name__).splitlines()[0]
            raise UsageError(f"cannot load --model {config.model}: {first}") from err
        except BaseException:
            remove_if_empty(output_dir, existed)
            raise
    print(result.table)
    out = result.output_dir
    print(
        f"{len(result.records)} problems; files in {out}: "
        "rollouts.jsonl, metrics.json, metrics.md, pass_at_k.png"
    )
    return 0
