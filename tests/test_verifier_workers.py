"""A verifier job that overruns its deadline gets its worker subprocess killed, not just abandoned.

A worker stuck on ``9**9**9**9`` never returns; left alive it burns a core for good (re-parented to init
when the trainer exits). The pool's other promises about its processes are checked here too: the default
verifiers share one worker, kept between calls; a batch is spread over the workers; shutdown stops the idle
ones, even one that will not exit. The processes are observed from outside, through /proc: the verifier's
children before and after each step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from pacsrl.rewards import (
    find_unparseable_gold,
    make_math_reward,
    score_gym_answers,
    shutdown_workers,
    verify_answer,
)
from pacsrl.rewards.gym import make_gym_reward

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")

TOWER = r"\boxed{9^{9^{9^{9}}}}"  # SymPy would try to build a number with ~10^369693099 digits


def _state(pid: int) -> str | None:
    """The process state letter (R, S, Z, ...), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _running(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


def _workers() -> set[int]:
    """Live verifier worker subprocesses of this process (found by parent pid and command line)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == os.getpid() and b"pacsrl.rewards" in cmdline and _running(int(entry.name)):
            found.add(int(entry.name))
    return found


def _within(seconds: float, fn, *args):
    """``fn(*args)``, failing the test if it has not returned within ``seconds`` (run in a daemon thread, so
    that a call that never returns cannot hang the test run)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"{fn.__name__} did not return within {seconds} s"
    return result[0]


@pytest.fixture
def no_leaked_workers():
    """Start with no idle workers; whatever the test leaves running (a bug) is killed afterwards."""
    shutdown_workers()
    assert _workers() == set()
    yield
    for pid in _workers():
        os.kill(pid, signal.SIGKILL)
    shutdown_workers()


def test_a_timed_out_check_kills_its_worker_and_a_new_one_takes_over(no_leaked_workers):
    assert verify_answer(r"\boxed{2}", "2")
    (first,) = _workers()  # the worker that will get stuck
    assert verify_answer(TOWER, "1", timeout=1.0) is False
    assert not _running(first)  # killed at the deadline, not left computing the tower
    assert verify_answer(r"\boxed{3}", "3") and not verify_answer(r"\boxed{3}", "4")
    (second,) = _workers()
    assert second != first and _running(second)


def _countdown_entry() -> tuple[str, dict]:
    """A countdown problem with its gold expression: 25 * 4 = 100 from the numbers 25 and 4."""
    entry = {"question": "", "answer": "25*4", "metadata": {"target": 100, "numbers": [25, 4]}}
    return "25*4", entry


def test_a_timed_out_gym_job_kills_its_worker_and_the_rest_of_the_batch_goes_to_a_new_one(no_leaked_workers):
    gold, entry = _countdown_entry()
    assert score_gym_answers("countdown", [gold], [entry]) == [(1.0, "ok")]
    (first,) = _workers()
    # countdown's scorer hands the answer to SymPy's parse_expr: the tower never returns
    results = score_gym_answers("countdown", [gold, "9**9**9**9", gold], [entry] * 3, timeout=1.0)
    assert results == [(1.0, "ok"), (0.0, "timeout"), (1.0, "ok")]
    assert not _running(first)
    (second,) = _workers()
    assert second != first


def test_the_default_verifiers_share_one_worker_and_keep_it(no_leaked_workers):
    # verify_answer, find_unparseable_gold and a default math reward (one worker) all use one worker
    # subprocess, kept between calls rather than restarted for each (a start costs about a second)
    assert verify_answer(r"\boxed{2}", "2")
    (first,) = _workers()
    assert verify_answer(r"\boxed{2}", "3") is False
    assert _workers() == {first}
    reward = make_math_reward()
    assert reward([r"\boxed{1}", r"\boxed{2}", r"\boxed{3}"], answer=["1", "5", "3"]) == [1.0, 0.0, 1.0]
    assert find_unparseable_gold(["3", "}{"]) == [(1, "}{")]
    assert _workers() == {first}
    # so do the gym scorers, by default: 3 + 4 = 7, not 8
    entry = {"question": "3 + 4 =", "answer": "7", "metadata": {"expression": "3 + 4"}}
    assert score_gym_answers("chain_sum", ["7", "8"], [entry] * 2) == [(1.0, "ok"), (0.0, "ok")]
    gym_reward = make_gym_reward("chain_sum")
    columns = {"answer": ["7", "7"], "metadata": [json.dumps(entry["metadata"])] * 2}
    assert gym_reward(["<answer>7</answer>", "<answer>8</answer>"], **columns) == [1.0, 0.0]
    assert _workers() == {first}


def test_a_batch_is_spread_over_the_workers(no_leaked_workers):
    # two completions, two workers: the second check does not wait for the first worker (whose start
    # alone takes about a second), it starts the other one
    reward = make_math_reward(num_workers=2)
    assert reward([r"\boxed{1}", r"\boxed{2}"], answer=["1", "1"]) == [1.0, 0.0]
    assert len(_workers()) == 2
    # so are gym answers, in two contiguous chunks
    shutdown_workers()
    entry = {"question": "3 + 4 =", "answer": "7", "metadata": {"expression": "3 + 4"}}
    assert score_gym_answers("chain_sum", ["8", "7"], [entry] * 2, num_workers=2) == [
        (0.0, "ok"),
        (1.0, "ok"),
    ]
    assert len(_workers()) == 2


def _at_once(n: int) -> dict[int, bool]:
    """verify_answer from n threads at once (daemon threads, so that a pool that never frees a place fails
    the test instead of hanging it); {i: answer} for the calls that returned."""
    results = {}
    threads = [
        threading.Thread(
            target=lambda i=i: results.update({i: verify_answer(rf"\boxed{{{i}}}", str(i))}), daemon=True
        )
        for i in range(n)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return results


def test_a_pool_never_runs_more_workers_than_its_size(no_leaked_workers):
    # verify_answer's pool has one place. A worker that died while idle, a timeout and a worker that could
    # not start each free their place exactly once: never a second worker, never a place lost for good.
    assert verify_answer(r"\boxed{2}", "2")
    (first,) = _workers()
    os.kill(first, signal.SIGKILL)  # dies while idle
    deadline = time.monotonic() + 30
    while _running(first) and time.monotonic() < deadline:  # dead before the next job looks at it
        time.sleep(0.01)
    assert _at_once(6) == dict.fromkeys(range(6), True)
    assert len(_workers()) == 1
    assert _within(120, verify_answer, TOWER, "1", 1.0) is False  # times out: its worker is killed
    assert _at_once(6) == dict.fromkeys(range(6), True)
    assert len(_workers()) == 1


def test_a_worker_that_cannot_start_frees_its_place(no_leaked_workers, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match="did not start"):
        verify_answer(r"\boxed{1}", "1")
    monkeypatch.undo()
    assert _at_once(4) == dict.fromkeys(range(4), True)
    assert len(_workers()) == 1


def test_a_worker_does_not_inherit_the_parents_open_files(no_leaked_workers):
    # a descriptor the parent made inheritable (a pipe's write end here) must not be held open by the worker:
    # the pipe's reader would never see EOF while the worker lives
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    try:
        assert verify_answer(r"\boxed{2}", "2")
        (worker,) = _workers()
        pipe = os.readlink(f"/proc/self/fd/{write_end}")  # "pipe:[inode]"
        held = {os.readlink(fd) for fd in Path(f"/proc/{worker}/fd").iterdir()}
        assert pipe not in held
    finally:
        os.close(read_end)
        os.close(write_end)


def test_shutdown_stops_idle_workers_even_one_that_will_not_exit_and_they_restart(no_leaked_workers):
    assert verify_answer(r"\boxed{2}", "2")
    (first,) = _workers()
    os.kill(first, signal.SIGSTOP)  # an idle worker that will not exit when asked (EOF on its stdin)
    _within(60, shutdown_workers)  # asks, waits 2 s, then kills it
    assert _state(first) is None  # killed and reaped
    # the next call starts a fresh worker (the pool does not still count the stopped one as live)
    assert _within(120, verify_answer, r"\boxed{3}", "3")
    (second,) = _workers()
    assert second != first
