"""The offline demo's library: evaluate a checkpoint, train it with PACS and with GRPO on the same prompts and
sample budget, evaluate again, and write a report folder.

One routine, ``train_and_evaluate``, trains and evaluates one method (an algorithm and its settings); the demo
(``run_demo``, ``pacsrl demo``) and the learning benchmark (``bench/learning.py``) both call it, so they cannot
drift apart. Every evaluation samples with a fixed seed and restores the global RNG afterwards, so the base model
and every trained model are scored on the same problems with the same random numbers, and an evaluation in the
middle of training does not change the training run's own sampling.

A report folder holds:

- ``metrics.json``: settings, the base evaluation, and per method its final evaluation, held-out pass@1 curve and
  training log; rewritten (atomically) after every evaluation, so an interrupted run keeps what it finished;
- ``report.md``: the comparison table (pass@1, pass@k, mean training reward, wall times) and the pass@k table;
- ``pass_at_k.png`` (base vs every method), ``curve_reward.png``, ``curve_heldout_pass1.png``,
  ``curve_entropy.png`` (a line per method).

Shape of the numbers: pass@k are fractions in [0, 1] in ``metrics.json`` and percentages in tables and plots.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from pacsrl.demo import DEMO_TASK, DEMO_TASK_CONFIG

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

Algorithm = Literal["pacs", "grpo"]
ALGORITHMS: tuple[str, ...] = ("pacs", "grpo")
_METHOD_SPEC = re.compile(r"(grpo|pacs|pacs-noweight)(?:@([0-9]*\.?[0-9]+(?:e-?[0-9]+)?))?")

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PASS_AT_K_PLOT = "pass_at_k.png"
CURVE_PLOTS = {
    "reward": "curve_reward.png",
    "heldout_pass@1": "curve_heldout_pass1.png",
    "entropy": "curve_entropy.png",
}

__all__ = [
    "ALGORITHMS",
    "DemoConfig",
    "DemoData",
    "HeldOutCurveCallback",
    "Method",
    "MethodResult",
    "curve_auc",
    "curve_pass1",
    "evaluate",
    "load_data",
    "load_policy",
    "run_demo",
    "t_interval",
    "t_quantile",
    "train_and_evaluate",
]


# --------------------------------------------------------------------------------------------------
# Settings


@dataclass
class DemoConfig:
    """Settings of ``pacsrl demo`` and of each run of ``bench/learning.py``.

    Both algorithms get the same prompts (same seed, same order), the same number of generated samples per step
    (``prompts_per_step * num_generations``), the same number of steps, learning rate, schedule and sampling
    temperature; only the loss differs.
    """

    model: str | None = field(
        default=None,
        metadata={
            "help": "Local checkpoint to start from (its tokenizer needs a chat template); default: the "
            "shipped warm-started tiny model (pacsrl.demo.demo_checkpoint_path())."
        },
    )
    task: str = field(
        default=DEMO_TASK, metadata={"help": "reasoning-gym task; the reward is its own scorer."}
    )
    task_config: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": f"Task options (JSON on the command line); default for {DEMO_TASK}: "
            f"{json.dumps(DEMO_TASK_CONFIG)}, else the task's defaults."
        },
    )
    algorithms: tuple[str, ...] = field(
        default=ALGORITHMS,
        metadata={"help": "Algorithms to train, in order: 'pacs', 'grpo' (comma-separated)."},
    )
    steps: int = field(
        default=120, metadata={"help": "Optimizer steps per algorithm (updates_per_rollout per rollout)."}
    )
    prompts_per_step: int = field(default=32, metadata={"help": "Prompts per optimizer step (B)."})
    updates_per_rollout: int = field(
        default=2,
        metadata={
            "help": "Optimizer steps per rollout (TRL's steps_per_generation): a rollout samples "
            "prompts_per_step * updates_per_rollout prompts and is cut into that many mini-batches; the later "
            "ones are off-policy, where PACS's implicit critic psi is non-zero (the paper uses 4)."
        },
    )
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (G)."})
    learning_rate: float = field(
        default=3e-4, metadata={"help": "AdamW learning rate (constant, no warm-up)."}
    )
    pacs_beta: float = field(
        default=1.0, metadata={"help": "PACS: scale of the implicit reward (the paper's beta)."}
    )
    pacs_weight_mode: str = field(
        default="question",
        metadata={
            "help": "PACS: BCE class weights, 'question' (class-balanced per group) or 'none'.",
            "choices": ["question", "none", "only_positive", "only_negative"],
        },
    )
    grpo_loss_type: str = field(
        default="dapo",
        metadata={
            "help": "GRPO: TRL's loss_type ('dapo' is TRL's default; 'grpo' the original per-sequence "
            "normalisation). KL beta is 0 for both algorithms, as in the paper."
        },
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Rollout sampling temperature (the paper's 1.0)."}
    )
    max_completion_length: int = field(
        default=40, metadata={"help": "Maximum completion tokens, train and eval."}
    )
    train_size: int = field(default=512, metadata={"help": "Distinct RL training problems (cycled through)."})
    eval_size: int = field(
        default=256, metadata={"help": "Held-out problems for the final pass@k evaluation."}
    )
    eval_samples: int = field(
        default=8, metadata={"help": "Samples per problem in the final evaluation (n)."}
    )
    eval_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Evaluation temperature. 1.0 (top_p 1) scores the distribution RL trains; the paper "
            "evaluates at 0.6 / top_p 0.95, which flatters a tiny model's pass@1."
        },
    )
    eval_top_p: float = field(default=1.0, metadata={"help": "Evaluation top_p."})
    curve_every: int = field(default=10, metadata={"help": "Steps between held-out pass@1 measurements."})
    curve_size: int = field(
        default=64, metadata={"help": "Held-out problems per curve point (first of the eval split)."}
    )
    curve_samples: int = field(default=4, metadata={"help": "Samples per problem per curve point."})
    seed: int = field(
        default=0, metadata={"help": "Seed of training (prompt order, sampling) and evaluation."}
    )
    threads: int = field(default=2, metadata={"help": "torch CPU threads."})
    save_models: bool = field(
        default=False, metadata={"help": "Also save each trained model under the report."}
    )

    def __post_init__(self):
        self.algorithms = tuple(self.algorithms)
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown or not self.algorithms:
            raise ValueError(
                f"algorithms={list(self.algorithms)}: expected one or more of {list(ALGORITHMS)}"
            )
        if len(set(self.algorithms)) != len(self.algorithms):
            raise ValueError(f"algorithms={list(self.algorithms)} lists an algorithm twice")
        positive = (
            "steps",
            "prompts_per_step",
            "updates_per_rollout",
            "train_size",
            "eval_size",
            "eval_samples",
            "curve_every",
            "curve_size",
            "curve_samples",
            "max_completion_length",
            "threads",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations}: both algorithms compare a completion with the "
                "others of its prompt, so they need at least 2 (the paper uses 8)"
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate={self.learning_rate} must be a positive number")
        if self.curve_size > self.eval_size:
            raise ValueError(
                f"curve_size={self.curve_size} exceeds eval_size={self.eval_size}: the curve uses the "
                "first curve_size problems of the eval split; lower curve_size or raise eval_size"
            )
        if self.curve_samples > self.eval_samples:
            raise ValueError(f"curve_samples={self.curve_samples} exceeds eval_samples={self.eval_samples}")

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A smoke-test sized demo (about 15 s on 2 CPU threads); ``overrides`` win."""
        settings: dict[str, Any] = {
            "steps": 6,
            "prompts_per_step": 8,
            "train_size": 64,
            "eval_size": 32,
            "curve_every": 3,
            "curve_size": 16,
            "curve_samples": 2,
        }
        return cls(**{**settings, **overrides})

    def resolved_task_config(self) -> dict[str, Any]:
        if self.task_config is not None:
            return dict(self.task_config)
        return dict(DEMO_TASK_CONFIG) if self.task == DEMO_TASK else {}


@dataclass(frozen=True)
class Method:
    """One trained contender: an algorithm and the settings that distinguish it from the others.

    ``pacs_beta`` / ``pacs_weight_mode`` are used by PACS only; None takes the ``DemoConfig``'s value.
    """

    name: str
    algorithm: Algorithm
    pacs_beta: float | None = None
    pacs_weight_mode: str | None = None

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"method {self.name!r}: algorithm {self.algorithm!r} is not one of {list(ALGORITHMS)}"
            )

    @classmethod
    def of(cls, algorithm: str) -> Method:
        """The demo's method for an algorithm, with the ``DemoConfig``'s settings: ``PACS`` or ``GRPO``."""
        return cls(algorithm.upper(), algorithm)  # type: ignore[arg-type]

    @classmethod
    def parse(cls, spec: str) -> Method:
        """A method from its short spec: ``grpo``, ``pacs`` or ``pacs@BETA`` (class weights 'question'),
        ``pacs-noweight`` or ``pacs-noweight@BETA`` (weights 'none'); e.g. ``pacs@0.5``."""
        match = _METHOD_SPEC.fullmatch(spec.strip().lower())
        if match is None:
            raise ValueError(
                f"method {spec!r}: expected 'grpo', 'pacs', 'pacs@BETA', 'pacs-noweight' or "
                "'pacs-noweight@BETA' (e.g. 'pacs@0.5')"
            )
        kind, beta_text = match.group(1), match.group(2)
        if kind == "grpo":
            if beta_text is not None:
                raise ValueError(f"method {spec!r}: GRPO has no PACS beta (its KL beta is 0)")
            return cls("GRPO", "grpo")
        beta = float(beta_text) if beta_text is not None else None
        if beta is not None and not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"method {spec!r}: beta must be a positive number")
        weights = "none" if kind == "pacs-noweight" else "question"
        name = ("PACS" if weights == "question" else "PACS w/o weights") + (f" beta={beta:g}" if beta else "")
        return cls(name, "pacs", beta, weights)


# --------------------------------------------------------------------------------------------------
# Pure helpers (tested against hand-worked values)


def _t_two_sided_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4), t >= 0."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if (
        df % 2 == 1
    ):  # (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 2 terms in the sum
        term, total = 1.0, 0.0
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * j) / (2 * j + 1)
        return 2.0 / math.pi * (theta + (s * c * total if df > 1 else 0.0))
    term, total = 1.0, 0.0  # sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df/2 terms
    for j in range(1, df // 2 + 1):
        total += term
        term *= c * c * (2 * j - 1) / (2 * j)
    return s * total


def t_quantile(confidence: float, df: int) -> float:
    """The t such that P(|T| <= t) = ``confidence`` for Student's t with ``df`` degrees of freedom
    (e.g. 12.706 for 95% and df=1, 4.303 for df=2, 1.96 as df grows). Bisection on the exact CDF."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    if df < 1:
        raise ValueError(f"df={df} must be >= 1")
    lo, hi = 0.0, 1.0
    while _t_two_sided_cdf(hi, df) < confidence:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_two_sided_cdf(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the t confidence interval of the mean: ``mean +- t * s / sqrt(n)`` with the
    sample standard deviation s (n - 1 in the denominator). One value gives a half-width of NaN (unknown)."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(confidence, n - 1) * sd / math.sqrt(n)


def curve_auc(steps: Sequence[float], values: Sequence[float]) -> float:
    """Area under a curve by the trapezoid rule, divided by the step range: the curve's mean height, so it is
    in the units of ``values`` (held-out pass@1) and comparable across step counts."""
    if len(steps) != len(values) or len(steps) < 2:
        raise ValueError(
            f"curve_auc needs two or more points with one value each, got {len(steps)} steps and "
            f"{len(values)} values"
        )
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"curve steps must increase strictly, got {list(steps)}")
    area = sum((b - a) * (u + v) / 2 for a, b, u, v in zip(steps, steps[1:], values, values[1:]))
    return area / (steps[-1] - steps[0])


def mean_of(history: Sequence[dict[str, Any]], key: str) -> float:
    """Mean of ``key`` over the log entries that hold it (NaN if none)."""
    values = [float(h[key]) for h in history if key in h]
    return math.fsum(values) / len(values) if values else math.nan


# --------------------------------------------------------------------------------------------------
# Model, data, evaluation


def load_policy(path: str | Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a local checkpoint, float32, offline; default the shipped demo checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from pacsrl.demo import demo_checkpoint_path

    path = Path(path) if path is not None else demo_checkpoint_path()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {str(path)!r} is not a local checkpoint folder (the demo never downloads)"
        )
    tokenizer_class = None
    if (path / "tokenizer_config.json").is_file():
        tokenizer_class = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    if tokenizer_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        # A plain tokenizers.json tokenizer (the demo's own): load it as declared. transformers 5's AutoTokenizer
        # would pick the model type's tokenizer class (Qwen2Tokenizer) and rebuild another pre-tokenizer.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {path} has no chat template: the demo's prompts are chat messages; use an "
            "instruct/chat checkpoint or add a chat_template to its tokenizer_config.json"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model, tokenizer


@dataclass
class DemoData:
    """RL-train prompts, the held-out eval split, the curve subset (its first problems) and the reward."""

    train: Dataset
    eval: Dataset
    curve: Dataset
    reward_fn: Callable[..., list[float]]


def load_data(config: DemoConfig) -> DemoData:
    """The demo task's splits: for the demo task with its default config, the held-out pool of
    ``pacsrl.demo.demo_splits`` (never seen in warm-start); otherwise disjoint splits of the task's stream."""
    from pacsrl.data.gym import make_gym_reward, make_gym_splits
    from pacsrl.demo import demo_splits

    task_config = config.resolved_task_config()
    if config.task == DEMO_TASK and task_config == DEMO_TASK_CONFIG:
        train, evals = demo_splits(config.train_size, config.eval_size)
    else:
        train, evals = make_gym_splits(
            config.task, config.train_size, config.eval_size, seed=config.seed, config=task_config
        )
    return DemoData(train, evals, evals.select(range(config.curve_size)), make_gym_reward(config.task))


def evaluate(
    model: Any,
    tokenizer: Any,
    dataset: Dataset,
    config: DemoConfig,
    *,
    n: int,
    name: str,
    reward_fn: Callable[..., list[float]],
    progress: bool = True,
) -> Any:
    """``pacsrl.eval.evaluate_model`` with the demo's sampling settings and seed, leaving the global torch RNG
    as it found it (sampling reseeds it), so that an evaluation never changes a training run."""
    from pacsrl.eval import evaluate_model

    cpu_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        return evaluate_model(
            model,
            tokenizer,
            dataset,
            n=n,
            temperature=config.eval_temperature,
            top_p=config.eval_top_p,
            max_new_tokens=config.max_completion_length,
            batch_size=256,
            seed=config.seed,
            reward_fn=reward_fn,
            name=name,
            progress=progress,
        )
    finally:
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def curve_pass1(
    model: Any,
    tokenizer: Any,
    dataset: Dataset,
    config: DemoConfig,
    reward_fn: Callable[..., list[float]],
    *,
    name: str,
) -> float:
    """One point of the held-out pass@1 curve: ``config.curve_samples`` samples per problem of ``dataset``, with
    ``evaluate`` (so every point uses the same problems and seed), no progress bar."""
    result = evaluate(
        model, tokenizer, dataset, config, n=config.curve_samples, name=name, reward_fn=reward_fn, progress=False
    )
    return result.metrics["all"]["pass@1"]


class HeldOutCurveCallback(TrainerCallback):
    """Measures held-out pass@1 every ``every`` optimizer steps (and at the last one) on the main process, with
    ``evaluate`` (same problems, same seed each time); each point goes to ``on_point(step, pass@1)``."""

    def __init__(
        self,
        tokenizer: Any,
        dataset: Dataset,
        config: DemoConfig,
        reward_fn: Callable[..., list[float]],
        on_point: Callable[[int, float], None],
        every: int | None = None,
    ):
        self.tokenizer, self.dataset, self.config, self.reward_fn = tokenizer, dataset, config, reward_fn
        self.on_point = on_point
        self.every = every or config.curve_every
        self.seconds = 0.0  # time spent measuring, to keep out of the training time

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if not state.is_world_process_zero or (step % self.every != 0 and step != state.max_steps):
            return
        started = time.perf_counter()
        pass1 = curve_pass1(model, self.tokenizer, self.dataset, self.config, self.reward_fn, name=f"step {step}")
        self.seconds += time.perf_counter() - started
        self.on_point(step, pass1)


class _ProgressBar(TrainerCallback):
    """A tqdm bar per training run showing the latest reward and entropy, in place of the Trainer's own bar and
    its printed log dicts."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None
        self.shown: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            # a step without a rollout logs no reward: keep showing the last one
            numbers = {k: logs[k] for k in ("reward", "entropy") if isinstance(logs.get(k), (int, float))}
            self.shown.update({k: f"{v:.3f}" for k, v in numbers.items()})
            self.bar.set_postfix(self.shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------------------------------
# Training one method


@dataclass
class MethodResult:
    """What ``train_and_evaluate`` returns (and ``metrics.json`` stores under ``methods``)."""

    method: Method
    eval: dict[str, Any] | None = None
    curve: list[dict[str, float]] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = math.nan
    curve_seconds: float = math.nan
    eval_seconds: float = math.nan
    done: bool = False

    def summary(self) -> dict[str, Any]:
        """JSON-ready record: the final eval (all problems), the curve, the training log and aggregates."""
        points = list(self.curve)
        return {
            "algorithm": self.method.algorithm,
            "settings": dataclasses.asdict(self.method),
            "done": self.done,
            "eval": self.eval,
            "curve": points,
            "heldout_pass@1_auc": curve_auc([p["step"] for p in points], [p["pass@1"] for p in points])
            if len(points) >= 2
            else None,
            "mean_train_reward": _finite_or_none(mean_of(self.log_history, "reward")),
            "mean_entropy": _finite_or_none(mean_of(self.log_history, "entropy")),
            "train_seconds": round(self.train_seconds, 2) if math.isfinite(self.train_seconds) else None,
            "curve_seconds": round(self.curve_seconds, 2) if math.isfinite(self.curve_seconds) else None,
            "eval_seconds": round(self.eval_seconds, 2) if math.isfinite(self.eval_seconds) else None,
            "log_history": self.log_history,
        }


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def trainer_config(method: Method, config: DemoConfig, output_dir: Path) -> Any:
    """The ``PACSConfig`` or ``GRPOConfig`` of a method: everything but the loss is shared."""
    from trl import GRPOConfig

    from pacsrl.config import PACSConfig

    shared = {
        "output_dir": str(output_dir),
        "max_steps": config.steps,
        "per_device_train_batch_size": config.prompts_per_step * config.num_generations,
        "gradient_accumulation_steps": 1,
        "steps_per_generation": config.updates_per_rollout,
        "num_generations": config.num_generations,
        "max_completion_length": config.max_completion_length,
        "temperature": config.temperature,
        "top_p": 1.0,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "seed": config.seed,
        "data_seed": config.seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "bf16": False,
        "gradient_checkpointing": False,
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
    }
    if method.algorithm == "pacs":
        return PACSConfig(
            **shared,
            pacs_beta=method.pacs_beta if method.pacs_beta is not None else config.pacs_beta,
            pacs_weight_mode=method.pacs_weight_mode or config.pacs_weight_mode,
            # the exact same gradients; off so that the logged entropy covers every completion, as GRPO's does
            # (the fast path leaves groups with equal labels out of the forward pass)
            pacs_on_policy_fast_path=False,
        )
    return GRPOConfig(**shared, beta=0.0, loss_type=config.grpo_loss_type)


def train_and_evaluate(
    method: Method,
    config: DemoConfig,
    data: DemoData,
    output_dir: Path,
    *,
    start_point: float | None = None,
    on_update: Callable[[MethodResult], None] | None = None,
) -> MethodResult:
    """Train a fresh copy of the starting checkpoint with ``method``, tracking held-out pass@1, then evaluate it.

    Args:
        start_point: held-out pass@1 of the starting model on ``data.curve`` (step 0 of the curve); measured
            here when None (pass the base model's to share it between methods).
        on_update: called with the partial result after every curve point and at the end (to save it).
    """
    from trl import GRPOTrainer

    from pacsrl.trainer import PACSTrainer

    torch.set_num_threads(config.threads)
    model, tokenizer = load_policy(config.model)
    result = MethodResult(method)

    def update() -> None:
        if on_update is not None:
            on_update(result)

    def on_point(step: int, pass1: float) -> None:
        result.curve.append({"step": step, "pass@1": pass1})
        logger.info(
            "%s step %d/%d: held-out pass@1 %.3f (%d problems x %d)",
            method.name,
            step,
            config.steps,
            pass1,
            len(data.curve),
            config.curve_samples,
        )
        update()

    if start_point is None:
        start_point = curve_pass1(model, tokenizer, data.curve, config, data.reward_fn, name="start")
    on_point(0, start_point)

    args = trainer_config(method, config, output_dir)
    trainer_cls = PACSTrainer if method.algorithm == "pacs" else GRPOTrainer
    curve = HeldOutCurveCallback(tokenizer, data.curve, config, data.reward_fn, on_point)
    trainer = trainer_cls(
        model=model,
        reward_funcs=data.reward_fn,
        args=args,
        train_dataset=data.train,
        processing_class=tokenizer,
        callbacks=[curve],
    )
    for callback in (ProgressCallback, PrinterCallback):  # they print every log dict; ours shows a short line
        trainer.remove_callback(callback)
    trainer.add_callback(_ProgressBar(f"{method.name} training"))
    logger.info(
        "training %s (%s): %d steps x %d prompts x %d completions, lr %g",
        method.name,
        trainer_cls.__name__,
        config.steps,
        config.prompts_per_step,
        config.num_generations,
        config.learning_rate,
    )
    started = time.perf_counter()
    trainer.train()
    result.train_seconds = time.perf_counter() - started - curve.seconds
    result.curve_seconds = curve.seconds
    result.log_history = [_plain(h) for h in trainer.state.log_history if "reward" in h or "entropy" in h]
    if config.save_models:
        trainer.save_model(str(output_dir / "model"))

    started = time.perf_counter()
    final = evaluate(
        trainer.model,
        tokenizer,
        data.eval,
        config,
        n=config.eval_samples,
        name=method.name,
        reward_fn=data.reward_fn,
    )
    result.eval_seconds = time.perf_counter() - started
    result.eval = final.metrics
    result.done = True
    overall = final.metrics["all"]
    logger.info(
        "%s: held-out pass@1 %.3f, pass@%d %.3f after %.0f s of training",
        method.name,
        overall["pass@1"],
        config.eval_samples,
        overall[f"pass@{config.eval_samples}"],
        result.train_seconds,
    )
    update()
    return result


def _plain(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
        for k, v in entry.items()
    }


# --------------------------------------------------------------------------------------------------
# The demo


def default_output_dir() -> Path:
    return Path("runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False, default=_json_default) + "\n", encoding="utf-8")
    tmp.replace(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {obj!r}")


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def run_demo(config: DemoConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the starting checkpoint, train and evaluate each algorithm of ``config``, write the report folder.

    Returns the content of ``metrics.json`` (with ``output_dir`` added). ``metrics.json`` is rewritten after
    every evaluation, so an interrupted demo keeps every result it reached.
    """
    torch.set_num_threads(config.threads)
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    from pacsrl.demo import demo_checkpoint_path

    model_path = Path(config.model) if config.model is not None else demo_checkpoint_path()
    report: dict[str, Any] = {
        "settings": {
            **dataclasses.asdict(config),
            "model": str(model_path),
            "task_config": config.resolved_task_config(),
            "torch": torch.__version__,
        },
        "base": None,
        "methods": {},
        "wall_seconds": None,
        "finished": False,
    }

    def save() -> None:
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        _write_json(output_dir / METRICS_FILE, _nan_to_none(report))

    logger.info(
        "demo: %s on %s %s; writing %s",
        ", ".join(config.algorithms),
        config.task,
        json.dumps(config.resolved_task_config()),
        output_dir,
    )
    data = load_data(config)
    model, tokenizer = load_policy(config.model)
    t0 = time.perf_counter()
    base = evaluate(
        model, tokenizer, data.eval, config, n=config.eval_samples, name="base", reward_fn=data.reward_fn
    )
    base_curve_pass1 = curve_pass1(model, tokenizer, data.curve, config, data.reward_fn, name="base")
    report["base"] = {
        "eval": base.metrics,
        "curve_pass@1": base_curve_pass1,
        "eval_seconds": round(time.perf_counter() - t0, 2),
    }
    logger.info(
        "base: held-out pass@1 %.3f, pass@%d %.3f (%d problems x %d samples, T=%g)",
        base.metrics["all"]["pass@1"],
        config.eval_samples,
        base.metrics["all"][f"pass@{config.eval_samples}"],
        len(data.eval),
        config.eval_samples,
        config.eval_temperature,
    )
    del model
    save()

    for algorithm in config.algorithms:
        method = Method.of(algorithm)

        def on_update(result: MethodResult, key: str = algorithm) -> None:
            report["methods"][key] = result.summary()
            save()

        try:
            train_and_evaluate(
                method,
                config,
                data,
                output_dir / algorithm,
                start_point=report["base"]["curve_pass@1"],
                on_update=on_update,
            )
        finally:  # also on Ctrl-C: the report shows every finished method and the partial curves
            save()
            write_report(report, output_dir)

    report["finished"] = True
    save()
    write_report(report, output_dir)
    report["output_dir"] = str(output_dir)
    return report


# --------------------------------------------------------------------------------------------------
# Report: tables and plots


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
        "# pacsrl demo: PACS vs GRPO",
        "",
        (
            f"Model `{s['model']}`, task `{s['task']}` {json.dumps(s['task_config'])}. Each algorithm: {s['steps']} steps "
            f"x {s['prompts_per_step']} prompts x {s['num_generations']} completions = {budget} generated samples, "
            f"{s['updates_per_rollout']} optimizer step(s) per rollout, lr {s['learning_rate']} (constant), rollout "
            f"temperature {s['temperature']}, max {s['max_completion_length']} completion tokens, seed {s['seed']}; PACS beta "
            f"{s['pacs_beta']}, weights '{s['pacs_weight_mode']}'; GRPO loss_type '{s['grpo_loss_type']}', KL beta 0."
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
