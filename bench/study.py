"""Learning study: can PACS, PACS without weights, GRPO (and RLOO, PPO) be told apart on the demo task?

    python bench/study.py --jobs 2                        # the study: every method x 8 seeds; resumable
    python bench/study.py --jobs 2 --methods grpo         # one method's runs first (its plateau)
    python bench/study.py --jobs 1 --seeds 0,1            # part of it (a later call adds the rest)
    python bench/study.py --smoke --output /tmp/study     # tiny sizes, seconds: what the test suite runs

Design (issue 11):

- **Paired seeds.** Seed s gives every method the same RL prompts in the same order, the same initial model (the
  shipped demo checkpoint) and the same sampling seed, in training and in evaluation; methods are compared by
  their per-seed differences (``bench/significance.py``): mean, 95% t-interval, exact sign-test and Wilcoxon
  signed-rank p-values, for each k, against GRPO and against PPO (when run).
- **One fixed evaluation** for every run: the first ``eval_size`` problems of the demo's held-out pool x
  ``eval_samples`` samples at temperature 1.0, unbiased pass@k for k = 1, 2, 4, ..., n. The base model is
  evaluated with the sampling seeds of ``--base-seeds``: two of them measure the evaluation's own noise.
- **Curves.** Held-out pass@k (k = 1 ... curve_samples) and the policy's mean token entropy along those samples
  (``curve_entropy``) on the first ``curve_size`` eval problems every ``curve_every`` steps: the same prompts for
  every run and step; the training rollouts' entropy and reward from the training log, every step.
- **Same settings for every method**: samples per step, learning rate (one, constant), steps per rollout.
  Runs go through the demo's own routine (``pacsrl.demo.training.train_and_evaluate``).

Settings (``STUDY``), the same for every method, and why:

- chain_sum with the demo's options, from the shipped demo model: room both ways. On the first 64 held-out problems
  x 64 samples at temperature 1.0 (the curve's step 0, seed 0) it scores pass@1 21.5% and pass@64 89.1%, inside
  the issue's 5-30% and >= 80%; the base runs measure it on all 512 problems at two sampling seeds.
- 512 eval problems x 64 samples (the issue's minimum) and 512 RL-train problems: together they fill the demo's
  held-out pool of 1,024 problems that warm start never saw.
- 600 optimizer steps x 16 prompts x 8 completions, 2 optimizer steps per rollout, lr 3e-4 constant (the demo's,
  one for every policy, not tuned; PPO's critic has its own, the demo's 3e-3); the curve of 64 problems x 64 samples
  every 25 steps. 16 prompts instead of the demo's 32, to keep a run affordable on one core.
- Why 600 steps: the issue asks to train until GRPO's held-out pass@1 has plateaued. The first sitting ran these
  settings for 150 steps (``bench/results/study-150``, all 42 runs, 33,511 CPU-seconds, about 4.7 hours at
  ``--jobs 2``) and found no method near a plateau: GRPO's mean curve pass@1 still rose +2.80 points from the
  third quarter of training to the last ([+1.73, +3.87], 8 of 8 seeds). 600 steps is the next try; the plateau
  table of ``results.md`` says whether it is long enough (for GRPO's 8 seeds: slowed, +1.76 points in the last
  quarter, [+0.01, +3.51]; README). A GRPO run takes 1,378-1,623 CPU-seconds, so the whole study needs about 9
  hours at ``--jobs 2``, more than twice the issue's ~4: it runs in sittings (the runs file resumes), GRPO's seeds
  first (the plateau is GRPO's).
- The two base-model evaluations do not depend on training, so the 600-step folder holds the 150-step folder's
  (the same 512 x 64 evaluation at sampling seeds 0 and 1; their records say ``copied_from``).

Output (``--output``, default ``bench/results/study``): ``runs.jsonl`` (one line per finished run, appended;
rerunning the same command skips finished runs and tolerates a truncated last line), ``settings.json`` (a folder
holds runs of one setting only), ``results.md`` (tables, labelled partial until every run is in) and the plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the main process logs a line per run; progress bars of two runs at once would interleave (set before tqdm loads)
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # significance.py, study_report.py next to this file

from pacsrl.demo.cli import build_parser
from pacsrl.demo.config import DemoConfig, Method

logger = logging.getLogger("bench.study")

# The study's settings (DemoConfig fields); any demo flag given on the command line overrides one.
STUDY: dict[str, Any] = {
    "steps": 600,
    "prompts_per_step": 16,
    "updates_per_rollout": 2,
    "num_generations": 8,
    "learning_rate": 3e-4,
    "train_size": 512,
    "eval_size": 512,
    "eval_samples": 64,
    "curve_every": 25,
    "curve_size": 64,
    "curve_samples": 64,
    "curve_entropy": True,
    "threads": 1,
}
# --smoke: the whole pipeline at toy sizes (seconds per run), for the test suite.
SMOKE: dict[str, Any] = {
    "steps": 4,
    "prompts_per_step": 2,
    "updates_per_rollout": 2,
    "num_generations": 2,
    "train_size": 8,
    "eval_size": 4,
    "eval_samples": 4,
    "curve_every": 1,
    "curve_size": 2,
    "curve_samples": 4,
    "curve_entropy": True,
    "threads": 1,
}
DEFAULT_METHODS = "pacs,pacs-noweight,grpo,rloo,ppo"
DEFAULT_SEEDS = "0,1,2,3,4,5,6,7"
DEFAULT_BASE_SEEDS = "0,1"
DEFAULT_OUTPUT = Path("bench/results/study")
RUNS_FILE = "runs.jsonl"
SETTINGS_FILE = "settings.json"
# config fields that each run sets (or that do not change results): not in a folder's settings.json
PER_RUN = ("seed", "threads", "algorithms", "pacs_weight_mode")
BASE = "base"


@dataclass(frozen=True)
class Job:
    """One run of the study: ``spec`` is a method spec (``Method.parse``) or ``base`` (evaluate the start only)."""

    spec: str
    seed: int

    @property
    def name(self) -> str:
        return BASE if self.spec == BASE else Method.parse(self.spec).name


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, DemoConfig]:
    parser = build_parser()
    parser.prog = "python bench/study.py"
    parser.description = __doc__
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS, help=f"method specs (default: {DEFAULT_METHODS})"
    )
    parser.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"training seeds (default: {DEFAULT_SEEDS})")
    parser.add_argument(
        "--base-seeds",
        default=DEFAULT_BASE_SEEDS,
        help=f"sampling seeds of the base model's evaluations; two measure its noise (default: {DEFAULT_BASE_SEEDS})",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each (default: 1)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, seconds per run (the test suite's)")
    parser.add_argument(
        "--no-curve-entropy",
        action="store_true",
        help="do not measure the policy's entropy on the curve problems (as the 150-step sitting did not)",
    )
    args = parser.parse_args(argv)
    refused = [
        flag
        for flag, dest in (
            ("--algorithms", "algorithms"),
            ("--beta", "pacs_beta"),
            ("--weight-mode", "pacs_weight_mode"),
            ("--seed", "seed"),
            ("--quick", "quick"),
        )
        if getattr(args, dest) not in (None, False)
    ]
    if refused:
        parser.error(
            f"{', '.join(refused)}: the study sets these per run; use --methods, --seeds and --smoke"
        )
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more")
    try:
        args.method_specs = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
        names = [Method.parse(m).name for m in args.method_specs]
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
        args.base_seed_list = [int(s) for s in args.base_seeds.split(",") if s.strip()]
    except ValueError as err:
        parser.error(str(err))
    if not names or len(set(names)) != len(names):
        parser.error(f"--methods {args.methods!r}: give each method once")
    for flag, seeds in (("--seeds", args.seed_list), ("--base-seeds", args.base_seed_list)):
        if len(set(seeds)) != len(seeds):
            parser.error(f"{flag}: a seed is given twice")
    if len(args.seed_list) < 2:
        parser.error(f"--seeds {args.seeds!r}: give two or more seeds (paired differences need several)")
    # demo flags given on the command line (each defaults to None) override the study's settings
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(DemoConfig)
        if getattr(args, f.name, None) is not None
    }
    if args.no_curve_entropy:
        given["curve_entropy"] = False
    try:
        config = DemoConfig(**{**(SMOKE if args.smoke else STUDY), **given})
    except ValueError as err:
        parser.error(str(err))
    args.command = " ".join(["python bench/study.py", *argv])
    if args.output is None:
        args.output = DEFAULT_OUTPUT if not args.smoke else Path("runs") / "study-smoke"
    return args, config


# --------------------------------------------------------------------------------------------------
# Runs file: append-only JSON lines


def read_runs(path: Path) -> list[dict[str, Any]]:
    """The finished runs in ``path`` (none if it does not exist); a line that is not JSON (a write cut short by an
    interruption) is skipped with a warning."""
    if not path.exists():
        return []
    runs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s line %d is not a whole record (an interrupted write?): skipped", path, number)
    return runs


def append_run(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a line, after a newline if the file ends in a cut-short line."""
    prefix = ""
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            prefix = "" if f.read(1) == b"\n" else "\n"
    with path.open("a") as f:
        f.write(prefix + json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_settings(output: Path, settings: dict[str, Any]) -> None:
    """Write ``settings.json``, or refuse if the folder holds runs made with other settings.

    A setting that the folder's runs predate (a ``DemoConfig`` field added since, e.g. for a new method) is added
    to ``settings.json`` at its current value: its default leaves the earlier methods as they were."""
    path = output / SETTINGS_FILE
    if not path.exists():
        path.write_text(json.dumps(settings, indent=2) + "\n")
        return
    old = json.loads(path.read_text())
    changed = sorted(k for k in set(old) & set(settings) if old[k] != settings[k])
    if changed:
        raise SystemExit(
            f"{output} holds runs made with other settings ({', '.join(changed)}); choose another --output"
        )
    added = sorted(set(settings) - set(old))
    if added:
        logger.info("settings new since the runs in %s: %s", output, ", ".join(added))
        path.write_text(json.dumps({**old, **{k: settings[k] for k in added}}, indent=2) + "\n")


def study_settings(config: DemoConfig) -> dict[str, Any]:
    """What every run of a results folder shares: the config without what each run sets (its seed, and its method's
    algorithm and class weights) and the thread count."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in PER_RUN}
    settings["task_config"] = config.resolved_task_config()
    return settings


# --------------------------------------------------------------------------------------------------
# One run (in a worker process with --jobs > 1)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict[str, str]:
    """What a run's floating-point results depend on beyond the code: the CPU, the kernels torch picked for it
    (AVX2 and AVX512 round differently) and torch's version. Recorded per run, since sittings may land on
    different machines of a shared pool."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "kernels": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def run_job(job: Job, config: DemoConfig) -> dict[str, Any]:
    """Train and evaluate one method at one seed (or evaluate the base model): the record for ``runs.jsonl``."""
    import torch

    from pacsrl.demo.evaluation import evaluate, load_data, load_policy
    from pacsrl.demo.training import train_and_evaluate

    torch.set_num_threads(config.threads)
    started, cpu = time.perf_counter(), _cpu_seconds()
    seeded = dataclasses.replace(config, seed=job.seed)
    data = load_data(seeded)
    record: dict[str, Any] = {"method": job.name, "spec": job.spec, "seed": job.seed, "machine": machine()}
    if job.spec == BASE:
        model, tokenizer = load_policy(seeded.model)
        final = evaluate(
            model,
            tokenizer,
            data.eval,
            seeded,
            n=seeded.eval_samples,
            name=BASE,
            reward_fn=data.reward_fn,
            progress=False,
        )
        record["eval"] = _pass_at(final.metrics["all"])
    else:
        with tempfile.TemporaryDirectory(prefix="pacsrl-study-") as work:
            result = train_and_evaluate(Method.parse(job.spec), seeded, data, Path(work))
        record["eval"] = _pass_at(result.eval["all"])
        record["curve"] = result.curve
        record["log"] = [
            {k: h[k] for k in ("step", "entropy", "reward") if k in h}
            for h in result.log_history
            if "step" in h
        ]
        record["train_seconds"] = round(result.train_seconds, 1)
        record["curve_seconds"] = round(result.curve_seconds, 1)
        record["eval_seconds"] = round(result.eval_seconds, 1)
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    record["cpu_seconds"] = round(_cpu_seconds() - cpu, 1)
    return record


def _pass_at(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("pass@")}


def _worker_init() -> None:
    logging.basicConfig(level=logging.WARNING)


# --------------------------------------------------------------------------------------------------
# The study


def pending_jobs(args: argparse.Namespace, runs: list[dict[str, Any]]) -> list[Job]:
    """Every run of the study not yet in ``runs``, seed by seed (so a partial study holds whole seeds), the base
    evaluations first."""
    done = {(r["spec"], r["seed"]) for r in runs}
    jobs = [Job(BASE, s) for s in args.base_seed_list]
    jobs += [Job(spec, seed) for seed in args.seed_list for spec in args.method_specs]
    return [j for j in jobs if (j.spec, j.seed) not in done]


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


class Progress:
    """The progress line per finished run, with an ETA from this sitting's mean wall time per kind of run."""

    def __init__(self, total: int, jobs: int):
        self.total, self.jobs, self.finished = total, jobs, 0
        self.walls: dict[bool, list[float]] = {True: [], False: []}  # base run? -> wall seconds

    def line(self, job: Job, record: dict[str, Any], left: list[Job]) -> str:
        self.finished += 1
        self.walls[job.spec == BASE].append(record["wall_seconds"])
        seconds = 0.0
        for j in left:
            known = self.walls[j.spec == BASE] or self.walls[False] or self.walls[True]
            seconds += sum(known) / len(known)
        k = max(int(key.removeprefix("pass@")) for key in record["eval"])
        return (
            f"[{self.finished}/{self.total}] {job.name} seed {job.seed}: pass@1 {100 * record['eval']['pass@1']:.1f}%, "
            f"pass@{k} {100 * record['eval'][f'pass@{k}']:.1f}% in {record['wall_seconds']:.0f} s; "
            f"{len(left)} left, ETA {_duration(seconds / self.jobs) if left else 'done'}"
        )


def run_study(args: argparse.Namespace, config: DemoConfig) -> list[dict[str, Any]]:
    """Run every pending job (``args.jobs`` at a time), appending each record as it finishes and rewriting the
    report after each; returns all runs of the folder."""
    from study_report import write_report

    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    check_settings(output, study_settings(config))
    runs_path = output / RUNS_FILE
    runs = read_runs(runs_path)
    jobs = pending_jobs(args, runs)
    logger.info(
        "study: %s x seeds %s (+ base at seeds %s) -> %s; %d of %d runs to do, %d at a time",
        ",".join(args.method_specs),
        args.seed_list,
        args.base_seed_list,
        output,
        len(jobs),
        len(args.base_seed_list) + len(args.seed_list) * len(args.method_specs),
        args.jobs,
    )
    progress = Progress(len(jobs), args.jobs)

    def finish(job: Job, record: dict[str, Any], left: list[Job]) -> None:
        append_run(runs_path, record)
        runs.append(record)
        logger.info(progress.line(job, record, left))
        write_report(runs, args, config, output)

    if args.jobs == 1:
        for i, job in enumerate(jobs):
            logger.info("starting %s seed %d", job.name, job.seed)
            finish(job, run_job(job, config), jobs[i + 1 :])
    else:
        _run_parallel(jobs, config, args.jobs, finish)
    write_report(runs, args, config, output)
    return runs


def _run_parallel(jobs: list[Job], config: DemoConfig, workers: int, finish: Any) -> None:
    """Run ``jobs`` in ``workers`` processes (``config.threads`` torch threads each), calling ``finish`` as each
    ends."""
    queue = list(jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
        running: dict[Future, Job] = {}
        try:
            while queue or running:
                while queue and len(running) < workers:
                    job = queue.pop(0)
                    logger.info("starting %s seed %d", job.name, job.seed)
                    running[pool.submit(run_job, job, config)] = job
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    finish(job, future.result(), [*running.values(), *queue])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    try:
        run_study(args, config)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished runs are in {args.output / RUNS_FILE}; rerun to resume", file=sys.stderr
        )
        return 130
    print(f"Results: {args.output.resolve()}/results.md ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    from pacsrl.cli import setup_logging

    setup_logging()
    sys.exit(main())
