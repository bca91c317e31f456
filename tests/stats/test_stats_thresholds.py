"""thresholds (Eq. 4), irrelevant_features, kept_fraction_by_layer: hand-built cases with known answers."""

import numpy as np
import pytest

from featstudy.stats import irrelevant_features, kept_fraction_by_layer, thresholds
from featstudy.stats.thresholds import threshold_grid

REAL = np.array([[0.30, 0.05], [0.10, 0.25], [-0.20, -0.05], [0.00, -0.40]])  # (F=4, C=2)
RANDOM = np.array(
    [
        [[0.10, 0.02], [-0.10, 0.01], [0.0, 0.0], [0.05, 0.0]],  # permutation 0
        [[-0.01, 0.05], [-0.02, -0.05], [0.0, 0.0], [0.0, 0.0]],  # permutation 1
    ]
)


def test_hand_case_thresholds():
    r = thresholds(REAL, RANDOM, step=0.05)
    assert r.grid.size == 21
    # real mean #{D > x}: 2, 1.5, 1, 1, 1, .5, 0...; random: 1.25, .25, 0...
    np.testing.assert_array_equal(r.d_avg_plus[:7], [0.75, 1.25, 1.0, 1.0, 1.0, 0.5, 0.0])
    # real mean #{D < -x}: 1.5, 1, 1, 1, .5...; random: 1, .25, 0...
    np.testing.assert_array_equal(r.d_avg_minus[:5], [0.5, 0.75, 1.0, 1.0, 0.5])
    assert r.t_plus == 0.05 and r.d_avg_t_plus == 1.25
    assert r.t_minus == -0.10 and r.d_avg_t_minus == 1.0  # plateau 0.10-0.15: the x nearest 0 wins
    np.testing.assert_array_equal(r.real_counts_plus[:, :3], [[2, 2, 1], [2, 1, 1]])
    np.testing.assert_array_equal(r.real_counts_minus[:, :5], [[1, 1, 1, 1, 0], [2, 1, 1, 1, 1]])
    assert r.random_counts_plus.shape == r.random_counts_minus.shape == (4, 21)
    np.testing.assert_array_equal(r.random_counts_plus[:, 0], [2, 2, 0, 1])  # row k*C + c


def test_counts_match_brute_force_and_2d_random():
    rng = np.random.default_rng(0)
    real = np.round(rng.uniform(-1, 1, (50, 6)), 2)
    rand = np.round(rng.uniform(-0.3, 0.3, (50, 6)), 3)
    r = thresholds(real, rand)
    assert r.grid.size == 1001
    for k in (0, 10, 150, 333, 1000):
        x = k / 1000
        np.testing.assert_array_equal(r.real_counts_plus[:, k], (real > x).sum(axis=0))
        np.testing.assert_array_equal(r.real_counts_minus[:, k], (real < -x).sum(axis=0))
        assert r.d_avg_plus[k] == pytest.approx((real > x).sum(0).mean() - (rand > x).sum(0).mean())
        assert r.d_avg_minus[k] == pytest.approx((real < -x).sum(0).mean() - (rand < -x).sum(0).mean())
    assert r.t_plus == r.grid[np.argmax(r.d_avg_plus)]
    np.testing.assert_array_equal(thresholds(real, rand[None]).d_avg_plus, r.d_avg_plus)


def test_plateau_at_zero_gives_zero():
    r = thresholds(np.zeros((3, 2)), np.zeros((3, 2)), step=0.5)
    assert r.t_plus == 0.0 and r.t_minus == 0.0 and not np.signbit(r.t_minus)


def test_grid_is_k_over_m_not_accumulated():
    g = threshold_grid(0.001)
    assert g.size == 1001 and g[0] == 0.0 and g[-1] == 1.0
    assert all(g[k] == k / 1000 for k in range(1001))
    assert any(g[k] != k * 0.001 for k in range(1001))  # multiplying (or accumulating) the step differs
    with pytest.raises(ValueError, match="does not divide 1"):
        threshold_grid(0.003)
    with pytest.raises(ValueError, match="step"):
        threshold_grid(0)


def test_shape_errors():
    with pytest.raises(ValueError, match="same features"):
        thresholds(REAL, RANDOM[:, :3])
    with pytest.raises(ValueError, match="d_real"):
        thresholds(RANDOM, RANDOM)
    with pytest.raises(ValueError, match="NaN"):
        thresholds(np.full((2, 2), np.nan), RANDOM[0, :2])


def test_irrelevant_features_hand_case():
    mask = irrelevant_features(REAL, 0.05, -0.10)
    # f0: 0.30 > t+; f1: 0.10 > t+; f2: -0.20 < t-; f3: -0.40 < t-
    assert mask.tolist() == [False, False, False, False]
    mask = irrelevant_features(REAL, 0.30, -0.40)
    assert mask.tolist() == [True, True, True, True]  # strict inequalities
    mask = irrelevant_features(REAL, 0.25, -0.30)
    assert mask.tolist() == [False, True, True, False]


def test_kept_fraction_by_layer_in_order_of_appearance():
    layers = ["conv2", "conv2", "conv1", "fc7"]
    got = kept_fraction_by_layer(REAL, 0.05, -0.10, layers)
    assert list(got) == ["conv2", "conv1", "fc7"]
    assert got == {"conv2": 0.75, "conv1": 0.5, "fc7": 0.5}
    stacked = kept_fraction_by_layer(np.stack([REAL, np.zeros_like(REAL)]), 0.05, -0.10, layers)
    assert stacked == {"conv2": 0.375, "conv1": 0.25, "fc7": 0.25}
    with pytest.raises(ValueError, match="layer_of_feature"):
        kept_fraction_by_layer(REAL, 0.05, -0.1, layers[:3])


def test_threshold_ties_are_decided_on_exact_counts_not_rounded_means():
    # 2 real classes, 3 random ones, grid 0, 0.5, 1. d_avg+(0) = 4/2 - 5/3 = 1/3 and d_avg+(0.5) = 2/2 - 2/3 = 1/3:
    # an exact tie, which goes to x = 0. Through the rounded means the two differ by an ulp
    # (0.33333333333333326 < 0.33333333333333337) and a float argmax would answer 0.5.
    import numpy as np
    from featstudy.stats import thresholds

    real = np.array([[0.7, 0.2], [0.7, 0.0], [0.2, 0.0]])
    rand = np.array([[0.7, 0.2, 0.0], [0.7, 0.2, 0.0], [0.2, 0.0, 0.0]])
    assert 4 / 2 - 5 / 3 < 2 / 2 - 2 / 3  # the float trap this test is about
    r = thresholds(real, rand, step=0.5)
    assert r.t_plus == 0.0
    assert r.d_avg_plus[0] == r.d_avg_t_plus


def test_d_avg_is_the_correctly_rounded_quotient_of_exact_counts():
    """d_avg±(x) = (1/C)·Σ#{real} − (1/KC')·Σ#{random} is a rational number: each value must be the float nearest
    to it (computed here with fractions.Fraction from counts made by hand), not a difference of two rounded means
    (which gave 1863.1999999999998 in MLflow). On these 40 seeded tables the old formula is off in most cases."""
    from fractions import Fraction

    rng = np.random.default_rng(20261202)
    for case in range(40):
        f, c, k = (int(v) for v in (rng.integers(5, 40), rng.integers(3, 12), rng.integers(1, 4)))
        real = np.round(rng.uniform(-1, 1, (f, c)), 2)
        rand = np.round(rng.uniform(-0.3, 0.3, (k, f, c)), 2)
        r = thresholds(real, rand, step=0.01)
        for i in range(101):
            x = i / 100
            for sign, got in ((1, r.d_avg_plus[i]), (-1, r.d_avg_minus[i])):
                hits = (lambda a: a > x) if sign > 0 else (lambda a: a < -x)
                exact = Fraction(int(hits(real).sum()), c) - Fraction(int(hits(rand).sum()), k * c)
                assert got == float(exact), (case, i, sign, got, exact)
        assert r.d_avg_t_plus == r.d_avg_plus[round(r.t_plus * 100)]
