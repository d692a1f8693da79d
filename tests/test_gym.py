import json

import pytest

from pacsrl.data.gym import (
    completion_text,
    format_solution,
    make_gym_dataset,
    make_gym_reward,
    make_gym_splits,
    normalize_question,
)

SMALL = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # a + b or a - b, digits 0-9


def test_schema_and_content():
    ds = make_gym_dataset("chain_sum", 8, seed=3, config=SMALL)
    assert set(ds.column_names) == {"prompt", "answer", "source", "question", "metadata"}
    assert len(ds) == 8
    for row in ds:
        assert row["source"] == "gym:chain_sum"
        assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
        assert row["prompt"][0]["content"].startswith(row["question"])
        assert "<answer>" in row["prompt"][0]["content"]
        meta = json.loads(row["metadata"])
        # the gold answer is the value of the expression, recomputed here independently
        a, op, b = meta["expression"].split()
        assert row["answer"] == str(int(a) + int(b) if op == "+" else int(a) - int(b))
        assert row["question"].endswith(meta["expression"] + " =")


def test_no_duplicates_within_a_dataset():
    # 2 terms of one digit: at most 10 * 10 * 2 = 200 distinct problems, so 150 draws repeat some.
    ds = make_gym_dataset("chain_sum", 150, seed=0, config=SMALL)
    keys = [normalize_question(q) for q in ds["question"]]
    assert len(set(keys)) == 150


def test_exclude_is_respected():
    first = make_gym_dataset("chain_sum", 50, seed=0, config=SMALL)
    # seed 1 reuses seed 0's problems (the generator seeds problem idx with seed + idx)
    second = make_gym_dataset("chain_sum", 50, seed=1, exclude=first["question"], config=SMALL)
    assert not {normalize_question(q) for q in first["question"]} & {normalize_question(q) for q in second["question"]}


def test_splits_are_disjoint_and_eval_is_stable():
    train, eval_ = make_gym_splits("chain_sum", 120, 40, seed=0, config=SMALL)
    assert (len(train), len(eval_)) == (120, 40)
    train_keys = {normalize_question(q) for q in train["question"]}
    eval_keys = {normalize_question(q) for q in eval_["question"]}
    assert len(train_keys) == 120 and len(eval_keys) == 40
    assert not train_keys & eval_keys
    _, eval_again = make_gym_splits("chain_sum", 10, 40, seed=0, config=SMALL)
    assert eval_again["question"] == eval_["question"]


def test_too_few_distinct_problems_is_a_clear_error():
    with pytest.raises(ValueError, match="only 200 distinct problems"):
        make_gym_dataset("chain_sum", 201, seed=0, config=SMALL)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'no_such_task'"):
        make_gym_dataset("no_such_task", 4, seed=0)
    with pytest.raises(ValueError, match="'size' or 'seed'"):
        make_gym_dataset("chain_sum", 4, seed=0, config={"seed": 1})


def _columns(answers, expressions):
    metadata = [json.dumps({"expression": e}) for e in expressions]
    return {"answer": answers, "metadata": metadata}


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<answer>7</answer>", 1.0),  # exact
        ("3 + 4 = 7 <answer> 7 </answer>", 1.0),  # reasoning before the tag; spaces inside stripped
        ("<answer>+07.0</answer>", 1.0),  # chain_sum's scorer compares decimals: +07.0 == 7
        ("<answer>5</answer> then <answer>7</answer>", 1.0),  # the last answer tag counts
        ("<answer>8</answer>", 0.0),  # wrong
        ("<answer>77</answer>", 0.0),  # scorer gives partial credit len("7")/len("77") = 0.5: not full marks
        ("7", 0.0),  # right number, no answer tag
        ("<answer></answer>", 0.0),  # empty answer
        ("<answer>seven</answer>", 0.0),  # not a number: Decimal() fails inside the scorer
        ("<answer>7", 0.0),  # unclosed tag
        ("", 0.0),
        ("\x00<answer>\uffff</answer>" * 50, 0.0),  # junk
        ([{"role": "assistant", "content": "<answer>7</answer>"}], 1.0),  # conversational
        ([{"role": "assistant", "content": "<answer>6</answer>"}], 0.0),
        ([{"role": "assistant", "content": None}], 0.0),  # conversational junk
        ([], 0.0),
        (None, 0.0),
    ],
)
def test_reward_table(completion, expected):
    reward = make_gym_reward("chain_sum")
    assert reward([completion], **_columns(["7"], ["3 + 4"])) == [expected]


def test_reward_batch_name_and_negative_answers():
    reward = make_gym_reward("chain_sum")
    assert reward.__name__ == "chain_sum_accuracy"
    completions = ["<answer>-5</answer>", "<answer>5</answer>", "<answer>12</answer>"]
    # 3 - 8 = -5; 3 - 8 != 5; 9 + 3 = 12; extra columns (as TRL passes them) are ignored
    got = reward(completions, **_columns(["-5", "-5", "12"], ["3 - 8", "3 - 8", "9 + 3"]), source=["gym:chain_sum"] * 3)
    assert got == [1.0, 0.0, 1.0]


def test_reward_on_generated_rows():
    ds = make_gym_dataset("chain_sum", 6, seed=0, config={"min_terms": 3, "max_terms": 3})
    reward = make_gym_reward("chain_sum")
    columns = {name: ds[name] for name in ("answer", "metadata", "question")}
    assert reward([format_solution(a) for a in ds["answer"]], **columns) == [1.0] * 6
    assert reward([format_solution(str(int(a) + 1)) for a in ds["answer"]], **columns) == [0.0] * 6


def test_reward_rejects_misaligned_columns():
    reward = make_gym_reward("chain_sum")
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        reward(["<answer>1</answer>"] * 2, **_columns(["1"], ["0 + 1"]))


def test_completion_text():
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "x"}]) == "x"
    assert completion_text([{"role": "user", "content": "q"}]) is None
    assert completion_text(42) is None
