"""The benchmarks' Student-t intervals over seeds (``bench/significance.py``, used by ``bench/learning.py`` and
``bench/study.py``), against printed t-tables and hand-worked values."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from significance import t_interval, t_quantile


@pytest.mark.parametrize(
    ("df", "expected"),
    [
        (1, math.tan(0.475 * math.pi)),  # Cauchy: t = tan(pi (0.975 - 1/2)) = 12.7062...
        (
            2,
            0.95 / math.sqrt(2 * 0.975 * 0.025),
        ),  # df=2: t = (2p - 1) / sqrt(2 p (1 - p)), p = 0.975 -> 4.3027
        (3, 3.182446305284263),  # printed t-tables: 3.182
        (4, 2.7764451051977987),  # 2.776
        (10, 2.2281388519649385),  # 2.228
        (30, 2.0422724563012373),  # 2.042
    ],
)
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.95, df) == pytest.approx(expected, abs=1e-9)


def test_t_quantile_tends_to_normal_and_other_levels():
    assert t_quantile(0.95, 100) == pytest.approx(1.983971519, abs=1e-6)  # printed tables: 1.984
    assert 1.959963 < t_quantile(0.95, 5000) < t_quantile(0.95, 1000) < 1.9624  # -> z = 1.959964 as df grows
    assert t_quantile(0.90, 1) == pytest.approx(math.tan(0.45 * math.pi), abs=1e-9)  # 6.3138
    with pytest.raises(ValueError, match="confidence"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.95, 0)


def test_t_interval_hand_values():
    # [1, 2, 3]: mean 2, sample sd 1, half-width t(0.95, 2) / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302652729911275 / math.sqrt(3), abs=1e-9)
    # [0.2, 0.4]: mean 0.3, sd sqrt(0.02) = 0.141421, half 12.7062 * 0.141421 / sqrt(2) = 1.27062
    mean, half = t_interval([0.2, 0.4])
    assert mean == pytest.approx(0.3)
    assert half == pytest.approx(1.2706204736174698, abs=1e-9)
    assert t_interval([5.0, 5.0, 5.0]) == (5.0, 0.0)
    mean, half = t_interval([0.7])
    assert mean == 0.7 and math.isnan(half)
    with pytest.raises(ValueError):
        t_interval([])
