"""What the demo trains and evaluates on: the starting checkpoint (``load_policy``), the task's splits and reward
(``load_data``), and its evaluation (``evaluate``, ``curve_point``, ``HeldOutCurveCallback``).

Every evaluation samples with a fixed seed and restores the global RNG afterwards, so the base model and every
trained model are scored on the same problems with the same random numbers, and an evaluation in the middle of
training does not change the training run's own sampling.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from pacsrl.demo import DEMO_TASK, DEMO_TASK_CONFIG
from pacsrl.demo.config import DemoConfig

if TYPE_CHECKING:
    from datasets import Dataset


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
    from pacsrl.data.gym import make_gym_splits
    from pacsrl.demo import demo_splits
    from pacsrl.rewards.gym import make_gym_reward

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

    with rng_restored():
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


@contextmanager
def rng_restored() -> Iterator[None]:
    """Leave the global torch RNG (CPU and CUDA) as it was on entry: sampling with a seed reseeds it."""
    cpu_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def curve_point(
    model: Any,
    tokenizer: Any,
    dataset: Dataset,
    config: DemoConfig,
    reward_fn: Callable[..., list[float]],
    *,
    name: str,
) -> dict[str, float]:
    """One point of the held-out curve: pass@k for k = 1, 2, 4, ..., ``config.curve_samples`` from that many samples
    per problem of ``dataset``, with ``evaluate`` (so every point uses the same problems and seed), no progress bar;
    with ``config.curve_entropy``, also ``"entropy"``: the policy's ``completion_entropy`` along those samples."""
    result = evaluate(
        model,
        tokenizer,
        dataset,
        config,
        n=config.curve_samples,
        name=name,
        reward_fn=reward_fn,
        progress=False,
    )
    point = {k: v for k, v in result.metrics["all"].items() if k.startswith("pass@")}
    if config.curve_entropy:
        point["entropy"] = completion_entropy(
            model, tokenizer, result.records, max_new_tokens=config.max_completion_length
        )
    return point


@torch.no_grad()
def completion_entropy(
    model: Any,
    tokenizer: Any,
    records: list[dict[str, Any]],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
) -> float:
    """The policy's mean next-token entropy (nats) along the completions of ``records`` (``evaluate``'s), taken
    over every token of every completion, as TRL's ``entropy`` metric takes it over a training batch: at each
    completion token and, for a completion that stopped before ``max_new_tokens``, at the step that sampled its end.

    Each completion is re-tokenized from its text after the prompt as the sampler renders it. That gives back the
    sampled tokens unless the model sampled a non-canonical split of a word; measured on the demo model, all 512
    of 512 samples (32 curve problems x 16) came back as sampled. The model's train/eval mode is restored on
    return."""
    from pacsrl.eval.sampling import _render

    rows: list[tuple[list[int], int, int]] = []  # (ids, first position scored, positions scored)
    for record in records:
        prompt_ids = tokenizer(_render(tokenizer, record["prompt"]), add_special_tokens=False)["input_ids"]
        for completion in record["completions"]:
            ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            scored = len(ids) + (1 if len(ids) < max_new_tokens else 0)
            # the logits at position i give the distribution of token i + 1: the first completion token's comes
            # from the last prompt position
            rows.append((prompt_ids + ids, len(prompt_ids) - 1, scored))
    if not rows:
        raise ValueError("completion_entropy needs one or more records with completions")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(ids) for ids, _, _ in batch)
            # right-padded: a causal model's logits at real positions never see the padding after them
            input_ids = torch.tensor(
                [ids + [pad_id] * (width - len(ids)) for ids, _, _ in batch], device=device
            )
            mask = torch.tensor(
                [[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in batch], device=device
            )
            logits = model(input_ids=input_ids, attention_mask=mask).logits  # (b, width, V)
            # only the scored positions go through the softmax (a large vocabulary makes the rest costly)
            scored = torch.cat(
                [logits[i, first : first + n] for i, (_, first, n) in enumerate(batch)]
            ).float()
            logp = torch.log_softmax(scored, dim=-1)  # (positions, V)
            total += -(logp.exp() * logp).sum().item()
            count += scored.shape[0]
    finally:
        model.train(was_training)
    return total / count


def curve_pass1(
    model: Any,
    tokenizer: Any,
    dataset: Dataset,
    config: DemoConfig,
    reward_fn: Callable[..., list[float]],
    *,
    name: str,
) -> float:
    """The held-out pass@1 of ``curve_point``."""
    return curve_point(model, tokenizer, dataset, config, reward_fn, name=name)["pass@1"]


class HeldOutCurveCallback(TrainerCallback):
    """Measures held-out pass@k every ``every`` optimizer steps (and at the last one) on the main process, with
    ``curve_point`` (same problems, same seed each time); each point goes to ``on_point(step, {"pass@1": ...})``."""

    def __init__(
        self,
        tokenizer: Any,
        dataset: Dataset,
        config: DemoConfig,
        reward_fn: Callable[..., list[float]],
        on_point: Callable[[int, dict[str, float]], None],
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
        point = curve_point(
            model, self.tokenizer, self.dataset, self.config, self.reward_fn, name=f"step {step}"
        )
        self.seconds += time.perf_counter() - started
        self.on_point(step, point)


__all__ = [
    "DemoData",
    "HeldOutCurveCallback",
    "completion_entropy",
    "curve_pass1",
    "curve_point",
    "evaluate",
    "load_data",
    "load_policy",
    "rng_restored",
]
