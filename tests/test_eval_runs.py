"""Run folders of ``pacsrl eval`` keep their promises: resume, durability, duplicate problems, stored
settings, and plots that show the right numbers.

No model is loaded: a seeded stand-in sampler draws completions from one random stream per call, as a
real sampler does, so a test can tell which seed sampled what. Expected numbers are worked by hand (in
comments) or with exact rationals.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest

from pacsrl.eval import (
    EvalConfig,
    compare_runs,
    compute_metrics,
    load_run,
    plot_pass_at_k,
    recompute,
    run_eval,
)
from pacsrl.eval.rollouts import append_rollout, write_rollouts


class Crash(Exception):
    """What a killed process looks like to the test: the run stops where it is."""


class SeededSampler:
    """Completions of one call are drawn from ``random.Random(seed)``, prompt after prompt: they depend on
    the seed and on the position in the call, like a real sampler's. Raises ``Crash`` on call
    ``crash_at`` (0-based), before sampling anything."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at
        self.calls: list[tuple[int | None, list[str]]] = []

    def __call__(self, prompts, n, *, seed=None):
        if len(self.calls) == self.crash_at:
            raise Crash
        self.calls.append((seed, [p[0]["content"] for p in prompts]))
        rng = random.Random(seed)
        return [["".join(rng.choice("0123456789") for _ in range(3)) for _ in range(n)] for _ in prompts]


def even_first_digit(completions, answer, **kwargs):
    """Scorer: 1.0 when the completion's first digit is even."""
    return [float(int(c[-1]["content"][0]) % 2 == 0) for c in completions]


def half(completions, answer, **kwargs):
    """Scorer that gives every sample 0.5 (partial credit)."""
    return [0.5] * len(completions)


def _problem(question: str, source: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}], "answer": "0", "source": source}


PROBLEMS = [
    _problem("a1", "alpha"),
    _problem("a2", "alpha"),
    _problem("a3", "alpha"),
    _problem("b1", "beta"),
    _problem("b2", "beta"),
]


def _config(out: Path, **overrides) -> EvalConfig:
    settings = {"model": "stand-in", "n": 3, "max_new_tokens": 3, "backend": "hf", "output": str(out)}
    return EvalConfig(**{**settings, **overrides})


@pytest.fixture
def use_sampler(monkeypatch):
    """Make ``run_eval`` (and so ``pacsrl eval``) load the given stand-in instead of a model."""

    def install(sampler):
        def load_sampler(model, backend, **kwargs):
            return sampler, backend

        monkeypatch.setattr("pacsrl.eval.run.load_sampler", load_sampler)
        return sampler

    return install


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------------
# Datasets: one row of results per dataset given


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("math500", "math500"),  # a benchmark by name
        ("aime24=raw/aime_2024.jsonl", "aime24"),  # a benchmark prepared from a local file: its name
        ("aime24=runs/lr=1e-6/aime.jsonl", "aime24"),  # ... whose path holds "=" too
        ("data/chain_sum_hard.parquet", "chain_sum_hard"),  # a prepared file: its stem
        ("data/held_out.jsonl", "held_out"),
        ("data/held_out.json", "held_out"),
        ("data/Held_Out.JSONL", "Held_Out"),  # the suffix in any case
        ("runs/lr=1e-6/test.jsonl", "test"),  # a prepared file whose path holds "=" (no benchmark "runs/lr")
    ],
)
def test_dataset_names_in_the_results(spec, name):
    from pacsrl.eval.run import dataset_name

    assert dataset_name(spec) == name


def _rows(*pairs: tuple[str, str]) -> list[dict]:
    return [_problem(question, source) for question, source in pairs]


def test_resolve_problems_names_each_datasets_rows_and_keeps_ids_apart(monkeypatch):
    from pacsrl.eval.rollouts import problem_ids
    from pacsrl.eval.run import resolve_problems

    files = {
        "data/mix.jsonl": _rows(("a1", "alpha"), ("g1", "gamma"), ("b1", "beta"), ("a2", "alpha")),
        "data/more.jsonl": _rows(("a1", "alpha"), ("b2", "beta")),  # "a1" of alpha is in mix.jsonl too
        "math500": _rows(("m1", "math500"), ("m2", "math500"), ("m3", "math500"), ("m4", "math500")),
        "data/solo.jsonl": _rows(("s1", "alpha")),  # one source, named after the file
    }
    asked = []

    def resolve_dataset(spec, limit=None):
        asked.append((spec, limit))
        return files[spec][:limit]

    monkeypatch.setattr("pacsrl.data.resolve_dataset", resolve_dataset)
    problems = resolve_problems(list(files), limit=3)
    assert asked == [(spec, 3) for spec in files]  # the limit applies to each dataset
    got = [(p["prompt"][0]["content"], p["dataset"]) for p in problems]
    assert got == [
        # a file that mixes sources: a source no other dataset has keeps its name, a shared one is prefixed
        ("a1", "mix/alpha"), ("g1", "gamma"), ("b1", "mix/beta"),  # "a2" is past the limit
        ("a1", "more/alpha"), ("b2", "more/beta"),
        ("m1", "math500"), ("m2", "math500"), ("m3", "math500"),  # one source: the dataset's name
        ("s1", "solo"),
    ]  # fmt: skip
    for p in problems:
        (base,) = problem_ids([p["source"]], [p["prompt"]])
        # a row named other than its source carries that name in its id, so the two "a1" stay apart
        assert p["id"] == (base if p["dataset"] == p["source"] else f"{base}@{p['dataset']}")
    assert len({p["id"] for p in problems}) == len(problems)


@pytest.mark.parametrize(
    "specs", [["data/x.jsonl", "other/x.parquet"], ["aime24=a.jsonl", "aime24=b.jsonl", "y.json"]]
)
def test_resolve_problems_refuses_two_datasets_of_one_name(specs, monkeypatch):
    from pacsrl.eval.run import resolve_problems

    def resolve_dataset(spec, limit=None):
        raise AssertionError("refused before any dataset is read")

    monkeypatch.setattr("pacsrl.data.resolve_dataset", resolve_dataset)
    twice = "x" if "y.json" not in specs else "aime24"
    with pytest.raises(ValueError, match=rf"--datasets names {twice} more than once"):
        resolve_problems(specs)


def test_a_spec_pacsrl_cannot_read_is_refused_as_such_not_as_a_repeated_name():
    from pacsrl.eval.run import resolve_problems

    # two CSV files share the stem "x", but only the data files pacsrl reads are named by their stem:
    # the user hears that a CSV is not a dataset, not that renaming one would help
    with pytest.raises(ValueError, match=r"dataset spec 'data/x.csv' is neither a dataset name"):
        resolve_problems(["data/x.csv", "other/x.csv"])


def test_limit_applies_to_each_dataset_of_the_config(tmp_path, use_sampler, monkeypatch):
    asked = []

    def resolve_dataset(spec, limit=None):
        asked.append((spec, limit))
        return _rows(*((f"{spec[0]}{i}", spec) for i in range(1, 4)))[:limit]  # 3 rows per dataset

    monkeypatch.setattr("pacsrl.data.resolve_dataset", resolve_dataset)
    sampler = use_sampler(SeededSampler())
    config = _config(tmp_path / "run", datasets=["x.jsonl", "math500"], limit=2)
    result = run_eval(config, reward_fn=half, progress=False)
    assert asked == [("x.jsonl", 2), ("math500", 2)]
    assert [q for _, prompts in sampler.calls for q in prompts] == ["x1", "x2", "m1", "m2"]
    assert sorted(result.metrics["sources"]) == ["math500", "x"]  # a row per dataset: a file by its stem


# --------------------------------------------------------------------------------------------------
# In memory, and saved as a run folder (a stand-in for the model's sampler: no model is loaded)


@pytest.fixture
def stand_in_hf_sampler(monkeypatch):
    """Make ``evaluate_model`` sample with a ``SeededSampler``; returns it and the HFSampler arguments."""
    sampler, made = SeededSampler(), []

    def hf_sampler(*args, **kwargs):
        made.append((args, kwargs))
        return sampler

    monkeypatch.setattr("pacsrl.eval.run.HFSampler", hf_sampler)
    return sampler, made


def _expected_metrics(records, ks, threshold):
    """pass@k per problem from exact rationals, averaged; grouped by source and over all."""
    groups = {}
    for r in records:
        groups.setdefault(r["source"], []).append(r)
    groups["all"] = list(records)
    out = {}
    for name, group in groups.items():
        per = [(len(r["scores"]), sum(s >= threshold for s in r["scores"])) for r in group]
        out[name] = {f"pass@{k}": sum(_exact(n, c, k) for n, c in per) / len(per) for k in ks}
    return out


def test_in_memory_evaluation_samples_scores_and_records_its_settings(
    stand_in_hf_sampler, tmp_path, monkeypatch
):
    from pacsrl.eval import evaluate_model

    monkeypatch.chdir(tmp_path)
    sampler, made = stand_in_hf_sampler
    model, tokenizer = object(), object()
    result = evaluate_model(
        model, tokenizer, PROBLEMS, n=3, ks=[3, 1], temperature=0.7, top_p=0.8, max_new_tokens=5,
        batch_size=6, seed=7, reward_fn=even_first_digit, threshold=1.0, name="policy", progress=False,
    )  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert made == [
        ((model, tokenizer), {"temperature": 0.7, "top_p": 0.8, "max_new_tokens": 5, "batch_size": 6, "progress": False})
    ]  # fmt: skip
    # chunks of batch_size // n = 2 problems, the seed advanced by the problems before each chunk
    assert sampler.calls == [(7, ["a1", "a2"]), (9, ["a3", "b1"]), (11, ["b2"])]
    assert [r["prompt"][0]["content"] for r in result.records] == ["a1", "a2", "a3", "b1", "b2"]
    for r, p in zip(result.records, PROBLEMS, strict=True):
        assert (r["source"], r["answer"], r["prompt"]) == (p["source"], p["answer"], p["prompt"])
        assert len(r["completions"]) == 3
        assert r["scores"] == [float(int(c[0]) % 2 == 0) for c in r["completions"]]  # the rule again
        assert r["num_correct"] == r["scores"].count(1.0)
    scores = [s for r in result.records for s in r["scores"]]
    assert 0 < sum(scores) < len(scores)  # mixed, so the checks below can fail
    expected = _expected_metrics(result.records, [1, 3], 1.0)
    assert result.metrics["ks"] == [1, 3]
    for group, values in expected.items():
        got = result.metrics["all"] if group == "all" else result.metrics["sources"][group]
        assert {k: got[k] for k in values} == pytest.approx(values, abs=1e-12), group
    assert result.name == "policy" and result.output_dir is None
    assert result.settings == {
        "model": "policy", "name": "policy", "n": 3, "temperature": 0.7, "top_p": 0.8, "max_new_tokens": 5,
        "seed": 7, "threshold": 1.0, "reward": "even_first_digit",
    }  # fmt: skip

    # a scorer given as a spec is recorded as given; no seed samples every chunk unseeded; the threshold counts
    sampler.calls.clear()
    result = evaluate_model(
        model, tokenizer, PROBLEMS[:2], n=3, batch_size=2, seed=None, reward_fn=f"{__name__}:half",
        threshold=0.5, progress=False,
    )  # fmt: skip
    assert sampler.calls == [(None, ["a1"]), (None, ["a2"])]  # batch_size 2 < n: one problem per chunk
    assert [r["num_correct"] for r in result.records] == [3, 3]  # 0.5 >= 0.5
    assert result.metrics["all"]["pass@1"] == 1.0
    assert (result.settings["reward"], result.settings["seed"], result.settings["threshold"]) == (
        f"{__name__}:half",
        None,
        0.5,
    )
    # a scorer object without a __name__ is recorded by its repr
    result = evaluate_model(model, tokenizer, PROBLEMS[:1], n=2, reward_fn=PartialCredit(0.5), progress=False)
    assert result.settings["reward"] == "PartialCredit(0.5)" and result.records[0]["scores"] == [0.5, 0.5]


def test_in_memory_evaluation_defaults(stand_in_hf_sampler, monkeypatch, capsys):
    from pacsrl.eval import evaluate_model

    sampler, made = stand_in_hf_sampler
    specs = []

    def resolve_reward(spec):
        specs.append(spec)
        return even_first_digit

    monkeypatch.setattr("pacsrl.eval.run.resolve_reward", resolve_reward)
    result = evaluate_model(None, None, PROBLEMS[:3])
    assert specs == ["math"]  # the math verifier by default
    assert made[0][1] == {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 4096, "batch_size": 64,
                          "progress": False}  # fmt: skip
    # n = 32, so chunks of 64 // 32 = 2 problems, from seed 0; pass@k for 1, 2, 4, ..., 32
    assert sampler.calls == [(0, ["a1", "a2"]), (2, ["a3"])]
    assert [len(r["completions"]) for r in result.records] == [32, 32, 32]
    assert result.metrics["ks"] == [1, 2, 4, 8, 16, 32]
    assert result.settings == {
        "model": "model", "name": "model", "n": 32, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 4096,
        "seed": 0, "threshold": 1.0, "reward": "math",
    }  # fmt: skip
    assert "eval" in capsys.readouterr().err  # a progress bar by default


def test_save_results_writes_a_run_folder_that_reads_back(stand_in_hf_sampler, tmp_path):
    from pacsrl.eval import evaluate_model, save_results

    result = evaluate_model(
        object(), object(), PROBLEMS, n=4, seed=3, reward_fn=even_first_digit, progress=False
    )
    out = tmp_path / "new" / "run"  # its parent does not exist yet
    for _ in range(2):  # a second save replaces the first
        paths = save_results(result, out)
    assert paths == {kind: out / name for kind, name in [("rollouts", "rollouts.jsonl"), ("metrics", "metrics.json"),
                     ("table", "metrics.md"), ("plot", "pass_at_k.png")]}  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["rollouts.jsonl", "settings.json", "metrics.json", "metrics.md", "pass_at_k.png"]
    )
    assert result.output_dir == out
    assert _lines(out / "rollouts.jsonl") == result.records  # each problem once
    assert json.loads((out / "settings.json").read_text()) == result.settings
    loaded = load_run(out)
    assert loaded.name == "model" and loaded.records == result.records
    expected = _expected_metrics(result.records, [1, 2, 4], 1.0)
    assert {k: loaded.metrics["all"][k] for k in expected["all"]} == pytest.approx(expected["all"], abs=1e-12)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["name"] == "model" and saved["settings"] == result.settings
    assert {k: saved["all"][k] for k in expected["all"]} == pytest.approx(expected["all"], abs=1e-12)
    assert (out / "metrics.md").read_text().splitlines()[0] == "| benchmark | model | problems | n | pass@1 | pass@2 | pass@4 |"  # fmt: skip
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_run_folder_is_named_after_the_model(tmp_path, monkeypatch):
    from pacsrl.eval.run import run_folder

    checkpoint = tmp_path / "runs" / "checkpoint-500"
    checkpoint.mkdir(parents=True)
    monkeypatch.chdir(checkpoint)
    default = Path("outputs") / "eval"
    assert run_folder(EvalConfig(model="Qwen/Qwen2.5-Math-1.5B")) == default / "Qwen__Qwen2.5-Math-1.5B"
    assert run_folder(EvalConfig(model="me/a + b_c")) == default / "me__a__b_c"  # a run of others: one "__"
    assert run_folder(EvalConfig(model=".")) == default / "checkpoint-500"  # a local folder: its name
    assert run_folder(EvalConfig(model="../checkpoint-500/")) == default / "checkpoint-500"
    assert run_folder(EvalConfig(model="org/m", name="my run")) == default / "my__run"  # --name wins
    assert run_folder(EvalConfig(model="org/m", output="elsewhere")) == Path("elsewhere")  # --output wins


def test_run_eval_loads_the_model_with_the_configs_sampling_settings(tmp_path, monkeypatch):
    loaded, sampler = [], SeededSampler()

    def load_sampler(model, backend, **kwargs):
        loaded.append((model, backend, kwargs))
        return sampler, backend

    monkeypatch.setattr("pacsrl.eval.run.load_sampler", load_sampler)
    config = _config(
        tmp_path / "run", model="org/m", backend="hf", temperature=0.7, top_p=0.8, max_new_tokens=5,
        batch_size=6, seed=7, dtype="bfloat16", gpu_memory_utilization=0.5, tensor_parallel_size=2,
    )  # fmt: skip
    run_eval(config, dataset=PROBLEMS, reward_fn=even_first_digit, progress=False)
    assert loaded == [
        ("org/m", "hf", {"temperature": 0.7, "top_p": 0.8, "max_new_tokens": 5, "batch_size": 6, "seed": 7,
                         "dtype": "bfloat16", "gpu_memory_utilization": 0.5, "tensor_parallel_size": 2,
                         "progress": False})
    ]  # fmt: skip
    # the hf backend samples batch_size // n = 6 // 3 = 2 problems at a time, from seed 7
    assert [seed for seed, _ in sampler.calls] == [7, 9, 11]


@pytest.mark.parametrize(
    ("backend", "batch_size", "chunk_size", "problems", "sizes"),
    [
        ("hf", 6, None, 5, [2, 2, 1]),  # batch_size // n = 6 // 3 = 2 problems (6 sequences) per call
        ("hf", 2, None, 3, [1, 1, 1]),  # a batch smaller than n: still one problem per call
        ("vllm", 6, None, 65, [64, 1]),  # vLLM batches by itself: 64 problems per call
        ("vllm", 6, 2, 5, [2, 2, 1]),  # --chunk-size wins
        ("hf", 6, 4, 5, [4, 1]),
    ],
)
def test_problems_per_sampler_call(backend, batch_size, chunk_size, problems, sizes, tmp_path, use_sampler):
    sampler = use_sampler(SeededSampler())
    config = _config(tmp_path / "run", backend=backend, batch_size=batch_size, chunk_size=chunk_size)
    dataset = [_problem(f"q{i}", "alpha") for i in range(problems)]
    run_eval(config, dataset=dataset, reward_fn=half, progress=False)
    assert [len(prompts) for _, prompts in sampler.calls] == sizes


def test_a_run_with_a_ready_sampler_needs_no_model(tmp_path, monkeypatch, use_sampler):
    from importlib.metadata import version

    monkeypatch.chdir(tmp_path)
    config = EvalConfig(n=3, max_new_tokens=3, backend="hf")  # no --model, no --name, no --output
    result = run_eval(config, dataset=PROBLEMS[:2], sampler=SeededSampler(), reward_fn=half, progress=False)
    out = Path("outputs") / "eval" / "model"  # named "model" for want of another name
    assert result.name == "model" and len(_lines(out / "rollouts.jsonl")) == 2
    settings = json.loads((out / "settings.json").read_text())
    assert settings["name"] == "model" and settings["model"] is None
    assert settings["output"] == "outputs/eval/model"  # where the run was written, though none was given
    assert settings["pacsrl_version"] == version("pacsrl")
    assert settings["backend_used"] == "custom"  # not the hf backend of the config: no model was loaded
    assert result.settings == settings  # the settings go with the result, and into metrics.json
    assert json.loads((out / "metrics.json").read_text())["name"] == "model"
    assert json.loads((out / "metrics.json").read_text())["settings"] == settings

    # samples of a custom sampler are not resumed by loading a model, nor the other way round
    use_sampler(SeededSampler())
    first = tmp_path / "custom"
    run_eval(_config(first), dataset=PROBLEMS[:2], sampler=SeededSampler(), reward_fn=half, progress=False)
    with pytest.raises(ValueError, match=r"\(backend_used: 'custom' in the folder, 'hf' now\)"):
        run_eval(_config(first), dataset=PROBLEMS, reward_fn=half, progress=False)
    second = tmp_path / "loaded"
    run_eval(_config(second), dataset=PROBLEMS[:2], reward_fn=half, progress=False)
    with pytest.raises(ValueError, match=r"\(backend_used: 'hf' in the folder, 'custom' now\)"):
        run_eval(_config(second), dataset=PROBLEMS, sampler=SeededSampler(), reward_fn=half, progress=False)

    # neither a model nor a sampler: refused before anything is written
    with pytest.raises(ValueError, match="no model to evaluate"):
        run_eval(EvalConfig(output=str(tmp_path / "none")), dataset=PROBLEMS, reward_fn=half)
    assert not (tmp_path / "none").exists()


def test_progress_bars_are_shown_unless_turned_off(tmp_path, use_sampler, stand_in_hf_sampler, capsys):
    from pacsrl.eval import evaluate_model

    use_sampler(SeededSampler())
    run_eval(_config(tmp_path / "quiet"), dataset=PROBLEMS, reward_fn=half, progress=False)
    evaluate_model(object(), object(), PROBLEMS, n=2, reward_fn=half, progress=False)
    assert capsys.readouterr().err == ""
    run_eval(_config(tmp_path / "shown"), dataset=PROBLEMS, reward_fn=half)  # shown by default
    assert "eval: 100%" in capsys.readouterr().err


def by_level(completions, level, **kwargs):
    """Scorer that reads a dataset column: every sample of a level-L problem scores L / 4."""
    return [lv / 4 for lv in level]


def test_other_columns_reach_the_scorer_and_stay_for_rescoring(tmp_path, use_sampler):
    use_sampler(SeededSampler())
    out = tmp_path / "run"
    dataset = [{**p, "level": level} for p, level in zip(PROBLEMS[:3], (1, 2, 4), strict=True)]
    run_eval(_config(out, threshold=0.5), dataset=dataset, reward_fn=by_level, progress=False)
    lines = _lines(out / "rollouts.jsonl")
    assert [r["columns"] for r in lines] == [{"level": 1}, {"level": 2}, {"level": 4}]
    assert [r["scores"] for r in lines] == [[0.25] * 3, [0.5] * 3, [1.0] * 3]
    # rescoring reads the columns back from rollouts.jsonl: the same scores, pass@1 = 2/3 at threshold 0.5
    assert recompute(out, rescore=True, reward=by_level).metrics["all"]["pass@1"] == pytest.approx(2 / 3)
    assert [r["scores"] for r in _lines(out / "rollouts.jsonl")] == [[0.25] * 3, [0.5] * 3, [1.0] * 3]


class Recorder:
    """Scorer that records its keyword arguments and returns the given scores; named ``recorder``
    unless ``named`` is false (then it has no ``__name__``, as most callable objects)."""

    def __init__(self, scores, named: bool = True) -> None:
        self.scores, self.calls = scores, []
        if named:
            self.__name__ = "recorder"

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.scores

    def __repr__(self) -> str:
        return "<a recorder>"


def test_score_completions_calls_the_scorer_as_trl_does():
    from pacsrl.eval.run import score_completions

    chat = [{"role": "user", "content": "1 + 1?"}]
    problem = {"id": "p7", "source": "alpha", "prompt": chat, "answer": "2", "columns": {"level": 3}}
    scorer = Recorder([1, 0.5])  # ints are scores too: returned as floats
    got = score_completions(scorer, problem, ["2", "3"])
    assert got == [1.0, 0.5] and all(type(s) is float for s in got)
    # a conversational prompt's completions as assistant messages; each column as a list, one per sample
    assert scorer.calls == [
        {"prompts": [chat, chat], "completions": [[{"role": "assistant", "content": "2"}],
                                                  [{"role": "assistant", "content": "3"}]],
         "answer": ["2", "2"], "source": ["alpha", "alpha"], "level": [3, 3]}
    ]  # fmt: skip
    # a plain-text prompt's completions as plain text; a record without other columns (an old run's)
    scorer = Recorder([0.0])
    old_record = {"id": "q", "source": "s", "prompt": "Q:", "answer": "1"}
    assert score_completions(scorer, old_record, ["A"]) == [0.0]
    assert scorer.calls == [{"prompts": ["Q:"], "completions": ["A"], "answer": ["1"], "source": ["s"]}]

    # a scorer that does not give one finite number per sample is refused, naming itself and the sample
    for scores, message in [
        (None, "reward function recorder returned None scores for 2 completions"),
        ([1.0], "reward function recorder returned 1 scores for 2 completions"),
        ([1.0, None], r"reward function recorder returned None for sample 1 of problem p7 \(alpha\)"),
        (["1.0", 1.0], r"reward function recorder returned '1.0' for sample 0 of problem p7"),  # text
        ([1.0, math.nan], r"returned nan for sample 1 of problem p7"),
        ([math.inf, 1.0], r"returned inf for sample 0 of problem p7"),
    ]:
        with pytest.raises(ValueError, match=message):
            score_completions(Recorder(scores), problem, ["2", "3"])
    # a scorer object without a __name__ is named by its repr
    with pytest.raises(ValueError, match=r"reward function <a recorder> returned 1 scores for 2 completions"):
        score_completions(Recorder([1.0], named=False), problem, ["2", "3"])


# --------------------------------------------------------------------------------------------------
# Problem ids and the rollouts file's format


def test_problem_ids_are_pinned_so_old_run_folders_still_resume():
    import hashlib

    from pacsrl.eval.rollouts import problem_ids

    prompt = [{"role": "user", "content": "Résumé?"}]
    # the hash of (source, prompt) as canonical JSON, written out by hand: keys sorted, text as UTF-8
    canonical = '["alpha", [{"content": "Résumé?", "role": "user"}]]'
    base = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
    other = hashlib.sha256('["beta", [{"content": "Résumé?", "role": "user"}]]'.encode()).hexdigest()[:16]
    ids = problem_ids(["alpha", "beta", "alpha", "alpha"], [prompt] * 4)
    assert ids == [base, other, f"{base}#2", f"{base}#3"]  # a repeat gets #k, the source tells two apart
    with pytest.raises(ValueError):
        problem_ids(["alpha", "beta"], [prompt])  # one prompt per source, never a silent cut


def test_dataset_problems_ids_columns_and_missing_columns():
    from pacsrl.eval.run import dataset_problems

    rows = [{**_problem("q", "alpha"), "level": 3}, {**_problem("q", "beta"), "level": 5}]
    problems = dataset_problems(rows)
    assert [p["columns"] for p in problems] == [
        {"level": 3},
        {"level": 5},
    ]  # the other columns, for the scorer
    assert all("#" not in p["id"] for p in problems)  # one prompt under two sources: two problems, no repeat
    assert problems[0]["id"] != problems[1]["id"]
    with pytest.raises(ValueError, match=r"row 1 lacks column\(s\) \['source'\]"):
        dataset_problems([_problem("q", "alpha"), {"prompt": "p", "answer": "1"}])


def test_rollouts_store_text_as_utf8_not_escapes(tmp_path):
    record = {"id": "1", "source": "s", "prompt": "p", "answer": "½", "completions": ["é"], "scores": [1.0]}
    append_rollout(tmp_path / "appended.jsonl", record)
    write_rollouts(tmp_path / "rewritten.jsonl", [record])
    for name in ("appended.jsonl", "rewritten.jsonl"):  # readable and greppable as written
        data = (tmp_path / name).read_bytes()
        assert "½".encode() in data and "é".encode() in data and b"\\u" not in data, name


def test_read_rollouts_skips_an_empty_line_and_refuses_an_incomplete_record(tmp_path, caplog):
    from pacsrl.eval.rollouts import read_rollouts

    def line(i):
        return json.dumps(
            {"id": str(i), "source": "s", "prompt": "p", "answer": "1", "completions": ["x"], "scores": [1]}
        )

    path = tmp_path / "rollouts.jsonl"
    path.write_text(line(1) + "\n\n" + line(2) + "\n")  # an empty line between two records
    with caplog.at_level("WARNING"):
        assert [r["id"] for r in read_rollouts(path)] == ["1", "2"]
    assert caplog.records == []  # a clean file: nothing to warn about
    path.write_text(line(1) + "\n  ")  # spaces after the last newline (an editor's): not a record, no error
    assert [r["id"] for r in read_rollouts(path)] == ["1"]
    path.write_text(line(1) + "\n" + json.dumps({"id": "2", "source": "s"}) + "\n" + line(3) + "\n")
    with pytest.raises(ValueError, match=r"rollouts.jsonl:2: not a complete rollout record"):
        read_rollouts(path)  # a JSON object without the required keys, not at the end: no crash made it


# --------------------------------------------------------------------------------------------------
# Resume


def test_interrupted_and_resumed_cli_run_writes_the_rollouts_of_an_uninterrupted_run(
    tmp_path, monkeypatch, use_sampler, capsys
):
    from pacsrl.cli import main

    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    (tmp_path / "scorers.py").write_text(
        "def even_first_digit(completions, answer, **kwargs):\n"
        "    return [float(int(c[-1]['content'][0]) % 2 == 0) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = tmp_path / "stand-in"  # a checkpoint folder for the CLI's check; the stand-in sampler samples
    model.mkdir()
    (model / "config.json").write_text("{}")

    def argv(out):
        return ["eval", "--model", str(model), "--datasets", str(data), "--n", "3", "--chunk-size", "2",
                "--seed", "7", "--backend", "hf", "--reward", "scorers:even_first_digit", "--output", str(out)]  # fmt: skip

    use_sampler(SeededSampler())
    assert main(argv(tmp_path / "whole")) == 0
    whole = (tmp_path / "whole" / "rollouts.jsonl").read_bytes()

    # killed after its first chunk (problems 0-1 written), then the same command again
    crashing = use_sampler(SeededSampler(crash_at=1))
    with pytest.raises(Crash):
        main(argv(tmp_path / "resumed"))
    assert len(_lines(tmp_path / "resumed" / "rollouts.jsonl")) == 2
    resuming = use_sampler(SeededSampler())
    assert main(argv(tmp_path / "resumed")) == 0
    capsys.readouterr()
    # chunks of 2 from seed 7: problems 0-1 with seed 7, 2-3 with 9, 4 with 11, however the run was cut
    assert [seed for seed, _ in crashing.calls + resuming.calls] == [7, 9, 11]
    assert (tmp_path / "resumed" / "rollouts.jsonl").read_bytes() == whole
    scores = [s for r in _lines(tmp_path / "resumed" / "rollouts.jsonl") for s in r["scores"]]
    assert 0 < sum(scores) < len(scores)  # the scores are mixed, so equal files say something


# Every setting that shapes what is sampled or how it is scored (README, "Resume"), with another value.
MUST_MATCH = {
    "model": "other-model",
    "n": 4,
    "temperature": 0.7,
    "top_p": 0.9,
    "max_new_tokens": 4,
    "seed": 1,
    "reward": "scorers:other",
    "dtype": "float32",
    "backend": "vllm",  # compared as the backend "auto" resolves to, stored as backend_used
}
# Settings that only change speed, which problems are included, or the counting: resuming is fine.
MAY_DIFFER = {
    "batch_size": 2,
    "chunk_size": 1,
    "limit": 2,
    "threshold": 0.5,
    "gpu_memory_utilization": 0.5,
    "tensor_parallel_size": 2,
    "name": "renamed",
    "k": [1, 3],
}


@pytest.mark.parametrize(("key", "value"), sorted(MUST_MATCH.items()))
def test_resume_refuses_each_setting_that_shapes_the_samples(key, value, tmp_path, use_sampler, monkeypatch):
    monkeypatch.setattr("pacsrl.eval.run.resolve_backend", lambda backend: backend)  # vllm without vLLM
    use_sampler(SeededSampler())
    out = tmp_path / "run"
    run_eval(_config(out), dataset=PROBLEMS[:2], reward_fn=even_first_digit, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    stored = "backend_used" if key == "backend" else key
    # the message names both values, the folder's and the one asked for now
    was, now = repr(getattr(_config(out), key)), repr(value)
    with pytest.raises(
        ValueError,
        match=rf"cannot resume .*\({stored}: {re.escape(was)} in the folder, {re.escape(now)} now\)",
    ):
        run_eval(_config(out, **{key: value}), dataset=PROBLEMS, reward_fn=even_first_digit, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused before writing anything


@pytest.mark.parametrize(("key", "value"), sorted(MAY_DIFFER.items()))
def test_resume_accepts_settings_that_do_not_shape_the_samples(key, value, tmp_path, use_sampler):
    use_sampler(SeededSampler())
    out = tmp_path / "run"
    run_eval(_config(out), dataset=PROBLEMS[:2], reward_fn=even_first_digit, progress=False)
    first = (out / "rollouts.jsonl").read_bytes()
    sampler = use_sampler(SeededSampler())
    result = run_eval(
        _config(out, **{key: value}), dataset=PROBLEMS, reward_fn=even_first_digit, progress=False
    )
    assert (out / "rollouts.jsonl").read_bytes().startswith(first)
    sampled = [q for _, prompts in sampler.calls for q in prompts]
    assert sampled == (["b1", "b2"] if key == "limit" else ["a3", "b1", "b2"])  # limit 2: 2 per source
    assert len(result.records) == (4 if key == "limit" else 5)


def test_overwrite_starts_over_whatever_the_folder_holds(tmp_path, use_sampler):
    out = tmp_path / "run"
    # a crashed run: two problems in rollouts.jsonl, settings.json, but no metrics, table or plot yet
    use_sampler(SeededSampler(crash_at=1))
    with pytest.raises(Crash):
        run_eval(_config(out, chunk_size=2), dataset=PROBLEMS, reward_fn=even_first_digit, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["rollouts.jsonl", "settings.json"]
    # other settings (n = 4, not 3) and fewer problems: nothing is resumed, nothing of the old run is kept
    for n in (4, 2):  # the second time, every file of the first overwrite is there to be replaced
        sampler = use_sampler(SeededSampler())
        result = run_eval(
            _config(out, n=n, overwrite=True),
            dataset=PROBLEMS[:3],
            reward_fn=even_first_digit,
            progress=False,
        )
        assert [q for _, prompts in sampler.calls for q in prompts] == ["a1", "a2", "a3"]
        lines = _lines(out / "rollouts.jsonl")
        assert [r["prompt"][0]["content"] for r in lines] == ["a1", "a2", "a3"]
        assert [len(r["completions"]) for r in lines] == [n, n, n]
        assert json.loads((out / "settings.json").read_text())["n"] == n
        assert json.loads((out / "metrics.json").read_text())["all"]["num_problems"] == 3
        assert len(result.records) == 3


# --------------------------------------------------------------------------------------------------
# Durability


@pytest.fixture
def fsyncs(monkeypatch):
    """Record, for every os.fsync, the file it syncs and that file's bytes at that moment."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name a file descriptor's file")
    calls: list[tuple[str, bytes]] = []
    real = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        calls.append((path, Path(path).read_bytes() if os.path.isfile(path) else b""))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_each_appended_problem_is_flushed_and_fsynced(tmp_path, fsyncs):
    path = tmp_path / "rollouts.jsonl"
    records = [{"id": str(i), "source": "s", "prompt": "p", "answer": "1", "completions": ["x"], "scores": [1.0]}
               for i in range(3)]  # fmt: skip
    for i, record in enumerate(records):
        append_rollout(path, record)
        # one fsync of this file per problem, after its line was written whole (flushed before the fsync)
        assert fsyncs[-1] == (str(path), b"".join(json.dumps(r).encode() + b"\n" for r in records[: i + 1]))
    assert len(fsyncs) == 3


def test_run_eval_fsyncs_every_problem_and_rewrites_atomically(tmp_path, use_sampler, fsyncs):
    use_sampler(SeededSampler())
    out = tmp_path / "run"
    run_eval(_config(out, chunk_size=5), dataset=PROBLEMS, reward_fn=even_first_digit, progress=False)
    rollouts = str(out / "rollouts.jsonl")
    synced = [content.count(b"\n") for path, content in fsyncs if path == rollouts]
    assert synced == [1, 2, 3, 4, 5]  # problem by problem, even inside one chunk

    # a rewrite (recompute with a new threshold) syncs the new file before it replaces the old one
    fsyncs.clear()
    write_rollouts(out / "rollouts.jsonl", _lines(out / "rollouts.jsonl")[:2])
    paths = [path for path, _ in fsyncs]
    assert paths[0] == rollouts + ".tmp" and fsyncs[0][1].count(b"\n") == 2
    assert paths[1:] == [str(out)]  # then the folder, so that the rename itself is durable


# --------------------------------------------------------------------------------------------------
# Duplicate problems


def test_a_dataset_with_a_repeated_problem_evaluates_each_row_and_reads_back(tmp_path, use_sampler):
    dataset = [*PROBLEMS, PROBLEMS[0], PROBLEMS[0]]  # "a1" three times: three rows, three problems
    out = tmp_path / "run"
    crashing = use_sampler(SeededSampler(crash_at=2))
    with pytest.raises(Crash):
        run_eval(_config(out, chunk_size=2), dataset=dataset, reward_fn=even_first_digit, progress=False)
    resuming = use_sampler(SeededSampler())
    result = run_eval(_config(out, chunk_size=2), dataset=dataset, reward_fn=even_first_digit, progress=False)
    sampled = [q for _, prompts in crashing.calls + resuming.calls for q in prompts]
    assert sorted(sampled) == sorted(p["prompt"][0]["content"] for p in dataset)  # each row exactly once

    loaded = load_run(out)
    ids = [r["id"] for r in loaded.records]
    assert len(ids) == len(set(ids)) == 7
    assert [r["prompt"][0]["content"] for r in loaded.records].count("a1") == 3
    assert loaded.metrics["sources"]["alpha"]["num_problems"] == 5
    assert loaded.metrics["all"]["num_problems"] == len(result.records) == 7
    assert compare_runs([out])[2][0].metrics["all"]["num_problems"] == 7


# --------------------------------------------------------------------------------------------------
# Stored settings


def test_a_runs_threshold_is_used_when_it_is_read_again(tmp_path, use_sampler):
    use_sampler(SeededSampler())
    out = tmp_path / "run"
    # every sample scores 0.5: correct at threshold 0.5, so pass@1 = 1; at the default 1.0 it would be 0
    result = run_eval(_config(out, threshold=0.5), dataset=PROBLEMS, reward_fn=half, progress=False)
    assert result.metrics["all"]["pass@1"] == 1.0
    assert load_run(out).metrics["all"]["pass@1"] == 1.0
    table, _, (compared,) = compare_runs([out])
    assert compared.metrics["all"]["pass@1"] == 1.0 and "| alpha | stand-in | 3 | 3 | 100.00 |" in table
    assert recompute(out).metrics["all"]["pass@1"] == 1.0
    assert json.loads((out / "metrics.json").read_text())["all"]["pass@1"] == 1.0
    # an explicit new threshold is stored and used from then on
    assert recompute(out, threshold=1.0).metrics["all"]["pass@1"] == 0.0
    assert load_run(out).metrics["all"]["pass@1"] == 0.0


def test_rerunning_a_finished_run_records_the_settings_its_metrics_use(tmp_path, use_sampler):
    use_sampler(SeededSampler())
    out = tmp_path / "run"
    run_eval(_config(out), dataset=PROBLEMS, reward_fn=half, progress=False)  # threshold 1.0: pass@1 = 0
    # nothing left to sample; a new threshold and name may change (README, "Resume")
    sampler = use_sampler(SeededSampler())
    result = run_eval(
        _config(out, threshold=0.5, name="renamed"), dataset=PROBLEMS, reward_fn=half, progress=False
    )
    assert sampler.calls == []
    assert result.metrics["all"]["pass@1"] == 1.0  # every 0.5 counts at threshold 0.5
    assert json.loads((out / "metrics.json").read_text())["all"]["pass@1"] == 1.0
    # read again later, the folder says what metrics.json says
    loaded = load_run(out)
    assert (loaded.name, loaded.metrics["all"]["pass@1"]) == ("renamed", 1.0)
    assert json.loads((out / "settings.json").read_text())["threshold"] == 0.5


def test_compare_keeps_two_runs_of_the_same_name(tmp_path, use_sampler):
    dirs = [tmp_path / "first", tmp_path / "second"]
    for d, reward in zip(dirs, (even_first_digit, half)):
        use_sampler(SeededSampler())
        run_eval(_config(d, name="same"), dataset=PROBLEMS, reward_fn=reward, progress=False)
    table, figure, results = compare_runs(dirs, output=tmp_path / "cmp")
    assert [r.name for r in results] == ["same (first)", "same (second)"]
    assert "| alpha | same (first) | 3 | 3 |" in table and "| alpha | same (second) | 3 | 3 |" in table
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert sorted(saved) == ["same (first)", "same (second)"]
    assert saved["same (second)"]["all"]["pass@1"] == 0.0  # half's 0.5 never reaches threshold 1.0
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["same (first)", "same (second)"]


def test_limit_keeps_the_first_rows_of_each_source(tmp_path, use_sampler):
    sampler = use_sampler(SeededSampler())
    result = run_eval(_config(tmp_path / "run", limit=2), dataset=PROBLEMS, reward_fn=half, progress=False)
    assert [r["prompt"][0]["content"] for r in result.records] == ["a1", "a2", "b1", "b2"]
    assert [q for _, prompts in sampler.calls for q in prompts] == ["a1", "a2", "b1", "b2"]


def test_user_ks_are_sorted_and_deduplicated(tmp_path, use_sampler):
    records = [{"source": "s", "scores": [1, 0, 0, 0]}]  # pass@1 = 1/4, pass@2 = 1/2, pass@4 = 1
    metrics = compute_metrics(records, ks=[4, 1, 2, 2])
    assert metrics["ks"] == [1, 2, 4]
    assert [metrics["all"][f"pass@{k}"] for k in (1, 2, 4)] == [0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match=r"every k must be in \[1, 4\]"):
        compute_metrics(records, ks=[8, 1])  # out of range even when it is not the last one given
    use_sampler(SeededSampler())
    out = tmp_path / "run"
    result = run_eval(_config(out, k=[3, 1, 3]), dataset=PROBLEMS, reward_fn=half, progress=False)
    assert json.loads((out / "metrics.json").read_text())["ks"] == [1, 3]
    assert result.table.splitlines()[0] == "| benchmark | model | problems | n | pass@1 | pass@3 |"


# --------------------------------------------------------------------------------------------------
# Plots


def _write_run(folder: Path, name: str, scores_by_source: dict[str, list[list[int]]]) -> Path:
    folder.mkdir(parents=True)
    records = [
        {"id": f"{source}{i}", "source": source, "prompt": "p", "answer": "1", "completions": ["x"] * len(s),
         "scores": s}
        for source, problems in scores_by_source.items()
        for i, s in enumerate(problems)
    ]  # fmt: skip
    (folder / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "settings.json").write_text(json.dumps({"name": name, "threshold": 1.0}))
    return folder


def _exact(n: int, c: int, k: int) -> float:
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def test_each_panel_plots_its_own_benchmark(tmp_path):
    runs = {
        "cold": {"alpha": [[1, 0, 0, 0]], "beta": [[0, 0, 0, 0], [1, 1, 0, 0]]},
        "hot": {"alpha": [[1, 1, 1, 1]], "beta": [[1, 0, 0, 0], [0, 0, 0, 0]]},
    }
    dirs = [_write_run(tmp_path / name, name, by_source) for name, by_source in runs.items()]
    _, figure, _ = compare_runs(dirs)
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}
    assert sorted(panels) == ["alpha", "beta"]
    for source, ax in panels.items():
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert sorted(lines) == ["cold", "hot"]
        for name, line in lines.items():
            problems = runs[name][source]
            # percent, averaged over the benchmark's problems, from exact rationals
            expected = [100 * sum(_exact(4, sum(s), k) for s in problems) / len(problems) for k in (1, 2, 4)]
            assert list(line.get_xdata()) == [1, 2, 4]
            assert list(line.get_ydata()) == pytest.approx(expected, abs=1e-9), (source, name)
    # hand-worked for one line: beta, cold: (0 + 1/2) / 2 = 25 %, (0 + 5/6) / 2, (0 + 1) / 2
    beta_cold = next(line for line in panels["beta"].get_lines() if line.get_label() == "cold")
    assert list(beta_cold.get_ydata()) == pytest.approx([25.0, 100 * 5 / 12, 50.0])

    # a run that lacks a benchmark draws no line in its panel
    only_alpha = _write_run(tmp_path / "alpha_only", "alpha only", {"alpha": [[1, 1, 0, 0]]})
    figure = plot_pass_at_k([(r.name, r.metrics) for r in map(load_run, [dirs[0], only_alpha])])
    labels = {
        ax.get_title(): [line.get_label() for line in ax.get_lines()]
        for ax in figure.axes
        if ax.get_visible()
    }
    assert labels == {"alpha": ["cold", "alpha only"], "beta": ["cold"]}


# --------------------------------------------------------------------------------------------------
# Scorer specs


def test_resolve_reward_specs_and_errors():
    from pacsrl.eval import resolve_reward
    from pacsrl.rewards import math_reward

    assert resolve_reward(half) is half  # a callable is used as it is
    assert resolve_reward("math") is math_reward
    assert resolve_reward("pacsrl.rewards:verify_answer").__name__ == "verify_answer"
    for spec in ("pacsrl.rewards", "pacsrl.rewards:", ":math_reward", ":"):
        with pytest.raises(
            ValueError, match=rf"reward '{spec}': expected 'auto', 'math', 'gym:TASK' or 'module:function'"
        ):
            resolve_reward(spec)
    with pytest.raises(ValueError, match=r"cannot import 'nope' from 'pacsrl.rewards'"):
        resolve_reward("pacsrl.rewards:nope")
    with pytest.raises(TypeError, match=r"reward 'pacsrl.rewards.math:DEFAULT_MAX_CHARS' is not a function"):
        resolve_reward("pacsrl.rewards.math:DEFAULT_MAX_CHARS")


def test_resolve_reward_routes_auto_and_gym(monkeypatch):
    from pacsrl.eval import resolve_reward

    tasks = []

    def make_gym_reward(task):
        tasks.append(task)
        return half

    monkeypatch.setattr("pacsrl.rewards.auto.make_auto_reward", lambda: even_first_digit)
    monkeypatch.setattr("pacsrl.rewards.gym.make_gym_reward", make_gym_reward)
    assert resolve_reward("auto") is even_first_digit
    assert resolve_reward("gym:basic_arithmetic") is half and tasks == ["basic_arithmetic"]


def test_resolve_reward_searches_the_current_folder_first(tmp_path, monkeypatch):
    import sys

    from pacsrl.eval import resolve_reward

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    for folder in (here, elsewhere):
        folder.mkdir()
        (folder / "pacsrl_test_scorer.py").write_text(f"def where(**kwargs):\n    return {folder.name!r}\n")
    monkeypatch.setattr(sys, "path", [str(elsewhere), *sys.path])  # a folder on the path before it
    monkeypatch.chdir(here)
    before = list(sys.path)
    try:
        assert resolve_reward("pacsrl_test_scorer:where")() == "here"  # as `python -m` would
        assert sys.path == before  # the current folder was put on the path for the import only
        del sys.modules["pacsrl_test_scorer"]
        monkeypatch.setattr(sys, "path", [str(here), *before])  # already on the path: left there
        assert resolve_reward("pacsrl_test_scorer:where")() == "here" and sys.path == [str(here), *before]
    finally:
        sys.modules.pop("pacsrl_test_scorer", None)


def test_rescore_uses_the_runs_own_scorer_unless_told_otherwise(tmp_path, monkeypatch):
    (tmp_path / "scorers.py").write_text(
        "def even_first_digit(completions, answer, **kwargs):\n"
        "    return [float(int(c[-1]['content'][0]) % 2 == 0) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    run = _write_run(tmp_path / "run", "r", {"s": [[0, 0, 0]]})
    record = json.loads((run / "rollouts.jsonl").read_text())
    record.update(prompt=[{"role": "user", "content": "p"}], answer="0")  # scorers get chat completions
    settings = {"name": "r", "threshold": 1.0, "reward": "scorers:even_first_digit"}
    (run / "settings.json").write_text(json.dumps(settings))

    def scores():
        return json.loads((run / "rollouts.jsonl").read_text())["scores"]

    # the run's own scorer: 2 and 4 are even, 3 is odd
    record["completions"] = ["2", "3", "4"]
    (run / "rollouts.jsonl").write_text(json.dumps(record) + "\n")
    recompute(run, rescore=True)
    assert scores() == [1.0, 0.0, 1.0]
    # a scorer given now wins, and is recorded as module:function
    recompute(run, rescore=True, reward=half)
    assert scores() == [0.5, 0.5, 0.5]
    assert json.loads((run / "settings.json").read_text())["reward"] == f"{__name__}:half"
    # a folder whose settings name no scorer is scored by the math verifier
    record["completions"] = [r"\boxed{0}", r"\boxed{1}", "no answer"]
    (run / "rollouts.jsonl").write_text(json.dumps(record) + "\n")
    (run / "settings.json").write_text(json.dumps({"name": "r"}))
    assert recompute(run, rescore=True).metrics["all"]["pass@1"] == pytest.approx(1 / 3)
    assert scores() == [1.0, 0.0, 0.0]
    assert json.loads((run / "settings.json").read_text())["reward"] == "math"  # the spec, as given
    # a scorer without a __name__ (a callable object) is recorded by its repr
    recompute(run, rescore=True, reward=PartialCredit(0.25))
    assert scores() == [0.25, 0.25, 0.25]
    assert json.loads((run / "settings.json").read_text())["reward"] == f"{__name__}:PartialCredit(0.25)"


class PartialCredit:
    """A scorer object, as a user might write one: no ``__name__``."""

    def __init__(self, credit: float) -> None:
        self.credit = credit

    def __call__(self, completions, **kwargs):
        return [self.credit] * len(completions)

    def __repr__(self) -> str:
        return f"PartialCredit({self.credit})"


def test_recompute_uses_the_ks_asked_for(tmp_path):
    run = _write_run(tmp_path / "run", "r", {"s": [[1, 0, 0, 0]]})  # pass@2 = 1 - C(3,2)/C(4,2) = 1/2
    for change in ({}, {"threshold": 0.5}):
        result = recompute(run, ks=[2], **change)
        assert result.metrics["ks"] == [2] and result.metrics["all"]["pass@2"] == 0.5
        assert json.loads((run / "metrics.json").read_text())["ks"] == [2]
        assert (run / "metrics.md").read_text().splitlines()[
            0
        ] == "| benchmark | model | problems | n | pass@2 |"


@pytest.mark.parametrize("change", [{"threshold": 0.5}, {"rescore": True, "reward": half}])
def test_recompute_refuses_a_k_beyond_n_before_rewriting_anything(change, tmp_path):
    run = _write_run(tmp_path / "run", "r", {"s": [[1, 0, 0, 0]]})  # n = 4
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(ValueError, match=r"every k must be in \[1, 4\]"):
        recompute(run, ks=[8], **change)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_compare_uses_the_ks_asked_for_and_writes_its_folder(tmp_path):
    run = _write_run(tmp_path / "run", "r", {"s": [[1, 0, 0, 0]]})  # pass@2 = 1 - C(3,2)/C(4,2) = 1/2
    table, _, (result,) = compare_runs([run], ks=[2])
    assert result.metrics["ks"] == [2] and result.metrics["all"]["pass@2"] == 0.5
    assert table.splitlines()[0] == "| benchmark | model | problems | n | pass@2 |"
    out = tmp_path / "new" / "cmp"  # its parent does not exist yet, and then it exists
    for _ in range(2):
        compare_runs([run], output=out)
    assert sorted(p.name for p in out.iterdir()) == ["comparison.json", "comparison.md", "comparison.png"]
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["r"]["run"] == str(run) and saved["r"]["ks"] == [1, 2, 4]  # default ks without --k
    # the PNG at 120 dpi, as a run's own plot: one panel of 4.2 x 3.4 inches is 504 x 408 pixels
    header = (out / "comparison.png").read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    assert (int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")) == (504, 408)


def test_a_folder_without_settings_reads_with_defaults(tmp_path):
    run = _write_run(tmp_path / "bare", "ignored", {"s": [[1, 0]]})
    (run / "settings.json").unlink()
    result = load_run(run)  # named after its folder, threshold 1.0: pass@1 = 1/2
    assert result.name == "bare" and result.settings == {} and result.metrics["all"]["pass@1"] == 0.5
    (run / "settings.json").write_text(json.dumps({"model": "org/model"}))  # no display name: the model's
    assert load_run(run).name == "org/model"
