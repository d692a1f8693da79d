"""The demo's report folder, written from the ``metrics.json`` content that ``run_demo`` builds:

- ``report.md``: the comparison table (pass@1, pass@k, mean training reward, wall times) and the pass@k table;
- ``pass_at_k.png`` (base vs every method), ``curve_reward.png``, ``curve_heldout_pass1.png``,
  ``curve_entropy.png`` (a line per method).

pass@k are fractions in [0, 1] in ``metrics.json`` and percentages in tables and plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PASS_AT_K_PLOT = "pass_at_k.png"
CURVE_PLOTS = {
    "reward": "curve_reward.png",
    "heldout_pass@1": "curve_heldout_pass1.png",
    "entropy": "curve_entropy.png",
}


def comparison_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model (base, then each method): pass@1, pass@k (largest k), mean training reward, wall times."""
    k = report["settings"]["eval_samples"]
    rows = []
    if report.get("base"):
        b = report["base"]["eval"]["all"]
        rows.append(
            {
                "model": "base",
                "pass@1": b["pass@1"],
                f"pass@{k}": b[f"pass@{k}"],
                "mean_train_reward": None,
                "heldout_pass@1_auc": None,
                "train_seconds": None,
                "eval_seconds": report["base"]["eval_seconds"],
            }
        )
    for m in report["methods"].values():
        if not m.get("done"):
            continue
        e = m["eval"]["all"]
        rows.append(
            {
                "model": m["settings"]["name"],
                "pass@1": e["pass@1"],
                f"pass@{k}": e[f"pass@{k}"],
                "mean_train_reward": m["mean_train_reward"],
                "heldout_pass@1_auc": m["heldout_pass@1_auc"],
                "train_seconds": m["train_seconds"],
                "eval_seconds": m["eval_seconds"],
            }
        )
    return rows


def comparison_table(report: dict[str, Any]) -> str:
    """The demo's Markdown table: pass@ in percent, wall times in seconds, '-' where not applicable."""
    k = report["settings"]["eval_samples"]
    header = [
        "model",
        "pass@1 (%)",
        f"pass@{k} (%)",
        "mean train reward",
        "held-out pass@1 AUC (%)",
        "train time (s)",
        "eval time (s)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    for r in comparison_rows(report):
        lines.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    pct(r["pass@1"]),
                    pct(r[f"pass@{k}"]),
                    num(r["mean_train_reward"], ".3f"),
                    pct(r["heldout_pass@1_auc"]),
                    num(r["train_seconds"], ".0f"),
                    num(r["eval_seconds"], ".0f"),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _series(method: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    if key == "heldout_pass@1":
        return [p["step"] for p in method["curve"]], [100 * p["pass@1"] for p in method["curve"]]
    points = [(h["step"], h[key]) for h in method["log_history"] if key in h and "step" in h]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(report: dict[str, Any], output_dir: Path) -> dict[str, Path]:
    """One PNG per training curve (reward, held-out pass@1, entropy), a line per method; returns the paths."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    labels = {
        "reward": "mean training reward",
        "heldout_pass@1": "held-out pass@1 (%)",
        "entropy": "mean token entropy (nats)",
    }
    paths = {}
    for key, filename in CURVE_PLOTS.items():
        fig = Figure(figsize=(5.5, 3.6), layout="constrained")
        ax = fig.subplots()
        for i, (name, m) in enumerate(report["methods"].items()):
            steps, values = _series(m, key)
            if steps:
                ax.plot(
                    steps,
                    values,
                    marker="o" if key == "heldout_pass@1" else None,
                    markersize=3,
                    color=f"C{i % 10}",
                    label=m["settings"]["name"],
                )
        if key == "heldout_pass@1" and report.get("base"):
            ax.axhline(
                100 * report["base"]["curve_pass@1"], color="grey", linestyle="--", linewidth=1, label="base"
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 2.5 on a short run
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(labels[key])
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.savefig(output_dir / filename, dpi=120)
        paths[key] = output_dir / filename
    return paths


def write_report(report: dict[str, Any], output_dir: Path) -> Path:
    """Write ``report.md`` and the plots for what ``report`` holds so far; returns the ``report.md`` path."""
    from pacsrl.eval import markdown_table, plot_pass_at_k

    output_dir = Path(output_dir)
    s = report["settings"]
    runs = [("base", report["base"]["eval"])] if report.get("base") else []
    runs += [(m["settings"]["name"], m["eval"]) for m in report["methods"].values() if m.get("done")]
    if runs:
        plot_pass_at_k(runs, output_dir / PASS_AT_K_PLOT)
    plot_curves(report, output_dir)
    budget = s["steps"] * s["prompts_per_step"] * s["num_generations"]
    text = [
        f"# pacsrl demo: {' vs '.join(a.upper() for a in s['algorithms'])}",
        "",
        (
            f"Model `{s['model']}`, task `{s['task']}` {json.dumps(s['task_config'])}. Each algorithm: {s['steps']} steps "
            f"x {s['prompts_per_step']} prompts x {s['num_generations']} completions = {budget} generated samples, "
            f"{s['updates_per_rollout']} optimizer step(s) per rollout, lr {s['learning_rate']} (constant), rollout "
            f"temperature {s['temperature']}, max {s['max_completion_length']} completion tokens, seed {s['seed']}; PACS beta "
            f"{s['pacs_beta']}, weights '{s['pacs_weight_mode']}'; GRPO loss_type '{s['grpo_loss_type']}', KL beta 0"
            + ("; RLOO (TRL), KL beta 0" if "rloo" in s["algorithms"] else "")
            + (
                f"; PPO critic lr {s['critic_learning_rate']}, GAE gamma = lam = 1, clip 0.2, value clip 0.5, no KL"
                if "ppo" in s["algorithms"]
                else ""
            )
            + "."
        ),
        (
            f"Evaluation: {s['eval_size']} held-out problems x {s['eval_samples']} samples, temperature "
            f"{s['eval_temperature']}, top_p {s['eval_top_p']}; held-out pass@1 curve on the first {s['curve_size']} of "
            f"them x {s['curve_samples']} samples every {s['curve_every']} steps (AUC = the curve's mean height). "
            "Train time leaves out the curve measurements; eval time is the final evaluation."
        ),
        "",
        comparison_table(report),
        "pass@k for every k:",
        "",
        markdown_table(runs) if runs else "(no evaluation yet)\n",
        f"Wall time: {report['wall_seconds']} s{'' if report['finished'] else ' (unfinished)'}.",
        "",
        f"![pass@k]({PASS_AT_K_PLOT})",
        *[f"![{key}]({name})" for key, name in CURVE_PLOTS.items()],
        "",
    ]
    path = output_dir / REPORT_FILE
    path.write_text("\n".join(text), encoding="utf-8")
    return path


__all__ = [
    "CURVE_PLOTS",
    "METRICS_FILE",
    "PASS_AT_K_PLOT",
    "REPORT_FILE",
    "comparison_rows",
    "comparison_table",
    "plot_curves",
    "write_report",
]
