"""The offline demo's task, its shipped warm-started tiny model, and its data splits.

The demo task is reasoning-gym's ``chain_sum`` with three one-digit terms ("7 - 3 + 9 ="; 4,000
distinct problems), the answer given as ``<answer>13</answer>``. The checkpoint under ``assets/demo``
is a 0.66M-parameter Qwen2 warm-started by ``pacsrl warmstart`` on worked solutions
("7 - 3 + 9 = 4 + 9 = 13" then the answer tag) until it is partly right (see its ``WARMSTART.md``), so
that RL has something to sharpen.

Held-out problems: a fixed pool of ``DEMO_POOL_SIZE`` distinct problems (seed ``DEMO_SEED``) is kept
out of the warm-start data; ``demo_splits`` draws the RL-train and eval splits from that pool, so eval
never overlaps the warm-start data nor the RL prompts.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

DEMO_TASK = "chain_sum"
DEMO_TASK_CONFIG: dict[str, Any] = {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}
# Seed and size of the held-out pool that warm-start data never includes.
DEMO_SEED = 20250902
DEMO_POOL_SIZE = 1024


def demo_checkpoint_path() -> Path:
    """Directory of the shipped warm-started checkpoint (model, tokenizer, WARMSTART.md, warmstart.json),
    loadable offline with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``."""
    path = Path(str(resources.files("pacsrl") / "assets" / "demo"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo checkpoint is missing from {path}; rebuild it with `pacsrl warmstart`"
        )
    return path


def held_out_pool(task: str = DEMO_TASK, config: dict | None = None) -> Dataset:
    """The ``DEMO_POOL_SIZE`` problems reserved for RL training and evaluation (never warm-start data)."""
    from pacsrl.data.gym import make_gym_dataset

    return make_gym_dataset(
        task, DEMO_POOL_SIZE, DEMO_SEED, config=DEMO_TASK_CONFIG if config is None else config
    )


def demo_splits(train_size: int, eval_size: int) -> tuple[Dataset, Dataset]:
    """RL-train and eval splits of the demo task, disjoint from each other and from the warm-start data.

    Eval is the first ``eval_size`` problems of the held-out pool and RL-train the next ``train_size``,
    so the eval split does not depend on ``train_size``. Columns are those of
    ``pacsrl.data.gym.make_gym_dataset``; score completions with ``make_gym_reward(DEMO_TASK)``.

    Raises:
        ValueError: if ``train_size + eval_size`` exceeds ``DEMO_POOL_SIZE``.
    """
    if train_size < 1 or eval_size < 1:
        raise ValueError(f"train_size and eval_size must be >= 1, got {train_size} and {eval_size}")
    if train_size + eval_size > DEMO_POOL_SIZE:
        raise ValueError(
            f"train_size + eval_size = {train_size + eval_size} exceeds the {DEMO_POOL_SIZE} held-out demo problems "
            "(the rest of the task's problems may have been seen in warm-start); ask for fewer"
        )
    pool = held_out_pool()
    return pool.select(range(eval_size, eval_size + train_size)), pool.select(range(eval_size))


__all__ = [
    "DEMO_POOL_SIZE",
    "DEMO_SEED",
    "DEMO_TASK",
    "DEMO_TASK_CONFIG",
    "demo_checkpoint_path",
    "demo_splits",
    "held_out_pool",
]
