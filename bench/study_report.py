"""The learning study's report (``bench/study.py``): ``results.md`` and four plots (``study_plots``) from the
runs so far.

- ``results.md``: what is finished (labelled partial until every run is in), the base model's evaluation at each
  sampling seed (its noise), final pass@k per method (mean and 95% t-interval over seeds), the paired differences
  against GRPO and against PPO for each k (mean, 95% t-interval, exact sign-test and Wilcoxon p-values; significant
  only when the interval excludes zero), the steps each method needs to reach GRPO's final held-out pass@1,
  whether each method still improves at the end (its curve's mean pass@1 in each quarter of training, and the
  per-seed change between the last three quarters with its 95% t-interval), and the
  policy's entropy at the end (on the fixed curve problems at the last curve point, when the runs measured it, and
  the training rollouts' over the last 10 steps; paired differences against GRPO and PPO);
- ``curves.png``: held-out pass@1 and pass@n over training, mean and 95% t band per method;
- ``pass_at_k.png``: final pass@k against k (log axis) per method, with 95% intervals;
- ``entropy.png``: the policy's mean token entropy over training, on the fixed curve problems (when measured) and
  in the training rollouts, mean and 95% band;
- ``paired.png``: per-seed paired differences (a dot per seed) against each reference, for k = 1, 8 and n.

Every pass@k is a percentage here (the runs file holds fractions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from significance import median_steps, paired_difference, steps_to_reach, t_interval

from pacsrl.demo.config import Method

BASE = "base"
REFERENCES = ("grpo", "ppo")
PLOTS = ("curves.png", "pass_at_k.png", "entropy.png", "paired.png")
ENTROPY_WINDOW = 10  # training steps averaged for the entropy at the end
SIGNIFICANCE_NOTE = (
    "'significant': the 95% t-interval excludes zero (it assumes the per-seed differences are roughly normal). "
    "With n seeds the exact tests cannot go below p = 2 / 2^n (0.0625 at 5 seeds, 0.0078 at 8), so they can "
    "disagree with it. These tables hold many comparisons, correlated across k: at 95%, about one in twenty "
    "would come out 'significant' with no real difference."
)


def method_names(specs: Sequence[str]) -> list[str]:
    return [Method.parse(s).name for s in specs]


def _reference_names(specs: Sequence[str]) -> list[str]:
    """GRPO and PPO, those of them in the study."""
    return [Method.parse(r).name for r in REFERENCES if r in specs]


def _ks(runs: Sequence[dict[str, Any]]) -> list[int]:
    return sorted({int(k.removeprefix("pass@")) for r in runs for k in r["eval"]})


def _by_seed(runs: Sequence[dict[str, Any]], name: str, key: str) -> dict[int, float]:
    return {r["seed"]: 100 * r["eval"][key] for r in runs if r["method"] == name and key in r["eval"]}


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, half = t_interval(values)
    return f"{mean:.1f}" + ("" if math.isnan(half) else f" ± {half:.1f}")


def _p(p: float) -> str:
    return "-" if math.isnan(p) else f"{p:.3f}"


def status_lines(runs: Sequence[dict[str, Any]], args: Any) -> list[str]:
    """Which runs are finished: one line per method, and 'partial' unless every run is in."""
    expected = len(args.base_seed_list) + len(args.seed_list) * len(args.method_specs)
    lines = []
    for name, seeds in [(BASE, args.base_seed_list)] + [
        (n, args.seed_list) for n in method_names(args.method_specs)
    ]:
        have = sorted(r["seed"] for r in runs if r["method"] == name)
        lines.append(f"- {name}: seeds {have or '[]'} of {seeds}")
    head = (
        f"**Complete:** all {expected} runs are in."
        if len(runs) >= expected
        else f"**PARTIAL: {len(runs)} of {expected} runs finished**; the study resumes with the same command. "
        "Differences below use the seeds that both methods have finished."
    )
    return [head, "", *lines]


def final_table(runs: Sequence[dict[str, Any]], names: Sequence[str], ks: Sequence[int]) -> str:
    lines = [
        "| method | seeds | " + " | ".join(f"pass@{k}" for k in ks) + " |",
        "|---|---:|" + "---:|" * len(ks),
    ]
    for name in names:
        seeds = _by_seed(runs, name, "pass@1")
        if not seeds:
            continue
        cells = [_cell(list(_by_seed(runs, name, f"pass@{k}").values())) for k in ks]
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def base_noise_table(runs: Sequence[dict[str, Any]], ks: Sequence[int]) -> str:
    base = sorted((r for r in runs if r["method"] == BASE), key=lambda r: r["seed"])
    if not base:
        return "(no base evaluation yet)\n"
    lines = ["| sampling seed | " + " | ".join(f"pass@{k}" for k in ks) + " |", "|---:|" + "---:|" * len(ks)]
    for r in base:
        lines.append(
            f"| {r['seed']} | " + " | ".join(f"{100 * r['eval'][f'pass@{k}']:.2f}" for k in ks) + " |"
        )
    if len(base) >= 2:
        spread = [
            max(100 * r["eval"][f"pass@{k}"] for r in base) - min(100 * r["eval"][f"pass@{k}"] for r in base)
            for k in ks
        ]
        lines.append("| max - min | " + " | ".join(f"{s:.2f}" for s in spread) + " |")
    return "\n".join(lines) + "\n"


def paired_table(
    runs: Sequence[dict[str, Any]], names: Sequence[str], reference: str, ks: Sequence[int]
) -> str:
    """Rows: method x k; the per-seed differences method - reference, in points."""
    lines = [
        "| method | k | seeds | mean difference (points) | 95% t-interval | wins | sign p | Wilcoxon p | significant |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for name in names:
        if name == reference:
            continue
        for k in ks:
            a, b = _by_seed(runs, name, f"pass@{k}"), _by_seed(runs, reference, f"pass@{k}")
            if len(set(a) & set(b)) < 2:
                continue
            d = paired_difference(a, b)
            lines.append(
                f"| {name} | {k} | {d.n} | {d.mean:+.2f} | [{d.low:+.2f}, {d.high:+.2f}] | {d.wins}/{d.n} | "
                f"{_p(d.sign_p)} | {_p(d.wilcoxon_p)} | {'yes' if d.significant else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def _curve(run: dict[str, Any], key: str) -> list[tuple[int, float]]:
    return [(p["step"], 100 * p[key]) for p in run.get("curve", []) if key in p]


def reach_table(runs: Sequence[dict[str, Any]], names: Sequence[str], reference: str) -> str:
    """Per method: at which curve step the held-out pass@1 first reaches the reference's final curve value of the
    same seed; median over seeds (a seed that never reaches counts as never)."""
    targets = {
        r["seed"]: _curve(r, "pass@1")[-1][1] for r in runs if r["method"] == reference and r.get("curve")
    }
    lines = ["| method | seeds | median step | per seed (step, - = never) |", "|---|---:|---:|---|"]
    for name in names:
        steps = {
            r["seed"]: steps_to_reach(_curve(r, "pass@1"), targets[r["seed"]])
            for r in runs
            if r["method"] == name and r["seed"] in targets and r.get("curve")
        }
        if not steps:
            continue
        median = median_steps(list(steps.values()))
        per_seed = ", ".join(f"{s}: {'-' if v is None else v}" for s, v in sorted(steps.items()))
        lines.append(
            f"| {name} | {len(steps)} | {'never' if median is None else f'{median:g}'} | {per_seed} |"
        )
    return "\n".join(lines) + "\n"


def quarter_means(curve: Sequence[tuple[int, float]], steps: int) -> list[float | None]:
    """The mean of a curve's points in each quarter of training, (0, steps/4], (steps/4, steps/2], ... (step 0,
    the start, in none); None for a quarter without a point. A quarter's mean is steadier than one point: the
    policy's pass@1 moves by a few points from one curve step to the next."""
    blocks: list[list[float]] = [[], [], [], []]
    for step, value in curve:
        if step > 0:
            blocks[min(3, math.ceil(4 * step / steps) - 1)].append(value)
    return [sum(b) / len(b) if b else None for b in blocks]


def plateau_table(runs: Sequence[dict[str, Any]], names: Sequence[str], steps: int) -> str:
    """Per method: the mean held-out pass@1 on the curve problems in each quarter of training (``quarter_means``,
    mean over seeds), and the per-seed change from the second quarter to the third and from the third to the last
    (in points): mean, 95% t-interval over seeds, and how many seeds rose. An interval above zero says the method
    was still improving; a plateau shows as a last change near zero, with an interval that bounds it, after
    earlier rises."""
    curves = {(r["method"], r["seed"]): _curve(r, "pass@1") for r in runs if r["method"] in names}
    curves = {key: c for key, c in curves.items() if any(step > 0 for step, _ in c)}
    if not curves:
        return "(no curve yet)\n"
    quarters = {key: quarter_means(c, steps) for key, c in curves.items()}
    quarters = {key: q for key, q in quarters.items() if None not in q}
    if not quarters:
        return (
            "(no run has a curve point in every quarter of training: that needs curve_every <= steps / 4)\n"
        )
    bounds = [f"{steps * i / 4:g}" for i in range(5)]
    head = " | ".join(f"steps {bounds[i]}-{bounds[i + 1]}" for i in range(4))
    spans = [(1, 2), (2, 3)]
    span_head = "".join(
        f" change {bounds[a]}-{bounds[a + 1]} -> {bounds[b]}-{bounds[b + 1]} | 95% t-interval | seeds rising |"
        for a, b in spans
    )
    lines = [
        f"| method | seeds | {head} |{span_head}",
        "|---|---:|" + "---:|" * 4 + "---:|---|---:|" * len(spans),
    ]
    for name in names:
        mine = [q for (m, _), q in sorted(quarters.items()) if m == name]
        if not mine:
            continue
        row = f"| {name} | {len(mine)} | " + " | ".join(
            f"{t_interval([q[i] for q in mine])[0]:.1f}" for i in range(4)
        )
        row += " |"
        for a, b in spans:
            changes = [q[b] - q[a] for q in mine]
            mean, half = t_interval(changes)
            interval = "-" if math.isnan(half) else f"[{mean - half:+.2f}, {mean + half:+.2f}]"
            row += f" {mean:+.2f} | {interval} | {sum(d > 0 for d in changes)}/{len(mine)} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def entropy_series(run: dict[str, Any], source: str) -> list[tuple[int, float]]:
    """A run's (step, mean token entropy) pairs: ``source="rollouts"``, the training rollouts' at every logged step;
    ``"heldout"``, along the samples of the fixed curve problems at every curve point that measured it."""
    if source not in ("rollouts", "heldout"):
        raise ValueError(f"source={source!r}: expected 'rollouts' or 'heldout'")
    entries = run.get("curve", []) if source == "heldout" else run.get("log", [])
    return [(e["step"], e["entropy"]) for e in entries if "entropy" in e]


def has_heldout_entropy(runs: Sequence[dict[str, Any]]) -> bool:
    """Whether any run measured the entropy on the curve problems (``curve_entropy``)."""
    return any(entropy_series(r, "heldout") for r in runs)


def final_entropy(run: dict[str, Any], window: int, source: str = "rollouts") -> float | None:
    """The policy's mean token entropy at the end of a run (``entropy_series``): the training rollouts' over the
    run's last ``window`` logged steps, or the fixed curve problems' at the last curve point that measured it."""
    values = [v for _, v in entropy_series(run, source)][-1 if source == "heldout" else -window :]
    return sum(values) / len(values) if values else None


def entropy_table(
    runs: Sequence[dict[str, Any]],
    names: Sequence[str],
    references: Sequence[str],
    window: int = ENTROPY_WINDOW,
    source: str = "rollouts",
) -> str:
    """Per method: the policy's entropy at the end (``final_entropy``: mean ± 95% t half-width over seeds), and its
    per-seed difference from each reference (mean, 95% t-interval, wins, sign p)."""
    values = {
        name: {
            r["seed"]: v
            for r in runs
            if r["method"] == name and (v := final_entropy(r, window, source)) is not None
        }
        for name in names
    }
    head = "".join(f" minus {ref}: mean [95% t] | wins | sign p |" for ref in references)
    lines = [
        f"| method | seeds | entropy (nats) |{head}",
        "|---|---:|---:|" + "---|---:|---:|" * len(references),
    ]
    for name in names:
        if not values[name]:
            continue
        mean, half = t_interval(list(values[name].values()))
        row = (
            f"| {name} | {len(values[name])} | {mean:.4f}"
            + ("" if math.isnan(half) else f" ± {half:.4f}")
            + " |"
        )
        for ref in references:
            if name == ref or len(set(values[name]) & set(values.get(ref, {}))) < 2:
                row += " - | - | - |"
                continue
            d = paired_difference(values[name], values[ref])
            row += f" {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] | {d.wins}/{d.n} | {_p(d.sign_p)} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def times_table(runs: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    lines = ["| method | seed | wall (s) | CPU (s) | machine |", "|---|---:|---:|---:|---|"]
    for name in names:
        for r in sorted((r for r in runs if r["method"] == name), key=lambda r: r["seed"]):
            m = r.get("machine")  # not recorded before 2026-12-02 16:00 UTC
            where = f"{m['cpu']}, {m['kernels']}, torch {m['torch']}" if m else "-"
            lines.append(
                f"| {name} | {r['seed']} | {r['wall_seconds']:.0f} | {r['cpu_seconds']:.0f} | {where} |"
            )
    return "\n".join(lines) + "\n"


def weights_section(runs: Sequence[dict[str, Any]], names: Sequence[str], ks: Sequence[int]) -> list[str]:
    """PACS against PACS without class weights, per seed: what the weights do (the paper's ablation); empty unless
    both are in the study."""
    with_weights, without = Method.parse("pacs").name, Method.parse("pacs-noweight").name
    if with_weights not in names or without not in names:
        return []
    return [
        f"## Class weights: {with_weights} against {without} ({with_weights} - {without}, per seed)",
        "",
        paired_table(runs, [with_weights], without, ks),
        SIGNIFICANCE_NOTE,
        "",
    ]


def write_report(runs: Sequence[dict[str, Any]], args: Any, config: Any, output: Path) -> Path:
    """Write ``results.md`` and the plots for the runs of this study in ``runs``; returns the results path."""
    names = method_names(args.method_specs)
    runs = [
        r
        for r in runs
        if (r["method"] == BASE and r["seed"] in args.base_seed_list)
        or (r["method"] in names and r["seed"] in args.seed_list)
    ]
    ks = _ks(runs)
    budget = config.steps * config.prompts_per_step * config.num_generations
    text = [
        "# Learning study: PACS against the baselines, paired seeds",
        "",
        f"`{args.command}`",
        "",
        *status_lines(runs, args),
        "",
        (
            f"Task `{config.task}` {config.resolved_task_config()}, the shipped demo model. Each run: {config.steps} "
            f"optimizer steps x {config.prompts_per_step} prompts x {config.num_generations} completions = {budget} "
            f"samples, {config.updates_per_rollout} optimizer steps per rollout, lr {config.learning_rate} constant, "
            f"rollout temperature {config.temperature}; PACS beta {config.pacs_beta}; GRPO loss_type "
            f"'{config.grpo_loss_type}'; no KL term for any method; PPO's critic lr {config.critic_learning_rate}. "
            f"Final evaluation: {config.eval_size} held-out problems x "
            f"{config.eval_samples} samples at temperature {config.eval_temperature}, sampling seed = the run's seed. "
            f"Curves: the first {config.curve_size} of them x {config.curve_samples} samples every "
            f"{config.curve_every} steps. pass@k in percent; intervals are 95% Student-t over seeds."
        ),
        "",
        "## Base model, evaluated at each sampling seed (the evaluation's own noise)",
        "",
        base_noise_table(runs, ks),
        "## Final held-out pass@k (mean ± 95% t half-width over seeds)",
        "",
        final_table(runs, [BASE, *names], ks) if ks else "(no run finished yet)\n",
        (
            "The base row's interval is over the base model's sampling seeds (one model), the others' over training "
            "seeds. Each row uses every seed its method has finished."
        ),
        "",
        "## Still improving at the end? Held-out pass@1 on the curve problems, mean per quarter of training",
        "",
        (
            f"The curve problems are the first {config.curve_size} of the evaluation problems x {config.curve_samples} "
            f"samples, scored every {config.curve_every} steps: a subset, so these numbers are not comparable with "
            f"the final evaluation's on all {config.eval_size} problems. A quarter a-b holds the curve points after "
            "step a up to step b."
        ),
        "",
        plateau_table(runs, names, config.steps),
    ]
    for reference in _reference_names(args.method_specs):
        text += [
            f"## Paired differences against {reference} (method - {reference}, per seed)",
            "",
            paired_table(runs, names, reference, ks),
            SIGNIFICANCE_NOTE,
            "",
            f"## Steps to reach {reference}'s final held-out pass@1 (curve problems, same seed)",
            "",
            (
                f"The target is {reference}'s own pass@1 on the curve at its last step, for the same seed; 'never' is "
                f"'not by the last curve step', and {reference}'s own row reaches it by construction."
            ),
            "",
            reach_table(runs, names, reference),
        ]
    text += weights_section(runs, names, ks)
    entropy_references = [n for n in _reference_names(args.method_specs) if n in names]
    if has_heldout_entropy(runs):
        text += [
            "## Policy entropy at the end, on the fixed curve problems",
            "",
            (
                f"The policy's mean token entropy (nats) along its samples of the {config.curve_size} curve problems "
                f"x {config.curve_samples} at the last curve step: the same prompts for every run and step."
            ),
            "",
            entropy_table(runs, names, entropy_references, source="heldout"),
        ]
    text += [
        f"## Policy entropy at the end (training rollouts, mean over the last {ENTROPY_WINDOW} steps)",
        "",
        entropy_table(runs, names, entropy_references),
        "## Wall and CPU time per run",
        "",
        "Seconds per run in its own process (one torch thread), on the machine and load of the sitting that ran it.",
        "",
        times_table(runs, [BASE, *names]),
    ]
    text += [f"![{p}]({p})" for p in PLOTS] + [""]
    from study_plots import plot_all  # it imports this module's helpers

    plot_all(runs, [BASE, *names], _reference_names(args.method_specs), ks, config, output)
    path = output / "results.md"
    path.write_text("\n".join(text), encoding="utf-8")
    return path
