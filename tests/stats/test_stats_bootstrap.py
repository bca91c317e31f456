"""bootstrap_thresholds: seeded and reproducible, stratified resamples, each replicate = thresholds recomputed
independently on its resample, percentile intervals, argument checks."""

import numpy as np
import pytest

from featstudy.stats import bootstrap_thresholds, permuted_labels, signed_ks, signed_ks_random, thresholds

FIELDS = ("t_plus", "t_minus", "d_avg_t_plus", "d_avg_t_minus")


@pytest.fixture(scope="module")
def data():
    """ReLU-like features, unequal classes (one of a single image), some features firing for some classes."""
    rng = np.random.default_rng(11)
    sizes = [30, 18, 25, 1, 22]
    labels = np.repeat(np.array(["ant", "bee", "cat", "dog", "eel"]), sizes)
    rng.shuffle(labels)
    x = np.maximum(rng.normal(0.1, 1.0, (labels.size, 40)), 0).astype(np.float32)
    for k, cls in enumerate(["ant", "bee", "cat", "eel"]):
        x[labels == cls, 8 * k:8 * k + 5] += rng.uniform(0.3, 1.5, 5).astype(np.float32)
        x[labels == cls, 8 * k + 5:8 * k + 7] *= 0.2  # and some fire less
    return x, labels


def recompute(x, labels, indices, permutation_seed, bins, permutations, step):
    """The thresholds of one replicate, recomputed here the way the app computes the real ones."""
    xs, ys = x[indices], labels[indices]
    d_real = signed_ks(xs, ys, bins=bins).d
    d_random = signed_ks_random(xs, ys, permutations=permutations, seed=permutation_seed, bins=bins)
    return thresholds(d_real, d_random, step=step)


@pytest.mark.parametrize("bins, permutations", [(None, 1), (10, 2), (100, 1)])
def test_each_replicate_is_thresholds_recomputed_on_its_resample(data, bins, permutations):
    x, labels = data
    res = bootstrap_thresholds(x, labels, n_boot=2, seed=5, bins=bins, permutations=permutations, step=0.01)
    assert res.n_boot == 2 and res.seed == 5 and res.bins == bins and res.permutations == permutations
    for b in range(2):
        th = recompute(x, labels, res.replicate_indices(b), res.permutation_seed(b), bins, permutations, 0.01)
        for name in FIELDS:
            assert getattr(res, name)[b] == getattr(th, name), (b, name)
    # the two replicates draw their own permutations (not one shared by all replicates)
    p0 = permuted_labels(labels, permutations, seed=res.permutation_seed(0))
    p1 = permuted_labels(labels, permutations, seed=res.permutation_seed(1))
    assert not np.array_equal(p0, p1)


def test_a_replicate_depends_on_seed_and_number_only(data):
    x, labels = data
    one = bootstrap_thresholds(x, labels, n_boot=1, seed=3, bins=None, step=0.01)
    three = bootstrap_thresholds(x, labels, n_boot=3, seed=3, bins=None, step=0.01)
    for name in FIELDS:
        assert getattr(one, name)[0] == getattr(three, name)[0]
    np.testing.assert_array_equal(one.replicate_indices(0), three.replicate_indices(0))
    # seeds are the SeedSequence(seed).spawn(n_boot)[b] children: (resampling, permutation)
    child = np.random.SeedSequence(3).spawn(3)[2]
    _, perm_seed = child.spawn(2)
    np.testing.assert_array_equal(permuted_labels(labels, 1, seed=perm_seed),
                                  permuted_labels(labels, 1, seed=three.permutation_seed(2)))


def test_reproducible_for_a_seed_different_across_seeds(data):
    x, labels = data
    a = bootstrap_thresholds(x, labels, n_boot=6, seed=0, bins=None, step=0.01)
    b = bootstrap_thresholds(x, labels, n_boot=6, seed=0, bins=None, step=0.01)
    c = bootstrap_thresholds(x, labels, n_boot=6, seed=1, bins=None, step=0.01)
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(a, name).shape == (6,) and getattr(a, name).dtype == np.float64
    assert any(not np.array_equal(getattr(a, name), getattr(c, name)) for name in FIELDS)
    assert not np.array_equal(a.replicate_indices(0), c.replicate_indices(0))
    assert not np.array_equal(a.replicate_indices(0), a.replicate_indices(1))  # replicates differ
    assert np.all(a.t_plus >= 0) and np.all(a.t_minus <= 0)
    assert np.ptp(a.d_avg_t_plus) > 0  # the resamples move the thresholds' d_avg


def test_resamples_are_within_class_with_replacement_and_keep_class_sizes(data):
    x, labels = data
    res = bootstrap_thresholds(x, labels, n_boot=4, seed=2, bins=None, step=0.05)
    np.testing.assert_array_equal(res.classes, np.unique(labels))
    np.testing.assert_array_equal(res.n_in, [30, 18, 25, 1, 22])
    for b in range(4):
        idx = res.replicate_indices(b)
        assert idx.shape == labels.shape and idx.dtype.kind == "i"
        np.testing.assert_array_equal(labels[idx], labels)  # every position keeps its class, so sizes are kept
        assert np.unique(idx).size < idx.size  # with replacement: duplicates
        assert idx[labels == "dog"].tolist() == np.flatnonzero(labels == "dog").tolist()  # one image: itself
        for cls in ("ant", "eel"):  # images come from their whole class, not a fixed subset
            assert np.isin(idx[labels == cls], np.flatnonzero(labels == cls)).all()
    pooled = np.concatenate([res.replicate_indices(b)[labels == "ant"] for b in range(4)])
    assert np.unique(pooled).size > 20  # 4 x 30 draws from 30 images


def test_interval_is_the_percentile_interval(data):
    x, labels = data
    res = bootstrap_thresholds(x, labels, n_boot=9, seed=4, bins=None, step=0.01, level=0.8)
    assert res.level == 0.8
    for name in FIELDS:
        values = getattr(res, name)
        low, high = res.interval(name)
        assert (low, high) == pytest.approx(tuple(np.percentile(values, [10, 90])), rel=1e-12, abs=1e-15)
        assert res.interval(name, 0.5) == pytest.approx(tuple(np.percentile(values, [25, 75])), rel=1e-12)
        assert isinstance(low, float) and isinstance(high, float) and low <= high
    with pytest.raises(ValueError, match="name must be one of"):
        res.interval("t_avg")
    with pytest.raises(ValueError, match="level"):
        res.interval("t_plus", 1.0)
    with pytest.raises(ValueError, match=r"b must be a replicate number in \[0, 9\)"):
        res.replicate_indices(9)


def test_memmap_input_gives_the_same_replicates(data, tmp_path):
    x, labels = data
    np.save(tmp_path / "f.npy", x)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    a = bootstrap_thresholds(x, labels, n_boot=2, seed=9, bins=10, step=0.01)
    b = bootstrap_thresholds(mm, labels.tolist(), n_boot=2, seed=9, bins=10, step=0.01, chunk_size=7,
                             progress=True)
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_boot": 0}, "n_boot must be an integer >= 1"),
        ({"n_boot": 2.5}, "n_boot"),
        ({"n_boot": True}, "n_boot"),
        ({"level": 0}, "level must be a number in"),
        ({"level": 1}, "level"),
        ({"level": 95}, "level"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"seed": 1.5}, "seed"),
        ({"permutations": 0}, "permutations"),
        ({"step": 0.003}, "does not divide 1"),
        ({"bins": 0}, "bins"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_arguments_raise_naming_them(data, kwargs, match):
    x, labels = data
    with pytest.raises(ValueError, match=match):
        bootstrap_thresholds(x, labels, **{"n_boot": 1, "bins": None, **kwargs})
