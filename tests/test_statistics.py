"""Paired comparisons (report.statistics): each answer checked against an independent computation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from doran_lightning.report import statistics as st


def test_t_interval_is_scipys_paired_t_interval():
    rng = np.random.default_rng(1)
    a = rng.normal(0.80, 0.02, size=7)
    b = a - rng.normal(0.01, 0.015, size=7)
    seeds, diff = st.paired_by_seed(dict(enumerate(a)), dict(enumerate(b)))
    interval = st.t_interval(diff)
    expected = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert seeds == list(range(7)) and interval.n == 7
    assert (interval.low, interval.high) == (pytest.approx(expected.low), pytest.approx(expected.high))
    assert interval.estimate == pytest.approx(np.mean(a - b))


def test_pairing_keeps_only_seeds_both_ran():
    seeds, diff = st.paired_by_seed({0: 0.5, 1: 0.6, 2: 0.7, 10: 0.1}, {1: 0.4, 2: 0.8, 3: 0.1, 0: float("nan"), 10: 0.3})
    assert seeds == [1, 2, 10] and diff == pytest.approx([0.2, -0.1, -0.2])
    single = st.t_interval([0.3])
    assert single.estimate == 0.3 and not single.defined and single.covers_zero


def test_mde_gives_80_percent_power_in_simulated_paired_experiments():
    n, sd = 10, 1.0
    mde = st.minimum_detectable_effect(sd, n)
    rng = np.random.default_rng(0)
    differences = rng.normal(mde, sd, size=(4000, n))  # paired-normal experiments at the true effect = MDE
    rejected = stats.ttest_1samp(differences, 0.0, axis=1).pvalue < 0.05
    assert 0.76 < rejected.mean() < 0.84
    # and the exact power of the t-test at that effect (noncentral t) is about 80 % too
    critical, shift = stats.t.ppf(0.975, n - 1), mde * math.sqrt(n) / sd
    exact = stats.nct.sf(critical, n - 1, shift) + stats.nct.cdf(-critical, n - 1, shift)
    assert exact == pytest.approx(0.8, abs=0.02)
    assert math.isnan(st.minimum_detectable_effect(sd, 1))
    assert st.minimum_detectable_effect(sd, 40) < mde / 2  # √n: four times the seeds, under half the effect


def test_seeds_needed_is_the_smallest_run_count_reaching_the_target():
    sd, target = 0.02, 0.01
    n = st.seeds_needed(sd, target)
    assert st.minimum_detectable_effect(sd, n) <= target < st.minimum_detectable_effect(sd, n - 1)
    # the normal approximation (z quantiles, known sd) asks for slightly fewer: t's heavier tails add a seed or two
    z = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) ** 2 * (sd / target) ** 2
    assert math.ceil(z) <= n <= math.ceil(z) + 3
    assert st.seeds_needed(float("nan"), target) is None and st.seeds_needed(sd, target, most=5) is None


def test_bootstrap_uses_the_same_examples_for_both_methods():
    rng = np.random.default_rng(3)
    same = {seed: (rng.random(200) < 0.7).astype(float) for seed in range(5)}
    identical = st.paired_bootstrap(same, same, resamples=300)
    assert (identical.estimate, identical.low, identical.high) == (0.0, 0.0, 0.0)  # unpaired draws would spread
    # B right wherever A is, and on 10 more examples of 200 per seed: every resample is ≤ 0, the estimate −0.05
    better = {}
    for seed, correct in same.items():
        extra = np.flatnonzero(correct == 0)[:10]
        better[seed] = correct.copy()
        better[seed][extra] = 1.0
    interval = st.paired_bootstrap(same, better, resamples=300)
    assert interval.estimate == pytest.approx(-0.05) and interval.high <= 0 and interval.low < -0.05 < interval.high


def test_bootstrap_width_matches_the_closed_form_standard_errors():
    # one seed: the resampled mean of e = a − b has sd = population sd(e) / √m
    m = 400
    e = np.zeros(m)
    e[:60], e[60:100] = 1.0, -1.0  # a right alone on 60 examples, b alone on 40
    a, b = {0: (e > 0).astype(float)}, {0: (e < 0).astype(float)}
    one = st.paired_bootstrap(a, b, resamples=4000)
    half = stats.norm.ppf(0.975) * e.std() / math.sqrt(m)
    assert one.estimate == pytest.approx(0.05) and (one.high - one.low) / 2 == pytest.approx(half, rel=0.1)
    # seeds whose differences are constant within the seed: only the seed draw varies, sd = sd(c) / √n
    c = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    a = {s: np.full(50, 0.5 + v / 2) for s, v in enumerate(c)}
    b = {s: np.full(50, 0.5 - v / 2) for s, v in enumerate(c)}
    several = st.paired_bootstrap(a, b, resamples=4000)
    assert (several.high - several.low) / 2 == pytest.approx(stats.norm.ppf(0.975) * c.std() / math.sqrt(len(c)), rel=0.15)


def test_bootstrap_refuses_test_sets_of_unequal_size():
    with pytest.raises(st.StatisticsError, match="unequal length"):
        st.paired_bootstrap({0: np.ones(5)}, {0: np.ones(6)})


def test_verdict_wording():
    covering = st.Interval(0.004, -0.003, 0.011, 5, "t over seeds")
    assert st.verdict("doran", "dora", [covering]) == "not distinguishable"
    above = st.Interval(0.012, 0.004, 0.020, 5, "t over seeds")
    assert st.verdict("doran", "dora", [above]) == "doran above dora by 1.20 [0.40, 2.00] points"
    below = st.Interval(-0.012, -0.020, -0.004, 5, "t over seeds")
    assert st.verdict("doran", "dora", [below]) == "doran below dora by 1.20 [0.40, 2.00] points"
    # a bootstrap interval that covers 0 keeps it undecided even when the t-interval does not
    assert st.verdict("doran", "dora", [above, covering]) == "not distinguishable"
    identical = st.t_interval([0.0, 0.0, 0.0])
    assert st.verdict("doran", "doran-aux", [identical]) == "not distinguishable: identical at every seed"
    assert st.verdict("doran", "doran-aux", [st.t_interval([0.0, 0.01, 0.0])]) == "not distinguishable"
    one_seed = st.t_interval([0.02])
    assert st.verdict("doran", "dora", [one_seed]) == "not distinguishable (no interval with 1 seed)"
    # one seed's bootstrap over test examples sees no training noise: it alone never decides
    assert st.verdict("doran", "dora", [one_seed, above]) == "not distinguishable (no interval with 1 seed)"
    for text in (st.verdict("a", "b", [i]) for i in (covering, above, below, one_seed)):
        assert "beat" not in text and "close" not in text


def test_predictions_file_is_read_in_index_order(tmp_path: Path):
    path = tmp_path / "predictions.csv"
    path.write_text("index,target,prediction\n2,1,1\n0,0,1\n1,2,2\n3,1,0\n")
    targets, predictions = st.read_predictions(path)
    assert list(targets) == [0.0, 2.0, 1.0, 1.0] and list(predictions) == [1.0, 2.0, 1.0, 0.0]
    assert st.correctness(path).tolist() == [0.0, 1.0, 1.0, 0.0]
    other = tmp_path / "other.csv"
    other.write_text("index,target,prediction\n0,0,0\n1,2,2\n2,1,1\n3,0,0\n")
    assert not st.same_test_set([path, other]) and st.same_test_set([path, path])
    wrong = tmp_path / "predict.csv"
    wrong.write_text("id,label,p_0\n0,food,0.9\n")
    with pytest.raises(st.StatisticsError, match="expected the columns index,target,prediction, got id,label,p_0"):
        st.read_predictions(wrong)


def _coverage(scheme, n: int, sims: int, resamples: int, m: int = 180, effect: float = 0.02) -> float:
    """How often `scheme`'s 95 % interval covers the true mean difference when every test example carries a
    persistent effect (sd 10 points, the same at every seed) on top of seed and seed × example noise."""
    rng = np.random.default_rng(n)
    hits = 0
    for k in range(sims):
        per_example = rng.normal(0, 0.10, m)  # a new test set each experiment: the test set is a sample too
        diff = effect + per_example[None, :] + rng.normal(0, 0.02, (n, 1)) + rng.normal(0, 0.3, (n, m))
        interval = scheme({s: diff[s] for s in range(n)}, {s: np.zeros(m) for s in range(n)},
                          resamples=resamples, seed=k)
        hits += interval.low <= effect <= interval.high
    return hits / sims


@pytest.mark.parametrize("n", [20, 160])
def test_crossed_bootstrap_covers_a_persistent_per_example_effect(n: int):
    assert _coverage(st.crossed_bootstrap, n, sims=200, resamples=150) >= 0.93
    assert st.paired_bootstrap is st.crossed_bootstrap  # the name report imports is the crossed scheme


def test_nested_bootstrap_falls_short_where_the_crossed_one_covers():
    # new example indices per seed average the shared per-example effect away: far too narrow at many seeds
    assert _coverage(st.nested_bootstrap, 160, sims=80, resamples=50, m=100) < 0.8


def test_crossed_bootstrap_sd_is_the_sum_of_its_two_sampling_variances():
    # an additive seeds × examples matrix: var(mean) = var_seeds / n + var_examples / m (population variances)
    seed_part, example_part = np.linspace(-0.05, 0.05, 10), np.linspace(-0.2, 0.2, 300)
    diff = 0.01 + seed_part[:, None] + example_part[None, :]
    interval = st.crossed_bootstrap({s: diff[s] for s in range(10)}, {s: np.zeros(300) for s in range(10)},
                                    resamples=8000)
    expected = math.sqrt(seed_part.var() / 10 + example_part.var() / 300)
    assert interval.se == pytest.approx(expected, rel=0.05) and interval.estimate == pytest.approx(0.01)
    assert st.bootstrap_mde(interval.se) == pytest.approx((1.959964 + 0.841621) * interval.se, rel=1e-5)
    assert interval.high - interval.estimate == pytest.approx(1.959964 * interval.se, rel=1e-5)


def test_difference_and_tost_p_by_hand():
    # normal reference (a bootstrap se): z = 0.012 / 0.004 = 3, p = 2 Φ(−3) = 0.0026998
    above = st.Interval(0.012, math.nan, math.nan, 20, st.CROSSED, se=0.004)
    assert st.difference_p(above) == pytest.approx(0.0026998, abs=1e-6)
    # TOST at ±0.01 around 0.003 (se 0.004): max(Φ(−3.25), Φ(−1.75)) = Φ(−1.75) = 0.0400592
    close = st.Interval(0.003, math.nan, math.nan, 20, st.CROSSED, se=0.004)
    assert st.tost_p(close, 0.01) == pytest.approx(0.0400592, abs=1e-6)
    assert st.difference_p(close) == pytest.approx(2 * 0.2266274, abs=1e-6)  # 2 Φ(−0.75)
    # t with 2 degrees of freedom has sf(t) = (1 − t/√(t² + 2)) / 2: differences 1, 2, 3 give mean 2, se 1/√3
    three = st.t_interval([1.0, 2.0, 3.0])
    t = 2 * math.sqrt(3)
    assert st.difference_p(three) == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    # margin 3: the upper test has t = −√3, p = (1 − √3/√5)/2 = 0.1127; the lower one t = 5√3, p = 0.0065
    assert st.tost_p(three, 3.0) == pytest.approx((1 - math.sqrt(3) / math.sqrt(5)) / 2, rel=1e-9)


def test_verdict_words_from_the_tests():
    assert st.decide("X", "Y", 0.012, 0.0027, 0.9, 1) == "X above Y"
    assert st.decide("X", "Y", -0.012, 0.0027, 0.9, 1) == "X below Y"
    assert st.decide("X", "Y", 0.003, 0.45, 0.040, 1) == "equivalent within ±1"
    assert st.decide("X", "Y", 0.003, 0.45, 0.040, 0.5) == "equivalent within ±0.5"
    assert st.decide("X", "Y", 0.006, 0.13, 0.16, 1) == "not distinguishable"
    assert st.decide("X", "Y", 0.006, math.nan, math.nan, 1) == "not distinguishable"


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 → running max 0.02, 0.03, 0.06, 0.06
    assert st.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = st.holm([0.6, math.nan, 0.4])  # NaN is no test: two tests, 0.4 × 2 = 0.8, then max(0.8, 0.6)
    assert adjusted[0] == pytest.approx(0.8) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.8)
    assert st.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1
