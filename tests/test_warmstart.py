import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pacsrl.data.gym import format_solution, normalize_question
from pacsrl.demo import DEMO_POOL_SIZE, DEMO_TASK, DEMO_TASK_CONFIG, demo_checkpoint_path, demo_splits
from pacsrl.demo.warmstart import main, sample_pass_at_k, warmstart_data, worked_solution
from pacsrl.rewards.gym import make_gym_reward


@pytest.fixture(scope="module")
def shipped():
    path = demo_checkpoint_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), path


@pytest.fixture(scope="module")
def splits():
    return demo_splits(train_size=64, eval_size=16)


def test_worked_solution():
    assert worked_solution("chain_sum", "13", json.dumps({"expression": "7 - 3 + 9"})) == (
        "7 - 3 + 9 = 4 + 9 = 13\n<answer>13</answer>"
    )
    assert (
        worked_solution("chain_sum", "-2", json.dumps({"expression": "7 - 9"}))
        == "7 - 9 = -2\n<answer>-2</answer>"
    )
    with pytest.raises(ValueError, match="gold answer is '3'"):
        worked_solution("chain_sum", "3", json.dumps({"expression": "7 - 9"}))
    assert worked_solution("countdown", "1+2", "{}") == format_solution("1+2")


def test_shipped_checkpoint_loads_and_tokenizer_round_trips(shipped, splits):
    model, tokenizer, path = shipped
    record = json.loads((path / "warmstart.json").read_text())
    assert record["task"] == DEMO_TASK and record["task_config"] == DEMO_TASK_CONFIG
    assert sum(p.numel() for p in model.parameters()) == record["parameters"] < 2_000_000
    assert (
        model.config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    _, eval_split = splits
    for row in eval_split:
        solution = worked_solution(DEMO_TASK, row["answer"], row["metadata"])
        for text in (row["prompt"][0]["content"], solution, "Hello, World! 0123456789 +-*/()=<>."):
            assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    messages = eval_split[0]["prompt"]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert tokenizer.decode(ids) == rendered


def test_shipped_checkpoint_is_partly_right(shipped, splits):
    torch.set_num_threads(2)
    model, tokenizer, _ = shipped
    _, eval_split = splits
    metrics = sample_pass_at_k(
        model, tokenizer, eval_split, make_gym_reward(DEMO_TASK), num_samples=8, seed=0
    )
    assert 0.0 < metrics["pass@1"] < metrics["pass@8"], metrics
    assert metrics["pass@1"] < 0.8, metrics


def test_evaluation_leaves_the_training_run_as_it_was(shipped, splits):
    # warm-start evaluates in the middle of training: the global RNG and the model's mode must come back as
    # they were, so that evaluating (or not) never changes the weights a rebuild gives
    model, tokenizer, _ = shipped
    _, eval_split = splits
    model.train()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    metrics = sample_pass_at_k(
        model, tokenizer, eval_split.select(range(4)), make_gym_reward(DEMO_TASK), num_samples=2, ks=(1, 2)
    )
    assert set(metrics) == {"pass@1", "pass@2"} and 0.0 <= metrics["pass@1"] <= metrics["pass@2"] <= 1.0
    assert torch.equal(torch.random.get_rng_state(), before)
    assert model.training
    model.eval()


def test_demo_splits_are_disjoint_from_each_other_and_from_warm_start(shipped):
    record = json.loads(shipped[2].joinpath("warmstart.json").read_text())
    train, eval_ = demo_splits(train_size=DEMO_POOL_SIZE - 100, eval_size=100)
    sft, val = warmstart_data(
        DEMO_TASK, DEMO_TASK_CONFIG, record["seed"], record["sft_problems"], record["val_problems"]
    )
    keys = [{normalize_question(q) for q in ds["question"]} for ds in (train, eval_, sft, val)]
    assert [len(k) for k in keys] == [
        DEMO_POOL_SIZE - 100,
        100,
        record["sft_problems"],
        record["val_problems"],
    ]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not keys[i] & keys[j], (i, j)
    with pytest.raises(ValueError, match="exceeds the"):
        demo_splits(train_size=DEMO_POOL_SIZE, eval_size=1)


def test_warmstart_cli_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    argv = ["--output", str(out), "--steps", "3", "--sft-size", "64", "--val-size", "4", "--eval-size", "4"]
    argv += ["--samples", "2", "--eval-every", "2", "--threads", "1"]
    assert main(argv) == 0
    record = json.loads((out / "warmstart.json").read_text())
    assert record["steps"] == 3 and record["sft_problems"] == 64 and record["task"] == DEMO_TASK
    assert set(record["eval"]) >= {"pass@1", "pass@2"} and 0.0 <= record["eval"]["pass@1"] <= 1.0
    assert [h["step"] for h in record["history"]] == [2, 3]
    assert "pacsrl warmstart --output" in (out / "WARMSTART.md").read_text()
    assert (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)
