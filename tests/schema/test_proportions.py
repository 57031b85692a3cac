"""Shares of k in n (core.schema.proportions): against scipy.stats, which they avoid importing."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binom

from core.schema.proportions import binomial_p, wilson_interval


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    lo, hi = wilson_interval(0, 50)
    assert lo == 0 and hi == pytest.approx(0.0713, abs=1e-3)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (3, 7), (50, 100), (1, 5000), (4999, 5000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_interval_is_scipys(k, n, confidence):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert wilson_interval(k, n, confidence=confidence) == pytest.approx(
        (ci.low, ci.high), abs=1e-12
    )


def test_the_binomial_p_value_is_the_upper_tail():
    assert binomial_p(3, 70, 0.01) == pytest.approx(
        sum(binom.pmf(k, 70, 0.01) for k in range(3, 71))
    )
    assert binomial_p(0, 70, 0.01) == 1.0
    assert math.isnan(binomial_p(0, 0, 0.01))
