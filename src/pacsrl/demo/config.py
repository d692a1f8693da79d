"""Settings of the demo and of the learning benchmark: ``DemoConfig`` (one run's settings, shared by every method)
and ``Method`` (one contender: an algorithm and the settings that distinguish it)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from pacsrl.algorithms import ALGORITHMS, Algorithm
from pacsrl.demo import DEMO_TASK, DEMO_TASK_CONFIG

DEFAULT_ALGORITHMS: tuple[str, ...] = ("pacs", "grpo")
_METHOD_SPEC = re.compile(r"(grpo|rloo|ppo|pacs|pacs-noweight)(?:@([0-9]*\.?[0-9]+(?:e-?[0-9]+)?))?")


def fit_threads(wanted: int, cpus: int, load: float) -> int:
    """At most ``wanted`` torch threads, and no more than the ``cpus`` that a 1-minute ``load`` average leaves free
    (at least 1). An intra-op thread that waits for a core holds up the others at every step (the demo's steps are
    many small operations), so on a busy machine fewer threads finish sooner."""
    return max(1, min(wanted, math.floor(cpus - load + 0.5)))


@dataclass
class DemoConfig:
    """Settings of ``pacsrl demo`` and of each run of ``bench/learning.py``.

    Every algorithm gets the same prompts (same seed, same order), the same number of generated samples per step
    (``prompts_per_step * num_generations``), the same number of steps, learning rate, schedule and sampling
    temperature; only the algorithm differs (PPO also trains its critic, at ``critic_learning_rate``).
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
        default=DEFAULT_ALGORITHMS,
        metadata={
            "help": "Algorithms to train, in order, comma-separated: 'pacs', 'grpo' (TRL), 'rloo' (TRL, no KL), "
            "'ppo' (pacsrl's, with a critic)."
        },
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
    critic_learning_rate: float = field(
        default=3e-3,
        metadata={
            "help": "PPO: the critic's learning rate (10 x the default lr, verl's ratio of 1e-5 to 1e-6); PPO's other "
            "settings are verl's defaults: GAE gamma = lam = 1, clip 0.2, value clip 0.5, no KL."
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
    curve_entropy: bool = field(
        default=False,
        metadata={
            "help": "Also measure the policy's mean token entropy along the curve's samples at each curve point "
            "(a fixed set of held-out prompts, unlike the training rollouts' entropy)."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of training (prompt order, sampling) and evaluation."}
    )
    threads: int | None = field(
        default=None,
        metadata={
            "help": "torch CPU threads. Default: 2, or fewer on a busy machine (the cores the 1-minute load "
            "average leaves free, at least 1): threads that wait for a busy core slow every step."
        },
    )
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
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations}: PACS, GRPO and RLOO compare a completion with the "
                "others of its prompt, so they need at least 2 (the paper uses 8)"
            )
        for name in ("learning_rate", "critic_learning_rate"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name}={getattr(self, name)} must be a positive number")
        if self.curve_size > self.eval_size:
            raise ValueError(
                f"curve_size={self.curve_size} exceeds eval_size={self.eval_size}: the curve uses the "
                "first curve_size problems of the eval split; lower curve_size or raise eval_size"
            )
        if self.curve_samples > self.eval_samples:
            raise ValueError(f"curve_samples={self.curve_samples} exceeds eval_samples={self.eval_samples}")

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A smoke-test sized demo (seconds on an idle machine; see the README); ``overrides`` win."""
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

    def resolved_threads(self) -> int:
        """``threads``, or when unset the default for this machine now (:func:`fit_threads`)."""
        if self.threads is not None:
            return self.threads
        return fit_threads(2, os.cpu_count() or 1, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)

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

    def resolved(self, config: DemoConfig) -> Method:
        """This method with the settings it trains with: for PACS, the ``DemoConfig``'s beta and weight mode
        where it sets none (so that ``metrics.json`` records what was used)."""
        if self.algorithm != "pacs":
            return self
        return dataclasses.replace(
            self,
            pacs_beta=self.pacs_beta if self.pacs_beta is not None else config.pacs_beta,
            pacs_weight_mode=self.pacs_weight_mode or config.pacs_weight_mode,
        )

    @classmethod
    def of(cls, algorithm: str) -> Method:
        """The demo's method for an algorithm, with the ``DemoConfig``'s settings: ``PACS``, ``GRPO``, ``RLOO``, ``PPO``."""
        return cls(algorithm.upper(), algorithm)  # type: ignore[arg-type]

    @classmethod
    def parse(cls, spec: str) -> Method:
        """A method from its short spec: ``grpo``, ``rloo``, ``ppo``, ``pacs`` or ``pacs@BETA`` (class weights
        'question'), ``pacs-noweight`` or ``pacs-noweight@BETA`` (weights 'none'); e.g. ``pacs@0.5``."""
        match = _METHOD_SPEC.fullmatch(spec.strip().lower())
        if match is None:
            raise ValueError(
                f"method {spec!r}: expected 'grpo', 'rloo', 'ppo', 'pacs', 'pacs@BETA', 'pacs-noweight' or "
                "'pacs-noweight@BETA' (e.g. 'pacs@0.5')"
            )
        kind, beta_text = match.group(1), match.group(2)
        if kind in ("grpo", "rloo", "ppo"):
            if beta_text is not None:
                raise ValueError(
                    f"method {spec!r}: {kind.upper()} has no PACS beta (its KL coefficient is 0)"
                )
            return cls(kind.upper(), kind)
        beta = float(beta_text) if beta_text is not None else None
        if beta is not None and not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"method {spec!r}: beta must be a positive number")
        weights = "none" if kind == "pacs-noweight" else "question"
        name = ("PACS" if weights == "question" else "PACS w/o weights") + (f" beta={beta:g}" if beta else "")
        return cls(name, "pacs", beta, weights)


__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHMS", "Algorithm", "DemoConfig", "Method"]
