"""A share of k in n: its Wilson interval, and how surprising k would be at a known rate.

Closed forms and ``scipy.special`` rather than ``scipy.stats``, whose import cost a second of
the first summary a server drew.
"""

from __future__ import annotations

import math
from statistics import NormalDist


def wilson_interval(k: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n; (nan, nan) when n == 0.

    The closed form scipy's ``binomtest(k, n).proportion_ci(method="wilson")`` computes
    (tests/schema/test_proportions.py checks they agree), without importing scipy.stats at start-up.
    """
    if n == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2n = k / n, z * z / n
    center = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    return max(0.0, center - half), min(1.0, center + half)


def binomial_p(calls: int, cells: int, rate: float) -> float:
    """P(X >= calls) for X ~ Binomial(cells, rate): how surprising ``calls`` would be in a
    healthy patient; 1.0 for no calls, NaN for no cells."""
    if cells <= 0:
        return math.nan
    if calls <= 0:
        return 1.0
    # why: scipy.special loads in a fifth of scipy.stats' second, which the first summary of
    # a server paid (1.8 s of the Score page's first 1,000 cells on a loaded machine)
    from scipy.special import bdtrc

    return float(bdtrc(calls - 1, cells, rate))  # = scipy.stats.binom.sf(calls - 1, ...)
