"""Evaluation runs: sample n completions per problem, score them with a verifier, report pass@k.

Three entry points:

* ``evaluate_model``: an already-loaded model and tokenizer, all in memory (e.g. during training);
* ``run_eval``: an ``EvalConfig`` run into a folder, resumable (``rollouts.jsonl`` is the source of truth);
* ``recompute`` / ``compare_runs``: metrics, tables and plots from finished folders, without a model.

A run folder holds ``settings.json``, ``rollouts.jsonl``, ``metrics.json``, ``metrics.md`` and
``pass_at_k.png``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pacsrl import __version__
from pacsrl.eval.config import RESUME_KEYS, EvalConfig
from pacsrl.eval.metrics import compute_metrics, num_correct
from pacsrl.eval.report import markdown_table, plot_pass_at_k, write_json
from pacsrl.eval.rollouts import (
    ROLLOUTS_FILE,
    append_rollout,
    problem_ids,
    read_rollouts,
    repair_rollouts,
    write_rollouts,
)
from pacsrl.eval.sampling import HFSampler, Sampler, load_sampler, resolve_backend

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]

SETTINGS_FILE = "settings.json"
METRICS_FILE = "metrics.json"
TABLE_FILE = "metrics.md"
PLOT_FILE = "pass_at_k.png"
REQUIRED_COLUMNS = ("prompt", "answer", "source")

__all__ = [
    "EvalResult",
    "compare_runs",
    "dataset_problems",
    "evaluate_model",
    "load_run",
    "recompute",
    "resolve_problems",
    "resolve_reward",
    "run_eval",
    "run_folder",
    "save_results",
    "score_completions",
]


@dataclass
class EvalResult:
    """Everything an evaluation produced.

    Attributes:
        name: the model's display name in tables and plots.
        records: one dict per problem, as in ``rollouts.jsonl`` (see ``pacsrl.eval.rollouts``).
        metrics: per benchmark and overall, see ``pacsrl.eval.metrics.compute_metrics``.
        settings: the settings the samples were drawn with.
        output_dir: the run folder, if the result was written to one.
    """

    name: str
    records: list[dict[str, Any]]
    metrics: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    output_dir: Path | None = None

    @property
    def table(self) -> str:
        """This run's Markdown table."""
        return markdown_table([(self.name, self.metrics)])


# --------------------------------------------------------------------------------------------------
# Problems and scoring


def resolve_reward(reward: str | RewardFn) -> RewardFn:
    """A scorer from its name: ``"auto"`` scores each row by its source's verifier
    (:func:`pacsrl.rewards.auto.make_auto_reward`: a ``gym:TASK`` row by the task's own scorer, any other by
    math-verify); ``"math"`` is ``pacsrl.rewards.math_reward``; ``"gym:TASK"`` a reasoning-gym task's scorer;
    ``"module:function"`` imports any TRL-style reward function (the current folder is searched first, as
    ``python -m`` does); a callable is returned as is."""
    if callable(reward):
        return reward
    if reward == "auto":
        from pacsrl.rewards.auto import make_auto_reward

        return make_auto_reward()
    if reward == "math":
        from pacsrl.rewards import math_reward

        return math_reward
    if reward.startswith("gym:"):
        from pacsrl.rewards.gym import make_gym_reward

        return make_gym_reward(reward[len("gym:") :])
    module_name, sep, attr = reward.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"reward {reward!r}: expected 'auto', 'math', 'gym:TASK' or 'module:function' (a module in the "
            "current folder or an installed package)"
        )
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward {reward!r}: cannot import {attr!r} from {module_name!r} ({err})") from err
    finally:
        if added:
            sys.path.remove(cwd)
    if not callable(fn):
        raise TypeError(f"reward {reward!r} is not a function")
    return fn


def dataset_name(spec: str) -> str:
    """The name of a ``--datasets`` argument in tables: a benchmark's name (``math500``, ``aime24=FILE``), or
    a prepared file's stem (``data/chain_sum_hard.parquet`` -> ``chain_sum_hard``), read as
    ``pacsrl.data.resolve_dataset`` reads the spec (a file's path may hold ``=``: ``runs/lr=1e-6/test.jsonl``)."""
    from pacsrl.data import PREPARERS

    name, sep, _ = spec.partition("=")
    if sep and name in PREPARERS:
        return name
    return Path(spec).stem if Path(spec).suffix.lower() in (".parquet", ".jsonl", ".json") else spec


def resolve_problems(specs: Sequence[str], limit: int | None = None) -> list[dict[str, Any]]:
    """The problems of each dataset spec (``pacsrl.data.resolve_dataset``), each tagged with the name of its
    row in the results (``dataset``), so that results get one row per dataset given, even when two share a
    source: the dataset's name (:func:`dataset_name`) when it holds one source; for a file that mixes
    several, its sources (``<name>/<source>`` where another dataset has that source too)."""
    from pacsrl.data import resolve_dataset

    names = [dataset_name(s) for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"--datasets names {', '.join(twice)} more than once: each dataset gets its own row, named after its "
            "file stem or benchmark name; give each dataset once, and rename files that share a stem"
        )
    per_spec = [dataset_problems(resolve_dataset(spec, limit=limit)) for spec in specs]
    sources = [{p["source"] for p in problems} for problems in per_spec]
    out = []
    for i, (name, problems) in enumerate(zip(names, per_spec, strict=True)):
        elsewhere = {s for j, other in enumerate(sources) if j != i for s in other}
        for problem in problems:
            source = problem["source"]
            if len(sources[i]) == 1:
                problem["dataset"] = name
            else:
                problem["dataset"] = f"{name}/{source}" if source in elsewhere else source
            if problem["dataset"] != source:  # ids stay unique when two datasets share a source and a problem
                problem["id"] += "@" + problem["dataset"]
            out.append(problem)
    return out


def dataset_problems(dataset: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Problems from records with columns ``prompt``, ``answer``, ``source`` (plus optional others,
    kept under ``columns`` and passed to the scorer). Each problem gets a stable ``id``."""
    rows = [dict(row) for row in dataset]
    if not rows:
        raise ValueError("the evaluation dataset is empty")
    for i, row in enumerate(rows):
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise ValueError(
                f"evaluation dataset row {i} lacks column(s) {missing}: found {list(row)}, expected at least "
                f"{list(REQUIRED_COLUMNS)} (prepare the data with `pacsrl prepare`)"
            )
    ids = problem_ids([str(r["source"]) for r in rows], [r["prompt"] for r in rows])
    return [
        {
            "id": pid,
            "source": str(r["source"]),
            "prompt": r["prompt"],
            "answer": r["answer"],
            "columns": {k: v for k, v in r.items() if k not in REQUIRED_COLUMNS},
        }
        for pid, r in zip(ids, rows, strict=True)
    ]


def score_completions(
    reward_fn: RewardFn, problem: Mapping[str, Any], completions: Sequence[str]
) -> list[float]:
    """Score one problem's completions with a TRL-style reward function.

    As in TRL, a conversational prompt's completions are passed as ``[{"role": "assistant", "content":
    text}]`` and every dataset column (``answer``, ``source``, the others) as a list with one entry per
    completion.
    """
    n = len(completions)
    prompt = problem["prompt"]
    if isinstance(prompt, str):
        wrapped: list[Any] = list(completions)
    else:
        wrapped = [[{"role": "assistant", "content": text}] for text in completions]
    columns = {"answer": problem["answer"], "source": problem["source"], **problem.get("columns", {})}
    kwargs = {key: [value] * n for key, value in columns.items()}
    scores = reward_fn(prompts=[prompt] * n, completions=wrapped, **kwargs)
    name = getattr(reward_fn, "__name__", repr(reward_fn))
    if scores is None or len(scores) != n:
        got = None if scores is None else len(scores)
        raise ValueError(f"reward function {name} returned {got} scores for {n} completions")
    for j, s in enumerate(scores):
        if s is None or isinstance(s, str) or not math.isfinite(float(s)):
            raise ValueError(
                f"reward function {name} returned {s!r} for sample {j} of problem {problem['id']} "
                f"({problem['source']}): every sample needs a finite score; is it the right scorer for "
                "this dataset?"
            )
    return [float(s) for s in scores]


def _sample_and_score(
    problems: Sequence[dict[str, Any]],
    sampler: Sampler,
    reward_fn: RewardFn,
    n: int,
    *,
    chunk_size: int,
    seed: int | None,
    threshold: float,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    total: int | None = None,
) -> list[dict[str, Any]]:
    """Sample and score ``problems`` chunk by chunk; each finished record goes to ``on_record``."""
    records = []
    done = (total or len(problems)) - len(problems)
    bar = tqdm(total=total or len(problems), initial=done, desc="eval", unit="problem", disable=not progress)
    try:
        for start in range(0, len(problems), chunk_size):
            chunk = problems[start : start + chunk_size]
            chunk_seed = None if seed is None else seed + done + start
            samples = sampler([p["prompt"] for p in chunk], n, seed=chunk_seed)
            if len(samples) != len(chunk) or any(len(s) != n for s in samples):
                raise RuntimeError(
                    f"the sampler returned {[len(s) for s in samples]} samples for {len(chunk)} x {n}"
                )
            for problem, completions in zip(chunk, samples, strict=True):
                scores = score_completions(reward_fn, problem, completions)
                record = {
                    "id": problem["id"],
                    "source": problem["source"],
                    **({"dataset": problem["dataset"]} if "dataset" in problem else {}),
                    "prompt": problem["prompt"],
                    "answer": problem["answer"],
                    "completions": list(completions),
                    "scores": scores,
                    "num_correct": num_correct(scores, threshold),
                    "columns": problem["columns"],
                }
                if on_record is not None:
                    on_record(record)
                records.append(record)
                bar.update(1)
    finally:
        bar.close()
    return records


# --------------------------------------------------------------------------------------------------
# In memory


def evaluate_model(
    model: Any,
    tokenizer: Any,
    dataset: Iterable[Mapping[str, Any]],
    n: int = 32,
    *,
    ks: Sequence[int] | None = None,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 4096,
    batch_size: int = 64,
    seed: int | None = 0,
    reward_fn: str | RewardFn = "math",
    threshold: float = 1.0,
    name: str = "model",
    progress: bool = True,
) -> EvalResult:
    """Evaluate an already-loaded transformers model on ``dataset``, in memory (nothing is written).

    Samples n completions per problem with ``sample_completions`` (the model's train/eval mode is
    restored afterwards), scores them with ``reward_fn`` and computes pass@k for ``ks`` (default: powers
    of two up to n, plus n). ``save_results`` writes the result to a run folder if wanted.
    """
    problems = dataset_problems(dataset)
    sampler = HFSampler(
        model,
        tokenizer,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=False,
    )
    records = _sample_and_score(
        problems,
        sampler,
        resolve_reward(reward_fn),
        n,
        chunk_size=max(1, batch_size // n),
        seed=seed,
        threshold=threshold,
        progress=progress,
    )
    settings = {
        "model": name,
        "name": name,
        "n": n,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "threshold": threshold,
        "reward": reward_fn
        if isinstance(reward_fn, str)
        else getattr(reward_fn, "__name__", repr(reward_fn)),
    }
    return EvalResult(name, records, compute_metrics(records, ks, threshold), settings)


# --------------------------------------------------------------------------------------------------
# Run folders


def run_folder(config: EvalConfig) -> Path:
    """The run folder of ``config``: ``--output``, else ``outputs/eval/<model name>``."""
    name = config.name or config.model or "model"
    return Path(config.output) if config.output else _default_output(name)


def _default_output(model: str) -> Path:
    path = Path(model)
    stem = path.resolve().name if path.exists() else model
    return Path("outputs") / "eval" / re.sub(r"[^\w.-]+", "__", stem)


def _write_summary(result: EvalResult, output_dir: Path) -> dict[str, Path]:
    paths = {
        "metrics": output_dir / METRICS_FILE,
        "table": output_dir / TABLE_FILE,
        "plot": output_dir / PLOT_FILE,
    }
    write_json(paths["metrics"], {"name": result.name, "settings": result.settings, **result.metrics})
    paths["table"].write_text(result.table, encoding="utf-8")
    plot_pass_at_k([(result.name, result.metrics)], paths["plot"])
    result.output_dir = output_dir
    return paths


def save_results(result: EvalResult, output_dir: str | Path) -> dict[str, Path]:
    """Write an in-memory ``EvalResult`` as a run folder (which ``recompute``/``compare_runs`` can read);
    replaces files of the same names. Returns the written paths by kind."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_rollouts(output_dir / ROLLOUTS_FILE, result.records)
    write_json(output_dir / SETTINGS_FILE, result.settings)
    return {"rollouts": output_dir / ROLLOUTS_FILE, **_write_summary(result, output_dir)}


def _check_resume(output_dir: Path, settings: Mapping[str, Any], overwrite: bool) -> list[dict[str, Any]]:
    """Records to resume from, after checking they were sampled with the same settings. Only reads."""
    rollouts = output_dir / ROLLOUTS_FILE
    if overwrite:
        for name in (ROLLOUTS_FILE, METRICS_FILE, TABLE_FILE, PLOT_FILE):
            (output_dir / name).unlink(missing_ok=True)
        return []
    records = read_rollouts(rollouts)
    if not records:
        return []
    settings_path = output_dir / SETTINGS_FILE
    if not settings_path.exists():
        raise ValueError(
            f"{rollouts} holds {len(records)} problems but there is no {SETTINGS_FILE} saying how they were "
            "sampled; pass --overwrite to start over, or choose another --output"
        )
    old = json.loads(settings_path.read_text(encoding="utf-8"))
    diff = [
        f"{k}: {old.get(k)!r} in the folder, {settings.get(k)!r} now"
        for k in RESUME_KEYS
        if old.get(k) != settings.get(k)
    ]
    if diff:
        raise ValueError(
            f"cannot resume {output_dir}: its {len(records)} problems were sampled with other settings ("
            + "; ".join(diff)
            + "). Pass --overwrite to start over, choose another --output, or run "
            "`pacsrl eval --recompute DIR --rescore --reward ...` to only re-score"
        )
    return records


def run_eval(
    config: EvalConfig,
    *,
    dataset: Iterable[Mapping[str, Any]] | None = None,
    sampler: Sampler | None = None,
    reward_fn: RewardFn | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``config.model`` into the run folder ``config.output``, resuming an interrupted run.

    Problems already in ``rollouts.jsonl`` are skipped (the settings that shape samples,
    ``RESUME_KEYS``, must match those in ``settings.json``, unless ``config.overwrite``); each new
    problem's line is appended whole as soon as it is scored. Metrics are computed over every problem
    in ``rollouts.jsonl``.

    Args:
        config: the run's settings.
        dataset: records to evaluate instead of resolving ``config.datasets`` with
            ``pacsrl.data.resolve_dataset``.
        sampler: a ready ``Sampler`` instead of loading ``config.model`` (tests, custom backends).
        reward_fn: a scorer instead of resolving ``config.reward``.
    """
    if config.model is None and sampler is None:
        raise ValueError("no model to evaluate: pass --model PATH_OR_ID")
    name = config.name or config.model or "model"
    output_dir = run_folder(config)

    reward_fn = reward_fn or resolve_reward(config.reward)
    if dataset is None:
        if not config.datasets:
            raise ValueError(
                "no datasets to evaluate: pass --datasets math500,aime24,... (or prepared files)"
            )
        problems = resolve_problems(config.datasets, limit=config.limit)
    else:
        problems = dataset_problems(dataset)
        if config.limit is not None:
            by_source: dict[str, int] = {}
            kept = []
            for p in problems:
                by_source[p["source"]] = by_source.get(p["source"], 0) + 1
                if by_source[p["source"]] <= config.limit:
                    kept.append(p)
            problems = kept

    settings = {
        **dataclasses.asdict(config),
        "name": name,
        "output": str(output_dir),
        "pacsrl_version": __version__,
        # the backend that samples, "auto" resolved: a resume check on it (RESUME_KEYS) needs it up front
        "backend_used": "custom" if sampler is not None else resolve_backend(config.backend),
    }
    records = _check_resume(output_dir, settings, config.overwrite)
    done = {r["id"] for r in records}
    pending = [p for p in problems if p["id"] not in done]
    logger.info(
        "%s: %d problems, %d already in %s, %d to sample (n=%d)",
        name,
        len(problems),
        len(problems) - len(pending),
        output_dir / ROLLOUTS_FILE,
        len(pending),
        config.n,
    )
    if pending:
        backend = settings["backend_used"]
        if sampler is None:
            sampler, backend = load_sampler(
                config.model,
                backend,
                temperature=config.temperature,
                top_p=config.top_p,
                max_new_tokens=config.max_new_tokens,
                batch_size=config.batch_size,
                seed=config.seed,
                dtype=config.dtype,
                gpu_memory_utilization=config.gpu_memory_utilization,
                tensor_parallel_size=config.tensor_parallel_size,
                progress=False,
            )
        output_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that fails before leaves no folder
        write_json(output_dir / SETTINGS_FILE, settings)
        # Only now, about to append, cut off a truncated last line left by a crash (reads never write).
        repair_rollouts(output_dir / ROLLOUTS_FILE)
        chunk_size = config.chunk_size or (64 if backend == "vllm" else max(1, config.batch_size // config.n))
        path = output_dir / ROLLOUTS_FILE
        records += _sample_and_score(
            pending,
            sampler,
            reward_fn,
            config.n,
            chunk_size=chunk_size,
            seed=config.seed,
            threshold=config.threshold,
            on_record=lambda r: append_rollout(path, r),
            progress=progress,
            total=len(problems),
        )
    else:  # every problem is in the folder already: record the settings (threshold, name) its metrics use
        write_json(output_dir / SETTINGS_FILE, settings)
    result = EvalResult(name, records, compute_metrics(records, config.k, config.threshold), settings)
    _write_summary(result, output_dir)
    return result


def load_run(run_dir: str | Path, ks: Sequence[int] | None = None) -> EvalResult:
    """Read a run folder and compute its metrics from ``rollouts.jsonl`` (no model needed).

    Only reads: a truncated last line (a crashed or still-running run) is ignored with a warning and
    the folder is left byte for byte as it was.
    """
    run_dir = Path(run_dir)
    rollouts = run_dir / ROLLOUTS_FILE
    if not rollouts.exists():
        raise FileNotFoundError(f"{run_dir} is not an evaluation run folder: no {ROLLOUTS_FILE} in it")
    settings_path = run_dir / SETTINGS_FILE
    settings = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.exists() else {}
    records = read_rollouts(rollouts)
    name = settings.get("name") or settings.get("model") or run_dir.name
    threshold = settings.get("threshold", 1.0)
    return EvalResult(name, records, compute_metrics(records, ks, threshold), settings, run_dir)


def recompute(
    run_dir: str | Path,
    *,
    ks: Sequence[int] | None = None,
    rescore: bool = False,
    reward: str | RewardFn | None = None,
    threshold: float | None = None,
) -> EvalResult:
    """Recompute a run folder's metrics, table and plot from ``rollouts.jsonl`` without a model.

    With ``rescore``, every stored completion is scored again (by ``reward``, default the run's own
    scorer) and ``rollouts.jsonl`` is rewritten atomically with the new scores (so is a new
    ``threshold``'s ``num_correct``; a truncated last line is then dropped). Otherwise it is only read.
    """
    run_dir = Path(run_dir)
    result = load_run(run_dir, ks)
    old_threshold = result.settings.get("threshold", 1.0)
    threshold = old_threshold if threshold is None else threshold
    if rescore:
        spec = reward if reward is not None else result.settings.get("reward", "math")
        reward_fn = resolve_reward(spec)
        for record in tqdm(result.records, desc="rescoring", unit="problem"):
            record["scores"] = score_completions(reward_fn, record, record["completions"])
        name = getattr(reward_fn, "__name__", repr(reward_fn))
        result.settings["reward"] = spec if isinstance(spec, str) else f"{reward_fn.__module__}:{name}"
    if rescore or threshold != old_threshold:  # stored scores or counts change: rewrite atomically
        result.settings["threshold"] = threshold
        for record in result.records:
            record["num_correct"] = num_correct(record["scores"], threshold)
        write_rollouts(run_dir / ROLLOUTS_FILE, result.records)
        write_json(run_dir / SETTINGS_FILE, result.settings)
    result.metrics = compute_metrics(result.records, ks, threshold)
    _write_summary(result, run_dir)
    return result


def compare_runs(
    run_dirs: Sequence[str | Path], output: str | Path | None = None, ks: Sequence[int] | None = None
) -> tuple[str, Any, list[EvalResult]]:
    """One Markdown table and one plot (a subplot per benchmark, a line per model) from finished runs.

    Model names come from each run's settings (``name``, else ``model``); two runs with the same name
    are told apart by their folder names. The run folders are only read (see ``load_run``). With
    ``output``, writes ``comparison.md``, ``comparison.json`` and ``comparison.png`` there. Returns the
    table, the matplotlib figure and the runs.
    """
    if not run_dirs:
        raise ValueError("compare needs at least one run folder")
    results = [load_run(d, ks) for d in run_dirs]
    names = [r.name for r in results]
    for r in results:
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({Path(r.output_dir or '').name})"
    runs = [(r.name, r.metrics) for r in results]
    table = markdown_table(runs)
    figure = plot_pass_at_k(runs)
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "comparison.md").write_text(table, encoding="utf-8")
        write_json(
            output / "comparison.json", {r.name: {"run": str(r.output_dir), **r.metrics} for r in results}
        )
        figure.savefig(output / "comparison.png", dpi=120)
    return table, figure, results
