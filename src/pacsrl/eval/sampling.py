"""Sampling backends: n completions per prompt from vLLM or from transformers ``generate``.

Both backends take prompts in the dataset's format (a conversational list of messages, or a plain
string used as-is) and return ``list[list[str]]``: for each prompt, its n completion texts.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

Prompt = str | list[dict[str, Any]]

__all__ = [
    "HFSampler",
    "Prompt",
    "Sampler",
    "VLLMSampler",
    "load_sampler",
    "resolve_backend",
    "sample_completions",
]


class Sampler(Protocol):
    """What the evaluation loop needs from a backend."""

    def __call__(self, prompts: Sequence[Prompt], n: int, *, seed: int | None = None) -> list[list[str]]:
        """For each prompt, n sampled completion texts."""
        ...


def _render(tokenizer: Any, prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)


@torch.inference_mode()
def sample_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    n: int,
    *,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 4096,
    batch_size: int = 64,
    seed: int | None = None,
    progress: bool = True,
) -> list[list[str]]:
    """Sample n completions per prompt from an already-loaded transformers model (CPU or GPU).

    Conversational prompts go through the tokenizer's chat template with ``add_generation_prompt``;
    rows are left-padded. A ``generate`` call holds up to ``batch_size`` sequences (prompt x sample
    pairs): transformers' ``num_return_sequences`` repeats the input rows anyway, so we repeat them
    ourselves and a batch can mix prompts and samples freely, whatever n is. ``temperature == 0``
    decodes greedily (then all n samples are the same). The model's train/eval mode is restored on
    return, so this is safe to call in the middle of training. Nothing is written to disk.

    Returns:
        For each prompt, its n completion texts (special tokens removed).
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature=}, {top_p=}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad batches with")
    encoded = [
        tokenizer(_render(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts
    ]  # P lists of prompt token ids
    jobs = [(p, j) for p in range(len(prompts)) for j in range(n)]  # one per sequence to sample
    out: list[list[str]] = [[""] * n for _ in prompts]
    # Stop at the model's EOS tokens and the tokenizer's (a chat template's end-of-turn), as vLLM does.
    eos = model.generation_config.eos_token_id
    eos_ids = sorted(
        {*([] if eos is None else [eos] if isinstance(eos, int) else eos), tokenizer.eos_token_id} - {None}
    )
    # Only temperature and top_p shape the distribution: override a checkpoint's generation_config defaults
    # (top_k, min_p, repetition_penalty), which vLLM would not apply either.
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad_id,
        "eos_token_id": eos_ids or None,
        "use_cache": True,
        "top_k": None,
        "min_p": None,
        "typical_p": 1.0,
        "repetition_penalty": 1.0,
    }
    if temperature == 0:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None)
    else:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
        for batch in tqdm(batches, desc="sampling", unit="batch", disable=not progress):
            rows = [encoded[p] for p, _ in batch]
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)  # (b, L)
            mask = torch.tensor(
                [[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device
            )  # (b, L)
            generated = model.generate(input_ids=input_ids, attention_mask=mask, **gen_kwargs)  # (b, L + T)
            texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for (p, j), text in zip(batch, texts, strict=True):
                out[p][j] = text
    finally:
        model.train(was_training)
    return out


class HFSampler:
    """``Sampler`` over a transformers model: see ``sample_completions``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        temperature: float = 0.6,
        top_p: float = 0.95,
        max_new_tokens: int = 4096,
        batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.kwargs = {
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
        }
        self.progress = progress

    def __call__(self, prompts: Sequence[Prompt], n: int, *, seed: int | None = None) -> list[list[str]]:
        return sample_completions(
            self.model, self.tokenizer, prompts, n, seed=seed, progress=self.progress, **self.kwargs
        )


class VLLMSampler:
    """``Sampler`` over vLLM: each call is one ``LLM.chat`` (or ``LLM.generate`` for plain-text prompts)
    call with ``SamplingParams(n=...)``; prefix caching shares each prompt's KV cache across its n samples.
    vLLM is imported here, only when this backend is used.

    An evaluation run calls it once per chunk of ``chunk_size`` problems (default 64), not once for the
    whole dataset: every problem of a finished chunk is appended to ``rollouts.jsonl`` before the next
    chunk starts, which is what lets an interrupted run resume. Within a chunk vLLM schedules all
    ``chunk_size x n`` sequences together; a larger ``--chunk-size`` (up to the dataset size: one call)
    keeps the GPU fuller at the end of each chunk, at the cost of more work redone after a crash.
    """

    def __init__(
        self,
        model: str,
        *,
        temperature: float = 0.6,
        top_p: float = 0.95,
        max_new_tokens: int = 4096,
        seed: int = 0,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
    ) -> None:
        try:
            import vllm
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "backend 'vllm' needs vLLM: pip install 'pacsrl[vllm]', or use --backend hf"
            ) from err
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model,
            enable_prefix_caching=True,
            seed=seed,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
        )
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens

    def __call__(
        self, prompts: Sequence[Prompt], n: int, *, seed: int | None = None
    ) -> list[list[str]]:  # pragma: no cover - needs vLLM and a GPU
        # No per-request seed: requests sharing one seed would share one random stream. The engine is
        # seeded once (``LLM(seed=...)``), so ``seed`` is ignored here.
        params = self._vllm.SamplingParams(
            n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_new_tokens
        )
        if all(isinstance(p, str) for p in prompts):
            outputs = self.llm.generate(list(prompts), params, use_tqdm=True)
        elif not any(isinstance(p, str) for p in prompts):
            outputs = self.llm.chat([list(p) for p in prompts], params, use_tqdm=True)
        else:
            raise ValueError(
                "a chunk mixes plain-text and conversational prompts; use one format per dataset"
            )
        return [[o.text for o in request.outputs] for request in outputs]


def resolve_backend(backend: Literal["auto", "vllm", "hf"]) -> Literal["vllm", "hf"]:
    """``auto`` picks vLLM when it is installed and a CUDA device is visible, else transformers."""
    if backend == "auto":
        vllm_ok = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
        return "vllm" if vllm_ok else "hf"
    if backend not in ("vllm", "hf"):
        raise ValueError(f"backend must be 'auto', 'vllm' or 'hf', got {backend!r}")
    return backend


def load_sampler(
    model: str,
    backend: Literal["auto", "vllm", "hf"] = "auto",
    *,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 4096,
    batch_size: int = 64,
    seed: int = 0,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.9,
    tensor_parallel_size: int = 1,
    progress: bool = True,
) -> tuple[Sampler, Literal["vllm", "hf"]]:
    """Load ``model`` (a local path or Hub id) for sampling; returns the sampler and the backend used."""
    chosen = resolve_backend(backend)
    logger.info("loading %s with the %s backend", model, chosen)
    if chosen == "vllm":
        sampler: Sampler = VLLMSampler(
            model,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
        )
        return sampler, chosen
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
    hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model)
    sampler = HFSampler(
        hf_model,
        tokenizer,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    return sampler, chosen
