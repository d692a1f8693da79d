"""Statistics over seeds for the benchmarks: Student-t intervals, and paired tests between two methods.

Pure functions over lists of floats (no numpy, no scipy), tested against t-tables, hand-worked values and brute-force
enumerations in ``tests/test_bench_stats.py``. ``bench/learning.py`` reports t-intervals of each method over seeds;
``bench/study.py`` compares methods by their per-seed differences (paired seeds: seed s gives every method the same
prompts, initial model and sampling seed), with

- ``paired_difference``: the mean difference, its 95% t-interval, and the exact sign-test and Wilcoxon signed-rank
  p-values (two-sided);
- ``steps_to_reach``: the first curve step at which a held-out curve reaches a target.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------------
# Student-t intervals


def _t_two_sided_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4), t >= 0."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        # (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 2 terms in the sum
        term, total = 1.0, 0.0
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * j) / (2 * j + 1)
        return 2.0 / math.pi * (theta + (s * c * total if df > 1 else 0.0))
    term, total = 1.0, 0.0  # sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df/2 terms
    for j in range(1, df // 2 + 1):
        total += term
        term *= c * c * (2 * j - 1) / (2 * j)
    return s * total


def t_quantile(confidence: float, df: int) -> float:
    """The t such that P(|T| <= t) = ``confidence`` for Student's t with ``df`` degrees of freedom
    (e.g. 12.706 for 95% and df=1, 4.303 for df=2, 1.96 as df grows). Bisection on the exact CDF."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    if df < 1:
        raise ValueError(f"df={df} must be >= 1")
    lo, hi = 0.0, 1.0
    while _t_two_sided_cdf(hi, df) < confidence:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_two_sided_cdf(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the t confidence interval of the mean: ``mean +- t * s / sqrt(n)`` with the
    sample standard deviation s (n - 1 in the denominator). One value gives a half-width of NaN (unknown)."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(confidence, n - 1) * sd / math.sqrt(n)


# --------------------------------------------------------------------------------------------------
# Paired tests

# Wilcoxon's exact null distribution is enumerated over all 2^n sign patterns; 2^20 is about a second.
WILCOXON_EXACT_MAX = 20


def sign_test_p(differences: Sequence[float]) -> float:
    """Exact two-sided sign test: with the zero differences dropped (n left, m of them positive), the chance
    under Binomial(n, 1/2) of a split at least as uneven as m : n - m, i.e. min(1, 2 P(X <= min(m, n - m))).
    1.0 when every difference is zero."""
    positive = sum(1 for d in differences if d > 0)
    n = sum(1 for d in differences if d != 0)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(positive, n - positive) + 1))
    return min(1.0, 2 * tail / 2**n)


def _midranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values`` (ascending), tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2 + 1  # mean of the ranks start+1 .. end+1
        start = end + 1
    return ranks


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Exact two-sided Wilcoxon signed-rank test. Zero differences are dropped (Wilcoxon's convention); the others
    are ranked by absolute value (ties get mid-ranks) and W+ is the rank sum of the positive ones. Under the null
    each sign is + or - with probability 1/2 independently, so the p-value is the share of the 2^n sign patterns
    whose W+ is at least as far from its mean n(n+1)/4 as the observed one. 1.0 when every difference is zero;
    NaN beyond ``WILCOXON_EXACT_MAX`` non-zero differences (use the t-interval there)."""
    nonzero = [d for d in differences if d != 0]
    n = len(nonzero)
    if n == 0:
        return 1.0
    if n > WILCOXON_EXACT_MAX:
        return math.nan
    ranks = _midranks([abs(d) for d in nonzero])
    observed = sum(r for r, d in zip(ranks, nonzero) if d > 0)
    centre = sum(ranks) / 2
    distance = abs(observed - centre) - 1e-9  # rank sums are multiples of 1/2: a tolerance for float sums
    extreme = 0
    for signs in itertools.product((0, 1), repeat=n):
        w = sum(r for r, s in zip(ranks, signs) if s)
        extreme += abs(w - centre) >= distance
    return extreme / 2**n


@dataclass(frozen=True)
class PairedDifference:
    """Per-seed differences a - b of one quantity, and what they say.

    ``mean`` and ``half_width``: the mean difference and its 95% t-interval half-width; ``significant`` when that
    interval excludes zero. ``wins``: seeds with a > b, of ``n``. ``sign_p`` / ``wilcoxon_p``: exact two-sided
    p-values. ``seeds`` and ``differences``: the paired values, seed by seed.
    """

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    half_width: float
    wins: int
    sign_p: float
    wilcoxon_p: float

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def significant(self) -> bool:
        return math.isfinite(self.half_width) and (self.low > 0 or self.high < 0)


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = 0.95) -> PairedDifference:
    """Compare method a with method b on the seeds both have (``{seed: value}`` each): differences a - b."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError("paired_difference: the two methods share no seed")
    differences = tuple(a[s] - b[s] for s in seeds)
    mean, half = t_interval(differences, confidence)
    return PairedDifference(
        seeds=seeds,
        differences=differences,
        mean=mean,
        half_width=half,
        wins=sum(1 for d in differences if d > 0),
        sign_p=sign_test_p(differences),
        wilcoxon_p=wilcoxon_p(differences),
    )


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first step of ``curve`` (``(step, value)`` pairs in step order) whose value is at least ``target``;
    None if it never gets there."""
    for step, value in curve:
        if value >= target:
            return step
    return None


def median_steps(steps: Sequence[int | None]) -> float | None:
    """Median over seeds of ``steps_to_reach`` results, a seed that never reached counting as infinitely many
    steps; None when the median itself is such a seed (half or more never reached)."""
    if not steps:
        raise ValueError("median_steps needs at least one value")
    ordered = sorted(math.inf if s is None else float(s) for s in steps)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return None if math.isinf(median) else median


__all__ = [
    "PairedDifference",
    "median_steps",
    "paired_difference",
    "sign_test_p",
    "steps_to_reach",
    "t_interval",
    "t_quantile",
    "wilcoxon_p",
]
