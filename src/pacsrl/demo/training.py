"""Training one method: ``train_and_evaluate`` trains a fresh copy of the starting checkpoint with PACS, TRL's GRPO
or RLOO, or pacsrl's PPO, tracks held-out pass@1 during training, evaluates the result and returns a ``MethodResult``.

The demo (``run_demo``, ``pacsrl demo``) and the learning benchmark (``bench/learning.py``) both call it, so they
cannot drift apart. Every algorithm gets the same settings (``trainer_config``); only the algorithm differs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from pacsrl.demo.config import DemoConfig, Method
from pacsrl.demo.evaluation import DemoData, HeldOutCurveCallback, curve_point, evaluate, load_policy

logger = logging.getLogger(__name__)


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
    """The config of a method's algorithm (``pacsrl.algorithms``): everything but the algorithm is shared."""
    from pacsrl.algorithms import config_class
    from pacsrl.demo import demo_checkpoint_path

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
    config_cls = config_class(method.algorithm)
    if method.algorithm == "pacs":
        return config_cls(
            **shared,
            pacs_beta=method.pacs_beta if method.pacs_beta is not None else config.pacs_beta,
            pacs_weight_mode=method.pacs_weight_mode or config.pacs_weight_mode,
            # the exact same gradients; off so that the logged entropy covers every completion, as GRPO's does
            # (the fast path leaves groups with equal labels out of the forward pass)
            pacs_on_policy_fast_path=False,
        )
    if method.algorithm == "grpo":
        return config_cls(**shared, beta=0.0, loss_type=config.grpo_loss_type)
    if method.algorithm == "rloo":
        return config_cls(**shared, beta=0.0)
    # PPO (verl's defaults for verifiable rewards, no KL): the critic starts from the same checkpoint as the policy
    critic = str(config.model) if config.model is not None else str(demo_checkpoint_path())
    return config_cls(
        **shared, critic_model_name_or_path=critic, critic_learning_rate=config.critic_learning_rate
    )


def train_and_evaluate(
    method: Method,
    config: DemoConfig,
    data: DemoData,
    output_dir: Path,
    *,
    start_point: float | None = None,
    on_update: Callable[[MethodResult], None] | None = None,
) -> MethodResult:
    """Train a fresh copy of the starting checkpoint with ``method``, tracking held-out pass@k, then evaluate it.

    Each curve point is ``{"step": s, "pass@1": ..., "pass@2": ..., ..., "pass@<curve_samples>": ...}``.

    Args:
        start_point: held-out pass@1 of the starting model on ``data.curve`` (step 0 of the curve, which then
            holds pass@1 only); measured here, every k, when None (pass the base model's to share it between
            methods).
        on_update: called with the partial result after every curve point and at the end (to save it).
    """
    from pacsrl.algorithms import trainer_class

    torch.set_num_threads(config.resolved_threads())
    model, tokenizer = load_policy(config.model)
    result = MethodResult(method.resolved(config))

    def update() -> None:
        if on_update is not None:
            on_update(result)

    def on_point(step: int, point: dict[str, float]) -> None:
        result.curve.append({"step": step, **point})
        logger.info(
            "%s step %d/%d: held-out pass@1 %.3f (%d problems x %d)",
            method.name,
            step,
            config.steps,
            point["pass@1"],
            len(data.curve),
            config.curve_samples,
        )
        update()

    if start_point is None:
        on_point(0, curve_point(model, tokenizer, data.curve, config, data.reward_fn, name="start"))
    else:
        on_point(0, {"pass@1": start_point})

    args = trainer_config(method, config, output_dir)
    trainer_cls = trainer_class(method.algorithm)
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


__all__ = ["MethodResult", "curve_auc", "mean_of", "train_and_evaluate", "trainer_config"]
