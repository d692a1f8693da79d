"""The verifier worker's side of its protocol, served in this process.

The pool runs ``pacsrl.rewards._worker.main`` in a subprocess, where a mutation tester cannot see which tests
run it. Here ``main`` reads framed requests from a fake stdin and writes to a pipe put on fd 1, and the framing
is decoded by this file's own code (4-byte big-endian length, then ASCII JSON), not the worker's.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import resource
import signal
import struct
import tempfile
import threading
import time
import warnings

import pytest

from pacsrl.rewards import _worker
from pipe_helpers import unread


def _frame(message: dict) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack(">I", len(payload)) + payload


def _unframe(data: bytes) -> list[dict]:
    messages = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        payload, data = data[4 : 4 + n], data[4 + n :]
        assert len(payload) == n, "a message cut short"
        messages.append(json.loads(payload.decode("ascii")))  # ASCII only: the protocol's promise
    return messages


def _serve(requests: list[dict], monkeypatch) -> tuple[list[dict], list[tuple]]:
    """Run the worker on these requests until EOF; returns the messages it sent and its setrlimit calls."""
    limits: list[tuple] = []
    # the 8 GiB address-space cap is for the worker process, not this one: record it instead
    monkeypatch.setattr(resource, "setrlimit", lambda *args: limits.append(args))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"".join(map(_frame, requests)))))
    read_end, write_end = os.pipe()
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(_read_all(read_end)))
    reader.start()
    saved_stdout = os.dup(1)
    os.dup2(write_end, 1)
    os.close(write_end)
    try:
        _worker.main()  # returns at EOF on stdin
    finally:
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    reader.join(timeout=60)
    return _unframe(received[0]), limits


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def test_math_requests_are_answered_in_order_after_ready(monkeypatch):
    requests = [
        {"op": "verify", "pred": r"so it is \boxed{0.5}", "gold": r"\frac{1}{2}"},
        {"op": "verify", "pred": r"\boxed{3}", "gold": "4"},
        {"op": "verify", "pred": "the answer is 4", "gold": "4"},  # no box: the expression is extracted
        {"op": "gold", "gold": r"\frac{1}{2}"},
        {"op": "gold", "gold": r"\frac{1}{"},  # unbalanced: not a math object
        {"op": "verify", "pred": r"\boxed{1}"},  # no gold: that job's error, and the worker goes on
        {"op": "verify", "pred": r"\boxed{(-\infty, 3]}", "gold": r"x \le 3"},
    ]
    messages, limits = _serve(requests, monkeypatch)
    assert messages[0] == {"ready": True}
    answers = messages[1:]
    assert [a.get("ok") for a in answers] == [True, False, True, True, False, False, True]
    assert answers[5]["error"] == "KeyError: 'gold'"
    assert all("error" not in a for i, a in enumerate(answers) if i != 5)
    assert limits == [(resource.RLIMIT_AS, (8 * 1024**3, resource.getrlimit(resource.RLIMIT_AS)[1]))]


def test_eof_at_once_sends_only_ready(monkeypatch):
    messages, _ = _serve([], monkeypatch)
    assert messages == [{"ready": True}]


def test_gym_batch_is_answered_job_by_job(monkeypatch):
    pytest.importorskip("reasoning_gym")
    entry = {"question": "3 + 4 =", "answer": "7", "metadata": {"expression": "3 + 4"}}
    requests = [
        {"op": "gym_load", "task": "chain_sum"},
        {
            "op": "gym",
            "jobs": [
                {"task": "chain_sum", "answer": "7", "entry": entry},
                {"task": "chain_sum", "answer": "8", "entry": entry},
                {"task": "no_such_task", "answer": "7", "entry": entry},  # its own error alone
                {"task": "chain_sum", "answer": " 7 ", "entry": entry},
            ],
        },
    ]
    messages, _ = _serve(requests, monkeypatch)
    assert messages[:2] == [{"ready": True}, {"ok": True}]
    scores = messages[2:]
    assert len(scores) == 4
    assert scores[0] == {"score": 1.0} and scores[1] == {"score": 0.0} and scores[3] == {"score": 1.0}
    assert scores[2]["ok"] is False and "no_such_task" in scores[2]["error"]


def test_a_long_error_is_cut_to_500_characters_and_sent_as_ascii(monkeypatch):
    messages, _ = _serve([{"op": "gym_load", "task": "é" * 1000}], monkeypatch)  # _unframe decodes ASCII only
    error = messages[1]["error"]
    assert messages[1]["ok"] is False and len(error) == 500 and error.endswith("é" * 100)


def test_output_a_library_prints_goes_to_stderr_not_to_the_answers(monkeypatch):
    # a library that writes to fd 1 (print, or C code) must not corrupt the framed answers: the worker moves
    # fd 1 onto stderr and answers on a private copy of the original stdout
    import math_verify

    real_verify = math_verify.verify

    def noisy_verify(*args, **kwargs):
        os.write(1, b"library noise\n")
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(math_verify, "verify", noisy_verify)
    saved_stderr = os.dup(2)
    with tempfile.TemporaryFile() as stderr:
        os.dup2(stderr.fileno(), 2)
        try:
            messages, _ = _serve([{"op": "verify", "pred": r"\boxed{2}", "gold": "2"}], monkeypatch)
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
        stderr.seek(0)
        printed = stderr.read()
    assert messages == [{"ready": True}, {"ok": True}]
    assert printed.count(b"library noise\n") == 2  # the warm-up's check and the job's


def test_a_box_outranks_every_other_anchor_and_an_unparseable_first_match_is_final(monkeypatch):
    final_answer = r"The final answer is $3$. I hope it is correct. \boxed{4}"
    requests = [
        # math-verify's own top anchor ("final answer is ... I hope") loses to the box: 4, not 3
        {"op": "verify", "pred": final_answer, "gold": "4"},
        {"op": "verify", "pred": final_answer, "gold": "3"},
        # no box: the answer the text states, "$)$", does not parse; that is the verdict, no other
        # number of the text ($4$) is taken in its place
        {"op": "verify", "pred": "the answer is $)$ or $4$", "gold": "4"},
    ]
    messages, _ = _serve(requests, monkeypatch)
    assert messages == [{"ready": True}, {"ok": True}, {"ok": False}, {"ok": False}]


def test_jobs_run_without_signal_timeouts(monkeypatch):
    # the parent's deadline is the only one: math-verify's SIGALRM timeouts (5 s by default) would score a
    # slow but right answer 0 before that deadline, and fail outside the main thread
    alarms = []
    monkeypatch.setattr(signal, "alarm", lambda seconds: alarms.append(seconds) or 0)
    requests = [{"op": "verify", "pred": r"\boxed{\frac{3}{4}}", "gold": "0.75"}, {"op": "gold", "gold": "1"}]
    messages, _ = _serve(requests, monkeypatch)
    assert messages == [{"ready": True}, {"ok": True}, {"ok": True}]
    assert alarms == []


def test_math_verify_notices_are_silenced_and_no_other_warning(monkeypatch, caplog):
    # with its timeouts off, math-verify's parser and grader each warn once per process; the worker hides
    # those two notices (the parent enforces the deadline) but must not hide other libraries' warnings
    from math_verify import grader, parser

    monkeypatch.setattr(parser, "TIMEOUT_WARNING_SHOWN", False)  # as in a fresh worker process
    monkeypatch.setattr(grader, "TIMEOUT_WARNING_SHOWN", False)
    caplog.set_level(logging.WARNING)
    for name in ("math_verify.parser", "math_verify.grader"):
        caplog.set_level(logging.NOTSET, logger=name)  # restored after the test
    _serve([{"op": "verify", "pred": r"\boxed{2}", "gold": "2"}], monkeypatch)
    logging.getLogger("another.library").warning("still heard")
    assert [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING] == [
        ("another.library", "still heard")
    ]


def test_the_worker_raises_no_warnings(monkeypatch):
    # its stderr is the parent's: a warning there would land in every training log, once per worker
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", hidden)  # as Python's default filters do in the worker
        messages, _ = _serve([{"op": "verify", "pred": r"\boxed{2}", "gold": "2"}], monkeypatch)
    assert messages == [{"ready": True}, {"ok": True}]
    assert [str(w.message) for w in caught] == []


class _ShortWrites(io.RawIOBase):
    """An unbuffered stream that takes at most 5 bytes per write, as a pipe may (see the next test)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += bytes(b[:5])
        return min(len(b), 5)


def test_a_message_is_written_whole_when_the_stream_takes_it_in_pieces():
    message = {"op": "gym", "jobs": ["x" * 20]}
    stream = _ShortWrites()
    _worker.write_message(stream, message)
    _worker.write_message(stream, {"op": "gold", "gold": "3"})
    assert _unframe(bytes(stream.data)) == [message, {"op": "gold", "gold": "3"}]


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
def test_a_signal_during_a_blocked_write_does_not_cut_the_message():
    # The pool writes requests to the worker's stdin unbuffered. A request larger than the pipe (a big gym
    # batch) blocks until the worker reads; a signal handled meanwhile makes write(2) return what it took so
    # far. Here the reader waits for that signal, so the first write is certain to be cut at the pipe's size.
    read_end, write_end = os.pipe()
    capacity = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ) if hasattr(fcntl, "F_GETPIPE_SZ") else 65536
    message = {"op": "gym", "jobs": ["x" * (3 * capacity)]}
    signalled = threading.Event()
    main = threading.get_ident()

    def signal_when_full():
        deadline = time.monotonic() + 10
        while unread(read_end) < capacity and time.monotonic() < deadline:
            time.sleep(0.001)
        signal.pthread_kill(main, signal.SIGUSR1)  # the main thread is blocked in write(2)

    received: list[bytes] = []

    def read_after_the_signal():
        signalled.wait(10)
        received.append(_read_all(read_end))

    previous = signal.signal(signal.SIGUSR1, lambda *_: signalled.set())
    threads = [threading.Thread(target=f, daemon=True) for f in (signal_when_full, read_after_the_signal)]
    try:
        for thread in threads:
            thread.start()
        with os.fdopen(write_end, "wb", buffering=0) as stream:
            _worker.write_message(stream, message)
        for thread in threads:
            thread.join(10)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert signalled.is_set()
    assert _unframe(received[0]) == [message]
