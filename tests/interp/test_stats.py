"""interp.stats against scipy on fixed data, and the properties the study reports rely on."""

import itertools

import numpy as np
import pytest
import scipy.stats

from interp import stats
from models.errors import InputError


@pytest.mark.parametrize("k,n", [(0, 10), (1, 16), (5, 16), (16, 16), (37, 64), (3, 200)])
def test_wilson_matches_scipy(k, n):
    e = stats.wilson(k, n)
    ci = scipy.stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert e.value == pytest.approx(k / n)
    assert e.lo == pytest.approx(ci.low, abs=1e-12) and e.hi == pytest.approx(ci.high, abs=1e-12)
    assert e.n == n
    assert (e.lo == 0.0) == (k == 0) and (e.hi == 1.0) == (k == n)  # exact ends, no 7e-18 from rounding


@pytest.mark.parametrize("table", [(5, 16, 0, 16), (3, 20, 9, 20), (0, 5, 0, 7), (12, 12, 1, 30), (7, 64, 4, 64)])
@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_fisher_exact_matches_scipy(table, alternative):
    k1, n1, k2, n2 = table
    want = scipy.stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative=alternative).pvalue
    assert stats.fisher_exact(k1, n1, k2, n2, alternative) == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs():
    for b, c in [(0, 0), (5, 0), (3, 9), (10, 10), (1, 20)]:
        want = 1.0 if b + c == 0 else scipy.stats.binomtest(b, b + c, 0.5).pvalue
        assert stats.mcnemar_exact(b, c) == pytest.approx(want, rel=1e-9)
    x = np.array([1] * 6 + [0] * 10 + [1] * 4)
    y = np.array([0] * 6 + [0] * 10 + [1] * 4)
    e = stats.paired_rate_difference(x, y)
    assert e.value == pytest.approx(6 / 20) and e.p == pytest.approx(scipy.stats.binomtest(6, 6).pvalue)
    assert e.lo > 0 and e.n == 20


def test_paired_difference_exact_sign_flips_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.4, 1, 10), rng.normal(0, 1, 10)
    for alt in ("two-sided", "greater", "less"):
        want = scipy.stats.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis),
                                            permutation_type="samples", alternative=alt, n_resamples=np.inf).pvalue
        assert stats.paired_difference(a, b, alternative=alt).p == pytest.approx(want, rel=1e-9)


def test_paired_difference_uses_the_per_item_difference():
    # a large shared item effect and a small consistent shift: paired is decisive, the unpaired comparison is not
    rng = np.random.default_rng(1)
    base = rng.normal(0, 5, 40)
    a, b = base + 0.3 + rng.normal(0, 0.05, 40), base
    paired, unpaired = stats.paired_difference(a, b), stats.mean_difference(a, b)
    assert paired.value == pytest.approx(unpaired.value)
    assert paired.lo > 0 and paired.p < 1e-3
    assert unpaired.lo < 0 < unpaired.hi and unpaired.p > 0.5


def test_mean_difference_permutation_p_close_to_scipy():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.5, 1, 30), rng.normal(0, 1, 25)
    want = scipy.stats.permutation_test((a, b), lambda x, y, axis: np.mean(x, axis) - np.mean(y, axis),
                                        n_resamples=20_000, random_state=0).pvalue
    # both are Monte Carlo over 20k relabellings (s.e. of each p ~0.005): agree within 4 s.e. of their difference
    assert stats.mean_difference(a, b, n_perm=20_000).p == pytest.approx(want, abs=0.03)


def test_bootstrap_interval_close_to_scipy_and_covers():
    rng = np.random.default_rng(3)
    x = rng.exponential(1.0, 60)
    e = stats.bootstrap(x, n_boot=20_000)
    ci = scipy.stats.bootstrap((x,), np.mean, method="percentile", n_resamples=20_000, random_state=0)
    assert e.lo == pytest.approx(ci.confidence_interval.low, abs=0.02)
    assert e.hi == pytest.approx(ci.confidence_interval.high, abs=0.02)
    # coverage of the true mean over repeated samples (nominal 0.95; percentile bootstrap runs a little low)
    hits = [stats.bootstrap(rng.normal(2.0, 1.0, 40), n_boot=2000, seed=s).excludes(2.0) for s in range(200)]
    assert 0.85 <= 1 - np.mean(hits) <= 0.99


def test_rate_difference_newcombe():
    e = stats.rate_difference(5, 16, 0, 16)
    # Newcombe's hybrid score interval (method 10), computed by hand from the two Wilson intervals
    a, b = stats.wilson(5, 16), stats.wilson(0, 16)
    assert e.lo == pytest.approx(5 / 16 - np.hypot(a.value - a.lo, b.hi - b.value))
    assert e.hi == pytest.approx(5 / 16 + np.hypot(a.hi - a.value, b.value - b.lo))
    assert e.p == pytest.approx(scipy.stats.fisher_exact([[5, 11], [0, 16]]).pvalue)


def test_holm_known_values_and_order():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    with pytest.raises(InputError, match="p-values"):
        stats.holm([0.1, float("nan")])


def test_null_test_percentile_band_and_p():
    null = np.arange(16, dtype=float)  # 0..15
    t = stats.null_test(20.0, null)
    assert t.percentile == 100 and t.p == pytest.approx(1 / 17) and t.k == 16
    assert t.band == pytest.approx(tuple(np.percentile(null, [5, 95])))
    inside = stats.null_test(7.0, null)
    assert inside.percentile == pytest.approx(100 * (7 + 0.5) / 16) and inside.p == pytest.approx(10 / 17)
    assert stats.null_test(-3.0, null, "less").p == pytest.approx(1 / 17)
    assert "null draws" in str(t)


def test_verdict_holm_and_generated_sentence():
    tests = {"strong": stats.Estimate(0.4, 0.2, 0.6, 64, p=0.001), "weak": stats.Estimate(0.1, -0.05, 0.25, 64, p=0.2),
             "borderline": stats.Estimate(0.2, 0.01, 0.4, 64, p=0.03)}
    v = stats.verdict(tests, "strong", what="controller vs constant")
    assert v.holds and "holds" in v.sentence and "controller vs constant" in v.sentence
    assert v.p_holm["strong"] == pytest.approx(0.003)
    # significant alone (0.03) but not after Holm over three cells (0.06)
    b = stats.verdict(tests, "borderline")
    assert not b.holds and "does not hold" in b.sentence and "Holm p 0.06" in b.sentence
    assert "primary" in b.table and b.table.count("exploratory") == 2
    # right significance, wrong direction
    assert not stats.verdict({"x": stats.Estimate(-0.4, -0.6, -0.2, 30, p=0.001)}, "x").holds
    assert stats.verdict({"x": stats.Estimate(-0.4, -0.6, -0.2, 30, p=0.001)}, "x", alternative="less").holds
    with pytest.raises(InputError, match="primary"):
        stats.verdict(tests, "missing")
    with pytest.raises(InputError, match="no p-value"):
        stats.verdict({"a": stats.Estimate(0.1, 0, 0.2, 3)}, "a")


def test_verdict_on_a_null_test():
    null = np.random.default_rng(0).normal(0, 1, 32)
    v = stats.verdict({"east": stats.null_test(5.0, null)}, "east")
    assert v.holds and "null 5-95%" in v.table
    assert not stats.verdict({"east": stats.null_test(0.5, null)}, "east").holds


def test_claims_and_tables():
    md = stats.claims_section([stats.Claim("EAST raises entropy", "+0.03 [-0.01, 0.07]", False),
                               stats.Claim("temperature raises it", "+0.2 [0.1, 0.3]", True),
                               stats.Claim("sampled mode", "valid rate 0.00", None)])
    assert md.count("\n") == 4 and "**does not hold**" in md and "not tested" in md
    assert "| 0.123 |" in stats.markdown_table(["x"], [[0.12345]])
    assert stats.markdown_table(["x", "y"], [["a | b", 1]]).splitlines()[2] == "| a \\| b | 1 |"
    with pytest.raises(InputError):
        stats.markdown_table(["a", "b"], [[1]])


@pytest.mark.parametrize("call", [
    lambda: stats.paired_difference([1.0, np.nan], [0.0, 0.0]),
    lambda: stats.paired_difference([1.0, 2.0], [0.0]),
    lambda: stats.bootstrap([]),
    lambda: stats.wilson(3, 2),
    lambda: stats.wilson(1.5, 4),
    lambda: stats.null_test(np.nan, [1.0, 2.0]),
    lambda: stats.null_test(1.0, [1.0, np.inf]),
    lambda: stats.paired_rate_difference([0, 2], [0, 1]),
    lambda: stats.bootstrap([1.0, 2.0], level=1.5),
    lambda: stats.paired_difference([1.0], [0.0], alternative="bigger"),
])
def test_bad_input_is_named(call):
    with pytest.raises(InputError):
        call()


def test_exact_sign_flip_enumerates_all_flips():
    d = np.array([1.0, 2.0, 3.0])
    flips = np.array([np.mean(np.array(s) * d) for s in itertools.product((1, -1), repeat=3)])
    want = 2 * min(np.mean(flips >= 2.0 - 1e-12), np.mean(flips <= 2.0 + 1e-12))
    assert stats.paired_difference(d, 0.0).p == pytest.approx(want)


def test_auroc_matches_sklearn_and_mann_whitney_and_resamples_within_class():
    from scipy.stats import mannwhitneyu
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(30), np.zeros(40)]
    s = np.round(rng.normal(size=70) + 0.8 * y, 1)  # rounding makes ties, which count half
    e = stats.auroc(s, y, n_boot=500)
    assert e.value == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    want_p = mannwhitneyu(s[y == 1], s[y == 0], alternative="greater", method="asymptotic", use_continuity=False).pvalue
    assert e.p == pytest.approx(want_p, rel=1e-9)
    assert e.lo < e.value < e.hi and e.n == 70 and e.hi - e.lo < 0.4
    noise = stats.auroc(rng.normal(size=70), y, n_boot=500)
    assert noise.lo < 0.5 < noise.hi  # no signal: the interval covers chance
    # two positives among many negatives: a resample that dropped a class would give NaN; within-class never does
    tiny = stats.auroc(np.r_[3.0, 2.0, rng.normal(size=20)], np.r_[1, 1, np.zeros(20)], n_boot=300)
    assert np.isfinite([tiny.lo, tiny.hi]).all() and tiny.value == 1.0


@pytest.mark.parametrize("scores,y,match", [
    (np.arange(4.0), [0, 1, 2, 1], "0/1 labels"),
    (np.arange(4.0), [0, 1, 1], "same length"),
    (np.arange(4.0), [0, 1, 1, 1], "2 items of each class"),
    (np.r_[0.0, np.nan, 1.0, 2.0], [0, 0, 1, 1], "NaN"),
])
def test_auroc_rejects_bad_input(scores, y, match):
    with pytest.raises(InputError, match=match):
        stats.auroc(scores, y)
