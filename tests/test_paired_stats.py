"""selfmedmae_components.paired_stats on inputs whose answer is known: the paired t and its p against scipy and
against the formula, the exact Wilcoxon p of a small sample, the t interval by hand, Holm's step-down by hand."""

import math

import pytest
from scipy import stats

from selfmedmae_components.paired_stats import holm, mean_ci, paired_test


def test_paired_t_equals_scipy_and_the_formula():
    a = [0.61, 0.55, 0.70, 0.52, 0.66, 0.58]
    b = [0.50, 0.56, 0.61, 0.47, 0.60, 0.49]
    r = paired_test(a, b)
    ref = stats.ttest_rel(a, b)
    assert r.t == pytest.approx(ref.statistic, rel=1e-12) and r.p_t == pytest.approx(ref.pvalue, rel=1e-12)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    assert r.t == pytest.approx(mean / se, rel=1e-9)
    assert r.p_t == pytest.approx(2 * stats.t.sf(mean / se, len(d) - 1), rel=1e-9)
    assert r.p_wilcoxon == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-12)
    assert r.n == 6 and r.mean_diff == pytest.approx(mean)


def test_wilcoxon_exact_p_of_five_positive_pairs():
    # all 5 differences positive: the most extreme of 2^5 equally likely sign patterns, two-sided p = 2/32
    r = paired_test([2, 3, 4, 5, 6], [1, 1, 1, 1, 1])
    assert r.p_wilcoxon == pytest.approx(2 / 32)


def test_t_interval_by_hand():
    # differences 1..5: mean 3, sd sqrt(2.5), t(0.975, 4) = 2.7764451 (tables)
    mean, low, high = mean_ci([1, 2, 3, 4, 5])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), rel=1e-7)
    r = paired_test([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    assert (r.mean_diff, r.ci_low, r.ci_high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), rel=1e-7)


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.2]) == [0.2]
    out = holm([0.01, math.nan, 0.02])  # NaN (an undefined test) is not part of the family
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_undefined_cases_give_nan_not_errors():
    one = paired_test([0.5], [0.4])
    assert one.mean_diff == pytest.approx(0.1) and math.isnan(one.ci_low) and math.isnan(one.p_t)
    same = paired_test([0.5, 0.6], [0.5, 0.6])
    assert same.mean_diff == 0 and math.isnan(same.p_t) and math.isnan(same.p_wilcoxon)
    with pytest.raises(ValueError, match="pairs"):
        paired_test([1, 2], [1])
