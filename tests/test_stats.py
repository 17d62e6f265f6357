"""Statistics against hand-computed values on small known tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.experiment.stats import (
    compare_arms,
    holm_adjust,
    mcnemar_exact,
    mean_std,
    paired_bootstrap,
)


def test_mcnemar_exact_matches_binomial_by_hand():
    # discordant: a-only 1, b-only 6 -> two-sided exact p = 2 * P(X <= 1), X ~ Bin(7, 0.5)
    a = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 1], bool)
    b = np.array([1, 1, 0, 1, 1, 1, 1, 1, 1, 1], bool)
    r = mcnemar_exact(a, b)
    assert (r.only_a, r.only_b) == (1, 6)
    by_hand = 2 * (math.comb(7, 0) + math.comb(7, 1)) / 2**7
    assert r.pvalue == pytest.approx(by_hand)  # 0.125
    assert mcnemar_exact(a, a).pvalue == pytest.approx(1.0)


def test_holm_by_hand():
    # sorted p: 0.01, 0.02, 0.04 with m=3 -> 0.03, 0.04, 0.04 (monotone), original order kept
    assert holm_adjust([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm_adjust([]) == []


def test_mean_std():
    assert mean_std([0.8, 0.9, 1.0]) == pytest.approx((0.9, 0.1))
    assert mean_std([0.5]) == (0.5, 0.0)


def test_bootstrap_of_identical_arms_is_zero_and_interval_covers_truth():
    a = np.array([1, 0, 1, 1, 0, 1, 1, 1], bool)
    assert paired_bootstrap(a, a, n_boot=500) == (0.0, 0.0, 0.0)
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.8
    b = rng.random(400) < 0.7
    diff, lo, hi = paired_bootstrap(a, b, n_boot=4000, seed=1)
    assert diff == pytest.approx(a.mean() - b.mean())
    # the normal-approximation interval of a paired difference, computed by hand
    d = a.astype(float) - b.astype(float)
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert lo == pytest.approx(diff - 1.96 * se, abs=0.015)
    assert hi == pytest.approx(diff + 1.96 * se, abs=0.015)


def test_patient_resampling_widens_interval_for_clustered_errors():
    # every patient contributes 10 slices that are all right or all wrong for arm a
    patients = np.repeat(np.arange(40), 10)
    rng = np.random.default_rng(3)
    a = np.repeat(rng.random(40) < 0.75, 10)
    b = np.ones(400, bool) & (np.arange(400) % 4 != 0)
    _, lo_s, hi_s = paired_bootstrap(a, b, None, n_boot=3000)
    _, lo_p, hi_p = paired_bootstrap(a, b, [f"p{p}" for p in patients], n_boot=3000)
    assert (hi_p - lo_p) > 2 * (hi_s - lo_s)


def test_compare_arms_applies_holm_across_pairs_and_seeds():
    rng = np.random.default_rng(0)
    correct = {arm: rng.random((2, 50)) < p for arm, p in (("hr", 0.9), ("lr", 0.6), ("sr", 0.7))}
    out = compare_arms(correct, [("hr", "lr"), ("sr", "lr"), ("lr+sr", "lr")], n_boot=200)
    assert [(c.a, c.b) for c in out] == [("hr", "lr"), ("sr", "lr")]  # missing arm skipped
    raw = [t.pvalue for c in out for t in c.mcnemar]
    assert [p for c in out for p in c.pvalues_holm] == pytest.approx(holm_adjust(raw))
    assert all(len(c.mcnemar) == 2 for c in out)
    assert out[0].ci_low <= out[0].diff <= out[0].ci_high
