"""Pass@k and friends: pure functions over sample counts and per-problem rollout records.

Shape symbols: P problems, n samples per problem, c correct samples of a problem.

``pass_at_k`` is the unbiased estimator of Chen et al. (2021) used by the paper (PAPER.md, "Evaluation"):

    pass@k = 1 - C(n - c, k) / C(n, k)

computed in the product form ``1 - prod_{i = n-c+1}^{n} (1 - k / i)``, which never forms a binomial
coefficient and so stays accurate in float64 for n in the thousands (C(1024, 512) overflows a double).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "OVERALL",
    "compute_metrics",
    "default_ks",
    "flatten_metrics",
    "mean_at_n",
    "num_correct",
    "pass_at_k",
]

# Name of the pseudo-benchmark that pools every problem of a run.
OVERALL = "all"


def _as_int_array(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == bool or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise ValueError(f"{name} must be an integer or an array of integers, got {value!r}")
    whole = np.all(np.isfinite(array)) and np.all(array == np.round(array))
    if np.issubdtype(array.dtype, np.floating) and not whole:
        raise ValueError(f"{name} must hold whole numbers, got {value!r}")
    return array.astype(np.int64)


def pass_at_k(n: Any, c: Any, k: Any) -> float | np.ndarray:
    """Unbiased pass@k estimate(s): the probability that at least one of k samples drawn without
    replacement from n samples, c of them correct, is correct.

    Args:
        n: samples per problem, an int or an array of shape (P,).
        c: correct samples per problem, same shape as ``n`` (or broadcastable to it).
        k: the k of pass@k, an int or an array broadcastable to ``n``.

    Returns:
        A float when every argument is a scalar, else a float64 array of the broadcast shape (P,).

    Raises:
        ValueError: a value is negative or not a whole number, k < 1, n < 1, c > n or k > n. The
            message names the offending values.
    """
    scalar = all(np.ndim(x) == 0 for x in (n, c, k))
    n_arr, c_arr, k_arr = (_as_int_array(name, x) for name, x in (("n", n), ("c", c), ("k", k)))
    n_arr, c_arr, k_arr = np.broadcast_arrays(n_arr, c_arr, k_arr)
    checks = [
        (n_arr < 1, "n must be >= 1"),
        (c_arr < 0, "c must be >= 0"),
        (k_arr < 1, "k must be >= 1"),
        (c_arr > n_arr, "c (correct samples) must be <= n (samples)"),
        (k_arr > n_arr, "k must be <= n: pass@k needs at least k samples per problem"),
    ]
    for bad, message in checks:
        if np.any(bad):
            i = tuple(int(j) for j in np.argwhere(bad)[0])  # ints: numpy 2 prints np.int64(1) in a tuple
            where = "" if scalar else f" at index {i if len(i) > 1 else i[0]}"
            raise ValueError(f"{message}; got n={n_arr[i]}, c={c_arr[i]}, k={k_arr[i]}{where}")

    # Factor i of the product runs over i = n-c+1 .. n; factors outside that range are 1.
    # If n - c < k the factor i = k lies in the range and is exactly 0, so pass@k = 1 exactly.
    max_n = int(n_arr.max()) if n_arr.size else 1
    i = np.arange(1, max_n + 1, dtype=np.float64)  # (n_max,)
    n_e, c_e, k_e = (x[..., None] for x in (n_arr, c_arr, k_arr))  # (..., 1)
    in_range = (i > n_e - c_e) & (i <= n_e)  # (..., n_max)
    factors = np.where(in_range, 1.0 - k_e / i, 1.0)  # (..., n_max)
    result = 1.0 - np.prod(factors, axis=-1)  # (...)
    return float(result) if scalar else result


def num_correct(scores: Sequence[float], threshold: float = 1.0) -> int:
    """Number of samples whose score reaches ``threshold`` (a 0/1 verifier: the number of 1s)."""
    return sum(1 for s in scores if s >= threshold)


def mean_at_n(n: Any, c: Any) -> float:
    """Average accuracy over problems, mean(c / n): the expected accuracy of one sample (= mean pass@1)."""
    n_arr, c_arr = np.broadcast_arrays(_as_int_array("n", n), _as_int_array("c", c))
    if np.any(n_arr < 1) or np.any(c_arr < 0) or np.any(c_arr > n_arr):
        raise ValueError(f"need 0 <= c <= n and n >= 1; got n={n!r}, c={c!r}")
    return float(np.mean(c_arr / n_arr))


def default_ks(n: int) -> list[int]:
    """The ks reported for n samples: the powers of two up to n, then n itself if it is not one.

    ``default_ks(32) == [1, 2, 4, 8, 16, 32]``; ``default_ks(12) == [1, 2, 4, 8, 12]``: the largest
    k always uses every sample, which is the number a reader wants most.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks = [2**e for e in range(int(math.log2(n)) + 1)]
    return ks if ks[-1] == n else [*ks, n]


def _group_metrics(
    records: Sequence[Mapping[str, Any]], ks: Sequence[int], threshold: float
) -> dict[str, Any]:
    n = np.array([len(r["scores"]) for r in records])
    c = np.array([num_correct(r["scores"], threshold) for r in records])
    out: dict[str, Any] = {
        "num_problems": len(records),
        "n": int(n.min()) if int(n.min()) == int(n.max()) else [int(n.min()), int(n.max())],
        "mean@n": mean_at_n(n, c),
        "mean_score": float(np.mean([np.mean(r["scores"]) for r in records])),
    }
    for k in ks:
        out[f"pass@{k}"] = float(np.mean(pass_at_k(n, c, k)))
    return out


def compute_metrics(
    records: Iterable[Mapping[str, Any]], ks: Sequence[int] | None = None, threshold: float = 1.0
) -> dict[str, Any]:
    """Metrics per benchmark and over all problems from rollout records.

    Args:
        records: one mapping per problem with keys ``source`` (benchmark name), optionally ``dataset`` (the
            name of the dataset argument it came from, which groups it when present: two files of one source
            stay two rows) and ``scores`` (the n scores of its samples), as written to ``rollouts.jsonl``.
        ks: the ks of pass@k; default ``default_ks(n)`` for the smallest n of any problem.
        threshold: a sample is correct when its score is >= threshold.

    Returns:
        ``{"ks": [...], "threshold": t, "sources": {name: group}, "all": group}`` where a group is
        ``{"num_problems", "n", "mean@n", "mean_score", "pass@1", "pass@2", ...}``; values are
        fractions in [0, 1]. "all" pools every problem, so large benchmarks weigh more (micro-average).
    """
    records = list(records)
    if not records:
        raise ValueError("no rollout records to compute metrics from")
    empty = [r.get("id", i) for i, r in enumerate(records) if len(r["scores"]) == 0]
    if empty:
        raise ValueError(f"{len(empty)} problem(s) have no scored samples, e.g. {empty[:3]}")
    min_n = min(len(r["scores"]) for r in records)
    ks = sorted(set(ks)) if ks else default_ks(min_n)
    if ks[0] < 1 or ks[-1] > min_n:
        raise ValueError(f"every k must be in [1, {min_n}] (the fewest samples of any problem); got ks={ks}")
    by_source: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_source.setdefault(str(r.get("dataset") or r["source"]), []).append(r)
    return {
        "ks": list(ks),
        "threshold": threshold,
        "sources": {name: _group_metrics(group, ks, threshold) for name, group in sorted(by_source.items())},
        OVERALL: _group_metrics(records, ks, threshold),
    }


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
    """Slash-namespaced scalars for a logger: ``{"eval/math500/pass@1": 0.61, "eval/all/pass@1": ...}``."""
    flat: dict[str, float] = {}
    groups = {**metrics["sources"], OVERALL: metrics[OVERALL]}
    for name, group in groups.items():
        for key, value in group.items():
            if key.startswith(("pass@", "mean")):
                flat[f"{prefix}/{name}/{key}"] = float(value)
    return flat
