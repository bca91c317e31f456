"""Analytic null: exact and asymptotic p-values against scipy, BH against scipy, expected counts by enumeration."""

import itertools
from math import comb

import numpy as np
import pytest
from scipy import special, stats

from featstudy.stats import bh_qvalues, expected_count_above, ks_pvalues, signed_ks
from featstudy.stats.thresholds import threshold_grid


def _continuous_data(sizes, n_features, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = rng.normal(size=(labels.size, n_features))
    x += 0.4 * rng.normal(size=(len(sizes), n_features))[labels]  # some real effects
    return x, labels


def test_exact_pvalues_match_scipy_exact():
    x, labels = _continuous_data([5, 7, 12, 40], 6, seed=0)  # all n_in * n_out <= 10,000
    r = signed_ks(x, labels, bins=None)
    p = ks_pvalues(r.d, r.n_in, r.n)
    assert p.shape == r.d.shape
    for f in range(x.shape[1]):
        for c in range(r.classes.size):
            inside = labels == c
            ref = stats.ks_2samp(x[~inside, f], x[inside, f], method="exact").pvalue
            assert p[f, c] == pytest.approx(ref, rel=1e-14, abs=1e-300)


def test_asymptotic_pvalues_within_documented_error():
    x, labels = _continuous_data([30, 600], 40, seed=1)  # 30 * 600 = 18,000 > 10,000: asymptotic
    r = signed_ks(x, labels, bins=None)
    p = ks_pvalues(r.d, r.n_in, r.n)
    exact = ks_pvalues(r.d, r.n_in, r.n, exact_max=10**6)
    en = 30 * 600 / 630
    np.testing.assert_allclose(p, special.kolmogorov((np.sqrt(en) + 0.12 + 0.11 / np.sqrt(en)) * np.abs(r.d)))
    for f in range(10):
        inside = labels == 0
        ref = stats.ks_2samp(x[~inside, f], x[inside, f], method="exact").pvalue
        assert exact[f, 0] == pytest.approx(ref, rel=1e-9)
    assert np.abs(p - exact).max() <= 0.024  # the docstring's table (30, 600)
    assert not np.array_equal(p, exact)


def test_pvalue_inputs():
    assert ks_pvalues(np.zeros((2, 2)), [3, 4], 7).tolist() == [[1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="classes"):
        ks_pvalues(np.zeros((2, 3)), [3, 4], 7)
    with pytest.raises(ValueError, match="n_in"):
        ks_pvalues(np.zeros((2, 2)), [0, 7], 7)


def test_many_pairs_vectorised():
    d = np.random.default_rng(0).uniform(-0.5, 0.5, (2000, 50))
    p = ks_pvalues(d, np.full(50, 30), 1500)
    assert p.shape == d.shape and np.all((p >= 0) & (p <= 1))
    assert np.all(np.diff(p[np.argsort(np.abs(d[:, 0])), 0]) <= 0)  # monotone in |D|


def test_bh_matches_scipy():
    p = np.random.default_rng(0).beta(0.3, 1.0, size=(40, 7))
    q = bh_qvalues(p)
    assert q.shape == p.shape
    np.testing.assert_allclose(q, stats.false_discovery_control(p.ravel()).reshape(p.shape), rtol=1e-12)
    assert np.all(q >= p)
    with pytest.raises(ValueError, match="p-values"):
        bh_qvalues(np.array([0.5, 1.5]))


@pytest.mark.parametrize("m, n", [(3, 4), (2, 6)])
def test_expected_count_by_enumeration(m, n):
    # every arrangement of a class of m images among m + n distinct values is equally likely under H0
    total = m + n
    combos = list(itertools.combinations(range(total), m))
    assert len(combos) == comb(total, m)
    labels = np.array([0] * m + [1] * n)
    x = np.empty((total, len(combos)))
    for f, members in enumerate(combos):
        rest = [v for v in range(total) if v not in members]
        x[:, f] = list(members) + rest
    r = signed_ks(x, labels, bins=None)
    grid = threshold_grid(0.05)
    got = expected_count_above(grid, r.n_in, r.n, n_features=len(combos))
    assert got.shape == (2, grid.size)
    for c in range(2):
        absd = np.abs(r.d[:, c])
        want = 0.5 * (absd[:, None] > grid[None, :]).sum(axis=0)
        np.testing.assert_allclose(got[c], want, rtol=1e-12, atol=1e-12)
        # what is neglected: P(D > x) = 1/2 P(|D| > x) + 1/2 P(D+ = D- > x)
        true = (r.d[:, c][:, None] > grid).sum(axis=0)
        ties = ((r.d_plus[:, c] == r.d_minus[:, c])[:, None] & (absd[:, None] > grid)).sum(axis=0)
        np.testing.assert_allclose(true, want + 0.5 * ties)


def test_expected_count_asymptotic_branch():
    grid = threshold_grid(0.01)
    got = expected_count_above(grid, [30, 200], 6000, n_features=9600)
    assert got[0, 0] == pytest.approx(4800) and np.all(np.diff(got, axis=1) <= 0)
    en = 30 * 5970 / 6000
    want = 0.5 * 9600 * special.kolmogorov((np.sqrt(en) + 0.12 + 0.11 / np.sqrt(en)) * grid)
    np.testing.assert_allclose(got[0], want)
    assert got[1, 20] < got[0, 20]  # larger classes: tighter null
