"""Reports of one or several evaluated models: a Markdown table and a pass@k-vs-k plot (and ``write_json``,
with which every pacsrl command writes its JSON files).

``runs`` is a sequence of ``(model name, metrics)`` pairs, metrics as returned by
``pacsrl.eval.metrics.compute_metrics``. The plot follows the layout of the paper's figure: one
subplot per benchmark, one line per model, k on a log2 axis.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from pacsrl.eval.metrics import OVERALL

Run = tuple[str, Mapping[str, Any]]

__all__ = ["markdown_table", "plot_pass_at_k", "write_json"]


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` as indented JSON (paths as strings), atomically: a temporary file renamed over
    ``path``, so that a reader (or a crash) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default)
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {obj!r}")


def _sources(runs: Sequence[Run]) -> list[str]:
    names: list[str] = []
    for _, metrics in runs:
        names += [s for s in metrics["sources"] if s not in names]
    return sorted(names)


def markdown_table(runs: Sequence[Run]) -> str:
    """A Markdown table, one row per (benchmark, model) plus an ``all`` row per model pooling every
    problem (shown when there are several benchmarks); pass@k in percent, blank where a run did not
    report that k."""
    ks = sorted({k for _, m in runs for k in m["ks"]})
    header = ["benchmark", "model", "problems", "n", *[f"pass@{k}" for k in ks]]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
    sources = _sources(runs)
    groups = [*sources, OVERALL] if len(sources) > 1 else sources
    for source in groups:
        for name, metrics in runs:
            group = metrics[OVERALL] if source == OVERALL else metrics["sources"].get(source)
            if group is None:
                continue
            n = group["n"] if isinstance(group["n"], int) else "-".join(map(str, group["n"]))
            cells = [f"{100 * group[f'pass@{k}']:.2f}" if f"pass@{k}" in group else "" for k in ks]
            lines.append("| " + " | ".join([source, name, str(group["num_problems"]), str(n), *cells]) + " |")
    return "\n".join(lines) + "\n"


def display_name(name: str) -> str:
    """A model's name in a plot legend: the last path component of a checkpoint path or Hub id."""
    return name.rstrip("/").rsplit("/", 1)[-1] or name


def plot_pass_at_k(runs: Sequence[Run], path: str | Path | None = None) -> Figure:
    """Plot pass@k (percent, the axis from 0) against k on a log2 axis: a subplot per benchmark, a line per
    model, labelled with the last path component of its name.

    Uses matplotlib's object API (no pyplot, no global backend), so it is safe in headless runs and
    inside training. Saves a PNG to ``path`` when given; returns the figure (``fig.axes[i].get_lines()``
    holds one line per model).
    """
    sources = _sources(runs)
    cols = min(len(sources), 4)
    rows = math.ceil(len(sources) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, source in zip(axes, sources):
        for i, (name, metrics) in enumerate(runs):  # colour by model, so it matches across subplots
            group = metrics["sources"].get(source)
            if group is None:
                continue
            ks = [k for k in metrics["ks"] if f"pass@{k}" in group]
            values = [100 * group[f"pass@{k}"] for k in ks]
            ax.plot(ks, values, marker="o", markersize=3, color=f"C{i % 10}", label=display_name(name))
        ax.set_ylim(bottom=0)  # from 0, so a small difference between models looks small
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))  # 1, 2, 4, ... rather than 2^0, 2^1, ...
        ax.set_title(source)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(sources) :]:
        ax.set_visible(False)
    legend: dict[str, Any] = {}
    for ax in axes[: len(sources)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=min(len(legend), 4))
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
