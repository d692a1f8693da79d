"""``EvalConfig``: the settings of one evaluation run; the help texts are the CLI's documentation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Settings (keys of a run's settings.json) that change what is sampled or how it is scored: a run folder
# refuses to resume under different values, so one rollouts.jsonl never mixes two sampling setups.
# - "dtype" and the backend change the numerics (bf16 vLLM kernels vs fp32 transformers), hence samples.
# - The backend is compared as "backend_used", the backend "auto" resolved to, not as the "backend"
#   option: "auto" gives vllm on a GPU machine with vLLM and hf elsewhere, so two runs both asking for
#   "auto" can sample differently, while "auto" and "hf" that both resolve to hf sample the same way.
# The other settings (batch_size, chunk_size, gpu_memory_utilization, limit, ...) only change how
# fast it runs or which problems are included; threshold only changes the counting (see --recompute).
RESUME_KEYS: tuple[str, ...] = (
    "model",
    "n",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "reward",
    "dtype",
    "backend_used",
)


@dataclass
class EvalConfig:
    """Settings of ``pacsrl eval``. Defaults follow the paper's evaluation (PAPER.md, "Evaluation")."""

    model: str | None = field(
        default=None,
        metadata={"help": "Model to evaluate: a local checkpoint folder or a Hugging Face Hub id."},
    )
    datasets: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Comma-separated dataset specs: a benchmark name (math500, aime24, ...), NAME=FILE, or a "
            "prepared parquet/jsonl file (see `pacsrl prepare`)."
        },
    )
    n: int = field(
        default=32, metadata={"help": "Samples per problem (the paper: 32 on MATH-500, 256 on AIME/AMC)."}
    )
    k: list[int] | None = field(
        default=None,
        metadata={
            "help": "Comma-separated ks of pass@k. Default: the powers of two up to n, then n itself if it "
            "is not one (n=12 gives 1,2,4,8,12)."
        },
    )
    output: str | None = field(
        default=None,
        metadata={"help": "Run folder for rollouts and metrics. Default: outputs/eval/<model name>."},
    )
    backend: Literal["auto", "vllm", "hf"] = field(
        default="auto",
        metadata={
            "help": "Sampling backend: vllm, hf (transformers generate), or auto (vllm if it is installed "
            "and a GPU is visible)."
        },
    )
    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature; 0 decodes greedily."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling top_p."})
    max_new_tokens: int = field(default=4096, metadata={"help": "Maximum tokens generated per sample."})
    batch_size: int = field(
        default=64, metadata={"help": "hf backend: sequences (prompt x sample pairs) per generate call."}
    )
    chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Problems per sampler call (one vLLM generate call, or hf generate calls of batch_size "
            "sequences); each finished chunk is saved, so this is the unit of resume. Default: "
            "max(1, batch_size // n) for hf, 64 for vllm."
        },
    )
    limit: int | None = field(
        default=None, metadata={"help": "Evaluate only the first LIMIT problems of each dataset."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed of the sampler."})
    reward: str = field(
        default="auto",
        metadata={
            "help": "Scorer: 'auto' (each row by its source: a reasoning-gym row, from a `pacsrl prepare "
            "gym:TASK` file, by its task's own scorer, any other by math-verify), 'math' (math-verify), "
            "'gym:TASK' (a reasoning-gym task's scorer) or 'module:function' (a module in the current folder "
            "or an installed one), any TRL-style reward function f(completions=..., answer=..., **columns) -> "
            "list[float]."
        },
    )
    threshold: float = field(
        default=1.0, metadata={"help": "A sample counts as correct when its score is >= threshold."}
    )
    name: str | None = field(
        default=None, metadata={"help": "Display name in tables and plots. Default: the model argument."}
    )
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, bfloat16, float16 or float32."})
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "vllm backend: fraction of GPU memory vLLM may use."}
    )
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "vllm backend: GPUs to shard the model over."}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Delete the rollouts already in the run folder instead of resuming from them."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str):
            self.datasets = [s for s in self.datasets.split(",") if s]
        problems = []
        if self.n < 1:
            problems.append(f"n={self.n} must be >= 1")
        if self.k is not None:
            bad = [k for k in self.k if not 1 <= k <= self.n]
            if bad:
                problems.append(f"k={self.k}: every k must be in [1, n={self.n}], got {bad}")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0 (0 decodes greedily)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        for name in ("max_new_tokens", "batch_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("chunk_size", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name}={value} must be >= 1 (or unset)")
        if self.backend not in ("auto", "vllm", "hf"):
            problems.append(f"backend={self.backend!r} must be one of auto, vllm, hf")
        if problems:
            raise ValueError("invalid evaluation settings: " + "; ".join(problems))
