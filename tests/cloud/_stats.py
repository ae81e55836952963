"""Chi-square goodness of fit without scipy (regularised incomplete gamma by series)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df)."""
    if x <= 0:
        return 1.0
    a, z = df / 2.0, x / 2.0
    term = 1.0 / a
    total = term
    n = 1
    while term > total * 1e-15 and n < 100_000:
        term *= z / (a + n)
        total += term
        n += 1
    lower = math.exp(a * math.log(z) - z - math.lgamma(a)) * total  # regularised P(a, z)
    return max(0.0, 1.0 - lower)


def chi_square_pvalue(observed: Sequence[int], expected_probs: Sequence[float], *, min_expected: float = 5.0) -> float:
    """Pearson's test; cells with expected count < `min_expected` are pooled into one."""
    n = sum(observed)
    stat = 0.0
    cells = 0
    pooled_o, pooled_e = 0.0, 0.0
    for o, p in zip(observed, expected_probs, strict=True):
        e = n * p
        if e < min_expected:
            pooled_o += o
            pooled_e += e
            continue
        stat += (o - e) ** 2 / e
        cells += 1
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
        cells += 1
    elif pooled_o > 0:
        return 0.0  # observed something the target gives probability 0
    return chi2_sf(stat, max(cells - 1, 1))
