"""The ks callback: ``arrays/ks.npz`` and its metrics, field by field, against hand-derived D (conftest.py's table)
and the independent scipy / permutation oracle (oracle.py)."""

from __future__ import annotations

import numpy as np
import pytest

import oracle
from featstudy.analysis.ks import ARRAY_FILE, KSCallback, load_ks_arrays

# conftest.py's table: D of each feature (rows) for classes a, b, c
D_BY_HAND = np.array([
    [-1, 0.5, 1],
    [1, 0.5, -1],
    [0, 0, 0],
    [-0.75, 1, -0.5],
    [-0.75, 0.375, 0.375],
    [1, -1, 0.5],
    [0.25, -0.125, -0.125],
    [0, 0, 0],
])


def npz(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_every_field_of_ks_npz(tiny):
    result = KSCallback().run(tiny.context(permutations=2, seed=3))
    path = tiny.out / "arrays" / "ks.npz"
    assert result.files == [path] and ARRAY_FILE == "arrays/ks.npz"
    z = npz(path)
    assert set(z) == {"d", "d_plus", "d_minus", "location", "d_random", "classes", "feature_names",
                      "layer_of_feature", "n_in", "n", "bins", "permutations", "seed", "dataset"}
    np.testing.assert_array_equal(z["d"], D_BY_HAND)
    d, d_plus, d_minus = oracle.signed_d(tiny.features, tiny.labels, 3)
    np.testing.assert_array_equal(z["d_plus"], d_plus)
    np.testing.assert_array_equal(z["d_minus"], d_minus)
    # by hand: conv1_1:0 is 0..11, so for class a D- = 1 (no out value <= 3), D+ = 0; class c the mirror
    assert (z["d_plus"][0, 0], z["d_minus"][0, 0]) == (0.0, 1.0)
    assert (z["d_plus"][0, 2], z["d_minus"][0, 2]) == (1.0, 0.0)
    # fc7:1 (0 0 0 1 | 0 ...): class a D+ = F_out(0) - F_in(0) = 1 - 3/4; class b D- = 1 - 7/8
    assert (z["d_plus"][6, 0], z["d_minus"][6, 0], z["d_plus"][6, 1], z["d_minus"][6, 1]) == (0.25, 0, 0, 0.125)
    # location: smallest value where the reported extremum is reached (conv1_1:0: a at 3, b (D+ tie) at 3, c at 7)
    assert z["location"][0].tolist() == [3.0, 3.0, 7.0]
    # conv5_4:0, class b (5..8 against 0 0 0 0 0 1 0 1): F_out - F_in is 6/8 at 0 and reaches 1 first at x = 1
    assert z["location"][3, 1] == 1.0
    assert z["d_random"].shape == (2, 8, 3)
    np.testing.assert_array_equal(z["d_random"], oracle.d_random(tiny.features, tiny.labels, 3, 2, 3))
    assert z["classes"].tolist() == ["a", "b", "c"]
    assert z["feature_names"].tolist() == tiny.feature_names
    assert z["layer_of_feature"].tolist() == ["conv1_1"] * 3 + ["conv5_4"] * 2 + ["fc7"] * 3
    assert z["n_in"].tolist() == [4, 4, 4] and int(z["n"]) == 12
    assert int(z["bins"]) == -1 and int(z["permutations"]) == 2 and int(z["seed"]) == 3
    assert str(z["dataset"]) == "tiny"
    assert load_ks_arrays(str(path)).keys() == z.keys()
    some = load_ks_arrays(path, keys=("d", "classes"))
    assert list(some) == ["d", "classes"] and some["classes"].tolist() == ["a", "b", "c"]
    with pytest.raises(KeyError) as info:
        load_ks_arrays(path, keys=("d", "nope", "d_random", "also_not"))
    assert info.value.args[0] == ["nope", "also_not"]


def test_metrics_names_and_values(tiny):
    result = KSCallback().run(tiny.context())
    m = result.metrics
    assert {k: m[k] for k in ("n_images", "n_classes", "n_features")} == {"n_images": 12, "n_classes": 3,
                                                                           "n_features": 8}
    assert set(m) == {"n_images", "n_classes", "n_features", "ks_seconds", "ks_random_seconds"}
    assert 0 <= m["ks_seconds"] < 60 and 0 <= m["ks_random_seconds"] < 60  # durations, not clock readings
    np.testing.assert_array_equal(result.objects["ks"].d, D_BY_HAND)
    np.testing.assert_array_equal(result.objects["d_random"], oracle.d_random(tiny.features, tiny.labels, 3, 1, 0))


def test_missing_settings_are_one_permutation_seed_0_exact(tiny):
    from featstudy.analysis import AnalysisContext
    from featstudy.store import load_embedding

    KSCallback().run(AnalysisContext(load_embedding(tiny.folder), {}, tiny.out, "tiny"))
    z = npz(tiny.out / "arrays" / "ks.npz")
    assert (int(z["permutations"]), int(z["seed"]), int(z["bins"])) == (1, 0, -1)
    np.testing.assert_array_equal(z["d_random"], oracle.d_random(tiny.features, tiny.labels, 3, 1, 0))


def test_layers_subset_and_binned(tiny):
    """analysis.layers=[fc7] and bins=4: only fc7's columns; D of the 4 equal-width bins of each feature."""
    KSCallback().run(tiny.context(layers=["fc7"], bins=4))
    z = npz(tiny.out / "arrays" / "ks.npz")
    assert z["feature_names"].tolist() == ["fc7:0", "fc7:1", "fc7:2"] and int(z["bins"]) == 4
    x = tiny.features[:, 5:].astype(np.float64)
    lo, hi = x.min(0), x.max(0)
    idx = np.clip(np.floor((x - lo) / np.where(hi > lo, hi - lo, 1) * 4), 0, 3)
    np.testing.assert_array_equal(z["d"], oracle.signed_d(idx, tiny.labels, 3)[0])
    # fc7:0 (2 2 2 2 | 0 0 0 0 | 1 1 1 1) has three distinct values in 4 bins: D unchanged, by hand +1, -1, +.5
    assert z["d"][0].tolist() == [1.0, -1.0, 0.5]


@pytest.mark.parametrize("permutations", [1, 3])
def test_seed_and_permutations(tiny, permutations):
    """K randomized arrays; the same for one seed, different across seeds; row k is the k-th permutation of
    default_rng(seed), so K=3's first row equals K=1's."""
    def random_d(seed, k=permutations):
        KSCallback().run(tiny.context(permutations=k, seed=seed))
        return npz(tiny.out / "arrays" / "ks.npz")["d_random"]

    a, b, c = random_d(0), random_d(0), random_d(1)
    assert a.shape == (permutations, 8, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a, oracle.d_random(tiny.features, tiny.labels, 3, permutations, 0))
    np.testing.assert_array_equal(random_d(0, 1)[0], a[0])
    # the real D does not depend on the seed
    assert not np.array_equal(a[0], D_BY_HAND)
