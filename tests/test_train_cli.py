"""`pacsrl train`: recipe parsing, and PACS / GRPO / RLOO / PPO smoke runs in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from pacsrl.cli import UsageError
from pacsrl.train_cli import parse_train_args
from test_sharded import _free_port
from tiny import save_tiny


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_cli")
    save_tiny(d / "model")
    with open(d / "gsm8k.jsonl", "w") as f:  # shaped like openai/gsm8k
        f.writelines(
            json.dumps({"question": f"What is {i}+{i}?", "answer": f"{i}+{i}={2 * i}.\n#### {2 * i}"}) + "\n"
            for i in range(8)
        )
    return d


def write_recipe(workdir, name, **fields):
    recipe = {
        "model_name_or_path": str(workdir / "model"),
        "train_dataset": f"gsm8k={workdir / 'gsm8k.jsonl'}",
        "output_dir": str(workdir / name),
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 8,
        "max_steps": 2,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        **fields,
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipe_and_overrides_parse(workdir):
    path = write_recipe(workdir, "parse", pacs_beta=0.5, pacs_baseline="mean")
    train_args, config, model_args = parse_train_args(["--config", str(path), "--pacs_beta", "2.0"])
    assert config.pacs_beta == 2.0  # the command line overrides the YAML
    assert config.pacs_baseline == "mean"  # the YAML overrides the default
    assert train_args.algorithm == "pacs" and model_args.model_name_or_path == str(workdir / "model")
    assert type(config).__name__ == "PACSConfig"


def test_grpo_ignores_pacs_fields_of_a_recipe(workdir):
    path = write_recipe(workdir, "grpo-parse", pacs_beta=0.5)
    train_args, config, _ = parse_train_args(["--config", str(path), "--algorithm", "grpo"])
    assert train_args.algorithm == "grpo" and type(config).__name__ == "GRPOConfig"


@pytest.mark.parametrize(
    ("algorithm", "config_name", "ignored"),
    [
        ("pacs", "PACSConfig", "critic_learning_rate, gamma"),
        ("grpo", "GRPOConfig", "critic_learning_rate, gamma, pacs_beta"),
        ("rloo", "RLOOConfig", "critic_learning_rate, gamma, pacs_beta"),
        ("ppo", "PPOConfig", "pacs_beta"),
    ],
)
def test_fields_of_other_algorithms_are_ignored_with_a_notice(
    workdir, caplog, algorithm, config_name, ignored
):
    # one recipe for a comparison: each algorithm takes its own fields and names, on one line, those it ignores
    path = write_recipe(workdir, f"mixed-{algorithm}", pacs_beta=0.5, critic_learning_rate=3e-6, gamma=0.9)
    with caplog.at_level("WARNING", logger="pacsrl.train_cli"):
        train_args, config, _ = parse_train_args(["--config", str(path), "--algorithm", algorithm])
    assert train_args.algorithm == algorithm and type(config).__name__ == config_name
    notices = [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]
    assert notices == [f"--algorithm {algorithm} ignores the recipe's fields of other algorithms: {ignored}"]
    if algorithm == "ppo":
        assert config.critic_learning_rate == 3e-6 and config.gamma == 0.9
    if algorithm == "rloo":
        assert config.beta == 0.0  # no KL by default, as the other algorithms


def test_unknown_recipe_field_is_an_error(workdir):
    path = write_recipe(workdir, "bad", pacs_bta=0.5)
    with pytest.raises(UsageError, match="unknown field 'pacs_bta' in .*did you mean pacs_beta"):
        parse_train_args(["--config", str(path)])


def test_rejected_config_message_reaches_the_user(workdir):
    path = write_recipe(workdir, "rejected", per_device_train_batch_size=6)
    with pytest.raises(
        UsageError, match="per_device_train_batch_size=6 is not a multiple of num_generations=4"
    ):
        parse_train_args(["--config", str(path)])


def _run(args, workdir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PACSRL_LOG_LEVEL": "INFO"}
    return subprocess.run(
        [sys.executable, "-m", "pacsrl", "train", *args],
        check=False,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_help_lists_every_field():
    out = subprocess.run(
        [sys.executable, "-m", "pacsrl", "train", "--help-all"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0
    for flag in (
        "--pacs_beta",
        "--pacs_reference",
        "--pacs_ref_reset_steps",
        "--algorithm",
        "--train_dataset",
        "--model_name_or_path",
        "--num_generations",
        "--learning_rate",
        "--use_peft",
    ):
        assert flag in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["pacs", "grpo", "rloo", "ppo"])
def test_train_smoke_subprocess(workdir, algorithm):
    path = write_recipe(workdir, f"smoke-{algorithm}", pacs_beta=0.5)
    proc = _run(["--config", str(path), "--algorithm", algorithm], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = workdir / f"smoke-{algorithm}"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert "saved the trained model" in proc.stderr
    logs = proc.stdout + proc.stderr
    assert ("pacs/loss" in logs) == (algorithm == "pacs")
    assert ("critic/value_loss" in logs) == (algorithm == "ppo")
    if algorithm == "ppo":
        assert (out / "critic" / "config.json").exists()  # the critic is saved next to the policy
    assert "1 process(es), single process, on cpu" in proc.stderr  # not accelerate's "NO"


@pytest.mark.slow
def test_train_under_torchrun_with_two_processes(workdir):
    """`torchrun --nproc_per_node 2 -m pacsrl train ...` on CPU (gloo); on GPUs `accelerate launch` does the same
    (on CPU `accelerate launch --cpu` starts a single process, whatever --num_processes says)."""
    path = write_recipe(workdir, "launched", max_steps=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PACSRL_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        _free_port(),
        "-m",
        "pacsrl",
        "train",
        "--config",
        str(path),
    ]
    proc = subprocess.run(cmd, check=False, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "2 process(es), MULTI_CPU, on cpu" in out
    assert out.count("saved the trained model") == 1  # by the main process only
    assert "pacs/loss" in out
    assert (workdir / "launched" / "model.safetensors").exists()


RECIPES = sorted((__import__("pathlib").Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_shipped_recipes_parse_and_say_how_to_run(recipe):
    head = recipe.read_text().splitlines()[:6]
    assert any("pacsrl train --config recipes/" + recipe.name in line for line in head), head
    # --use_cpu: bf16 recipes are checked against the hardware when parsed, and CI has no GPU
    train_args, config, model_args = parse_train_args(["--config", str(recipe), "--use_cpu", "true"])
    assert model_args.model_name_or_path
    if train_args.algorithm == "pacs":
        assert config.per_device_train_batch_size % config.num_generations == 0


@pytest.mark.slow
def test_cpu_recipe_trains_as_its_header_says(tmp_path):
    """recipes/tiny-demo-cpu.yaml, run from the repository root as its header says, shortened to 2 steps (with an
    evaluation): it trains the shipped demo model on the demo task with the task's own scorer and saves it."""
    root = RECIPES[0].parents[1]
    out = tmp_path / "tiny"
    overrides = [
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "16",
        "--gym_size",
        "16",
        "--gym_eval_size",
        "4",
        "--eval_steps",
        "2",
        "--per_device_eval_batch_size",
        "16",
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PACSRL_LOG_LEVEL": "INFO"}
    proc = subprocess.run(
        [sys.executable, "-m", "pacsrl", "train", "--config", "recipes/tiny-demo-cpu.yaml", *overrides],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out_text = proc.stdout + proc.stderr
    assert proc.returncode == 0, out_text[-3000:]
    assert "reward: gym:chain_sum's own scorer" in out_text and "rewards/chain_sum_accuracy/mean" in out_text
    assert "eval_reward" in out_text and "pacs/loss" in out_text
    assert (out / "model.safetensors").exists()
