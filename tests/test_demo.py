"""``pacsrl demo`` and its helpers: curve AUC, method specs, settings, the report table; a quick demo
end to end in a subprocess (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pacsrl.demo.cli import build_parser, config_from_args
from pacsrl.demo.config import DemoConfig, Method
from pacsrl.demo.report import CURVE_PLOTS, METRICS_FILE, PASS_AT_K_PLOT, REPORT_FILE, comparison_table
from pacsrl.demo.training import curve_auc

# --------------------------------------------------------------------------------------------------
# held-out entropy


def _entropy_one_prefix_at_a_time(model, tokenizer, record, max_new_tokens):
    """Every distribution the policy sampled a completion token (or its end) from, one unpadded prefix per forward,
    its entropy summed over the vocabulary in float64: (sum of entropies, count) over the record's completions."""
    prompt = tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    for completion in record["completions"]:
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        steps = len(ids) + 1 if len(ids) < max_new_tokens else len(ids)  # + the step that sampled the end
        for t in range(steps):
            prefix = torch.tensor([prompt_ids + ids[:t]])
            probs = torch.softmax(model(input_ids=prefix).logits[0, -1].double(), dim=-1).tolist()
            total += -sum(p * math.log(p) for p in probs if p > 0)
            count += 1
    return total, count


def test_completion_entropy_matches_one_prefix_at_a_time():
    # catches: positions shifted by one (the prompt's last position left out, or one past the completion), the
    # end-of-completion step dropped for stopped completions or kept for truncated ones, padding leaking into
    # real positions, a per-sequence instead of a per-token mean
    from pacsrl.demo.evaluation import completion_entropy, load_policy

    model, tokenizer = load_policy()
    model.train()
    question = [{"role": "user", "content": "What is 3 + 4 + 5?"}]
    records = [
        {"prompt": question, "completions": ["<answer>12</answer>", "", "3 + 4 = 7, 7 + 5 = 12 <answer>12"]},
        {
            "prompt": [{"role": "user", "content": "What is 1 + 2 + 9?"}],
            "completions": ["<answer>12</answer>"],
        },
    ]
    max_new_tokens = 25  # the third completion has exactly 25 tokens: truncated, no end step
    assert (
        len(tokenizer(records[0]["completions"][2], add_special_tokens=False)["input_ids"]) == max_new_tokens
    )
    expected_total, expected_count = 0.0, 0
    with torch.no_grad():
        for record in records:
            total, count = _entropy_one_prefix_at_a_time(model, tokenizer, record, max_new_tokens)
            expected_total, expected_count = expected_total + total, expected_count + count
    got = completion_entropy(model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=3)
    assert got == pytest.approx(expected_total / expected_count, rel=1e-5)
    assert model.training  # mode restored


def test_measuring_curve_entropy_leaves_the_run_unchanged(tmp_path):
    # catches: the entropy pass consuming random numbers and so changing the training run that the curve measures
    # (the curve at step 2 comes before the rollout of steps 3-4)
    from pacsrl.demo.evaluation import load_data
    from pacsrl.demo.training import train_and_evaluate

    results = {}
    for measured in (False, True):
        config = DemoConfig.quick(
            steps=4, prompts_per_step=2, num_generations=4, train_size=8, eval_size=4, eval_samples=4,
            curve_every=2, curve_size=2, curve_samples=4, threads=1, curve_entropy=measured,
        )  # fmt: skip
        result = train_and_evaluate(Method.parse("grpo"), config, load_data(config), tmp_path / str(measured))
        results[measured] = result
    plain, measured = results[False], results[True]
    assert all("entropy" in p for p in measured.curve) and not any("entropy" in p for p in plain.curve)
    assert [{k: v for k, v in p.items() if k != "entropy"} for p in measured.curve] == plain.curve
    assert measured.eval == plain.eval
    assert [h.get("entropy") for h in measured.log_history] == [h.get("entropy") for h in plain.log_history]


# --------------------------------------------------------------------------------------------------
# curve AUC


def test_curve_auc_trapezoid_hand_value():
    # trapezoids: 10 * (0.1 + 0.3) / 2 = 2.0, 10 * (0.3 + 0.2) / 2 = 2.5, 20 * (0.2 + 0.4) / 2 = 6.0; total 10.5 over 40 steps
    assert curve_auc([0, 10, 20, 40], [0.1, 0.3, 0.2, 0.4]) == pytest.approx(10.5 / 40)
    assert curve_auc([0, 5], [0.2, 0.2]) == pytest.approx(0.2)  # a flat curve's mean height is its value
    with pytest.raises(ValueError, match="two or more"):
        curve_auc([0], [0.1])
    with pytest.raises(ValueError, match="increase"):
        curve_auc([0, 10, 10], [0.1, 0.2, 0.3])


# --------------------------------------------------------------------------------------------------
# methods, settings, command line


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("grpo", Method("GRPO", "grpo")),
        ("rloo", Method("RLOO", "rloo")),
        ("PPO", Method("PPO", "ppo")),
        ("pacs", Method("PACS", "pacs", None, "question")),  # beta from the DemoConfig
        ("pacs@0.5", Method("PACS beta=0.5", "pacs", 0.5, "question")),
        ("PACS-noweight@2", Method("PACS w/o weights beta=2", "pacs", 2.0, "none")),
    ],
)
def test_method_parse(spec, expected):
    assert Method.parse(spec) == expected


@pytest.mark.parametrize("spec", ["dpo", "pacs@", "pacs@-1", "pacs@0", "grpo@1", "ppo@1", "pacs@1@2"])
def test_method_parse_rejects(spec):
    with pytest.raises(ValueError, match="method"):
        Method.parse(spec)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"algorithms": ("pacs", "dpo")}, "algorithms"),
        ({"algorithms": ("pacs", "pacs")}, "twice"),
        ({"steps": 0}, "steps=0"),
        ({"num_generations": 1}, "at least 2"),
        ({"curve_size": 200, "eval_size": 100}, "curve_size=200 exceeds eval_size=100"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"critic_learning_rate": 0.0}, "critic_learning_rate"),
    ],
)
def test_demo_config_rejects(overrides, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**overrides)


def test_cli_quick_sizes_and_overrides():
    parser = build_parser()
    quick = config_from_args(parser.parse_args(["--quick"]))
    assert quick.steps < DemoConfig().steps and quick.eval_size < DemoConfig().eval_size
    config = config_from_args(
        parser.parse_args(
            [
                "--quick",
                "--steps",
                "3",
                "--algorithms",
                "grpo,pacs",
                "--lr",
                "5e-4",
                "--beta",
                "0.5",
                "--task-config",
                '{"min_terms": 2}',
                "--model",
                "/some/path",
            ]
        )
    )
    assert (config.steps, config.algorithms, config.learning_rate, config.pacs_beta) == (
        3,
        ("grpo", "pacs"),
        5e-4,
        0.5,
    )
    assert config.task_config == {"min_terms": 2} and config.model == "/some/path"
    assert config.eval_size == quick.eval_size  # the rest stays at --quick's sizes
    assert parser.parse_args(["--algorithms", "pacs,grpo,rloo,ppo"]).algorithms == (
        "pacs",
        "grpo",
        "rloo",
        "ppo",
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--algorithms", "pacs,dpo"])


def test_comparison_table_formats_rows():
    metrics = {"all": {"pass@1": 0.25, "pass@8": 0.5}}
    report = {
        "settings": {"eval_samples": 8},
        "base": {"eval": {"all": {"pass@1": 0.125, "pass@8": 0.375}}, "eval_seconds": 3.2},
        "methods": {
            "pacs": {
                "done": True,
                "settings": {"name": "PACS"},
                "eval": metrics,
                "mean_train_reward": 0.2,
                "heldout_pass@1_auc": 0.2,
                "train_seconds": 61.4,
                "eval_seconds": 3.0,
            },
            "grpo": {"done": False, "settings": {"name": "GRPO"}},  # unfinished: not in the table
        },
    }
    lines = comparison_table(report).splitlines()
    assert lines[2] == "| base | 12.5 | 37.5 | - | - | - | 3 |"
    assert lines[3] == "| PACS | 25.0 | 50.0 | 0.200 | 20.0 | 61 | 3 |"
    assert len(lines) == 4


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_quick_demo_writes_a_complete_report(tmp_path):
    out = tmp_path / "demo"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(  # noqa: PLW1510 (the return code is asserted below)
        [sys.executable, "-m", "pacsrl", "demo", "--quick", "--output", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| PACS |" in proc.stdout and "| GRPO |" in proc.stdout and str(out.resolve()) in proc.stdout
    for name in (METRICS_FILE, REPORT_FILE, PASS_AT_K_PLOT, *CURVE_PLOTS.values()):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["finished"] is True
    # the settings each method trained with, not the Method's "take the DemoConfig's" None
    assert metrics["methods"]["pacs"]["settings"]["pacs_beta"] == metrics["settings"]["pacs_beta"] == 1.0
    assert metrics["methods"]["pacs"]["settings"]["pacs_weight_mode"] == "question"
    assert metrics["settings"]["threads"] in (1, 2)  # the count used (default: fit to the free cores)
    k = metrics["settings"]["eval_samples"]
    numbers = [metrics["base"]["eval"]["all"]["pass@1"], metrics["base"]["eval"]["all"][f"pass@{k}"]]
    assert set(metrics["methods"]) == {"pacs", "grpo"}
    for m in metrics["methods"].values():
        assert m["done"]
        numbers += [
            m["eval"]["all"]["pass@1"],
            m["eval"]["all"][f"pass@{k}"],
            m["mean_train_reward"],
            m["mean_entropy"],
            m["heldout_pass@1_auc"],
            m["train_seconds"],
        ]
        steps = [p["step"] for p in m["curve"]]
        assert steps[0] == 0 and steps[-1] == metrics["settings"]["steps"]
        assert len(m["log_history"]) == metrics["settings"]["steps"]
    assert all(isinstance(x, float) and math.isfinite(x) for x in numbers), numbers
    assert all(0.0 <= x <= 1.0 for x in numbers[:2])
    report = (out / REPORT_FILE).read_text()
    assert "| base |" in report and "| PACS |" in report and "| GRPO |" in report


def test_bench_script_parses(tmp_path):
    """bench/learning.py shares the demo's parser; its own options are validated before any run."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "learning.py"
    spec = importlib.util.spec_from_file_location("bench_learning", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args, config = bench.parse_args(
        ["--quick", "--methods", "pacs@1,pacs-noweight@1,grpo", "--seeds", "0,1,2"]
    )
    assert [m.name for m in args.method_list] == ["PACS beta=1", "PACS w/o weights beta=1", "GRPO"]
    assert args.seed_list == [0, 1, 2] and config.steps == DemoConfig.quick().steps
    args, _ = bench.parse_args(["--quick", "--methods", "pacs,grpo,rloo,ppo"])
    assert [m.algorithm for m in args.method_list] == ["pacs", "grpo", "rloo", "ppo"]
    for bad in (["--seeds", "0"], ["--methods", "dpo"], ["--beta", "2"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    # the summary: mean and 95% t half-width over seeds
    runs = [
        {"method": "GRPO", "seed": s, "pass@1": p, "pass@8": p, "auc": p}
        for s, p in enumerate([0.1, 0.2, 0.3])
    ]
    (row,) = bench.summarise(runs, 8)
    assert row["pass@1"][0] == pytest.approx(0.2)
    assert row["pass@1"][1] == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))
    assert "| GRPO | 3 | 20.0 ± 24.8 |" in bench.markdown([row], 8)


@pytest.mark.slow
def test_demo_runs_any_local_checkpoint_with_a_chat_template(tmp_path):
    # a random tiny model with its own tokenizer (tests/tiny.py): the demo must load it, train and evaluate it
    from pacsrl.demo.cli import main as demo_main
    from tiny import save_tiny

    model_dir = save_tiny(tmp_path / "tiny")
    out = tmp_path / "report"
    argv = ["--model", str(model_dir), "--output", str(out), "--quick", "--algorithms", "pacs,rloo,ppo"]
    argv += [
        "--steps",
        "2",
        "--prompts-per-step",
        "4",
        "--num-generations",
        "4",
        "--eval-size",
        "4",
        "--eval-samples",
        "2",
    ]
    argv += ["--curve-every", "2", "--curve-size", "4", "--max-completion-length", "8"]
    rc = demo_main(argv)
    assert rc == 0
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["finished"] is True and set(metrics["methods"]) == {"pacs", "rloo", "ppo"}
    assert metrics["settings"]["model"] == str(model_dir)
    for name in ("pacs", "rloo", "ppo"):  # the baselines run on the same data and rewards
        assert math.isfinite(metrics["methods"][name]["mean_train_reward"])
    assert any("critic/value_loss" in h for h in metrics["methods"]["ppo"]["log_history"])
