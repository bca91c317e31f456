"""The null callback: exact KS p-values, Benjamini-Hochberg q-values and the significant shares, real and randomized.

Expectations: p by enumerating all C(12, 4) = 495 equally likely placements of a class of 4 among 12 images
(oracle.ks_p), q by ``scipy.stats.false_discovery_control``. By hand: |D| = 1 has p = 2/495 (the class entirely
below or entirely above the rest); the tiny embedding has 7 such pairs of its 24, BH gives them
q = (2/495)·24/7 = 0.0139 < 0.05, and every smaller |D| stays above 0.05 (p of |D| >= .75 is already
42/495 = 0.085, by the count; scipy's ``ks_2samp(method="exact")`` agrees). So 7/24 of the pairs are significant: conv1_1 4 of 9, conv5_4 1 of 6, fc7 2 of 9; no randomized pair
(its |D| never exceeds .625) is.
"""

from __future__ import annotations

import csv
from functools import lru_cache

import numpy as np
import pytest

import oracle
from featstudy.analysis import AnalysisContext
from featstudy.analysis.null import NullCallback
from featstudy.errors import ConfigError
from featstudy.store import load_embedding


@lru_cache(maxsize=None)
def p_exact(d_abs: float) -> float:
    return oracle.ks_p(d_abs, 4, 8)


def q_values(d: np.ndarray) -> np.ndarray:
    p = np.vectorize(lambda v: p_exact(float(abs(v))))(d)
    return oracle.bh(p)


def test_hand_derived_p_values():
    from scipy.stats import ks_2samp

    assert p_exact(1.0) == pytest.approx(2 / 495)
    assert p_exact(0.75) == pytest.approx(42 / 495)
    # scipy's exact p of two samples realising D = 1 and D = .75 without ties
    assert ks_2samp(np.arange(4, 12), np.arange(4), method="exact").pvalue == pytest.approx(2 / 495)
    assert ks_2samp(np.arange(3, 11), [0, 1, 2, 11], method="exact").pvalue == pytest.approx(42 / 495)


def test_shares_and_table(tiny):
    result = NullCallback().run(tiny.context())
    m = result.metrics
    assert m["null_significant_share"] == pytest.approx(7 / 24)
    assert m["null_significant_share.conv1_1"] == pytest.approx(4 / 9)
    assert m["null_significant_share.conv5_4"] == pytest.approx(1 / 6)
    assert m["null_significant_share.fc7"] == pytest.approx(2 / 9)
    assert m["null_significant_share_random"] == 0.0
    assert set(m) == {"null_significant_share", "null_significant_share_random",
                      "null_significant_share.conv1_1", "null_significant_share.conv5_4", "null_significant_share.fc7"}
    d = oracle.signed_d(tiny.features, tiny.labels, 3)[0]
    np.testing.assert_allclose(result.objects["q"], q_values(d), rtol=1e-9)
    p = np.vectorize(lambda v: p_exact(float(abs(v))))(d)
    np.testing.assert_allclose(result.objects["p"], p, rtol=1e-12)
    path = tiny.out / "tables" / "null_by_layer.csv"
    assert result.files == [path]
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows == [["layer", "n_pairs", "n_q_below_0.05", "share"], ["conv1_1", "9", "4", "0.444444"],
                    ["conv5_4", "6", "1", "0.166667"], ["fc7", "9", "2", "0.222222"]]
    table = result.tables["tables/null_by_layer.json"]
    assert table["n_pairs"] == [9, 6, 9] and table["n_q_below_0.05"] == [4, 1, 2]
    assert table["share"] == pytest.approx([4 / 9, 1 / 6, 2 / 9])


def test_a_q_value_equal_to_the_level_is_not_significant(tiny):
    """BH keeps q < level, strictly: at level = the seven pairs' own q-value (2/495 * 24/7) none is significant."""
    # the boundary input is the callback's own float for that q (scipy's differs in the last bit); the expectation
    # (nothing significant at level == q) comes from the definition, not from the code
    level = float(NullCallback().run(tiny.context()).objects["q"].min())
    assert level == pytest.approx(2 / 495 * 24 / 7, rel=1e-12)
    result = NullCallback(q=level).run(tiny.context())
    assert result.metrics["null_significant_share"] == 0.0
    # the randomized side too: a permutation whose D table is the real one has the same q-values
    ctx = GivenRandom(load_embedding(tiny.folder), {"bins": None, "permutations": 1, "seed": 0, "layers": None},
                      tiny.out, "tiny")
    ctx.given = oracle.signed_d(tiny.features, tiny.labels, 3)[0][None]
    at_level = NullCallback(q=level).run(ctx)
    assert at_level.metrics["null_significant_share_random"] == 0.0 and at_level.objects["shares_random"] == [0.0]
    assert NullCallback(q=level * (1 + 1e-9)).run(tiny.context()).metrics["null_significant_share"] == \
        pytest.approx(7 / 24)


def test_the_fdr_level_is_used(tiny):
    """q = 0.02 still keeps the seven |D| = 1 pairs (q 0.0139); q = 0.01 keeps none."""
    assert NullCallback(q=0.02).run(tiny.context()).metrics["null_significant_share"] == pytest.approx(7 / 24)
    result = NullCallback(q=0.01).run(tiny.context())
    assert result.metrics["null_significant_share"] == 0.0
    with open(tiny.out / "tables" / "null_by_layer.csv", newline="") as fh:
        assert next(csv.reader(fh))[2] == "n_q_below_0.01"


class GivenRandom(AnalysisContext):
    """A context whose randomized D is given (to reach significant randomized pairs on 12 images)."""

    given: np.ndarray

    def d_random(self) -> np.ndarray:
        return self.given


def test_randomized_share_is_bh_within_each_permutation(tiny):
    """K = 2 randomized tables: the first with three |D| = 1 pairs, the second with none. Within the first, BH over
    its own 24 tests gives q = (2/495)·24/3 = 0.032 < 0.05: 3/24 significant, 0 in the second, mean 1/16. (BH
    pooled over both tables' 48 tests would give q = 0.065 and no significant pair: a different procedure from
    the real labels'.)"""
    ctx = GivenRandom(load_embedding(tiny.folder), {"bins": None, "permutations": 2, "seed": 0, "layers": None},
                      tiny.out, "tiny")
    first = np.zeros((8, 3))
    first[[0, 3, 5], [0, 1, 2]] = [1.0, -1.0, 1.0]
    ctx.given = np.stack([first, np.full((8, 3), 0.25)])
    shares = [float((q_values(g) < 0.05).mean()) for g in ctx.given]
    assert shares == [3 / 24, 0.0]
    m = NullCallback().run(ctx).metrics
    assert m["null_significant_share_random"] == pytest.approx(1 / 16)
    # at q = 0.01 BH keeps none of them (q = 0.032), though their raw p = 2/495 = 0.004 is below 0.01
    assert NullCallback(q=0.01).run(ctx).metrics["null_significant_share_random"] == 0.0


@pytest.mark.parametrize("q", [0, 1, -0.5, 1.5])
def test_bad_level_is_a_config_error_naming_the_key(q):
    with pytest.raises(ConfigError, match=r"analysis\.callbacks\.null\.q"):
        NullCallback(q=q)
