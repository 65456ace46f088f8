"""Paired statistics of a label-efficiency study (tools/label_efficiency.py): pre-trained minus scratch, per seed.

Each labelled count gives ``n`` pairs (one per seed, the same labelled subset and seed for both inits), so the
tests are paired: the t-test on the differences (``scipy.stats.ttest_rel``), the Wilcoxon signed-rank test
(``scipy.stats.wilcoxon``, exact for small n), a t-based 95 % confidence interval of the mean difference, and
Holm's step-down correction of the p values across counts (one family per metric and init pair).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

__all__ = ["PairedResult", "mean_ci", "holm", "paired_test"]


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided t interval ``mean -+ t_{n-1} * sd / sqrt(n)``; (mean, nan, nan) for one value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p values, in the input's order (NaN stays NaN and does not count in the family).

    Sorted ascending, the i-th (0-based) of m gets ``max_{j<=i} min(1, (m - j) * p_(j))``: the step-down
    procedure that rejects at level alpha exactly where the adjusted p <= alpha.
    """
    finite = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    out = [math.nan] * len(pvalues)
    m, running = len(finite), 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


@dataclass(frozen=True)
class PairedResult:
    """A paired comparison ``a - b``: n pairs, mean difference with its CI, t statistic and the two p values."""

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    t: float
    p_t: float
    p_wilcoxon: float


def paired_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedResult:
    """Paired t-test and Wilcoxon signed-rank test of ``a - b`` (two-sided), and the CI of the mean difference.

    With fewer than 2 pairs, or all differences zero, the tests are undefined: NaN (not an error, so a study
    with one seed still writes its table).
    """
    if len(a) != len(b):
        raise ValueError(f"paired_test needs pairs: {len(a)} values against {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean, low, high = mean_ci(diffs, confidence)
    t = p_t = p_w = math.nan
    if len(diffs) >= 2 and any(d != 0 for d in diffs):
        res = stats.ttest_rel(a, b)
        t, p_t = float(res.statistic), float(res.pvalue)
        p_w = float(stats.wilcoxon(a, b).pvalue)
    return PairedResult(len(diffs), mean, low, high, t, p_t, p_w)
