import json
import logging
import os
import pickle
import random
import re
import time

import pytest
from reasoning_gym.utils import extract_answer

import pacsrl.data.gym as gym_module
import pacsrl.rewards._pool as pool_module
import pacsrl.rewards.gym as rewards_gym_module
from pacsrl.data.gym import format_solution, make_gym_dataset, make_gym_splits, normalize_question
from pacsrl.rewards import (
    VerifierStats,
    math_reward,
    reset_verifier_stats,
    shutdown_workers,
    verifier_stats,
)
from pacsrl.rewards.completions import completion_text
from pacsrl.rewards.gym import GymReward, extract_last_answer, make_gym_reward, score_gym_answers


@pytest.fixture(autouse=True)
def _fresh_stats():
    reset_verifier_stats()
    yield


SMALL = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # a + b or a - b, digits 0-9


def test_schema_and_content():
    ds = make_gym_dataset("chain_sum", 8, seed=3, config=SMALL)
    assert set(ds.column_names) == {"prompt", "answer", "source", "question", "metadata", "gym_config"}
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
        # the options it was generated with travel with the file
        assert json.loads(row["gym_config"]) == SMALL


def test_no_duplicates_within_a_dataset():
    # 2 terms of one digit: at most 10 * 10 * 2 = 200 distinct problems, so 150 draws repeat some.
    ds = make_gym_dataset("chain_sum", 150, seed=0, config=SMALL)
    keys = [normalize_question(q) for q in ds["question"]]
    assert len(set(keys)) == 150


def test_exclude_is_respected():
    first = make_gym_dataset("chain_sum", 50, seed=0, config=SMALL)
    # seed 1 reuses seed 0's problems (the generator seeds problem idx with seed + idx)
    second = make_gym_dataset("chain_sum", 50, seed=1, exclude=first["question"], config=SMALL)
    assert not {normalize_question(q) for q in first["question"]} & {
        normalize_question(q) for q in second["question"]
    }


def test_splits_are_disjoint_and_eval_is_stable():
    train, eval_ = make_gym_splits("chain_sum", 120, 40, seed=0, config=SMALL)
    assert (len(train), len(eval_)) == (120, 40)
    train_keys = {normalize_question(q) for q in train["question"]}
    eval_keys = {normalize_question(q) for q in eval_["question"]}
    assert len(train_keys) == 120 and len(eval_keys) == 40
    assert not train_keys & eval_keys
    _, eval_again = make_gym_splits("chain_sum", 10, 40, seed=0, config=SMALL)
    assert eval_again["question"] == eval_["question"]


def test_splits_of_one_problem_each_follow_the_config():
    train, eval_ = make_gym_splits("chain_sum", 1, 1, seed=0, config=SMALL)
    assert (len(train), len(eval_)) == (1, 1)
    for row in (train[0], eval_[0]):
        assert json.loads(row["gym_config"]) == SMALL
        expression = json.loads(row["metadata"])["expression"]
        assert re.fullmatch(r"\d [+-] \d", expression)  # SMALL: a + b or a - b, one digit each
    for sizes in [(0, 5), (5, 0)]:
        with pytest.raises(ValueError, match="must be >= 1"):
            make_gym_splits("chain_sum", *sizes, seed=0, config=SMALL)


def test_questions_are_compared_without_case_or_spacing():
    assert normalize_question("  What is\t2 +  2?\n") == "what is 2 + 2?"
    assert normalize_question("ÉTÉ Straße") == normalize_question("été strasse")  # casefold, not lower
    assert normalize_question("2 + 2") != normalize_question("2+2")  # spacing collapsed, never removed


def test_dedupe_and_exclusion_ignore_case_and_spacing(monkeypatch):
    questions = ["What is 2 + 2?", "what is  2 + 2?", "WHAT IS 2 +\n2? ", "What is 3 + 3?", "What is 4 + 4?"]

    class Generator:  # a task that repeats a problem with other case and spacing
        def __getitem__(self, idx):
            return {"question": questions[idx % len(questions)], "answer": str(idx), "metadata": {}}

    monkeypatch.setattr(gym_module, "_create", lambda task, size, seed, config: Generator())
    ds = make_gym_dataset("chain_sum", 3, seed=0)
    assert ds["question"] == ["What is 2 + 2?", "What is 3 + 3?", "What is 4 + 4?"]
    held_out = make_gym_dataset("chain_sum", 2, seed=0, exclude=["  what IS 3 + 3?"])
    assert held_out["question"] == ["What is 2 + 2?", "What is 4 + 4?"]


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


def _text(text):
    return {"type": "text", "text": text}


def _assistant(content):
    return {"role": "assistant", "content": content}


_TOOL_TURN = {"role": "tool", "content": "ok"}


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
        ([{"role": "assistant", "content": None}], 0.0),  # no text
        # content parts: the text parts joined, as the math reward reads them
        ([_assistant([_text("<answer>"), _text("7"), {"type": "image"}, _text("</answer>")])], 1.0),
        # the last assistant message is read, after a tool turn
        ([_assistant("<answer>6</answer>"), _TOOL_TURN, _assistant("<answer>7</answer>")], 1.0),
    ],
)
def test_reward_table(completion, expected):
    reward = make_gym_reward("chain_sum")
    assert reward([completion], **_columns(["7"], ["3 + 4"])) == [expected]


def test_reward_batch_name_and_negative_answers():
    reward = make_gym_reward("chain_sum")
    assert reward.__name__ == "chain_sum_accuracy"
    completions = ["<answer>-5</answer>", "-5, no tag", "<answer>5</answer>", "<answer>12</answer>"]
    # 3 - 8 = -5; no answer tag; 3 - 8 != 5; 9 + 3 = 12; extra columns (as TRL passes them) are ignored
    columns = _columns(["-5", "-5", "-5", "12"], ["3 - 8", "3 - 8", "3 - 8", "9 + 3"])
    got = reward(completions, **columns, source=["gym:chain_sum"] * 4)
    assert got == [1.0, 0.0, 0.0, 1.0]


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
    # either column alone out of line is refused too (zip would drop the rows it lacks)
    with pytest.raises(ValueError, match="2 completions but 2 answers and 1 metadata rows"):
        reward(["<answer>1</answer>"] * 2, answer=["1", "1"], metadata=_columns([], ["0 + 1"])["metadata"])
    with pytest.raises(ValueError, match="2 completions but 1 answers and 2 metadata rows"):
        reward(["<answer>1</answer>"] * 2, **_columns(["1"], ["0 + 1", "0 + 1"]))


def test_completion_text():
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "x"}]) == "x"
    assert completion_text(({"role": "user", "content": "q"}, {"role": "assistant", "content": None})) == ""
    parts = [_text("a"), {"type": "image_url"}, "raw", {"type": "text", "text": None}, _text("b")]
    assert completion_text([{"role": "assistant", "content": parts}]) == "ab"  # text parts only
    # a list without an assistant message, whatever it holds, is refused, listing the roles it found
    with pytest.raises(
        ValueError, match=r"completion 0 has no assistant message \(roles: \['user', 'str'\]\)"
    ):
        completion_text([{"role": "user", "content": "q"}, "a bare string"])


@pytest.mark.parametrize(
    ("completion", "error", "message"),
    [
        ([{"role": "user", "content": "q"}], ValueError, "completion 1 has no assistant message"),
        ([], ValueError, "completion 1 has no assistant message"),
        (42, TypeError, "completion 1 is a int"),
        (None, TypeError, "completion 1 is a NoneType"),
        ([{"role": "assistant", "content": 7}], TypeError, "completion 1: assistant content is a int"),
    ],
)
def test_both_rewards_refuse_a_completion_that_is_not_one(completion, error, message):
    # TRL passes strings or chat-message lists: anything else is a bug upstream, never a silent 0.0, and the
    # math and gym rewards read completions alike (one reader)
    with pytest.raises(error, match=message):
        completion_text(completion, 1)
    gym = make_gym_reward("chain_sum")
    with pytest.raises(error, match=message):
        gym(["<answer>7</answer>", completion], **_columns(["7", "7"], ["3 + 4", "3 + 4"]))
    with pytest.raises(error, match=message):
        math_reward([r"\boxed{7}", completion], answer=["7", "7"])
    assert verifier_stats() == VerifierStats()  # refused before any job ran


def test_extract_last_answer_matches_reasoning_gym():
    # reasoning-gym's regex extraction is the specification; compare on random texts built from tag pieces
    rng = random.Random(0)
    pieces = ["<answer>", "</answer>", "<answer", "answer>", " ", "\n", "7", "x", "<", ">", "/"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert extract_last_answer(text) == extract_answer(text), repr(text)
    assert extract_last_answer("<answer>a</answer>b</answer>") == "a"  # first close after an open
    assert extract_last_answer("<answer>x<answer>y</answer>") == "x<answer>y"  # tags do not nest
    # linear time where the regex is quadratic (many opening tags and no closing one)
    start = time.monotonic()
    assert extract_last_answer("<answer>" * 500_000) is None
    assert extract_last_answer("<answer>1</answer>" + "<answer>" * 500_000) == "1"
    assert time.monotonic() - start < 2


@pytest.fixture(scope="module")
def countdown_row():
    ds = make_gym_dataset("countdown", 1, seed=0)
    return {name: list(ds[name]) for name in ("answer", "metadata", "question")}


def test_pathological_answers_are_bounded(countdown_row, caplog):
    reward = make_gym_reward("countdown", timeout=2.0)
    expression = countdown_row["answer"][0]
    completions = [
        "<answer>9**9**9**9</answer>",  # countdown's scorer gives it to SymPy's parse_expr: never returns
        "<answer>" + "(" * 100_000 + "1" + ")" * 100_000 + "</answer>",  # deep nesting
        "<answer>" + "1+" * 300_000 + "1</answer>",  # a huge expression
        "x" * 3_000_000 + format_solution("1 + 1"),  # megabytes of text before a wrong answer
        "<answer>" * 300_000,  # unbalanced tags: nothing to score (quadratic for reasoning-gym's regex)
        "</answer><answer>" * 100_000 + "<answer>",  # unbalanced the other way round: empty answers
        "\x00\udcff<answer>\ud800</answer>",  # NUL and lone surrogates
        format_solution(expression),  # the gold expression itself: full marks, from a fresh worker
    ]
    metrics = {}
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pacsrl.rewards.gym"):
        rewards = reward(
            completions,
            **{k: v * len(completions) for k, v in countdown_row.items()},
            log_metric=lambda name, value: metrics.__setitem__(name, value),
        )
    elapsed = time.monotonic() - start
    assert rewards == [0.0] * (len(completions) - 1) + [1.0]
    assert elapsed < 40, f"pathological answers took {elapsed:.1f} s"
    # how many timed out depends on the machine's load; each one is logged once, and the logged count,
    # the counter and the reported fraction must agree
    logged = sum("timed out" in r.getMessage() for r in caplog.records)
    assert logged >= 1  # at least the power tower
    assert verifier_stats().timeouts == logged
    assert metrics["countdown_accuracy/timeout_frac"] == logged / len(completions)


def test_timeout_is_counted_and_the_next_answers_still_scored(countdown_row, caplog):
    reward = make_gym_reward("countdown", timeout=1.0)
    gold = format_solution(countdown_row["answer"][0])
    completions = [gold, "<answer>9**9**9**9</answer>", gold]
    metrics = {}
    with caplog.at_level(logging.WARNING, logger="pacsrl.rewards.gym"):
        rewards = reward(
            completions,
            **{k: v * 3 for k, v in countdown_row.items()},
            log_metric=lambda name, value: metrics.__setitem__(name, value),
        )
    # the tower was given the reward's 1 s, not the default 5 s
    (message,) = [r.getMessage() for r in caplog.records if "timed out" in r.getMessage()]
    assert "timed out after 1 s on answer '9**9**9**9'" in message
    assert rewards == [1.0, 0.0, 1.0]  # the job after the timeout goes to a fresh worker
    assert verifier_stats() == VerifierStats(calls=3, timeouts=1, errors=0)
    assert metrics == {"countdown_accuracy/timeout_frac": 1 / 3, "countdown_accuracy/error_frac": 0.0}


RAISING_SCORER = """
import reasoning_gym

def _raising_scorer(answer, entry):
    raise KeyError("expression")

reasoning_gym.get_score_answer_fn = lambda task: _raising_scorer
"""


def test_scorer_errors_are_counted_and_logged(tmp_path, monkeypatch, caplog):
    # The scorer runs in the worker subprocess, so it is patched there: a sitecustomize module on the
    # worker's PYTHONPATH replaces every task's scorer by one that raises (as a scorer broken by metadata
    # types changed in the JSON round trip would, on every row).
    (tmp_path / "sitecustomize.py").write_text(RAISING_SCORER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    # pools of their own, so that their workers start with the patch (and no other test gets them)
    monkeypatch.setattr(pool_module, "_POOLS", {})
    # a fresh count of scorer errors, so the rate limit below starts at 1 whatever ran before in this process
    monkeypatch.setattr(rewards_gym_module, "_ERRORS", rewards_gym_module._ErrorCounts())
    reward = make_gym_reward("chain_sum")
    metrics = {}
    try:
        with caplog.at_level(logging.WARNING, logger="pacsrl.rewards.gym"):
            rewards = reward(
                ["<answer>7</answer>"] * 5 + ["no tag"],
                **_columns(["7"] * 6, ["3 + 4"] * 6),
                log_metric=lambda name, value: metrics.__setitem__(name, value),
            )
            # another task's errors are counted on their own: its first error is logged too
            assert score_gym_answers(
                "countdown", ["1"], [{"question": "", "answer": "1", "metadata": {}}]
            ) == [(0.0, "error")]
    finally:
        pool_module.shutdown_workers()
    assert rewards == [0.0] * 6
    assert verifier_stats() == VerifierStats(calls=6, timeouts=0, errors=6)  # the untagged one is not a job
    assert metrics == {"chain_sum_accuracy/timeout_frac": 0.0, "chain_sum_accuracy/error_frac": 5 / 6}
    warnings = [r.getMessage() for r in caplog.records if "scorer raised" in r.getMessage()]
    # rate-limited: logged at the 1st, 2nd and 4th error of the task, with the scorer's exception
    assert len(warnings) == 4 and all("KeyError: 'expression'" in w for w in warnings)
    assert "(1 countdown scorer errors so far" in warnings.pop()
    # each with the task's error count so far
    assert [re.search(r"\((\d+) chain_sum scorer errors so far", w).group(1) for w in warnings] == [
        "1",
        "2",
        "4",
    ]


DYING_SCORER = """
import os
import reasoning_gym

_get = reasoning_gym.get_score_answer_fn

def _get_dying(task):
    score = _get(task)
    def scorer(answer, entry):
        if answer == "die":  # the worker process dies (as on a crash in C code, or the OOM killer)
            os._exit(3)
        return score(answer, entry)
    return scorer

reasoning_gym.get_score_answer_fn = _get_dying
"""


def test_a_worker_dying_mid_batch_scores_that_answer_zero_and_the_rest_go_on(tmp_path, monkeypatch, caplog):
    (tmp_path / "sitecustomize.py").write_text(DYING_SCORER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(pool_module, "_POOLS", {})  # workers started with the patch, for this test alone
    monkeypatch.setattr(rewards_gym_module, "_ERRORS", rewards_gym_module._ErrorCounts())
    entry = {"question": "3 + 4 =", "answer": "7", "metadata": {"expression": "3 + 4"}}
    try:
        with caplog.at_level(logging.WARNING, logger="pacsrl.rewards.gym"):
            results = score_gym_answers("chain_sum", ["7", "die", "8", "7"], [entry] * 4)
    finally:
        pool_module.shutdown_workers()
    # 3 + 4 = 7; the death is an error (0.0), not a timeout; the answers after it go to a fresh worker
    assert results == [(1.0, "ok"), (0.0, "error"), (0.0, "ok"), (1.0, "ok")]
    assert verifier_stats() == VerifierStats(calls=4, timeouts=0, errors=1)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "answer 'die'" in warning and "worker died" in warning


@pytest.mark.parametrize(
    ("task", "key"), [("graph_color", "possible_answer"), ("propositional_logic", "example_answer")]
)
def test_tasks_without_a_single_gold_answer(task, key):
    ds = make_gym_dataset(task, 3, seed=0)
    assert list(ds["answer"]) == ["", "", ""]  # reasoning-gym's None, never the string "None"
    columns = {name: ds[name] for name in ("answer", "metadata", "question")}
    # the scorer checks validity against the metadata: a valid answer the generator stored scores 1.0
    valid = [json.loads(m)[key] for m in ds["metadata"]]
    solutions = [format_solution(json.dumps(v) if isinstance(v, dict) else v) for v in valid]
    reward = make_gym_reward(task)
    assert reward(solutions, **columns) == [1.0] * 3
    assert reward([format_solution("None"), format_solution(""), "<answer>"], **columns) == [0.0] * 3


ECHO_SCORER = """
import json
import reasoning_gym

def _echo_scorer(answer, entry):
    # full marks when the answer is the JSON of the very entry this scorer was given
    return 1.0 if answer == json.dumps(entry, sort_keys=True) else 0.0

reasoning_gym.get_score_answer_fn = lambda task: _echo_scorer
"""


def test_the_scorer_gets_the_entry_rebuilt_from_the_columns(tmp_path, monkeypatch):
    # reasoning-gym's entries hold None as the gold of tasks without a single gold answer (stored as ""),
    # the question text and the metadata as a dict; the scorer, patched in the worker, echoes what it got.
    (tmp_path / "sitecustomize.py").write_text(ECHO_SCORER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    reward = make_gym_reward("chain_sum", num_workers=7)  # a pool of its own, started with the patch
    no_gold = {"question": "Colour the graph.", "answer": None, "metadata": {"edges": [[0, 1]]}}
    gold = {"question": "3 + 4 =", "answer": "7", "metadata": {"expression": "3 + 4"}}
    completions = [format_solution(json.dumps(e, sort_keys=True)) for e in (no_gold, gold, gold)]
    columns = {
        "answer": ["", "7", "8"],
        "metadata": [json.dumps(e["metadata"]) for e in (no_gold, gold, gold)],
        "question": [e["question"] for e in (no_gold, gold, gold)],
    }
    try:
        # row 3's gold is 8, not the 7 its answer quotes: the scorer must see 8
        assert reward(completions, **columns) == [1.0, 1.0, 0.0]
        # without a question column the scorer gets an empty question
        without_question = {"question": "", "answer": "7", "metadata": {"expression": "3 + 4"}}
        completion = format_solution(json.dumps(without_question, sort_keys=True))
        assert reward([completion], answer=["7"], metadata=[columns["metadata"][1]]) == [1.0]
    finally:
        shutdown_workers()


def test_empty_gold_answer_is_rejected(monkeypatch):
    class Generator:  # a task whose gold is the empty string, which would read as "no single gold answer"
        def __getitem__(self, idx):
            return {"question": f"q{idx}", "answer": "", "metadata": {}}

    monkeypatch.setattr(gym_module, "_create", lambda task, size, seed, config: Generator())
    with pytest.raises(ValueError, match="empty string as its gold answer.*question: 'q0'"):
        make_gym_dataset("chain_sum", 2, seed=0)


def test_reward_arguments_and_pickle():
    assert gym_module.make_gym_reward is make_gym_reward  # still importable from pacsrl.data.gym
    reward = make_gym_reward("chain_sum", timeout=2.0, num_workers=2)
    assert isinstance(reward, GymReward) and reward.timeout == 2.0
    assert repr(reward) == "GymReward(task='chain_sum', timeout=2.0, num_workers=2)"
    clone = pickle.loads(pickle.dumps(reward))
    assert clone.__name__ == "chain_sum_accuracy"
    # 3 + 4 = 7 in both rows; spread over two workers, order kept
    completions = ["<answer>7</answer>", "<answer>8</answer>"]
    assert clone(completions, **_columns(["7", "7"], ["3 + 4"] * 2)) == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'no_such_task'"):
        make_gym_reward("no_such_task")
    for bad in (0, -1.0, float("inf"), "5"):
        with pytest.raises(ValueError, match="timeout"):
            make_gym_reward("chain_sum", timeout=bad)
    for bad in (0, True, 1.5, "2"):
        with pytest.raises(ValueError, match="num_workers"):
            make_gym_reward("chain_sum", num_workers=bad)
    with pytest.raises(ValueError, match="metadata of row 0 is not a JSON string"):
        reward(["<answer>7</answer>"], answer=["7"], metadata=["{not json"])
