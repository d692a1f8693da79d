"""Tests of the math verifier (pacsrl.rewards).

Expected values are mathematical truth, judged on the answer the spec names: the last ``\\boxed{...}`` of
a completion, or math-verify's fallback when it has no box.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import signal
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

import pacsrl.rewards._pool as pool_module
import pacsrl.rewards._worker as worker_module
import pacsrl.rewards.gym as gym_module
import pacsrl.rewards.math as math_module
from pacsrl.rewards import (
    VerifierStats,
    find_unparseable_gold,
    make_math_reward,
    math_reward,
    reset_verifier_stats,
    score_gym_answers,
    timeout_count,
    verifier_stats,
    verify_answer,
)
from pacsrl.rewards.auto import make_auto_reward
from pipe_helpers import unread

CORRECTED = (
    r"First \boxed{3}. Hmm, that contradicts the second condition, so let us redo the computation "
    r"carefully from the start. Now \boxed{5}."
)

SELF_CORRECTED = r"So \boxed{3}. Wait, no: \boxed{5}"

PARTS = [{"type": "text", "text": r"\boxed{"}, {"type": "text", "text": "9}"}]

# (completion, gold, expected reward)
CASES = [
    # integers
    pytest.param(r"The answer is \boxed{42}.", "42", 1.0, id="int-equal"),  # 42 = 42
    pytest.param(r"\boxed{-7}", "-7", 1.0, id="int-negative"),  # -7 = -7
    pytest.param(r"\boxed{41}", "42", 0.0, id="int-off-by-one"),  # 41 != 42
    pytest.param(r"\boxed{12}", "21", 0.0, id="int-swapped-digits"),  # 12 != 21
    pytest.param(r"\boxed{-2}", "2", 0.0, id="int-wrong-sign"),  # -2 != 2
    pytest.param(r"\boxed{2^{10}}", "1024", 1.0, id="int-power"),  # 2^10 = 1024
    # fractions
    pytest.param(r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0, id="frac-equal"),  # same fraction
    pytest.param(r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}", 1.0, id="dfrac-vs-frac"),  # \dfrac = \frac
    pytest.param(r"\boxed{3/4}", r"\frac{3}{4}", 1.0, id="slash-vs-frac"),  # 3/4 = 3/4
    pytest.param(r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", 1.0, id="frac-unreduced"),  # 2/4 = 1/2
    pytest.param(r"\boxed{\frac12}", r"\frac{1}{2}", 1.0, id="frac-no-braces"),  # \frac12 is \frac{1}{2}
    pytest.param(r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0.0, id="frac-wrong"),  # 1/3 != 1/2
    pytest.param(r"\boxed{\frac{2}{1}}", r"\frac{1}{2}", 0.0, id="frac-inverted"),  # 2 != 1/2
    # decimals vs fractions
    pytest.param(r"\boxed{0.5}", r"\frac{1}{2}", 1.0, id="decimal-vs-frac"),  # 0.5 = 1/2
    pytest.param(r"\boxed{\frac{1}{4}}", "0.25", 1.0, id="frac-vs-decimal-gold"),  # 1/4 = 0.25
    pytest.param(r"\boxed{2.50}", "2.5", 1.0, id="decimal-trailing-zero"),  # 2.50 = 2.5
    pytest.param(r"\boxed{0.33}", r"\frac{1}{3}", 0.0, id="decimal-truncated"),  # 0.33 != 1/3 (off by 1/300)
    pytest.param(r"\boxed{2.0001}", "2", 0.0, id="decimal-close"),  # 2.0001 != 2
    # LaTeX spacing
    pytest.param(r"\boxed{ \frac { 1 } { 2 } }", r"\frac{1}{2}", 1.0, id="spaces-in-frac"),  # whitespace only
    pytest.param(r"\boxed{2\,\pi}", r"2\pi", 1.0, id="thin-space"),  # \, is a thin space
    pytest.param(r"\boxed{x ^ 2 + 1}", "x^2+1", 1.0, id="spaces-in-polynomial"),  # whitespace only
    # \left( \right)
    pytest.param(r"\boxed{\left( 1, 2 \right)}", "(1,2)", 1.0, id="left-right-parens"),  # \left( is (
    pytest.param(r"\boxed{\left[ 0, 1 \right)}", "[0,1)", 1.0, id="left-right-interval"),  # same interval
    # intervals
    pytest.param(r"\boxed{[0, 1)}", "[0,1)", 1.0, id="interval-equal"),  # same half-open interval
    pytest.param(r"\boxed{(0, 1]}", "[0,1)", 0.0, id="interval-wrong-ends"),  # (0,1] != [0,1)
    pytest.param(r"\boxed{(-\infty, 3]}", r"(-\infty,3]", 1.0, id="interval-infinite"),  # same ray
    pytest.param(r"\boxed{[2,5] \cup [7,9]}", r"[2,5]\cup[7,9]", 1.0, id="interval-union"),  # same union
    # gold and prediction play different roles in math-verify: a gold inequality accepts the interval it
    # describes, but a predicted inequality is not accepted for a gold interval. These pin the order.
    pytest.param(r"\boxed{(-\infty, 3]}", r"a \le 3", 1.0, id="order-gold-inequality"),  # a <= 3 is (-inf, 3]
    pytest.param(r"\boxed{a \le 3}", r"(-\infty, 3]", 0.0, id="order-pred-inequality"),  # not read as a set
    pytest.param(r"\boxed{(-\infty, 3)}", "x < 3", 1.0, id="order-gold-strict"),  # x < 3 is (-inf, 3)
    pytest.param(r"\boxed{x < 3}", r"(-\infty, 3)", 0.0, id="order-pred-strict"),  # not read as a set
    # tuples
    pytest.param(r"\boxed{(3, -4)}", "(3,-4)", 1.0, id="tuple-equal"),  # same ordered pair
    pytest.param(r"\boxed{(-4, 3)}", "(3,-4)", 0.0, id="tuple-order-matters"),  # (-4,3) != (3,-4)
    # sets
    pytest.param(r"\boxed{\{3, 1, 2\}}", r"\{1,2,3\}", 1.0, id="set-reordered"),  # sets ignore order
    pytest.param(r"\boxed{\{1, 2\}}", r"\{1,2,3\}", 0.0, id="set-missing-element"),  # {1,2} != {1,2,3}
    # expressions equal after simplification
    pytest.param(r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0, id="expand-square"),  # (x+1)^2 = x^2+2x+1
    pytest.param(r"\boxed{2(x+3)}", "2x+6", 1.0, id="distribute"),  # 2(x+3) = 2x+6
    pytest.param(r"\boxed{x^2 - 1}", "(x-1)(x+1)", 1.0, id="difference-of-squares"),  # (x-1)(x+1) = x^2-1
    pytest.param(r"\boxed{x^2 + 1}", "(x+1)^2", 0.0, id="missing-cross-term"),  # differs by 2x
    pytest.param(r"\boxed{x+1}", "x-1", 0.0, id="expr-wrong-sign"),  # differs by 2
    # square roots
    pytest.param(r"\boxed{\sqrt{8}}", r"2\sqrt{2}", 1.0, id="sqrt-simplify"),  # sqrt(8) = 2 sqrt(2)
    pytest.param(r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0, id="sqrt-rational"),  # = 1/sqrt2
    pytest.param(r"\boxed{\sqrt{3}}", r"\sqrt{2}", 0.0, id="sqrt-wrong"),  # sqrt3 != sqrt2
    # pi
    pytest.param(r"\boxed{2\pi}", r"2\pi", 1.0, id="pi-equal"),  # same
    pytest.param(r"\boxed{\pi/2}", r"\frac{\pi}{2}", 1.0, id="pi-slash"),  # pi/2 = \frac{\pi}{2}
    pytest.param(r"\boxed{3.14}", r"\pi", 0.0, id="pi-approximation"),  # 3.14 != pi
    # text around the box
    pytest.param(r"Adding gives 5, so it is $\boxed{12}$.", "12", 1.0, id="text-inline-math"),  # box in $..$
    pytest.param("We get \\boxed{12}.\nBecause 3 * 4 = 12 and 7 is odd.", "12", 1.0, id="text-after-box"),
    # ^ numbers after the box do not override it
    # several boxes: the last one counts, however close the boxes are (math-verify alone would merge boxes
    # listed within ~70 characters into one set answer)
    pytest.param(CORRECTED, "5", 1.0, id="boxes-last-right"),  # the final answer is 5
    pytest.param(CORRECTED, "3", 0.0, id="boxes-earlier-right"),  # 3 was retracted
    pytest.param(SELF_CORRECTED, "5", 1.0, id="boxes-self-correction"),  # the last box is 5
    pytest.param(SELF_CORRECTED, "3", 0.0, id="boxes-self-correction-retracted"),  # 3 was retracted
    pytest.param(r"\boxed{3}, \boxed{5}", "5", 1.0, id="boxes-adjacent-comma"),  # the last box is 5
    pytest.param(r"\boxed{3}\boxed{5}", r"\{3,5\}", 0.0, id="boxes-adjacent-not-a-set"),  # 5 != {3,5}
    pytest.param(r"It is \boxed{3} or \boxed{5}.", "5", 1.0, id="boxes-hedging"),  # the last box is 5
    pytest.param(r"It is \boxed{3} or \boxed{5}.", "3", 0.0, id="boxes-hedging-first"),  # the last box is 5
    pytest.param(r"$x = \boxed{2}$ and $x = \boxed{-3}$", r"\{-3,2\}", 0.0, id="boxes-roots"),  # -3 != {-3,2}
    pytest.param(r"$x = \boxed{2}$ and $x = \boxed{-3}$", "-3", 1.0, id="boxes-roots-last"),  # the last box
    pytest.param(r"$x \in \boxed{\{1, 2\}}$", r"\{2,1\}", 1.0, id="boxes-set-in-one-box"),  # {1,2} = {2,1}
    pytest.param(r"\boxed{2}, so \boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0, id="boxes-nested-braces"),  # 1/2
    pytest.param(r"\boxed{1},\boxed{\sqrt{\frac{9}{4}}}", r"\frac{3}{2}", 1.0, id="boxes-nested-deep"),  # 3/2
    pytest.param(r"\boxed{3}, then $\fbox{5}$", "5", 1.0, id="boxes-fbox-last"),  # \fbox is a box too: 5
    pytest.param(r"\fbox{5}", "5", 1.0, id="fbox-alone"),  # read as \boxed{5}
    pytest.param(r"\boxed{3}. Wait: \boxed 5", "5", 1.0, id="boxes-last-without-brace"),  # \boxed 5 reads 5
    # an unclosed last box (a truncated completion) holds no answer: math-verify is given the text from it
    # on, "\boxed{5", where its fallbacks find nothing; the earlier, closed box is never read
    pytest.param(r"\boxed{3}. Wait, it is \boxed{5", "5", 0.0, id="boxes-last-unclosed"),  # no answer
    pytest.param(r"\boxed{3}. Wait, it is \boxed{5", "3", 0.0, id="boxes-last-unclosed-retracted"),  # not 3
    # no box: math-verify's fallbacks
    pytest.param("The answer is 7.", "7", 1.0, id="nobox-answer-is"),  # "answer is" anchor
    pytest.param(r"So the final answer is $\frac{1}{2}$", r"\frac{1}{2}", 1.0, id="nobox-latex"),  # $...$
    pytest.param("I do not know.", "7", 0.0, id="nobox-no-answer"),  # nothing to extract
    # empty completions
    pytest.param("", "7", 0.0, id="empty"),  # nothing to extract
    pytest.param("   \n\t", "7", 0.0, id="whitespace-only"),  # nothing to extract
    pytest.param(r"\boxed{}", "7", 0.0, id="empty-box"),  # an empty box is no answer
    # other notations
    pytest.param(r"\boxed{10\%}", r"10\%", 1.0, id="percent"),  # same percentage
    pytest.param(r"\boxed{\infty}", r"\infty", 1.0, id="infinity"),  # same
    pytest.param(
        r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1.0, id="vector"
    ),  # same column vector
    # conversational completions: the last assistant message counts
    pytest.param([{"role": "assistant", "content": r"so \boxed{6}"}], "6", 1.0, id="chat-single"),  # 6 = 6
    pytest.param(
        [{"role": "user", "content": r"\boxed{6}"}, {"role": "assistant", "content": r"\boxed{5}"}],
        "6",
        0.0,
        id="chat-ignores-user",  # the assistant said 5
    ),
    pytest.param(
        [
            {"role": "assistant", "content": r"\boxed{6}"},
            {"role": "tool", "content": "ok"},
            {"role": "assistant", "content": r"\boxed{5}"},
        ],
        "5",
        1.0,
        id="chat-last-assistant",  # the last assistant message says 5
    ),
    pytest.param(
        [{"role": "assistant", "content": PARTS}],
        "9",
        1.0,
        id="chat-content-parts",  # text parts joined: \boxed{9}
    ),
]


@pytest.fixture(autouse=True)
def _fresh_stats():
    reset_verifier_stats()
    yield


@pytest.mark.parametrize(("completion", "gold", "expected"), CASES)
def test_math_reward_table(completion, gold, expected):
    assert math_reward(completions=[completion], answer=[gold]) == [expected]


def test_batch_with_trl_keyword_arguments():
    # TRL passes prompts, completion_ids, other dataset columns, trainer_state, log_extra and log_metric.
    metrics = {}
    rewards = math_reward(
        prompts=["p1", "p2", "p3"],
        completions=[r"\boxed{1}", r"\boxed{2}", r"\boxed{4}"],
        completion_ids=[[1], [2], [3]],
        answer=["1", "3", "4"],
        problem=["a", "b", "c"],
        trainer_state=None,
        log_extra=lambda column, values: None,
        log_metric=lambda name, value: metrics.__setitem__(name, value),
    )
    assert rewards == [1.0, 0.0, 1.0]
    assert metrics == {"math_reward/timeout_frac": 0.0}
    assert verifier_stats() == VerifierStats(calls=3, timeouts=0, errors=0)


def test_verify_answer():
    assert verify_answer(r"\boxed{\frac{6}{8}}", "0.75") is True  # 6/8 = 3/4
    assert verify_answer(r"\boxed{0.7}", "0.75") is False  # 0.7 != 0.75
    # either argument not a string is refused before any worker sees it
    for completion, gold in ((7, "7"), ("7", 7), (None, None)):
        with pytest.raises(TypeError, match="expects two strings"):
            verify_answer(completion, gold)


def test_empty_batch():
    metrics = {}
    for reward in (math_reward, make_math_reward(num_workers=2)):
        assert reward([], answer=[], log_metric=lambda name, value: metrics.__setitem__(name, value)) == []
    assert metrics == {}  # no fraction of an empty batch
    assert verifier_stats() == VerifierStats()


def test_find_unparseable_gold():
    answers = ["3", r"\frac{1}{", "", r"\sqrt{2}", "(0, 1]", "}{"]
    # unbalanced \frac, empty, and a lone "}{" cannot be parsed into a math object
    assert find_unparseable_gold(answers) == [(1, r"\frac{1}{"), (2, ""), (5, "}{")]
    assert find_unparseable_gold([]) == []


def test_name_and_pickle():
    assert math_reward.__name__ == "math_reward"
    assert make_math_reward().__name__ == "math_reward"  # the default name, as TRL logs it
    assert repr(make_math_reward(timeout=2.0, name="m")) == (
        "MathReward(name='m', timeout=2.0, num_workers=1, max_chars=10000)"
    )
    custom = make_math_reward(timeout=2.0, name="math_acc")
    assert custom.__name__ == "math_acc"
    clone = pickle.loads(pickle.dumps(custom))
    assert clone.__name__ == "math_acc" and clone.timeout == 2.0
    assert clone([r"\boxed{2}"], answer=["2"]) == [1.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        math_reward([r"\boxed{1}", r"\boxed{2}"], answer=["1"])
    with pytest.raises(TypeError, match="gold answer 0 is a int"):
        math_reward([r"\boxed{1}"], answer=[1])
    with pytest.raises(TypeError, match="completion 0 is a int"):
        math_reward([7], answer=["7"])
    with pytest.raises(ValueError, match="no assistant message"):
        math_reward([[{"role": "user", "content": "hi"}]], answer=["7"])
    with pytest.raises(TypeError, match="row 1"):
        find_unparseable_gold(["1", None])
    for bad in (0, -1.0, float("nan"), float("inf"), "5"):
        with pytest.raises(ValueError, match="timeout"):
            make_math_reward(timeout=bad)
    for bad in (0, True, 1.5, "2"):
        with pytest.raises(ValueError, match="num_workers"):
            make_math_reward(num_workers=bad)
    for bad in (10, 999, True, 5000.5, "5000"):
        with pytest.raises(ValueError, match="max_chars"):
            make_math_reward(max_chars=bad)
    assert make_math_reward(max_chars=1000).max_chars == 1000  # the smallest allowed
    with pytest.raises(ValueError, match="name"):
        make_math_reward(name="math reward")
    with pytest.raises(ValueError, match="timeout"):
        verify_answer(r"\boxed{1}", "1", timeout=0)


def test_long_completions_keep_their_answer():
    filler = "Let us think about it some more. " * 40_000  # ~1.3 MB
    # the box comes after a megabyte of reasoning
    assert verify_answer(filler + r"so \boxed{17}.", "17") is True
    # the box is followed by more text than max_chars: the region after the box is kept
    assert verify_answer(r"We find \boxed{17}. " + filler, "17") is True
    # several boxes in a long text: the last one still counts
    assert verify_answer(r"\boxed{3} " + filler + r"\boxed{5}", "3") is False


def test_answer_text_is_the_last_box_alone():
    answer_text = math_module._answer_text
    # the last box, sent as \boxed{content}; nested and escaped braces are kept whole, earlier boxes dropped
    assert answer_text(r"$\boxed{2}$ and $\boxed{\frac{1}{\{2\}}}$.", 1000) == r"\boxed{\frac{1}{\{2\}}}"
    assert answer_text(r"\boxed{3} then \fbox {5} done", 1000) == r"\boxed{5}"  # \fbox, space before {
    # a last box without an opening brace, or unclosed: the text from its command on
    assert answer_text(r"\boxed{3}. \boxed 5.", 1000) == r"\boxed 5."
    assert answer_text(r"\boxed{3}. \boxed{5", 1000) == r"\boxed{5"
    # no box: the last max_chars characters
    text = "x" * 5000 + "the answer is 7"
    assert answer_text(text, 1000) == text[-1000:]
    # huge unbalanced input: a box not closed within max_chars is read as unclosed, cut to max_chars
    start = time.monotonic()
    huge = "\\boxed{" + "{" * 3_000_000 + "}"
    assert answer_text(huge, 1000) == huge[:1000]
    many = "\\boxed{" * 500_000
    assert answer_text(many, 1000) == "\\boxed{"
    assert time.monotonic() - start < 2, "the box scan must be linear and bounded by max_chars"


def test_pathological_inputs_are_bounded():
    reward = make_math_reward(timeout=2.0)
    completions = [
        r"\boxed{9^{9^{9^{9}}}}",  # sympy would try to evaluate a number with ~10^369693099 digits
        "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",  # thousands of nested braces
        "\\boxed{" * 5000,  # thousands of unclosed boxes
        "\\boxed{1}, \\boxed{" + "{" * 2_000_000,  # 1, then a megabyte-long unclosed last box: not 1
        "x" * 3_000_000,  # megabytes of text without a box
        "1/" * 200_000 + "1",  # a huge plain expression for the fallback extractor
        "$" * 100_000 + "\\frac{" * 1000,  # unbalanced delimiters everywhere
        "\x00\udcff\\boxed{\ud800}",  # NUL and lone surrogates
    ]
    start = time.monotonic()
    rewards = reward(completions, answer=["1"] * len(completions))
    elapsed = time.monotonic() - start
    assert rewards == [0.0] * len(completions)  # none of them equals 1
    assert elapsed < 30, f"pathological inputs took {elapsed:.1f} s"
    stats = verifier_stats()
    assert stats.calls == len(completions)


def test_failed_checks_are_logged_with_what_they_checked(monkeypatch, caplog):
    # every job times out (a stand-in pool: no worker starts), then every job errs
    monkeypatch.setattr(pool_module.WorkerPool, "run", lambda self, message, timeout: None)
    with caplog.at_level(logging.WARNING, logger="pacsrl.rewards.math"):
        assert verify_answer(r"So \boxed{12}.", "13") is False
        assert find_unparseable_gold(["3", "4"]) == [(0, "3"), (1, "4")]
    monkeypatch.setattr(pool_module.WorkerPool, "run", lambda self, message, timeout: {"error": "boom"})
    with caplog.at_level(logging.WARNING, logger="pacsrl.rewards.math"):
        assert math_reward([r"\boxed{8}"], answer=["9"]) == [0.0]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    # each names what was checked: the completion's last box (as sent) and the gold, or the gold's row
    assert "boxed{12}'" in messages[0] and "'13'" in messages[0] and "timed out" in messages[0]
    assert "row 0 '3'" in messages[1] and "row 1 '4'" in messages[2]
    assert "boxed{8}'" in messages[3] and "'9'" in messages[3] and "boom" in messages[3]
    assert verifier_stats() == VerifierStats(calls=4, timeouts=3, errors=1)


def test_stats_counter_adds_under_threads():
    counter = pool_module._StatsCounter()
    assert counter.get() == VerifierStats()

    def add(_):
        for _ in range(500):
            counter.add(calls=1, timeouts=1)
            counter.add(calls=2, errors=1)

    with ThreadPoolExecutor(max_workers=4) as executor:
        list(executor.map(add, range(4)))
    # 4 threads x 500 rounds: calls 3 per round, timeouts 1, errors 1
    assert counter.get() == VerifierStats(calls=6000, timeouts=2000, errors=2000)
    counter.reset()
    assert counter.get() == VerifierStats()


def test_timeout_is_counted_and_logged(caplog):
    metrics = {}
    reward = make_math_reward(timeout=1.0, name="slow_math")
    with caplog.at_level(logging.WARNING, logger="pacsrl.rewards.math"):
        rewards = reward(
            [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{1}"],
            answer=["1", "1"],
            log_metric=lambda name, value: metrics.__setitem__(name, value),
        )
    assert rewards == [0.0, 1.0]  # the tower times out; the worker is replaced for the next completion
    assert timeout_count() == 1
    assert verifier_stats() == VerifierStats(calls=2, timeouts=1, errors=0)
    assert metrics == {"slow_math/timeout_frac": 0.5}
    assert any("timed out" in r.getMessage() for r in caplog.records)


def test_threads():
    cases = [(p.values[0], p.values[1], p.values[2]) for p in CASES[:24]]
    with ThreadPoolExecutor(max_workers=4) as executor:
        results = list(executor.map(lambda c: math_reward([c[0]], answer=[c[1]])[0], cases))
    assert results == [c[2] for c in cases]
    assert verifier_stats().calls == len(cases)


def test_several_workers():
    reward = make_math_reward(num_workers=2)
    completions = [rf"\boxed{{{i}}}" for i in range(10)]
    golds = [str(i if i % 2 else i + 1) for i in range(10)]  # odd rows right, even rows wrong
    assert reward(completions, answer=golds) == [float(i % 2) for i in range(10)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_its_own_worker():
    assert verify_answer(r"\boxed{2}", "2")  # start a worker in the parent
    pid = os.fork()
    if pid == 0:  # child: must not talk to the parent's worker
        ok = verify_answer(r"\boxed{3}", "3") and not verify_answer(r"\boxed{3}", "4")
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert verify_answer(r"\boxed{2}", "2")  # the parent's worker still works


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_fresh_locks():
    # another thread may hold the verifiers' locks at the fork (here this one does): the child must get
    # fresh ones, not copies held forever
    assert verify_answer(r"\boxed{2}", "2")
    locks = [pool_module._POOLS_LOCK, pool_module._STATS._lock, gym_module._ERRORS._lock]
    for lock in locks:
        lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # child: whatever happens, it must end here (never return into pytest)
            code = 1
            try:
                signal.alarm(60)  # a lock inherited held would hang the child: end it instead
                ok = verify_answer(r"\boxed{3}", "3") and gym_module._ERRORS.add("forked child") == 1
                code = 0 if ok else 1
            finally:
                os._exit(code)
    finally:
        for lock in locks:
            lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_after_fork_the_counters_get_fresh_locks_and_keep_their_counts():
    # os.register_at_fork runs these in a forked child, where a tool that follows this process cannot see
    # them (test_forked_child_gets_fresh_locks forks for real); here they run in this process: a lock held
    # (by another thread) at the fork is replaced by a free one, and the counts so far are kept
    stats = pool_module._StatsCounter()
    stats.add(calls=2, errors=1)
    errors = gym_module._ErrorCounts()
    errors.add("chain_sum")
    stats._lock.acquire()
    errors._lock.acquire()
    stats.after_fork_in_child()
    errors.after_fork_in_child()
    assert not stats._lock.locked() and not errors._lock.locked()  # (else the next add would hang)
    assert stats.add(calls=1) == VerifierStats(calls=3, timeouts=0, errors=1)
    assert errors.add("chain_sum") == 2 and errors.add("other") == 1


def test_after_fork_the_pools_drop_the_parents_workers_and_locks(monkeypatch):
    # the module's after-fork handler, on stand-in state so that this process's own pools are untouched: the
    # child closes its copies of the parent's worker pipes without signalling the workers (a stand-in
    # without kill() would raise), forgets them, and gets free locks for the pools and the counters
    closed = []
    parent_worker = types.SimpleNamespace(close_pipes=lambda: closed.append("pipes"))
    pool = pool_module.WorkerPool(1)
    pool._idle.append(parent_worker)
    pool._live = 1
    held = threading.Lock()
    held.acquire()
    stats = pool_module._StatsCounter()
    stats._lock.acquire()
    monkeypatch.setattr(pool_module, "_POOLS", {1: pool})
    monkeypatch.setattr(pool_module, "_POOLS_LOCK", held)
    monkeypatch.setattr(pool_module, "_STATS", stats)
    pool_module._after_fork_in_child()
    assert closed == ["pipes"]
    assert pool._idle == [] and pool._live == 0
    assert not pool_module._POOLS_LOCK.locked() and not stats._lock.locked()  # (else these would hang)
    assert pool_module.get_pool(1) is pool
    assert pool_module.count_job("error") == VerifierStats(calls=1, timeouts=0, errors=1)


def test_a_new_pool_keeps_its_worker_between_jobs(monkeypatch):
    # a pool built here (get_pool's may predate this test) with stand-in workers: the second and third jobs
    # go to the worker started for the first, not to new ones (a real start costs about a second)
    started = []

    class StandIn:
        def __init__(self):
            self.proc = types.SimpleNamespace(poll=lambda: None)  # alive
            started.append(self)

        def request(self, message, timeout):
            return {"ok": True, "worker": started.index(self)}

    monkeypatch.setattr(pool_module, "Worker", StandIn)
    pool = pool_module.WorkerPool(1)
    answers = [pool.run({"op": "verify"}, timeout=1.0) for _ in range(3)]
    assert answers == [{"ok": True, "worker": 0}] * 3
    assert len(started) == 1


def test_a_new_pool_runs_at_most_its_size_of_workers_at_once(monkeypatch):
    # a pool of 2 with stand-in workers whose jobs wait for the test: two jobs hold both places, so a third
    # waits for one of their workers instead of starting a third (verify_answer's pool has one place, where
    # counting the live workers cannot go wrong)
    started = []
    gates = [threading.Event() for _ in range(3)]
    busy = threading.Semaphore(0)

    class StandIn:
        def __init__(self):
            self.proc = types.SimpleNamespace(poll=lambda: None)  # alive
            started.append(self)

        def request(self, message, timeout):
            busy.release()
            gates[message["job"]].wait(10)
            return {"job": message["job"], "worker": started.index(self)}

    monkeypatch.setattr(pool_module, "Worker", StandIn)
    pool = pool_module.WorkerPool(2)
    answers = {}

    def job(i):
        answers[i] = pool.run({"job": i}, timeout=1.0)

    threads = [threading.Thread(target=job, args=(i,), daemon=True) for i in range(3)]
    threads[0].start()
    threads[1].start()
    assert busy.acquire(timeout=10) and busy.acquire(timeout=10)  # jobs 0 and 1 hold both workers
    threads[2].start()
    assert not busy.acquire(timeout=0.3)  # job 2 waits...
    assert len(started) == 2
    gates[0].set()
    threads[0].join(10)
    gates[2].set()
    threads[2].join(10)  # ...and runs on the worker job 0 gave back
    gates[1].set()
    threads[1].join(10)
    assert answers[2] == {"job": 2, "worker": answers[0]["worker"]}
    assert len(started) == 2


def test_a_worker_gets_a_setup_request_once(monkeypatch):
    # run_batch with a setup (a gym task's load request): a stand-in worker is sent it before its first
    # batch only, then keeps the two batches' jobs
    sent = []

    class StandIn:
        def __init__(self):
            self.proc = types.SimpleNamespace(poll=lambda: None)  # alive
            self.loaded = set()
            self.answers = []

        def request(self, message, timeout):
            sent.append(message)
            return {"ok": True}

        def send(self, message):
            sent.append(message)
            self.answers = [{"score": float(job)} for job in message["jobs"]]

        def receive(self, timeout):
            return self.answers.pop(0)

    monkeypatch.setattr(pool_module, "Worker", StandIn)
    pool = pool_module.WorkerPool(1)
    setup = ("gym:chain_sum", {"op": "gym_load", "task": "chain_sum"})

    def batch(jobs):
        return {"op": "gym", "jobs": jobs}

    assert pool.run_batch(batch, [1, 0], timeout=1.0, setup=setup) == [{"score": 1.0}, {"score": 0.0}]
    assert pool.run_batch(batch, [2], timeout=1.0, setup=setup) == [{"score": 2.0}]
    assert sent == [setup[1], batch([1, 0]), batch([2])]


def test_worker_killed_while_idle_is_replaced():
    assert verify_answer(r"\boxed{2}", "2")  # make sure an idle worker exists
    pool = pool_module.get_pool(1)
    for worker in pool._idle:
        worker.proc.kill()
        worker.proc.wait()
    # a worker that died between jobs is replaced; the job is not charged for it
    assert verify_answer(r"\boxed{2}", "2")
    assert verifier_stats() == VerifierStats(calls=2, timeouts=0, errors=0)


def test_worker_dying_mid_job_scores_zero_and_is_counted(monkeypatch, caplog):
    def die(self, message, timeout):
        self.proc.kill()
        raise pool_module.WorkerDied("killed by the test")

    monkeypatch.setattr(pool_module.Worker, "request", die)
    with caplog.at_level(logging.WARNING, logger="pacsrl.rewards.math"):
        assert math_reward([r"\boxed{2}"], answer=["2"]) == [0.0]
    assert verifier_stats() == VerifierStats(calls=1, timeouts=0, errors=1)
    assert any("worker died" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert math_reward([r"\boxed{2}"], answer=["2"]) == [1.0]  # a fresh worker takes over


def test_worker_that_cannot_start_raises_a_clear_error(monkeypatch):
    # an environment problem (not completion text) is an error, not a silent 0.0
    monkeypatch.setattr(sys, "executable", "/bin/false")
    reward = make_math_reward(num_workers=3)  # a pool of its own, with no worker started yet
    with pytest.raises(RuntimeError, match="did not start"):
        reward([r"\boxed{1}"], answer=["1"])


class _Trickle(io.RawIOBase):
    """A stream that hands out at most 3 bytes per read, as a pipe may."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._data.read(min(n, 3) if n >= 0 else 3)


def test_worker_messages_survive_short_reads_and_a_cut_ends_them():
    first = {
        "op": "verify",
        "pred": "\\boxed{\\frac{1}{2}}",
        "gold": "0.5 \u00e9",
    }  # non-ASCII travels escaped
    second = {"op": "gold", "gold": "3"}
    out = io.BytesIO()
    worker_module.write_message(out, first)
    worker_module.write_message(out, second)
    data = out.getvalue()
    # each message: a 4-byte big-endian length, then that many bytes of JSON
    assert int.from_bytes(data[:4], "big") == len(json.dumps(first)) and data[4:5] == b"{"
    stream = _Trickle(data)
    assert worker_module.read_message(stream) == first
    assert worker_module.read_message(stream) == second
    assert worker_module.read_message(stream) is None  # EOF
    # a message cut short (its writer died) reads as EOF, in the header or in the payload
    assert worker_module.read_message(_Trickle(data[:2])) is None
    assert worker_module.read_message(_Trickle(data[:10])) is None
    assert worker_module.read_message(_Trickle(b"")) is None


def test_worker_answers_are_read_whole_from_short_reads():
    # the parent's reader (Worker._receive) on a pipe this test writes, a few bytes at a time, each piece
    # read before the next is written (as a loaded machine may deliver a message)
    read_end, write_end = os.pipe()
    worker = pool_module.Worker.__new__(pool_module.Worker)  # no subprocess: only its reader is tested
    worker.proc = types.SimpleNamespace(stdout=os.fdopen(read_end, "rb", buffering=0), poll=lambda: 3)
    message = {"ok": True, "note": "x" * 20}
    payload = json.dumps(message).encode()
    data = len(payload).to_bytes(4, "big") + payload
    pieces = [data[:3], data[3:6]] + [data[i : i + 5] for i in range(6, len(data), 5)]

    def trickle():
        for piece in pieces:
            os.write(write_end, piece)
            deadline = time.monotonic() + 10
            while unread(read_end) and time.monotonic() < deadline:
                time.sleep(0.001)

    writer = threading.Thread(target=trickle, daemon=True)
    writer.start()
    try:
        assert worker.receive(30.0) == message
        writer.join()
        with pytest.raises(pool_module.JobTimeout):  # nothing more comes within the deadline
            worker.receive(0.05)
        os.write(write_end, data[:7])  # a message cut off by the worker's death
        os.close(write_end)
        with pytest.raises(pool_module.WorkerDied, match="exit code 3"):
            worker.receive(5.0)
    finally:
        worker.proc.stdout.close()
        if not writer.is_alive():
            try:
                os.close(write_end)
            except OSError:
                pass


def test_auto_reward_scores_each_row_by_its_source():
    auto = make_auto_reward(timeout=3.0)
    meta = json.dumps({"expression": "4 + 9"})
    # each completion holds a box and an answer tag that disagree: its score shows which verifier read it
    completions = [
        r"\boxed{7} <answer>8</answer>",  # math500: math-verify reads the box, 7 (right)
        r"\boxed{12} <answer>13</answer>",  # gym:chain_sum: the task's scorer reads the tag, 4 + 9 = 13 (right)
        r"\boxed{5} <answer>6</answer>",  # aime, another math source: the box, 5 (right)
        r"\boxed{8} <answer>9</answer>",  # math500: the box, 8 (wrong)
    ]
    calls = []
    scores = auto(
        prompts=["p0", "p1", "p2", "p3"],
        completions=completions,
        answer=["7", "13", "5", "9"],
        source=["math500", "gym:chain_sum", "aime", "math500"],
        metadata=[meta] * 4,
        question=["", "4 + 9 =", "", ""],
        trainer_state=None,
        log_metric=lambda name, value: calls.append((name, value)),
    )
    assert scores == [1.0, 1.0, 1.0, 0.0]
    # one call per scorer, whatever the number of sources (each reward logs its metrics once per call)
    expected = [("chain_sum_accuracy/error_frac", 0.0), ("chain_sum_accuracy/timeout_frac", 0.0)]
    assert sorted(calls) == [*expected, ("math_reward/timeout_frac", 0.0)]
    # the scorers get the reward's timeout; every non-gym source shares the one math scorer
    assert auto.scorer("math500") is auto.scorer("aime") and auto.scorer("math500").timeout == 3.0
    assert auto.scorer("gym:chain_sum").timeout == 3.0 and auto.scorer("gym:chain_sum").task == "chain_sum"
    assert make_auto_reward().scorer("gsm8k").timeout == 5.0  # the verifiers' default, 5 s per check
    with pytest.raises(ValueError, match="2 completions but 1 sources"):
        auto(completions=completions[:2], source=["aime"], answer=["7", "13"])


def test_preview_keeps_the_tail_of_a_long_text():
    preview = pool_module.preview
    digits = "".join(str(i % 10) for i in range(100))  # 0123456789 0123...
    assert preview(digits[:80]) == "'" + digits[:80] + "'"  # 80 characters: whole
    assert preview(digits[:81]) == "'..." + digits[1:81] + "'"  # 81: "..." and the last 80
    assert preview(digits) == "'..." + digits[20:] + "'"
    assert preview(digits, n=5) == "'...56789'"


def _chain_sum_entry(expression: str, gold: str) -> dict:
    return {"question": f"{expression} =", "answer": gold, "metadata": {"expression": expression}}


def test_score_gym_answers():
    answers = ["7", "77", "+07.0", "seven", "-5", "12"]
    entries = [_chain_sum_entry("3 + 4", "7")] * 4
    entries += [_chain_sum_entry("3 - 8", "-5"), _chain_sum_entry("9 + 3", "12")]
    # chain_sum's own scorer: 7 = 7; "77" contains "7", partial credit len("7")/len("77") = 0.5; +07.0 = 7;
    # "seven" is no decimal (the scorer catches that itself: 0.0); 3 - 8 = -5; 9 + 3 = 12
    expected = [(1.0, "ok"), (0.5, "ok"), (1.0, "ok"), (0.0, "ok"), (1.0, "ok"), (1.0, "ok")]
    assert score_gym_answers("chain_sum", answers, entries) == expected
    # spread over two workers in contiguous chunks: same answers, same order
    assert score_gym_answers("chain_sum", answers, entries, num_workers=2) == expected
    assert verifier_stats() == VerifierStats(calls=12, timeouts=0, errors=0)
    assert score_gym_answers("chain_sum", [], []) == []


def test_score_gym_answers_bad_arguments():
    with pytest.raises(ValueError, match="2 answers but 1 entries"):
        score_gym_answers("chain_sum", ["1", "2"], [_chain_sum_entry("0 + 1", "1")])
    with pytest.raises(ValueError, match="timeout"):
        score_gym_answers("chain_sum", ["1"], [_chain_sum_entry("0 + 1", "1")], timeout=0)
    # a scorer the worker cannot build is an environment error, not a 0.0
    with pytest.raises(RuntimeError, match="could not set up 'gym:no_such_task'.*not registered"):
        score_gym_answers("no_such_task", ["1"], [{}])
    assert verifier_stats() == VerifierStats()


@pytest.mark.parametrize("failure", [pool_module.WorkerDied, pool_module.JobTimeout])
def test_a_worker_that_dies_or_hangs_while_setting_up_a_scorer_is_an_error(monkeypatch, failure):
    request = pool_module.Worker.request

    def fail_setup(self, message, timeout):
        if message["op"] == "gym_load":
            raise failure("in the test")
        return request(self, message, timeout)

    monkeypatch.setattr(pool_module.Worker, "request", fail_setup)
    monkeypatch.setattr(pool_module, "_POOLS", {})  # a fresh worker, which has not set up chain_sum yet
    try:
        # an environment problem, raised (never scored 0.0), naming what went wrong
        with pytest.raises(RuntimeError, match=f"could not set up 'gym:chain_sum': {failure.__name__}"):
            score_gym_answers("chain_sum", ["7"], [_chain_sum_entry("3 + 4", "7")])
    finally:
        pool_module.shutdown_workers()
    assert verifier_stats() == VerifierStats()
