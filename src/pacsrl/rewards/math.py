"""Math verifier: a completion earns 1.0 when its last ``\\boxed{}`` answer equals the gold answer.

Equivalence is math-verify's (https://github.com/huggingface/Math-Verify), with the gold answer wrapped in
``\\boxed{}`` as in the PACS paper. Which answer is judged is decided here, not by math-verify: a completion
with a box is judged on its last box alone (math-verify, given the whole text, would merge boxes written
within about 70 characters of each other, "\\boxed{3}, \\boxed{5}", into one set answer); one without a box
is judged by math-verify's fallbacks ("answer is ...", last ``$...$``, last number).

Every check runs in a worker subprocess (:mod:`pacsrl.rewards._pool`) that is killed when it overruns its
deadline, so a reward call never raises on completion text, never hangs, and works from any thread or process
(math-verify's own ``signal.alarm`` timeouts do not).

A check that times out or crashes scores 0.0 and is counted in :func:`verifier_stats`; the reward
function also reports the fraction per batch through TRL's ``log_metric`` hook.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pacsrl.rewards._pool import (
    Outcome,
    VerifierStats,
    WorkerPool,
    count_job,
    get_pool,
    preview,
    reset_verifier_stats,
    shutdown_workers,
    timeout_count,
    validate_timeout,
    verifier_stats,
)
from pacsrl.rewards.completions import completion_text

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_CHARS = 10_000
# The box commands math-verify reads (latex2sympy2_extended's extract_boxed_content handles both).
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BOX_OPENING = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACES = re.compile(r"[{}]")


# --------------------------------------------------------------------------------------------------------
# Jobs


def _answer_text(text: str, max_chars: int) -> str:
    """The text math-verify is given for a completion: its last box alone, or, without a box, its tail.

    * The last ``\\boxed{...}`` (or ``\\fbox{...}``) is found by its command's last occurrence and a
      brace-matching scan, and sent as ``\\boxed{<its content>}``: earlier boxes, however close, are never
      seen. Braces are counted as math-verify counts them (``\\{`` and ``\\}`` included).
    * A last box with no opening brace (``\\boxed 5``) or whose braces do not close within ``max_chars``
      characters (a truncated completion) is sent as the text from its command on, at most ``max_chars``
      characters: earlier boxes still never count, and math-verify reads what it can from that text.
    * Without a box, the last ``max_chars`` characters, where math-verify's fallbacks look ("answer is ...",
      last ``$...$``, last number); texts up to ``max_chars`` are unchanged.

    Linear in ``len(text)``, and the scan reads at most ``max_chars`` characters, so any input is cheap.
    """
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start == -1:
        return text[-max_chars:]
    tail = text[start : start + max_chars]
    opening = _BOX_OPENING.match(tail)
    if opening is not None:
        depth = 0
        for brace in _BRACES.finditer(tail, opening.end() - 1):
            depth += 1 if brace.group() == "{" else -1
            if depth == 0:
                return "\\boxed{" + tail[opening.end() : brace.start()] + "}"
    return tail


def _check(pool: WorkerPool, message: dict[str, Any], timeout: float, what: str) -> tuple[bool, Outcome]:
    """Run one job; (answer, outcome). Timeouts and errors answer False and are counted and logged."""
    response = pool.run(message, timeout)
    if response is None:
        stats = count_job("timeout")
        logger.warning(
            "math verification of %s timed out after %.3g s and scores 0.0 (%d timeouts in %d checks so far)",
            what,
            timeout,
            stats.timeouts,
            stats.calls,
        )
        return False, "timeout"
    if "error" in response:
        stats = count_job("error")
        logger.warning(
            "math verification of %s failed and scores 0.0: %s (%d errors in %d checks so far)",
            what,
            response["error"],
            stats.errors,
            stats.calls,
        )
        return False, "error"
    count_job("ok")
    return bool(response["ok"]), "ok"


def _verify(text: str, gold: str, timeout: float, max_chars: int, pool: WorkerPool) -> tuple[bool, Outcome]:
    pred = _answer_text(text, max_chars)
    message = {"op": "verify", "pred": pred, "gold": gold}
    return _check(pool, message, timeout, f"completion {preview(pred)} against gold {preview(gold)}")


def verify_answer(completion_text: str, gold: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether the final answer of ``completion_text`` equals ``gold`` (the math reward as a bool).

    The final answer is the last ``\\boxed{...}`` alone, or math-verify's fallback when there is no box.
    Never raises on the text itself and returns within about ``timeout`` seconds (plus the start-up of a
    worker subprocess, about a second, on first use and after a timeout); a timeout counts as False.
    """
    if not isinstance(completion_text, str) or not isinstance(gold, str):
        raise TypeError(
            "verify_answer expects two strings, got "
            f"{type(completion_text).__name__} and {type(gold).__name__}"
        )
    return _verify(completion_text, gold, validate_timeout(timeout), DEFAULT_MAX_CHARS, get_pool(1))[0]


def find_unparseable_gold(answers: Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> list[tuple[int, str]]:
    """Return ``(row index, gold text)`` for every gold answer math-verify cannot parse into a math object.

    Call it once when a dataset is prepared. Such a gold answer (empty, malformed LaTeX, ...) could only
    match a completion by exact string equality, so those rows should be fixed or dropped. A gold answer
    whose parsing times out is reported too.

    Raises:
        TypeError: if an answer is not a string.
    """
    timeout = validate_timeout(timeout)
    pool = get_pool(1)
    bad = []
    for i, gold in enumerate(answers):
        if not isinstance(gold, str):
            raise TypeError(f"gold answer at row {i} is a {type(gold).__name__}, expected str: {gold!r}")
        ok, _ = _check(pool, {"op": "gold", "gold": gold}, timeout, f"gold answer at row {i} {preview(gold)}")
        if not ok:
            bad.append((i, gold))
    return bad


# --------------------------------------------------------------------------------------------------------
# TRL reward function


class MathReward:
    """TRL reward function: 1.0 when a completion's last ``\\boxed{}`` equals the row's gold answer, else 0.0.

    Only the last box is judged, even when boxes are listed together ("\\boxed{3}, \\boxed{5}" answers 5);
    a completion without a box is judged by math-verify's fallbacks ("answer is ...", last ``$...$``, last
    number). Build it with :func:`make_math_reward`. Called by TRL as ``func(prompts=..., completions=...,
    completion_ids=..., answer=[...], ...)``; it reads ``completions`` and the dataset column ``answer``.
    Instances are picklable and can be shared by threads.
    """

    def __init__(self, timeout: float, num_workers: int, max_chars: int, name: str) -> None:
        self.timeout = timeout
        self.num_workers = num_workers
        self.max_chars = max_chars
        self.__name__ = name

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.__name__!r}, timeout={self.timeout}, "
            f"num_workers={self.num_workers}, max_chars={self.max_chars})"
        )

    def __call__(self, completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
        """Score each completion against its gold answer.

        Args:
            completions: N completions, strings or chat-message lists (the last assistant message is read).
            answer: N gold answers (LaTeX without ``\\boxed{}``), the dataset column ``answer``.
            **kwargs: other TRL columns; ``log_metric``, when TRL passes it, receives
                ``<name>/timeout_frac``, the fraction of this batch that timed out.

        Returns:
            N rewards in {0.0, 1.0}.
        """
        if len(completions) != len(answer):
            raise ValueError(
                f"{self.__name__}: got {len(completions)} completions but {len(answer)} gold answers "
                "(column 'answer'); they must match one to one"
            )
        texts = [completion_text(c, i) for i, c in enumerate(completions)]
        for i, gold in enumerate(answer):
            if not isinstance(gold, str):
                raise TypeError(
                    f"{self.__name__}: gold answer {i} is a {type(gold).__name__} ({gold!r}); "
                    "the 'answer' column must hold strings"
                )
        pool = get_pool(self.num_workers)

        def check(i: int) -> tuple[bool, Outcome]:
            return _verify(texts[i], answer[i], self.timeout, self.max_chars, pool)

        if self.num_workers == 1 or len(texts) <= 1:
            results = [check(i) for i in range(len(texts))]
        else:
            with ThreadPoolExecutor(max_workers=min(self.num_workers, len(texts))) as executor:
                results = list(executor.map(check, range(len(texts))))

        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and texts:
            timeouts = sum(outcome == "timeout" for _, outcome in results)
            log_metric(f"{self.__name__}/timeout_frac", timeouts / len(texts))
        return [float(ok) for ok, _ in results]


def make_math_reward(
    timeout: float = DEFAULT_TIMEOUT,
    num_workers: int = 1,
    max_chars: int = DEFAULT_MAX_CHARS,
    name: str = "math_reward",
) -> MathReward:
    """Build a math reward function for TRL.

    Args:
        timeout: seconds allowed per completion (parse + compare); a timeout scores 0.0 and is counted.
        num_workers: verifier subprocesses used per process (a batch is spread over them). Each holds a
            Python interpreter with SymPy, about 100 MB.
        max_chars: the longest box content read (a last box that does not close within it is read as
            the text from it on, cut to ``max_chars``); completions without a box are cut to their last
            ``max_chars`` characters before parsing. Real answers are unaffected.
        name: the function's ``__name__``, which TRL uses to name the reward in its logs.

    Raises:
        ValueError: on a non-positive timeout, num_workers < 1 or max_chars < 1000.
    """
    timeout = validate_timeout(timeout)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1000:
        raise ValueError(f"max_chars must be an integer >= 1000 (room for an answer), got {max_chars!r}")
    if not name.isidentifier():
        raise ValueError(f"name must be a Python identifier (TRL logs it as a metric name), got {name!r}")
    return MathReward(timeout, num_workers, max_chars, name)


math_reward = make_math_reward()
"""The math reward with default settings (5 s per completion, one worker subprocess per process)."""


# VerifierStats, verifier_stats, ... are the counters of every verifier (pacsrl.rewards._pool), also importable
# from here
__all__ = [
    "DEFAULT_MAX_CHARS",
    "DEFAULT_TIMEOUT",
    "MathReward",
    "VerifierStats",
    "find_unparseable_gold",
    "make_math_reward",
    "math_reward",
    "reset_verifier_stats",
    "shutdown_workers",
    "timeout_count",
    "verifier_stats",
    "verify_answer",
]
