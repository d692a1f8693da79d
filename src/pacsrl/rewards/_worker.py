"""Verification worker subprocess, started and driven by :mod:`pacsrl.rewards._pool`.

math-verify parses LaTeX with ANTLR and compares with SymPy; on hostile text either can run for minutes or
blow the stack, and its own ``signal.alarm`` timeouts only work in the main thread of the main interpreter.
So the parent process never runs math-verify itself: it sends each job to this long-lived subprocess and
kills it when a job overruns its deadline. A fresh interpreter (not ``fork``) keeps CUDA, NCCL and thread
state of a training process out of the worker.

Protocol over stdin/stdout: each message is a 4-byte big-endian length followed by that many bytes of
ASCII JSON. The worker first sends ``{"ready": true}``, then answers each request with one message:

* ``{"op": "verify", "pred": str, "gold": str}`` -> ``{"ok": bool}`` (gold is wrapped in ``\\boxed{}``;
  pred is the last box of a completion, or its tail when it has none)
* ``{"op": "gold", "gold": str}`` -> ``{"ok": bool}`` (True when the gold parses to a math object)

* ``{"op": "gym_load", "task": str}`` -> ``{"ok": true}`` once ``reasoning_gym`` is imported and the task's
  scorer (``reasoning_gym.get_score_answer_fn(task)``) is built; it is kept for the worker's lifetime.
* ``{"op": "gym", "jobs": [{"task": str, "answer": str, "entry": dict}, ...]}`` -> one message per job, in
  order, each sent as soon as that job is scored: ``{"score": float}``, the scorer's
  ``score_answer(answer, entry)``. One request for a whole batch keeps the common case at one round trip,
  while the parent still gives each job its own deadline.

An exception inside math-verify or a scorer is answered with ``{"ok": false, "error": "..."}`` (for that
job alone). EOF on stdin ends the worker, so it never outlives its parent.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from collections.abc import Callable, Iterator
from functools import cache, lru_cache
from typing import Any, BinaryIO

HEADER = struct.Struct(">I")
MEMORY_LIMIT_BYTES = 8 * 1024**3


def write_message(stream: BinaryIO, message: dict[str, Any]) -> None:
    """Write one length-prefixed JSON message, whole, and flush it.

    Both ends write to unbuffered pipes, where a write may take only part of the data: a message larger than
    the pipe waits for the reader, and a signal handled meanwhile ends the write with what fitted so far.
    """
    payload = json.dumps(message, ensure_ascii=True).encode("ascii")
    data = memoryview(HEADER.pack(len(payload)) + payload)
    while data:
        data = data[stream.write(data) :]
    stream.flush()


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    chunks = []
    while n > 0:
        chunk = stream.read(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_message(stream: BinaryIO) -> dict[str, Any] | None:
    """Read one message (blocking); None at EOF."""
    header = _read_exact(stream, HEADER.size)
    if header is None:
        return None
    payload = _read_exact(stream, HEADER.unpack(header)[0])
    return None if payload is None else json.loads(payload)


def main() -> None:
    """Serve requests until stdin closes."""
    # Answers go to a private copy of stdout; anything a library prints lands on stderr instead.
    channel = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    requests = sys.stdin.buffer

    # The parent enforces the deadline by killing this process, so math-verify's signal timeouts are off;
    # silence the warning it logs about that (once per process).
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from sympy import Basic, MatrixBase

    # The parent sends a completion's last box alone (math.py's _answer_text), so boxed answers get the top
    # priority here; without a box, math-verify falls back to its usual anchors ("answer is ...", last
    # $...$, last number).
    pred_config = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

    @lru_cache(maxsize=4096)
    def parse_gold(gold: str) -> list:
        # As in the paper: the gold answer is wrapped in \boxed{} before parsing.
        return parse("\\boxed{" + gold + "}", parsing_timeout=None)

    @cache
    def gym_scorer(task: str) -> Callable[[str, dict[str, Any]], float]:
        import reasoning_gym  # only in workers that score gym tasks: it takes about a second to import

        return reasoning_gym.get_score_answer_fn(task)

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] == "gym_load":
            gym_scorer(request["task"])
            return {"ok": True}
        gold = parse_gold(request["gold"])
        if request["op"] == "gold":
            return {"ok": any(isinstance(g, (Basic, MatrixBase)) for g in gold)}
        pred = parse(
            request["pred"],
            extraction_config=pred_config,
            extraction_mode="first_match",
            parsing_timeout=None,
        )
        return {"ok": bool(verify(gold, pred, timeout_seconds=None))}

    # Cap the address space so that a runaway job fails with MemoryError (scored 0.0) instead of
    # swapping the training node; best effort, where the platform supports it.
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, hard))
    except (ImportError, ValueError, OSError):
        pass

    # Warm up (regex compilation, ANTLR and SymPy lazy imports) before reporting ready, so that the first
    # real job's deadline is not spent on it.
    handle({"op": "verify", "pred": "\\boxed{\\frac{1}{2}}", "gold": "0.5"})
    write_message(channel, {"ready": True})

    def guarded(job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        try:
            return job()
        except Exception as exc:  # noqa: BLE001 (reported to the parent, which counts it and scores 0.0)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}

    def gym_score(job: dict[str, Any]) -> dict[str, Any]:
        return {"score": float(gym_scorer(job["task"])(job["answer"], job["entry"]))}

    def serve(request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if request.get("op") == "gym":
            for job in request["jobs"]:
                yield guarded(lambda: gym_score(job))  # noqa: B023 (called at once)
        else:
            yield guarded(lambda: handle(request))

    while (request := read_message(requests)) is not None:
        for response in serve(request):
            write_message(channel, response)


if __name__ == "__main__":
    main()
