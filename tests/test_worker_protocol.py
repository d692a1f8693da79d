"""The verifier worker's side of its protocol, served in this process.

The pool runs ``pacsrl.rewards._worker.main`` in a subprocess, where a mutation tester cannot see which tests
run it. Here ``main`` reads framed requests from a fake stdin and writes to a pipe put on fd 1, and the framing
is decoded by this file's own code (4-byte big-endian length, then ASCII JSON), not the worker's.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import threading

import pytest

from pacsrl.rewards import _worker


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
