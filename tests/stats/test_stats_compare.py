"""binned_vs_exact and the runnable docstring examples of featstudy.stats."""

import doctest
import importlib

import numpy as np
import pytest

from featstudy.stats import binned_vs_exact, signed_ks


def test_binned_vs_exact_report():
    rng = np.random.default_rng(0)
    x = (np.maximum(rng.normal(0.2, 1, (600, 40)), 0) ** 3).astype(np.float32)  # skewed, 40% zeros
    y = np.arange(600) % 6
    rep = binned_vs_exact(x, y, bins=10)
    e, b = signed_ks(x, y, bins=None), signed_ks(x, y, bins=10)
    assert rep.n_pairs == 240 and rep.bins == 10
    assert rep.max_abs_diff == np.abs(b.d - e.d).max() > 0
    assert rep.mean_abs_diff == pytest.approx(np.abs(b.d - e.d).mean())
    assert rep.sign_flip_share == np.mean(b.sign != e.sign)
    many = binned_vs_exact(x, y, bins=100_000)  # fine bins approach the exact statistic
    assert many.max_abs_diff < rep.max_abs_diff
    with pytest.raises(ValueError, match="bins"):
        binned_vs_exact(x, y, bins=None)


@pytest.mark.parametrize("module", ["ks", "permutation", "thresholds", "null", "compare", "auroc", "selectivity",
                                    "bootstrap"])
def test_docstring_examples_run(module):
    mod = importlib.import_module(f"featstudy.stats.{module}")
    res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0
