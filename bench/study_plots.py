"""The learning study's plots (``bench/study_report.py`` writes them with ``results.md``): ``curves.png``,
``pass_at_k.png``, ``entropy.png`` and ``paired.png``, from the runs so far; every pass@k in percent."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from significance import t_interval
from study_report import BASE, _by_seed, _curve, entropy_series, has_heldout_entropy

BAND_TITLE = "line: mean over seeds; band: 95% t-interval over seeds"


def _band(
    series: Sequence[Sequence[tuple[int, float]]],
) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean and 95% t band over seeds at each step every series has."""
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in series])) if series else []
    xs, means, lows, highs = [], [], [], []
    for step in steps:
        values = [v for c in series for s, v in c if s == step]
        mean, half = t_interval(values)
        half = 0.0 if math.isnan(half) else half
        xs.append(step)
        means.append(mean)
        lows.append(mean - half)
        highs.append(mean + half)
    return xs, means, lows, highs


def _line(
    ax: Any,
    series: Sequence[Sequence[tuple[int, float]]],
    label: str,
    color: str,
    marker: str | None,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> None:
    """The mean over seeds and its 95% band, the band cut to ``bounds`` (a percentage's 0-100: with two seeds
    the t-interval's half-width is 12.7 standard deviations)."""
    xs, means, lows, highs = _band(series)
    if xs:
        ax.plot(xs, means, color=color, label=f"{label} ({len(series)})", marker=marker, markersize=3)
        lows = [max(v, bounds[0]) for v in lows]
        highs = [min(v, bounds[1]) for v in highs]
        ax.fill_between(xs, lows, highs, color=color, alpha=0.15)


def plot_all(
    runs: Sequence[dict[str, Any]],
    names: Sequence[str],
    references: Sequence[str],
    ks: Sequence[int],
    config: Any,
    output: Path,
) -> None:
    from matplotlib.figure import Figure

    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    trained = [n for n in names if n != BASE]
    top = f"pass@{config.curve_samples}"

    fig = Figure(figsize=(11, 4), layout="constrained")
    for ax, key in zip(fig.subplots(1, 2), ("pass@1", top)):
        for name in trained:
            _line(
                ax,
                [_curve(r, key) for r in runs if r["method"] == name and _curve(r, key)],
                name,
                colors[name],
                "o",
                bounds=(0.0, 100.0),
            )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"held-out {key} (%), first {config.curve_size} eval problems")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, title="method (seeds)", title_fontsize=8)
    fig.suptitle(BAND_TITLE, fontsize=9)
    fig.savefig(output / "curves.png", dpi=110)

    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    for name in names:
        points = [(k, list(_by_seed(runs, name, f"pass@{k}").values())) for k in ks]
        points = [(k, t_interval(v)) for k, v in points if v]
        if points:
            ax.errorbar(
                [k for k, _ in points],
                [m for _, (m, _) in points],
                yerr=[0.0 if math.isnan(h) else h for _, (_, h) in points],
                color=colors[name],
                marker="o",
                markersize=3,
                capsize=2,
                label=name,
                linestyle="--" if name == BASE else "-",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("final held-out pass@k (%)")
    ax.set_title("mean over seeds, bars: 95% t-interval (base: over sampling seeds)", fontsize=9)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.savefig(output / "pass_at_k.png", dpi=110)

    heldout = has_heldout_entropy(runs)
    fig = Figure(figsize=(11 if heldout else 6, 4), layout="constrained")
    panels = [("rollouts", "mean token entropy of the training rollouts (nats)")]
    if heldout:
        panels.insert(0, ("heldout", f"mean token entropy on the {config.curve_size} curve problems (nats)"))
    for ax, (source, label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for name in trained:
            series = [entropy_series(r, source) for r in runs if r["method"] == name]
            _line(ax, [s for s in series if s], name, colors[name], "o" if source == "heldout" else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, title="method (seeds)", title_fontsize=8)
    fig.suptitle(BAND_TITLE, fontsize=9)
    fig.savefig(output / "entropy.png", dpi=110)

    shown_ks = sorted({k for k in (1, 8, ks[-1] if ks else 1) if k in ks})
    rows = max(1, len(references))
    fig = Figure(figsize=(4 * max(1, len(shown_ks)), 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, max(1, len(shown_ks)), squeeze=False)
    for i, reference in enumerate(references):
        others = [n for n in trained if n != reference]
        for j, k in enumerate(shown_ks):
            ax = axes[i][j]
            for x, name in enumerate(others):
                a, b = _by_seed(runs, name, f"pass@{k}"), _by_seed(runs, reference, f"pass@{k}")
                seeds = sorted(set(a) & set(b))
                if not seeds:
                    continue
                diffs = [a[s] - b[s] for s in seeds]
                jitter = [x - 0.15 + 0.3 * n / max(1, len(diffs) - 1) for n in range(len(diffs))]
                ax.scatter(jitter, diffs, color=colors[name], s=14, alpha=0.8)
                mean, half = t_interval(diffs)
                ax.errorbar(
                    [x + 0.35],
                    [mean],
                    yerr=[0.0 if math.isnan(half) else half],
                    color="black",
                    marker="_",
                    markersize=10,
                    capsize=3,
                )
            ax.axhline(0, color="grey", linewidth=1)
            ax.set_xticks(range(len(others)), others, rotation=20, ha="right", fontsize=8)
            ax.set_title(f"pass@{k}: method - {reference} (points)", fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("dots: one per seed (in seed order); black: mean and 95% t-interval", fontsize=9)
    fig.savefig(output / "paired.png", dpi=110)
