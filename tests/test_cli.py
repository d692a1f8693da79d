"""The command line as a new user meets it: one-line errors (exit 2) before any model is loaded, did-you-mean,
`pacsrl train --help`'s layout, the scorer each dataset row gets, one eval row per dataset, no empty folders."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import datasets
import pytest
import yaml

import pacsrl.cli
from pacsrl.eval.config import EvalConfig
from pacsrl.eval.run import resolve_reward, run_eval
from pacsrl.train_cli import GroupSignalWatch, format_help, parse_train_args

PROGRESS = re.compile(r"\d+%\||examples/s\]|ba/s\]")
DEMO = str(Path(pacsrl.__file__).parent / "assets" / "demo")


def _fails_in_two_lines(argv, capsys, *needles):
    """pacsrl ``argv`` exits with 2 and prints one or two lines on stderr holding every needle, no traceback
    (progress bars of the data loading excepted)."""
    capsys.readouterr()
    assert pacsrl.cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip() and not PROGRESS.search(line)]
    assert 1 <= len(lines) <= 2 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _recipe(tmp_path, **fields) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": DEMO, "use_cpu": True, **fields}))
    return str(path)


# --------------------------------------------------------------------------------------------------
# pacsrl train: mistakes get one or two lines, before any model is loaded


def test_train_without_arguments_asks_for_a_recipe(capsys):
    _fails_in_two_lines(["train"], capsys, "--config", "recipes/")


def test_train_unknown_fields_get_did_you_mean(tmp_path, capsys):
    recipe = _recipe(tmp_path, pacs_betta=1.0)
    _fails_in_two_lines(["train", "--config", recipe], capsys, "'pacs_betta'", "did you mean pacs_beta?")
    recipe = _recipe(tmp_path)
    _fails_in_two_lines(
        ["train", "--config", recipe, "--lerning_rate", "1e-5"], capsys, "did you mean learning_rate"
    )
    # a value argparse cannot read: its one-line message, not the 1,000-line usage
    _fails_in_two_lines(
        ["train", "--config", recipe, "--pacs_beta", "abc"], capsys, "invalid float value: 'abc'"
    )


@pytest.mark.parametrize(
    "fields, needle",
    [
        (
            {"per_device_train_batch_size": 6, "num_generations": 4},
            "per_device_train_batch_size=6 is not a multiple",
        ),
        ({"beta": 0.04}, "beta=0.04"),
        ({"pacs_baseline": "nope"}, "pacs_baseline='nope' is not one of"),
        ({"algorithm": "ppo2"}, "--algorithm 'ppo2' is not one of"),
        ({"model_name_or_path": "/no/such/dir"}, "/no/such/dir: no such folder"),
        # HF_HUB_OFFLINE=1 (conftest): a bare name that is no folder here is looked up in the cache only
        ({"model_name_or_path": "my-ckpt"}, "my-ckpt: no such folder here"),
        ({"train_dataset": "nowhere.parquet"}, "nowhere.parquet"),
    ],
)
def test_train_bad_settings_fail_in_two_lines(tmp_path, capsys, fields, needle, monkeypatch):
    import pacsrl.trainer

    monkeypatch.setattr(pacsrl.trainer.PACSTrainer, "__init__", _must_not_load)
    recipe = _recipe(tmp_path, output_dir=str(tmp_path / "out"), **fields)
    _fails_in_two_lines(["train", "--config", recipe], capsys, needle)
    assert not (tmp_path / "out").exists()


def _must_not_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the arguments were checked")


def test_train_bf16_on_a_cpu_machine_says_use_cpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("bf16 is fine on a GPU machine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": DEMO}))
    _fails_in_two_lines(["train", "--config", str(recipe)], capsys, "use_cpu: true")


def test_debug_switch_shows_the_traceback(tmp_path):
    with pytest.raises(pacsrl.cli.UsageError, match="pacs_betta"):
        pacsrl.cli.main(["--debug", "train", "--config", _recipe(tmp_path, pacs_betta=1.0)])


def test_unknown_command_did_you_mean(capsys):
    _fails_in_two_lines(["trian"], capsys, "did you mean train?")


def test_train_help_puts_recipe_data_and_pacs_first():
    short, full = format_help(), format_help(everything=True)
    assert short.startswith("``pacsrl train``: train a model with PACS")  # the description on top
    usage = short.index("usage:")
    order = [
        short.index(flag, usage)
        for flag in ("--config", "--train_dataset", "--gym_config", "--pacs_beta", "--learning_rate")
    ]
    assert order == sorted(order)
    assert len(short.splitlines()) < 250  # TRL's 1,000-odd lines are behind --help-all
    assert "--lr_scheduler_type" not in short and "--help-all" in short
    assert (
        "--lr_scheduler_type" in full
        and "--lora_r" in full
        and full.index("--pacs_beta") < full.index("--lora_r")
    )


# --------------------------------------------------------------------------------------------------
# gym task options and the learning signal


def test_gym_config_from_yaml_and_command_line(tmp_path):
    recipe = _recipe(tmp_path, train_dataset="gym:chain_sum", gym_config={"min_terms": 3, "max_terms": 3})
    train_args, _, _ = parse_train_args(["--config", recipe])
    assert train_args.gym_config == {"min_terms": 3, "max_terms": 3}
    train_args, _, _ = parse_train_args(
        ["--config", recipe, "--gym_config", '{"min_terms": 2, "max_terms": 2}']
    )
    assert train_args.gym_config == {"min_terms": 2, "max_terms": 2}

    from pacsrl.train_cli import _load_data

    train_args.gym_size, train_args.gym_eval_size = 6, 2
    train, held_out = _load_data(train_args)
    # "a + b =" or "a - b =": two terms, so one operator, in every problem
    assert all(
        sum(q.count(op) for op in (" + ", " - ")) == 1
        for q in list(train["question"]) + list(held_out["question"])
    )


def test_group_signal_watch_logs_and_warns_once(caplog):
    logged = []

    def reward(prompts, completions, **kwargs):
        return [float(c) for c in completions]

    watch = GroupSignalWatch(reward)
    assert watch.__name__ == "reward"  # TRL names the reward's metrics after it: unchanged
    with caplog.at_level(logging.WARNING, logger="pacsrl.train_cli"):
        # prompts a, a, b, b: group a all right, group b all wrong -> no mixed group
        watch(
            prompts=["a", "a", "b", "b"],
            completions=["1", "1", "0", "0"],
            log_metric=lambda k, v: logged.append(v),
        )
        watch(
            prompts=["a", "a", "b", "b"],
            completions=["0", "0", "0", "0"],
            log_metric=lambda k, v: logged.append(v),
        )
        # group a mixed (1, 0)
        watch(
            prompts=["a", "a", "b", "b"],
            completions=["1", "0", "0", "0"],
            log_metric=lambda k, v: logged.append(v),
        )
    assert logged == [1.0, 1.0, 0.0]
    assert sum("nothing can be learned" in r.message for r in caplog.records) == 1


# --------------------------------------------------------------------------------------------------
# Which scorer a row gets


def _gym_file(path: Path, config: dict, size: int = 4, seed: int = 0) -> Path:
    from pacsrl.data.gym import make_gym_dataset

    make_gym_dataset("chain_sum", size=size, seed=seed, config=config).to_parquet(str(path))
    return path


def test_auto_reward_scores_each_row_by_its_source():
    auto = resolve_reward("auto")
    meta = json.dumps({})
    completions = [
        "\\boxed{13} <answer>12</answer>",  # gym row: the task reads <answer> (12, wrong); math-verify the box (13)
        "<answer>13</answer>",  # gym row, right
        "so \\boxed{7}",  # math row, right; the gym scorer would find no <answer> tag
    ]
    scores = auto(
        completions=completions,
        answer=["13", "13", "7"],
        source=["gym:chain_sum", "gym:chain_sum", "math500"],
        metadata=[meta, meta, meta],
        question=["4 + 9 =", "4 + 9 =", "3 + 4?"],
    )
    assert scores == [0.0, 1.0, 1.0]


def test_eval_scores_a_prepared_gym_file_with_the_tasks_scorer(tmp_path):
    path = _gym_file(tmp_path / "sums.parquet", {"min_terms": 2, "max_terms": 2})
    gold = datasets.Dataset.from_parquet(str(path))["answer"]

    def sampler(prompts, n, seed=None):
        # per problem: the gold in <answer> but a wrong box (the task's scorer: 1), and the reverse (0)
        return [
            [f"\\boxed{{{int(g) + 1}}} <answer>{g}</answer>", f"\\boxed{{{g}}} <answer>x</answer>"]
            for g in gold
        ]

    config = EvalConfig(n=2, datasets=[str(path)], output=str(tmp_path / "run"))  # reward: auto (the default)
    result = run_eval(config, sampler=sampler, progress=False)
    assert [r["scores"] for r in result.records] == [[1.0, 0.0]] * len(gold)


def test_eval_gives_one_row_per_dataset_even_with_one_source(tmp_path):
    easy = _gym_file(tmp_path / "easy.parquet", {"min_terms": 2, "max_terms": 2}, size=3)
    hard = _gym_file(tmp_path / "hard.parquet", {"min_terms": 4, "max_terms": 4}, size=2)
    rows = [row for f in (easy, hard) for row in datasets.Dataset.from_parquet(str(f))]
    answers = {row["question"]: row["answer"] for row in rows}

    def sampler(prompts, n, seed=None):  # right on 2-term problems, wrong on 4-term ones
        out = []
        for p in prompts:
            question = p[0]["content"].rsplit(" Put the final answer", 1)[0]
            gold = answers[question]
            two_terms = sum(question.count(op) for op in (" + ", " - ")) == 1
            out.append([f"<answer>{gold}</answer>" if two_terms else "<answer>x</answer>"] * n)
        return out

    config = EvalConfig(n=2, datasets=[str(easy), str(hard)], output=str(tmp_path / "run"), k=[1])
    metrics = run_eval(config, sampler=sampler, progress=False).metrics
    assert metrics["sources"]["easy"]["num_problems"] == 3 and metrics["sources"]["easy"]["pass@1"] == 1.0
    assert metrics["sources"]["hard"]["num_problems"] == 2 and metrics["sources"]["hard"]["pass@1"] == 0.0
    assert metrics["all"]["num_problems"] == 5 and metrics["all"]["pass@1"] == pytest.approx(3 / 5)


# --------------------------------------------------------------------------------------------------
# pacsrl eval: arguments checked before the model loads; Ctrl-C; no empty folders


@pytest.fixture
def no_model_loading(monkeypatch):
    import pacsrl.eval.run

    monkeypatch.setattr(pacsrl.eval.run, "load_sampler", _must_not_load)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--reward", "gym"], "expected 'auto', 'math', 'gym:TASK' or 'module:function'"),
        (["--reward", "gym:no_such_task"], "unknown reasoning-gym task 'no_such_task'"),
        (["--datasets", "nowhere.parquet"], "nowhere.parquet"),
        (["--model", "/no/such/dir"], "--model /no/such/dir: no such folder"),
        (["--model", "my-ckpt"], "--model my-ckpt: no such folder here"),
        (["--modle", "x"], "did you mean --model?"),
    ],
)
def test_eval_mistakes_fail_before_loading(tmp_path, capsys, no_model_loading, extra, needle):
    data = _gym_file(tmp_path / "sums.parquet", {"min_terms": 2, "max_terms": 2}, size=2)
    out = tmp_path / "run"
    argv = ["eval", "--model", DEMO, "--datasets", str(data), "--output", str(out), "--n", "2", *extra]
    _fails_in_two_lines(argv, capsys, needle)
    assert not out.exists()  # a failed run leaves no empty folder


def test_eval_reward_module_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "my_checks_cwd.py").write_text(
        "def always(completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    fn = resolve_reward("my_checks_cwd:always")
    assert fn(completions=["a", "b"]) == [1.0, 1.0]


def test_eval_ctrl_c_says_where_the_results_are(tmp_path, capsys, monkeypatch):
    import pacsrl.eval.run

    data = _gym_file(tmp_path / "sums.parquet", {"min_terms": 2, "max_terms": 2}, size=3)
    calls = []

    def sampler(prompts, n, seed=None):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [["<answer>0</answer>"] * n for _ in prompts]

    monkeypatch.setattr(pacsrl.eval.run, "load_sampler", lambda *a, **k: (sampler, "hf"))
    out = tmp_path / "run"
    argv = [
        "eval",
        "--model",
        DEMO,
        "--datasets",
        str(data),
        "--output",
        str(out),
        "--n",
        "2",
        "--batch-size",
        "2",
        "--backend",
        "hf",
    ]
    capsys.readouterr()
    assert pacsrl.cli.main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert (
        len([x for x in err.splitlines() if x.strip() and not PROGRESS.search(x)]) == 1
        and "Traceback" not in err
    )
    assert f"1 finished problems are saved in {out / 'rollouts.jsonl'}" in err and "resume" in err


def test_remove_if_empty(tmp_path):
    (tmp_path / "new" / "runs").mkdir(parents=True)
    pacsrl.cli.remove_if_empty(tmp_path / "new", existed=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept" / "runs").mkdir(parents=True)
    (tmp_path / "kept" / "runs" / "log.txt").write_text("x")
    pacsrl.cli.remove_if_empty(tmp_path / "kept", existed=False)
    assert (tmp_path / "kept" / "runs" / "log.txt").exists()
    (tmp_path / "mine").mkdir()
    pacsrl.cli.remove_if_empty(tmp_path / "mine", existed=True)  # the user's folder: never removed
    assert (tmp_path / "mine").exists()


# --------------------------------------------------------------------------------------------------
# pacsrl prepare: the seed defaults to 0, as train's gym_seed


def test_prepare_gym_seed_defaults_to_zero(tmp_path):
    base = ["prepare", "gym:chain_sum", "--size", "5"]
    assert pacsrl.cli.main([*base, "--output", str(tmp_path / "a.parquet")]) == 0
    assert pacsrl.cli.main([*base, "--seed", "0", "--output", str(tmp_path / "b.parquet")]) == 0
    assert pacsrl.cli.main([*base, "--seed", "1", "--output", str(tmp_path / "c.parquet")]) == 0
    a, b, c = (datasets.Dataset.from_parquet(str(tmp_path / f"{x}.parquet"))["question"] for x in "abc")
    assert a == b and a != c


# --------------------------------------------------------------------------------------------------
# Small things: the demo's threads and settings, plots


@pytest.mark.parametrize(
    ("wanted", "cpus", "load", "expected"),
    [
        (2, 2, 0.1, 2),  # idle 2-core machine: 2 - 0.1 = 1.9 free, rounds to 2
        (2, 2, 0.6, 1),  # 1.4 free: 1
        (2, 2, 13.9, 1),  # a busy machine: never fewer than 1
        (2, 16, 3.0, 2),  # plenty free: what was asked
        (8, 16, 9.4, 7),  # 6.6 free, rounds to 7
    ],
)
def test_fit_threads_hand_values(wanted, cpus, load, expected):
    from pacsrl.demo.config import fit_threads

    assert fit_threads(wanted, cpus, load) == expected


def test_cli_makes_idle_openmp_threads_sleep(monkeypatch, capsys):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert pacsrl.cli.main(["objective"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice is kept
    assert pacsrl.cli.main(["objective"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_demo_method_records_the_settings_it_trains_with():
    from pacsrl.demo.config import DemoConfig, Method

    config = DemoConfig(pacs_beta=0.5, pacs_weight_mode="none")
    assert Method.of("pacs").resolved(config) == Method("PACS", "pacs", 0.5, "none")
    assert Method.parse("pacs@2").resolved(config).pacs_beta == 2.0  # a method's own beta wins
    assert Method.of("grpo").resolved(config) == Method.of("grpo")  # GRPO uses neither


def test_demo_curves_have_whole_step_ticks(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from pacsrl.demo.report import plot_curves

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    history = [{"step": s, "reward": 0.1 * s, "entropy": 0.5} for s in range(1, 4)]  # a short run: 3 steps
    method = {"settings": {"name": "PACS"}, "log_history": history, "curve": [{"step": 0, "pass@1": 0.2}]}
    plot_curves({"methods": {"pacs": method}}, tmp_path)
    ticks = [t for fig in figures for t in fig.axes[0].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_pass_at_k_plot_starts_at_zero_with_short_names():
    from pacsrl.eval.metrics import compute_metrics
    from pacsrl.eval.report import plot_pass_at_k

    records = [
        {"source": "a", "scores": [1.0, 1.0, 0.0, 1.0]},
        {"source": "a", "scores": [1.0, 1.0, 1.0, 0.0]},
    ]
    fig = plot_pass_at_k([("/ckpt/runs/pacs-final/", compute_metrics(records))])
    assert fig.axes[0].get_ylim()[0] == 0  # pass@k is 75-100 here: auto-scaling would start near 75
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["pacs-final"]
