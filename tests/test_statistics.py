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
