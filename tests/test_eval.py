"""Tests of pacsrl.eval: pass@k against independent computations, sampling, resumable runs, reports, CLI.

Everything is offline: a char-level tokenizer and a tiny random Qwen2 are built in a fixture, and the
datasets are small prepared files written here.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from pacsrl.eval import (
    EvalConfig,
    compare_runs,
    compute_metrics,
    default_ks,
    evaluate_model,
    flatten_metrics,
    mean_at_n,
    pass_at_k,
    recompute,
    run_eval,
    sample_completions,
)
from pacsrl.eval.rollouts import read_rollouts, repair_rollouts
from pacsrl.eval.sampling import HFSampler
from tiny import PRINTABLE, save_tiny

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Independent references


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """1 - C(n-c, k) / C(n, k) in exact rational arithmetic (math.comb(a, b) = 0 when b > a)."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


# --------------------------------------------------------------------------------------------------
# pass@k


def test_pass_at_k_hand_worked():
    # n=4, c=1, k=2: C(3,2)/C(4,2) = 3/6 -> 1 - 1/2
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)
    # n=5, c=2, k=1: c/n
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-15)
    assert isinstance(pass_at_k(4, 1, 2), float)


def test_pass_at_k_matches_brute_force_over_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (
                    n,
                    c,
                    k,
                )


@pytest.mark.parametrize("n", [16, 64, 100, 256])
def test_pass_at_k_matches_exact_rationals(n):
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 100, 128, 256) if k <= n]
    for c in sorted({0, 1, 2, 3, n // 7, n // 3, n // 2, n - 5, n - 1, n}):
        for k in ks:
            expected = float(exact_pass_at_k(n, c, k))
            assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15), (n, c, k)


def test_pass_at_k_large_n_is_finite_and_accurate():
    # C(1024, 512) ~ 4.5e306 is at the edge of float64; the product form never builds it.
    n = 1024
    for c, k in [(1, 1), (1, 512), (3, 256), (10, 1024), (100, 32), (500, 512), (1, 1024), (0, 512)]:
        got = pass_at_k(n, c, k)
        assert math.isfinite(got)
        assert got == pytest.approx(float(exact_pass_at_k(n, c, k)), rel=1e-11, abs=1e-15), (c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0  # no correct sample
    assert pass_at_k(10, 10, 1) == 1.0  # all correct
    assert pass_at_k(10, 7, 4) == 1.0  # n - c = 3 < k = 4: every 4-subset holds a correct sample
    assert pass_at_k(10, 7, 3) < 1.0  # n - c = 3 = k: one subset of all-wrong samples
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0


def test_pass_at_k_vectorised_matches_scalar():
    rng = np.random.default_rng(0)
    n = rng.integers(4, 300, size=50)
    c = np.array([rng.integers(0, m + 1) for m in n])
    got = pass_at_k(n, c, 4)
    assert isinstance(got, np.ndarray) and got.shape == (50,)
    np.testing.assert_allclose(
        got, [float(exact_pass_at_k(int(a), int(b), 4)) for a, b in zip(n, c)], rtol=1e-12
    )
    # k broadcast as an array too
    np.testing.assert_allclose(pass_at_k(8, 2, np.array([1, 2, 8])), [0.25, 1 - 15 / 28, 1.0], rtol=1e-12)


@pytest.mark.filterwarnings("error")  # a stray numpy warning (say, a division by zero) fails the test
@pytest.mark.parametrize(
    ("n", "c", "k"),
    [
        (4, 1, 2),  # Python ints
        (4.0, 1.0, 2.0),  # whole floats are counts too
        (np.float32(4), np.float32(1), np.float32(2)),  # of any float width
        (np.uint8(4), np.int16(1), np.int64(2)),  # and ints of any width
    ],
)
def test_pass_at_k_takes_whole_numbers_of_any_real_dtype(n, c, k):
    got = pass_at_k(n, c, k)
    assert type(got) is float  # a Python float for scalars, not a numpy scalar
    assert got == 0.5  # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6, exact in binary


def test_pass_at_k_of_no_problems_is_an_empty_array():
    for empty in (np.array([], dtype=np.int64), np.array([])):
        got = pass_at_k(empty, empty, 1)
        assert isinstance(got, np.ndarray) and got.shape == (0,) and got.dtype == np.float64


@pytest.mark.parametrize(
    ("n", "c", "k", "match"),
    [
        # not a count: the message opens with the argument's name and shows its value
        (True, 1, 1, r"^n must be an integer or an array of integers, got True$"),
        (4, np.array([True, False]), 1, r"^c must be an integer or an array of integers, got array\(\[ True"),
        (4, "1", 1, r"^c must be an integer or an array of integers, got '1'$"),
        (4, 1, 2j, r"^k must be an integer or an array of integers, got 2j$"),
        (2.5, 1, 1, r"^n must hold whole numbers, got 2\.5$"),
        (4, 1.5, 2, r"^c must hold whole numbers, got 1\.5$"),
        (4, 1, np.float32(1.5), r"^k must hold whole numbers, got np\.float32\(1\.5\)$"),
        (4, 1, math.inf, r"^k must hold whole numbers, got inf$"),
        # out of range: the broken rule, then the values; a scalar call has no index
        (-3, 0, 1, r"^n must be >= 1; got n=-3, c=0, k=1$"),
        (4, -1, 2, r"^c must be >= 0; got n=4, c=-1, k=2$"),
        (4, 1, 0, r"^k must be >= 1; got n=4, c=1, k=0$"),
        (4, 5, 2, r"^c \(correct samples\) must be <= n \(samples\); got n=4, c=5, k=2$"),
        (4, 1, 5, r"^k must be <= n: .*; got n=4, c=1, k=5$"),
        # arrays: the first offending element, by its index (a plain int in 1-D, a tuple in 2-D)
        (
            np.array([4, 8]),
            np.array([1, 9]),
            2,
            r"^c \(correct samples\) must be <= n.*; got n=8, c=9, k=2 at index 1$",
        ),
        (
            np.full((2, 2), 4),
            1,
            np.array([[1, 2], [5, 1]]),
            r"^k must be <= n: .*; got n=4, c=1, k=5 at index \(1, 0\)$",
        ),
    ],
)
def test_pass_at_k_refusals_name_the_argument_and_the_values(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_mean_at_n_and_default_ks():
    assert mean_at_n([4, 4, 2], [1, 4, 0]) == pytest.approx((0.25 + 1 + 0) / 3)
    assert default_ks(1) == [1]
    assert default_ks(32) == [1, 2, 4, 8, 16, 32]
    assert default_ks(12) == [1, 2, 4, 8, 12]


def test_mean_at_n_refuses_impossible_counts_naming_the_argument():
    assert mean_at_n(1, 0) == 0.0 and mean_at_n([1, 2], [1, 1]) == 0.75  # n = 1 is allowed: (1 + 1/2) / 2
    for n, c in [([4, 0], [1, 0]), ([4, 4], [1, -1]), ([4, 4], [1, 5])]:  # n < 1, c < 0, c > n: each alone
        with pytest.raises(ValueError, match=r"need 0 <= c <= n and n >= 1"):
            mean_at_n(n, c)
    with pytest.raises(ValueError, match=r"^n must hold whole numbers"):
        mean_at_n([2.5], [1])
    with pytest.raises(ValueError, match=r"^c must hold whole numbers"):
        mean_at_n([2], [0.5])


def test_num_correct_and_group_metrics_fields():
    from pacsrl.eval.metrics import num_correct

    assert num_correct([1.0, 0.5, 1]) == 2  # the default threshold is 1.0
    records = [{"source": "s", "scores": [1, 0]}, {"source": "s", "scores": [0.5, 0.5, 1, 0]}]
    group = compute_metrics(records)["all"]
    assert group["n"] == [2, 4]  # problems with different sample counts: the fewest and the most
    assert group["mean_score"] == pytest.approx((0.5 + 0.5) / 2)  # mean of each problem's mean score
    assert compute_metrics(records[:1])["all"]["n"] == 2


def test_compute_metrics_rows_by_dataset_and_names_problems_without_samples():
    records = [
        {"source": "math", "dataset": "easy", "scores": [1, 1]},
        {"source": "math", "dataset": "hard", "scores": [0, 0]},
        {"source": "math", "scores": [1, 0]},  # no dataset: its source names its row
    ]
    metrics = compute_metrics(records, threshold=0.5)
    pass1 = {name: group["pass@1"] for name, group in metrics["sources"].items()}
    assert pass1 == {"easy": 1.0, "hard": 0.0, "math": 0.5}  # one source, three rows
    assert metrics["threshold"] == 0.5
    with pytest.raises(ValueError, match=r"2 problem\(s\) have no scored samples, e.g. \['p1', 2\]"):
        compute_metrics([{"source": "s", "scores": [1]}, {"id": "p1", "source": "s", "scores": []},
                         {"source": "s", "scores": []}])  # fmt: skip  # the id, else the row's index


def test_flatten_metrics_names_every_pass_and_mean_value():
    group = {"num_problems": 3, "n": [2, 4], "mean@n": 0.5, "mean_score": 0.625, "pass@1": 0.5, "pass@2": 1}
    metrics = {"ks": [1, 2], "threshold": 1.0, "sources": {"alpha": group, "beta": {**group, "pass@1": 0.25}},
               "all": {**group, "mean@n": 0.4}}  # fmt: skip
    flat = flatten_metrics(metrics, prefix="val")
    per_group = {"mean@n": 0.5, "mean_score": 0.625, "pass@1": 0.5, "pass@2": 1.0}  # not num_problems, not n
    assert flat == {
        **{f"val/alpha/{k}": v for k, v in per_group.items()},
        **{f"val/beta/{k}": v for k, v in {**per_group, "pass@1": 0.25}.items()},
        **{f"val/all/{k}": v for k, v in {**per_group, "mean@n": 0.4}.items()},
    }
    assert all(type(v) is float for v in flat.values())  # an int pass@2 too, as loggers want
    assert flatten_metrics(metrics) == {
        "eval/" + key.removeprefix("val/"): v for key, v in flat.items()
    }  # default


def test_compute_metrics_per_source_and_overall():
    records = [
        {"source": "a", "scores": [1, 0, 0, 0]},  # pass@1 = 1/4, pass@2 = 1/2
        {"source": "a", "scores": [1, 1, 1, 1]},  # 1, 1
        {"source": "b", "scores": [0, 0, 0, 0]},  # 0, 0
    ]
    m = compute_metrics(records, ks=[1, 2])
    assert m["sources"]["a"]["pass@1"] == pytest.approx(0.625)
    assert m["sources"]["a"]["pass@2"] == pytest.approx(0.75)
    assert m["sources"]["b"]["pass@2"] == 0.0
    assert m["all"]["pass@1"] == pytest.approx(1.25 / 3)  # micro-average over the 3 problems
    assert m["all"]["mean@n"] == pytest.approx(m["all"]["pass@1"])
    with pytest.raises(ValueError, match=r"every k must be in \[1, 4\]"):
        compute_metrics(records, ks=[8])


# --------------------------------------------------------------------------------------------------
# Fixtures: a tiny model, its tokenizer, small prepared datasets, a pluggable scorer


def _save_char_model(path: Path, **model) -> Path:
    """A random Qwen2 with a char-level tokenizer (printable ASCII, "[role]content" chat format), saved to
    ``path``; ``model`` sizes it (``tests/tiny.py``'s ``build_model`` arguments)."""
    return save_tiny(
        path, chars=PRINTABLE, chat="brackets", tie_word_embeddings=False, bos_token_id=1, **model
    )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return _save_char_model(
        tmp_path_factory.mktemp("tiny_model"),
        hidden=16,
        layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def _problem(question: str, answer: str, source: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}], "answer": answer, "source": source, "level": 1}


PROBLEMS = [
    _problem("1+1?", "2", "alpha"),
    _problem("2+2?", "4", "alpha"),
    _problem("3+3?", "6", "alpha"),
    _problem("x=1, x?", "1", "beta"),
    _problem("y=7, y?", "7", "beta"),
]


@pytest.fixture
def dataset_file(tmp_path) -> Path:
    path = tmp_path / "tiny.parquet"
    datasets.Dataset.from_list(PROBLEMS).to_parquet(str(path))
    return path


def parity_reward(completions, answer, **kwargs):
    """A deterministic stand-in for a verifier: 1.0 when the first character has an even code point."""
    assert len(answer) == len(completions) and kwargs["source"] and kwargs["level"] == [1] * len(answer)
    texts = [c[-1]["content"] for c in completions]
    return [float(bool(t) and ord(t[0]) % 2 == 0) for t in texts]


class CountingSampler:
    """Wraps a sampler and records every prompt it is asked to sample."""

    def __init__(self, inner):
        self.inner, self.prompts = inner, []

    def __call__(self, prompts, n, *, seed=None):
        self.prompts += [p[0]["content"] for p in prompts]
        return self.inner(prompts, n, seed=seed)


def independent_metrics(rollouts: Path | list[dict], ks: list[int]) -> dict:
    """pass@k per source and overall from rollouts.jsonl (or its records), with exact rationals (no
    pacsrl code)."""
    groups: dict[str, list[tuple[int, int]]] = {}
    records = rollouts if isinstance(rollouts, list) else map(json.loads, rollouts.read_text().splitlines())
    for record in records:
        n, c = len(record["scores"]), sum(s >= 1.0 for s in record["scores"])
        groups.setdefault(record["source"], []).append((n, c))
        groups.setdefault("all", []).append((n, c))
    return {
        name: {k: float(sum(exact_pass_at_k(n, c, k) for n, c in nc) / len(nc)) for k in ks}
        for name, nc in groups.items()
    }


def table_values(table: str) -> dict[tuple[str, str], list[float]]:
    """The numbers of a Markdown table, by (benchmark, model): problems, n, then each pass@k in percent."""
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")][1:]
    return {(cells[0].strip(), cells[1].strip()): [float(c) for c in cells[2:]] for cells in rows}


def assert_table_matches(table: str, model: str, expected: dict, sizes: dict[str, tuple[int, int]]) -> None:
    """Each row of ``model`` holds its benchmark's problems, n and pass@k (percent, 2 decimals) as computed
    independently (``expected`` from ``independent_metrics``); ``sizes`` maps a benchmark to (problems, n)."""
    values = {bench: row for (bench, name), row in table_values(table).items() if name == model}
    assert sorted(values) == sorted(expected)
    for bench, by_k in expected.items():
        want = [*sizes[bench], *(100 * by_k[k] for k in sorted(by_k))]
        assert values[bench] == pytest.approx(want, abs=0.0051), bench


# --------------------------------------------------------------------------------------------------
# Sampling


def test_sample_completions_shapes_modes_and_seeds(tiny_model):
    model, tokenizer = tiny_model
    prompts = [p["prompt"] for p in PROBLEMS[:3]]
    model.train()
    out = sample_completions(
        model, tokenizer, prompts, 3, max_new_tokens=4, batch_size=4, seed=1, progress=False
    )
    assert model.training  # the caller's mode is restored
    assert len(out) == 3 and all(len(s) == 3 and all(isinstance(t, str) for t in s) for s in out)
    assert any(t for s in out for t in s)
    # a batch of 5 sequences splits prompts' samples across generate calls
    split = sample_completions(
        model, tokenizer, prompts, 3, max_new_tokens=4, batch_size=5, seed=1, progress=False
    )
    assert [len(s) for s in split] == [3, 3, 3]
    same = sample_completions(
        model, tokenizer, prompts, 3, max_new_tokens=4, batch_size=4, seed=1, progress=False
    )
    assert same == out
    greedy = sample_completions(model, tokenizer, prompts, 2, temperature=0, max_new_tokens=4, progress=False)
    assert all(s[0] == s[1] for s in greedy)
    # greedy must match an independent argmax decode of the first prompt
    import torch

    text = tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(4):
            next_id = model(ids).logits[0, -1].argmax()
            if next_id.item() == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    expected = tokenizer.decode(
        ids[0, len(tokenizer(text, add_special_tokens=False)["input_ids"]) :], skip_special_tokens=True
    )
    assert greedy[0][0] == expected


def test_evaluate_model_in_memory_writes_nothing(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tokenizer = tiny_model
    result = evaluate_model(
        model,
        tokenizer,
        PROBLEMS,
        n=4,
        max_new_tokens=3,
        batch_size=8,
        reward_fn=parity_reward,
        progress=False,
    )
    assert list(tmp_path.iterdir()) == []
    assert result.metrics["ks"] == [1, 2, 4]
    assert set(result.metrics["sources"]) == {"alpha", "beta"}
    assert [(r["source"], r["answer"]) for r in result.records] == [
        (p["source"], p["answer"]) for p in PROBLEMS
    ]
    all_scores = []
    for r in result.records:
        assert len(r["completions"]) == 4 and all(isinstance(t, str) for t in r["completions"])
        # parity_reward's rule written out again: 1 when the first character's code point is even
        expected = [1.0 if t != "" and ord(t[0]) % 2 == 0 else 0.0 for t in r["completions"]]
        assert r["scores"] == expected
        assert r["num_correct"] == expected.count(1.0)
        all_scores += expected
    assert 0 < sum(all_scores) < len(all_scores)  # mixed scores, so the checks can fail
    for group, values in independent_metrics(result.records, [1, 2, 4]).items():
        got = result.metrics["all"] if group == "all" else result.metrics["sources"][group]
        for k, value in values.items():
            assert got[f"pass@{k}"] == pytest.approx(value, abs=1e-12), (group, k)
    assert "| alpha | model | 3 | 4 |" in result.table
    flat = flatten_metrics(result.metrics)
    assert flat["eval/alpha/pass@2"] == result.metrics["sources"]["alpha"]["pass@2"]
    assert flat["eval/all/pass@4"] == result.metrics["all"]["pass@4"]


# --------------------------------------------------------------------------------------------------
# Runs on disk


def _config(model_dir, out, **overrides) -> EvalConfig:
    settings = {"model": str(model_dir), "n": 4, "max_new_tokens": 3, "batch_size": 8, "backend": "hf"}
    return EvalConfig(**{**settings, "output": str(out), **overrides})


def test_run_eval_end_to_end_writes_all_files(tiny_model_dir, dataset_file, tmp_path):
    out = tmp_path / "run"
    config = _config(tiny_model_dir, out, datasets=[str(dataset_file)], n=6, k=[1, 2, 3, 6])
    run_eval(config, reward_fn=parity_reward, progress=False)
    for name in ("rollouts.jsonl", "metrics.json", "metrics.md", "pass_at_k.png", "settings.json"):
        assert (out / name).is_file(), name
    lines = (out / "rollouts.jsonl").read_text().splitlines()
    assert len(lines) == len(PROBLEMS)
    record = json.loads(lines[0])
    assert (
        record["prompt"] == PROBLEMS[0]["prompt"] and record["answer"] == "2" and record["source"] == "alpha"
    )
    assert len(record["completions"]) == len(record["scores"]) == 6 and record["columns"] == {"level": 1}

    metrics = json.loads((out / "metrics.json").read_text())
    # mixed scores, so the check below can fail
    assert 0 < metrics["all"]["pass@1"] < metrics["all"]["pass@6"]
    expected = independent_metrics(out / "rollouts.jsonl", [1, 2, 3, 6])
    for group, values in expected.items():
        got = metrics["all"] if group == "all" else metrics["sources"][group]
        for k, value in values.items():
            assert got[f"pass@{k}"] == pytest.approx(value, abs=1e-12), (group, k)
    assert metrics["sources"]["alpha"]["num_problems"] == 3 and metrics["all"]["n"] == 6
    assert (out / "pass_at_k.png").read_bytes()[:8] == PNG_SIGNATURE
    sizes = {"alpha": (3, 6), "beta": (2, 6), "all": (5, 6)}
    assert_table_matches((out / "metrics.md").read_text(), str(tiny_model_dir), expected, sizes)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["n"] == 6 and settings["temperature"] == 0.6 and settings["backend_used"] == "hf"


def test_resume_after_crash_skips_finished_problems(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    out = tmp_path / "run"
    config = _config("tiny", out, chunk_size=1)
    first = CountingSampler(HFSampler(model, tokenizer, max_new_tokens=3, progress=False))
    run_eval(config, dataset=PROBLEMS, sampler=first, reward_fn=parity_reward, progress=False)
    assert len(first.prompts) == 5
    full = (out / "rollouts.jsonl").read_text().splitlines(keepends=True)

    # simulate a crash after m=2 problems, in the middle of writing the third line
    m = 2
    (out / "rollouts.jsonl").write_text("".join(full[:m]) + full[m][: len(full[m]) // 2])
    second = CountingSampler(HFSampler(model, tokenizer, max_new_tokens=3, progress=False))
    result = run_eval(config, dataset=PROBLEMS, sampler=second, reward_fn=parity_reward, progress=False)
    assert second.prompts == [p["prompt"][0]["content"] for p in PROBLEMS[m:]]
    text = (out / "rollouts.jsonl").read_text()
    lines = text.splitlines(keepends=True)
    assert text.endswith("\n") and lines[:m] == full[:m]  # finished lines kept byte for byte
    ids = [json.loads(line)["id"] for line in lines]
    assert len(ids) == len(set(ids)) == len(PROBLEMS) == len(result.records)
    assert result.metrics["all"]["num_problems"] == len(PROBLEMS)

    # a complete run resumes to nothing
    third = CountingSampler(HFSampler(model, tokenizer, max_new_tokens=3, progress=False))
    run_eval(config, dataset=PROBLEMS, sampler=third, reward_fn=parity_reward, progress=False)
    assert third.prompts == [] and (out / "rollouts.jsonl").read_text() == text


def test_resume_refuses_other_settings_unless_overwrite(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    out = tmp_path / "run"
    sampler = HFSampler(model, tokenizer, max_new_tokens=3, progress=False)
    run_eval(
        _config("tiny", out), dataset=PROBLEMS[:2], sampler=sampler, reward_fn=parity_reward, progress=False
    )
    with pytest.raises(ValueError, match=r"temperature: 0.6 in the folder, 1.0 now.*--overwrite"):
        run_eval(
            _config("tiny", out, temperature=1.0), dataset=PROBLEMS, sampler=sampler, reward_fn=parity_reward
        )
    counting = CountingSampler(sampler)
    result = run_eval(
        _config("tiny", out, temperature=1.0, overwrite=True),
        dataset=PROBLEMS,
        sampler=counting,
        reward_fn=parity_reward,
        progress=False,
    )
    assert len(counting.prompts) == len(PROBLEMS) == len(result.records)
    assert json.loads((out / "settings.json").read_text())["temperature"] == 1.0


def test_resume_refuses_another_dtype_or_backend(tiny_model_dir, tmp_path, monkeypatch):
    # bf16 vLLM samples and fp32 transformers samples must never share one rollouts.jsonl
    out = tmp_path / "run"
    first = _config(tiny_model_dir, out, dtype="float32", backend="hf")
    run_eval(first, dataset=PROBLEMS[:2], reward_fn=parity_reward, progress=False)
    before = (out / "rollouts.jsonl").read_bytes()
    assert json.loads((out / "settings.json").read_text())["backend_used"] == "hf"

    with pytest.raises(ValueError, match=r"cannot resume.*dtype: 'float32' in the folder, 'bfloat16' now"):
        run_eval(
            _config(tiny_model_dir, out, dtype="bfloat16", backend="hf"), dataset=PROBLEMS, progress=False
        )
    # "auto" is compared as what it resolves to: vllm (on a GPU machine with vLLM) is refused ...
    monkeypatch.setattr("pacsrl.eval.run.resolve_backend", lambda backend: "vllm")
    with pytest.raises(ValueError, match=r"backend_used: 'hf' in the folder, 'vllm' now"):
        run_eval(
            _config(tiny_model_dir, out, dtype="float32", backend="auto"), dataset=PROBLEMS, progress=False
        )
    assert (out / "rollouts.jsonl").read_bytes() == before  # refused before anything was written
    # ... and hf resumes: only the 3 new problems are sampled
    monkeypatch.setattr("pacsrl.eval.run.resolve_backend", lambda backend: "hf")
    result = run_eval(
        _config(tiny_model_dir, out, dtype="float32", backend="auto"),
        dataset=PROBLEMS,
        reward_fn=parity_reward,
        progress=False,
    )
    assert len(result.records) == len(PROBLEMS)
    assert (out / "rollouts.jsonl").read_bytes().startswith(before)


def _record(id_: str) -> dict:
    return {"id": id_, "source": "s", "prompt": "p", "answer": "1", "completions": ["x"], "scores": [1.0]}


def test_read_rollouts_never_writes_and_repair_keeps_finished_lines(tmp_path, caplog):
    path = tmp_path / "rollouts.jsonl"
    finished = (json.dumps(_record("a")) + "\n").encode()
    # a truncated last line: read skips it (with a warning) and leaves the file alone
    path.write_bytes(finished + json.dumps(_record("b")).encode()[:20])
    with caplog.at_level("WARNING", logger="pacsrl.eval.rollouts"):
        assert [r["id"] for r in read_rollouts(path)] == ["a"]
    assert "ignoring a truncated last line (20 bytes)" in caplog.text
    assert path.read_bytes() == finished + json.dumps(_record("b")).encode()[:20]
    assert [r["id"] for r in repair_rollouts(path)] == ["a"]
    assert path.read_bytes() == finished  # cut off, the finished line kept byte for byte

    # a complete last line whose newline was never written: kept; repair adds the newline
    path.write_bytes(finished + json.dumps(_record("b")).encode())
    assert [r["id"] for r in read_rollouts(path)] == ["a", "b"]
    assert not path.read_bytes().endswith(b"\n")
    repair_rollouts(path)
    assert path.read_bytes() == finished + (json.dumps(_record("b")) + "\n").encode()
    assert repair_rollouts(tmp_path / "missing.jsonl") == [] and not (tmp_path / "missing.jsonl").exists()


def test_read_rollouts_rejects_corruption_that_no_crash_makes(tmp_path):
    good = _record("a")
    path = tmp_path / "rollouts.jsonl"
    path.write_text(json.dumps(good) + "\n{broken\n" + json.dumps({**good, "id": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"rollouts.jsonl:2: not a complete rollout record"):
        read_rollouts(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match=r"rollouts.jsonl:2: problem id 'a' already on line 1"):
        read_rollouts(path)


def test_recompute_with_new_ks_and_rescore_with_the_math_verifier(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prompt = [{"role": "user", "content": "1+1?"}]
    # scores of a broken scorer; the verifier says 1, 0, 1, 0
    record = {
        "id": "p1",
        "source": "alpha",
        "prompt": prompt,
        "answer": "2",
        "columns": {},
        "completions": ["so \\boxed{2}", "\\boxed{3}", "it is \\boxed{2}", "no idea"],
        "scores": [0.0, 0.0, 0.0, 0.0],
    }
    (run_dir / "rollouts.jsonl").write_text(json.dumps(record) + "\n")
    (run_dir / "settings.json").write_text(json.dumps({"model": "m", "reward": "math", "n": 4}))
    assert recompute(run_dir, ks=[1, 4]).metrics["all"]["pass@4"] == 0.0
    result = recompute(run_dir, ks=[1, 2, 4], rescore=True)
    assert read_rollouts(run_dir / "rollouts.jsonl")[0]["scores"] == [1.0, 0.0, 1.0, 0.0]
    assert result.metrics["all"]["pass@1"] == pytest.approx(0.5)
    assert result.metrics["all"]["pass@2"] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert json.loads((run_dir / "metrics.json").read_text())["ks"] == [1, 2, 4]
    # a stricter threshold than any score: nothing counts as correct, and the stored counts follow
    assert recompute(run_dir, threshold=1.5).metrics["all"]["pass@4"] == 0.0
    assert read_rollouts(run_dir / "rollouts.jsonl")[0]["num_correct"] == 0
    assert json.loads((run_dir / "settings.json").read_text())["threshold"] == 1.5


def test_compare_plot_has_one_line_per_model(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    sampler = HFSampler(model, tokenizer, max_new_tokens=3, progress=False)
    dirs = []
    for name, temperature in [("cold", 0.3), ("hot", 1.5), ("greedy", 0.0)]:
        dirs.append(tmp_path / name)
        config = _config("tiny", dirs[-1], name=name, temperature=temperature)
        run_eval(config, dataset=PROBLEMS, sampler=sampler, reward_fn=parity_reward, progress=False)
    table, fig, _ = compare_runs(dirs, output=tmp_path / "cmp")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["alpha", "beta"]
    for ax in visible:
        assert len(ax.get_lines()) == 3
        assert [tuple(line.get_xdata()) for line in ax.get_lines()] == [(1, 2, 4)] * 3
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:8] == PNG_SIGNATURE
    for d, ax_lines in zip(dirs, zip(*(ax.get_lines() for ax in visible), strict=True), strict=True):
        # the table's rows and the plotted lines hold the pass@k of that run's own rollouts
        expected = independent_metrics(d / "rollouts.jsonl", [1, 2, 4])
        assert_table_matches(table, d.name, expected, {"alpha": (3, 4), "beta": (2, 4), "all": (5, 4)})
        for ax, line in zip(visible, ax_lines, strict=True):
            assert line.get_label() == d.name
            want = [100 * expected[ax.get_title()][k] for k in (1, 2, 4)]
            assert list(line.get_ydata()) == pytest.approx(want, abs=1e-9)


def test_compare_only_reads_the_run_folders(tiny_model, tmp_path, caplog, capsys):
    # --compare (and load_run) must never rewrite another run's files, not even to drop a crash's trace
    model, tokenizer = tiny_model
    sampler = HFSampler(model, tokenizer, max_new_tokens=3, progress=False)
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        config = _config("tiny", d, name=d.name)
        run_eval(config, dataset=PROBLEMS, sampler=sampler, reward_fn=parity_reward, progress=False)
    rollouts = dirs[1] / "rollouts.jsonl"
    text = rollouts.read_bytes()
    rollouts.write_bytes(text[: len(text) - 40])  # b crashed while writing its last line

    def snapshot():
        return {p: p.read_bytes() for d in dirs for p in sorted(d.iterdir())}

    before = snapshot()
    with caplog.at_level("WARNING", logger="pacsrl.eval.rollouts"):
        table, _, results = compare_runs(dirs, output=tmp_path / "cmp")
    assert snapshot() == before
    assert f"{rollouts}: ignoring a truncated last line" in caplog.text
    assert [len(r.records) for r in results] == [len(PROBLEMS), len(PROBLEMS) - 1]  # b's last line ignored
    assert "| beta | b | 1 | 4 |" in table

    from pacsrl.cli import main

    assert main(["eval", "--compare", *map(str, dirs)]) == 0  # the CLI path, without --output
    assert "| beta | b | 1 | 4 |" in capsys.readouterr().out
    assert snapshot() == before


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli_eval_recompute_compare(tiny_model_dir, dataset_file, tmp_path, monkeypatch, capsys):
    from pacsrl.cli import main

    (tmp_path / "my_scorers.py").write_text(
        textwrap.dedent("""
        def first_char_even(completions, answer, **kwargs):
            return [float(bool(c[-1]["content"]) and ord(c[-1]["content"][0]) % 2 == 0) for c in completions]
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "cli_run"
    argv = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--datasets",
        str(dataset_file),
        "--n",
        "4",
        "--max-new-tokens",
        "3",
        "--backend",
        "hf",
        "--output",
        str(out),
        "--reward",
        "my_scorers:first_char_even",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "| benchmark | model | problems | n | pass@1 | pass@2 | pass@4 |" in printed and str(out) in printed
    )
    # the printed table holds the pass@k of the stored rollouts, under first_char_even's rule
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    for r in rollouts:
        assert r["scores"] == [float(c != "" and ord(c[0]) % 2 == 0) for c in r["completions"]]
    sizes = {"alpha": (3, 4), "beta": (2, 4), "all": (5, 4)}
    assert_table_matches(printed, str(tiny_model_dir), independent_metrics(rollouts, [1, 2, 4]), sizes)
    assert main(argv) == 0  # resumes: nothing left to sample
    capsys.readouterr()
    assert main([*argv, "--temperature", "1.0"]) == 2  # other settings: refused with a message, no traceback
    assert "cannot resume" in capsys.readouterr().err

    assert main(["eval", "--recompute", str(out), "--k", "1,3"]) == 0
    assert "pass@3" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["ks"] == [1, 3]

    assert main(["eval", "--compare", str(out), str(out), "--output", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "comparison.md").is_file()
    assert (
        main(["eval", "--model", str(tiny_model_dir), "--datasets", str(dataset_file), "--top-p", "0"]) == 2
    )
    assert "top_p=0.0 must be in (0, 1]" in capsys.readouterr().err
    del sys.modules["my_scorers"]


# --------------------------------------------------------------------------------------------------
# GPU: the vLLM backend against the transformers backend


def _save_gpu_model(path: Path) -> Path:
    """A tiny random Qwen2 with a char-level tokenizer, shaped for vLLM's kernels (head_dim 64)."""
    return _save_char_model(
        path,
        vocab_size=128,  # >= the 98 tokens, a multiple of 8 for the kernels
        hidden=128,
        layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )


@pytest.mark.gpu
def test_vllm_and_hf_backends_give_the_same_output_structure(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("vllm")
    model_dir = _save_gpu_model(tmp_path / "model")
    n = 4
    results = {}
    for backend in ("hf", "vllm"):  # hf first: its tiny model is freed before vLLM takes GPU memory
        config = _config(
            model_dir,
            tmp_path / backend,
            backend=backend,
            n=n,
            max_new_tokens=8,
            dtype="float16",
            gpu_memory_utilization=0.3,
        )
        results[backend] = run_eval(config, dataset=PROBLEMS, reward_fn=parity_reward, progress=False)
    hf, vllm = results["hf"], results["vllm"]
    for backend, result in results.items():
        assert result.settings["backend_used"] == backend
        assert len(result.records) == len(PROBLEMS)
        for r in result.records:
            assert len(r["completions"]) == len(r["scores"]) == n, backend
            assert all(isinstance(t, str) for t in r["completions"]), backend
            assert set(r["scores"]) <= {0.0, 1.0} and r["num_correct"] == r["scores"].count(1.0), backend
        lines = (tmp_path / backend / "rollouts.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == [r["id"] for r in result.records]
    assert [r["id"] for r in hf.records] == [r["id"] for r in vllm.records]
    assert [set(r) for r in hf.records] == [set(r) for r in vllm.records]
    assert hf.metrics["ks"] == vllm.metrics["ks"] == [1, 2, 4]
    assert set(hf.metrics["sources"]) == set(vllm.metrics["sources"]) == {"alpha", "beta"}
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted(
        p.name for p in (tmp_path / "vllm").iterdir()
    )
