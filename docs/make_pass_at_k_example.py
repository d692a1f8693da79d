"""Regenerate the README's pass@k example: ``docs/pass_at_k_example.png`` and ``docs/pass_at_k_example.md``.

A tiny comparison that runs offline on a CPU in seconds: one tiny random Qwen2 (char-level tokenizer,
built by ``tests/tiny.py``, nothing downloaded) sampled at two temperatures, n=16 samples per problem,
on two toy benchmarks of one-digit answers. The toy scorer counts a sample as correct when the answer digit is
its first character (``toy-first``) or appears anywhere in it (``toy-any``). The numbers mean nothing
about math; the example shows the table and plot that ``pacsrl eval --compare`` writes, and the usual
shape of pass@k curves: two samplers level at k=1 can part as k grows, the hotter one covering more
answers.

    python docs/make_pass_at_k_example.py            # from the repository root
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from pacsrl.eval import evaluate_model, markdown_table, plot_pass_at_k

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from tiny import build_model, build_tokenizer  # the repository's one tiny-model builder (tests/tiny.py)

N = 16  # samples per problem
PROBLEMS_PER_BENCHMARK = 24
TEMPERATURES = {"T=0.6": 0.6, "T=1.2": 1.2}


def tiny_model() -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = build_tokenizer(list("0123456789+=?[]:abcdefghijklmnopqrstuvwxyz "), chat="brackets")
    model = build_model(
        tokenizer,
        seed=0,
        hidden=32,
        layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        initializer_range=0.15,  # peaked next-token distributions, so that temperature matters
        tie_word_embeddings=False,
        bos_token_id=1,
    )
    return model, tokenizer


def toy_problems() -> list[dict]:
    rng = random.Random(0)
    problems = []
    for source in ("toy-first", "toy-any"):
        for _ in range(PROBLEMS_PER_BENCHMARK):
            a, b = rng.randrange(5), rng.randrange(5)
            prompt = [{"role": "user", "content": f"{a}+{b}=?"}]
            problems.append({"prompt": prompt, "answer": str(a + b), "source": source})
    return problems


def toy_reward(completions, answer, source, **kwargs) -> list[float]:
    """1.0 when the answer digit is the completion's first character (toy-first) or in it (toy-any)."""
    texts = [c[-1]["content"] for c in completions]
    rows = zip(texts, answer, source, strict=True)
    return [float(t[:1] == a if s == "toy-first" else a in t) for t, a, s in rows]


def main() -> None:
    model, tokenizer = tiny_model()
    problems = toy_problems()
    runs = []
    for name, temperature in TEMPERATURES.items():
        result = evaluate_model(
            model,
            tokenizer,
            problems,
            n=N,
            temperature=temperature,
            top_p=1.0,
            max_new_tokens=4,
            batch_size=256,
            seed=0,
            reward_fn=toy_reward,
            name=name,
            progress=False,
        )
        runs.append((name, result.metrics))
    table = markdown_table(runs)
    (HERE / "pass_at_k_example.md").write_text(table, encoding="utf-8")
    figure = plot_pass_at_k(runs)
    figure.savefig(HERE / "pass_at_k_example.png", dpi=80)
    print(table, end="")


if __name__ == "__main__":
    main()
