"""Learning benchmark: PACS (with and without class weights, several betas) vs GRPO on the demo task, several seeds.

    python bench/learning.py                                   # every method, seeds 0,1,2, the demo's settings
    python bench/learning.py --methods pacs@1,grpo --seeds 0,1,2,3,4 --steps 40 --output runs/bench
    python bench/learning.py --quick --methods pacs,grpo --seeds 0,1     # smoke test
    python bench/learning.py --methods pacs@1,grpo,rloo,ppo             # PACS against the three baselines

Every run starts from the same checkpoint and uses the same settings as ``pacsrl demo`` (any demo option can be
given: ``--lr``, ``--prompts-per-step``, ``--eval-size``, ``--model``...), so every method gets the same prompts,
seed by seed, and the same sample budget (steps x prompts x G). Runs go through the demo's own routine
(``pacsrl.demo.training.train_and_evaluate``). Per method and over seeds it reports the mean and the 95% t-interval of
the final held-out pass@1 and pass@n and of the area under the held-out pass@1 curve (the curve's mean height,
trapezoid rule), as ``results.md`` and ``learning.png`` in the output folder. Each finished run is appended to
``runs.jsonl``; rerunning the same command resumes (finished runs are skipped).

Methods: ``grpo``, ``rloo`` (TRL's GRPO and RLOO, no KL); ``ppo`` (pacsrl's PPO with a critic, ``--critic-lr``);
``pacs@BETA`` (class weights 'question'); ``pacs-noweight@BETA`` (weights 'none').
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

# bench/significance.py, next to this file, also when this file is loaded from elsewhere (tests)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from significance import t_interval

from pacsrl.demo.cli import build_parser, config_from_args
from pacsrl.demo.config import DemoConfig, Method
from pacsrl.demo.evaluation import curve_pass1, evaluate, load_data, load_policy
from pacsrl.demo.training import MethodResult, train_and_evaluate

logger = logging.getLogger("bench.learning")

DEFAULT_METHODS = "pacs@0.5,pacs@1,pacs@2,pacs-noweight@0.5,pacs-noweight@1,pacs-noweight@2,grpo"
RUNS_FILE = "runs.jsonl"
SETTINGS_FILE = "settings.json"


# --------------------------------------------------------------------------------------------------
# Command line, runs, summary


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, DemoConfig]:
    parser = build_parser()
    parser.prog = "python bench/learning.py"
    parser.description = __doc__
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS, help=f"comma-separated methods (default: {DEFAULT_METHODS})"
    )
    parser.add_argument(
        "--seeds", default="0,1,2", help="comma-separated seeds, at least 2 for an interval (default: 0,1,2)"
    )
    args = parser.parse_args(argv)
    given = [
        flag
        for flag, dest in (
            ("--algorithms", "algorithms"),
            ("--beta", "pacs_beta"),
            ("--weight-mode", "pacs_weight_mode"),
            ("--seed", "seed"),
        )
        if getattr(args, dest) is not None
    ]
    if given:
        parser.error(f"{', '.join(given)}: the benchmark sets these per run; use --methods and --seeds")
    try:
        args.method_list = [Method.parse(m) for m in args.methods.split(",") if m.strip()]
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as err:
        parser.error(str(err))
    names = [m.name for m in args.method_list]
    if not names or len(set(names)) != len(names):
        parser.error(f"--methods {args.methods!r}: give each method once")
    if len(args.seed_list) < 2 or len(set(args.seed_list)) != len(args.seed_list):
        parser.error(f"--seeds {args.seeds!r}: give two or more distinct seeds (an interval needs several)")
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    return args, config


def _read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_settings(output: Path, settings: dict[str, Any]) -> None:
    path = output / SETTINGS_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise SystemExit(
                f"{output} holds runs made with other settings ({', '.join(changed)}); "
                "choose another --output"
            )
    else:
        path.write_text(json.dumps(settings, indent=2) + "\n")


def summarise(runs: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Per method (in order of first appearance): mean and 95% t half-width over seeds of the final pass@1,
    pass@k and the held-out pass@1 AUC."""
    methods: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        methods.setdefault(run["method"], []).append(run)
    rows = []
    for name, group in methods.items():
        row: dict[str, Any] = {"method": name, "seeds": sorted(r["seed"] for r in group)}
        for key, values in (
            ("pass@1", [r["pass@1"] for r in group]),
            (f"pass@{k}", [r[f"pass@{k}"] for r in group]),
            ("auc", [r["auc"] for r in group if r["auc"] is not None]),
        ):
            row[key] = t_interval(values) if values else (math.nan, math.nan)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], k: int) -> str:
    def cell(pair: tuple[float, float]) -> str:
        mean, half = pair
        if math.isnan(mean):
            return "-"
        return f"{100 * mean:.1f}" + ("" if math.isnan(half) else f" ± {100 * half:.1f}")

    lines = [
        f"| method | seeds | pass@1 (%) | pass@{k} (%) | held-out pass@1 AUC (%) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {len(r['seeds'])} | {cell(r['pass@1'])} | {cell(r[f'pass@{k}'])} | "
            f"{cell(r['auc'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], rows: list[dict[str, Any]], k: int, path: Path) -> None:
    """Left: mean held-out pass@1 curve per method over seeds, with its 95% t band; right: final pass@1 and pass@k
    per method with 95% intervals."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax_curve, ax_bar = fig.subplots(1, 2)
    learned = [r for r in rows if r["method"] != "base"]
    for i, row in enumerate(learned):
        curves = [r["curve"] for r in runs if r["method"] == row["method"]]
        steps = sorted({p["step"] for c in curves for p in c})
        means, lows, highs, shown = [], [], [], []
        for step in steps:
            values = [p["pass@1"] for c in curves for p in c if p["step"] == step]
            if len(values) < len(curves):
                continue
            mean, half = t_interval(values)
            half = 0.0 if math.isnan(half) else half
            shown.append(step)
            means.append(100 * mean)
            lows.append(100 * (mean - half))
            highs.append(100 * (mean + half))
        ax_curve.plot(shown, means, color=f"C{i % 10}", label=row["method"], marker="o", markersize=2)
        ax_curve.fill_between(shown, lows, highs, color=f"C{i % 10}", alpha=0.15)
    ax_curve.set_xlabel("optimizer step")
    ax_curve.set_ylabel("held-out pass@1 (%)")
    ax_curve.grid(True, alpha=0.3)
    ax_curve.legend(fontsize=8)
    width = 0.38
    for j, (key, label) in enumerate((("pass@1", "pass@1"), (f"pass@{k}", f"pass@{k}"))):
        xs = [i + (j - 0.5) * width for i in range(len(rows))]
        means = [100 * r[key][0] for r in rows]
        errs = [0.0 if math.isnan(r[key][1]) else 100 * r[key][1] for r in rows]
        ax_bar.bar(xs, means, width, yerr=errs, capsize=3, label=label, color=f"C{j}", alpha=0.8)
    ax_bar.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax_bar.set_ylabel("final held-out pass@k (%), 95% t-interval")
    ax_bar.grid(True, axis="y", alpha=0.3)
    ax_bar.legend()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(sys.argv[1:] if argv is None else argv)
    output: Path = args.output or Path("runs") / f"bench-learning-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    output.mkdir(parents=True, exist_ok=True)
    # the seed varies per run; threads change speed, not results
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("seed", "threads")}
    settings["algorithms"] = list(settings["algorithms"])
    _check_settings(output, settings)
    runs_path = output / RUNS_FILE
    runs = _read_runs(runs_path)
    done = {(r["method"], r["seed"]) for r in runs}
    k = config.eval_samples
    started = time.perf_counter()
    data = load_data(config)
    total = len(args.seed_list) * (len(args.method_list) + 1)
    logger.info(
        "benchmark: %d methods x %d seeds (+ base), %d steps each; writing %s",
        len(args.method_list),
        len(args.seed_list),
        config.steps,
        output,
    )

    for seed in args.seed_list:
        seeded = dataclasses.replace(config, seed=seed)
        if ("base", seed) not in done:
            model, tokenizer = load_policy(config.model)
            final = evaluate(model, tokenizer, data.eval, seeded, n=k, name="base", reward_fn=data.reward_fn)
            start = curve_pass1(model, tokenizer, data.curve, seeded, data.reward_fn, name="base")
            record = {
                "method": "base",
                "seed": seed,
                "pass@1": final.metrics["all"]["pass@1"],
                f"pass@{k}": final.metrics["all"][f"pass@{k}"],
                "auc": None,
                "curve": [{"step": 0, "pass@1": start}],
            }
            _append(runs_path, record)
            runs.append(record)
        start_point = next(r for r in runs if r["method"] == "base" and r["seed"] == seed)["curve"][0][
            "pass@1"
        ]
        for method in args.method_list:
            if (method.name, seed) in done:
                logger.info("%s seed %d: already in %s, skipped", method.name, seed, runs_path)
                continue
            result: MethodResult = train_and_evaluate(
                method, seeded, data, output / "work" / f"{method.name}-{seed}", start_point=start_point
            )
            summary = result.summary()
            record = {
                "method": method.name,
                "seed": seed,
                "pass@1": result.eval["all"]["pass@1"],
                f"pass@{k}": result.eval["all"][f"pass@{k}"],
                "auc": summary["heldout_pass@1_auc"],
                "curve": result.curve,
                "mean_train_reward": summary["mean_train_reward"],
                "mean_entropy": summary["mean_entropy"],
                "train_seconds": summary["train_seconds"],
                "settings": summary["settings"],
            }
            _append(runs_path, record)
            runs.append(record)
            finished = sum(1 for r in runs if r["seed"] in args.seed_list)
            logger.info(
                "[%d/%d] %s seed %d: pass@1 %.3f, pass@%d %.3f, AUC %.3f (%.0f s so far)",
                finished,
                total,
                method.name,
                seed,
                record["pass@1"],
                k,
                record[f"pass@{k}"],
                record["auc"],
                time.perf_counter() - started,
            )
            _write_summary(runs, args, config, output)

    table = _write_summary(runs, args, config, output)
    print()
    print(table)
    print(
        f"Results: {output.resolve()}/results.md, learning.png, runs.jsonl ({time.perf_counter() - started:.0f} s)"
    )
    return 0


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _write_summary(
    runs: list[dict[str, Any]], args: argparse.Namespace, config: DemoConfig, output: Path
) -> str:
    k = config.eval_samples
    wanted = {"base", *(m.name for m in args.method_list)}
    order = {name: i for i, name in enumerate(["base", *(m.name for m in args.method_list)])}
    selected = [r for r in runs if r["seed"] in args.seed_list and r["method"] in wanted]
    # rows in the order of --methods, whatever order runs finished
    selected.sort(key=lambda r: order[r["method"]])
    rows = summarise(selected, k)
    table = markdown(rows, k)
    budget = config.steps * config.prompts_per_step * config.num_generations
    command = "python bench/learning.py " + " ".join(sys.argv[1:])
    (output / "results.md").write_text(
        f"# Learning benchmark\n\n`{command}`\n\n"
        f"Task `{config.task}`, {config.steps} steps x {config.prompts_per_step} prompts x {config.num_generations} "
        f"completions = {budget} samples per run, lr {config.learning_rate}, seeds {args.seed_list}. Final eval: "
        f"{config.eval_size} held-out problems x {k} samples at temperature {config.eval_temperature}; AUC: mean "
        f"height of the held-out pass@1 curve ({config.curve_size} problems x {config.curve_samples} samples every "
        f"{config.curve_every} steps, trapezoid rule). Mean ± 95% t-interval half-width over seeds.\n\n{table}\n"
        "![learning curves](learning.png)\n"
    )
    plot(selected, rows, k, output / "learning.png")
    return table


if __name__ == "__main__":
    from pacsrl.cli import setup_logging

    setup_logging()
    sys.exit(main())
