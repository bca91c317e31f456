"""selectivity_index: against a loop written here, dead features, negative means, ties, labels, memmaps, traps."""

import numpy as np
import pytest

from featstudy.stats import selectivity_index


def loop_selectivity(x, labels):
    """(index, preferred, class means) by a plain loop over features and classes, straight from the definition."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    index, preferred, means = [], [], []
    for f in range(x.shape[1]):
        mu = [float(np.mean(x[labels == c, f])) for c in classes]
        top = max(range(len(classes)), key=lambda c: (mu[c], -c))  # highest mean, smallest label on ties
        mu_max = mu[top]
        mu_rest = sum(m for c, m in enumerate(mu) if c != top) / (len(classes) - 1)  # mean of the class means
        if mu_max == 0 and mu_rest == 0:
            si = 0.0
        elif mu_max + mu_rest == 0:
            si = float("nan")
        else:
            si = (mu_max - mu_rest) / (mu_max + mu_rest)
        index.append(si)
        preferred.append(classes[top])
        means.append(mu)
    return np.array(index), np.array(preferred), np.array(means)


@pytest.fixture
def unbalanced():
    """ReLU-like features over classes of very different sizes, with a dead feature and a negative one."""
    rng = np.random.default_rng(3)
    sizes = {"ant": 5, "bee": 60, "cat": 1, "dog": 20, "eel": 34}
    labels = np.concatenate([[k] * v for k, v in sizes.items()])
    rng.shuffle(labels)
    x = np.maximum(rng.normal(0.0, 1.0, (labels.size, 12)), 0)
    x[labels == "bee", 1] += 3.0  # the big class prefers feature 1
    x[labels == "ant", 2] += 2.0  # a small class prefers feature 2
    x[:, 3] = 0.0  # never fires
    x[:, 4] = rng.normal(-2.0, 1.0, labels.size)  # negative means everywhere
    x[:, 5] = rng.normal(0.0, 1.0, labels.size)  # means of both signs
    return x, labels


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_the_loop_with_string_labels(unbalanced, dtype):
    x, labels = unbalanced
    x = x.astype(dtype)
    r = selectivity_index(x, labels)
    si, pref, means = loop_selectivity(x, labels)
    assert r.classes.tolist() == ["ant", "bee", "cat", "dog", "eel"]
    np.testing.assert_array_equal(r.n_in, [5, 60, 1, 20, 34])
    assert r.index.shape == r.preferred.shape == (x.shape[1],) and r.class_means.shape == (x.shape[1], 5)
    np.testing.assert_allclose(r.class_means, means, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(r.index, si, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(r.preferred, pref)
    assert r.preferred[1] == "bee" and r.preferred[2] == "ant"
    assert r.index[3] == 0.0 and r.preferred[3] == "ant"  # dead feature: 0, the first label
    assert r.index[4] < 0  # all means negative: the ratio's sign flips (documented)


def test_rest_is_the_mean_of_the_other_class_means_not_of_the_other_images(unbalanced):
    x, labels = unbalanced
    r = selectivity_index(x, labels)
    f = 2  # preferred by "ant" (5 images); the rest are classes of 60, 1, 20, 34 images
    others = [c for c in r.classes if c != "ant"]
    rest_classes = np.mean([x[labels == c, f].mean() for c in others])
    rest_images = x[labels != "ant", f].mean()
    mu_max = x[labels == "ant", f].mean()
    assert abs(rest_classes - rest_images) > 1e-3  # the two readings differ on these data
    assert r.index[f] == pytest.approx((mu_max - rest_classes) / (mu_max + rest_classes), rel=1e-12)


def test_hand_values_negative_means_and_the_zero_denominator():
    y = np.array(["a", "a", "b", "b"])
    x = np.array([
        [4.0, 0.0, 1.0, -1.0, 3.0, 2.0],
        [2.0, 0.0, 1.0, -1.0, 3.0, 2.0],
        [1.0, 0.0, -1.0, -3.0, -1.0, 2.0],
        [1.0, 0.0, -1.0, -3.0, -1.0, 2.0],
    ])
    r = selectivity_index(x, y)
    # (3 − 1)/(3 + 1); never fires; μ_max + μ_rest = 0 with non-zero means; both negative; μ_rest < 0 < μ_max;
    # all classes equal
    assert r.index[0] == 0.5 and r.index[1] == 0.0
    assert np.isnan(r.index[2])  # undefined, not 0: the class means differ
    assert r.index[3] == (-1 - -3) / (-1 + -3) == -0.5
    assert r.index[4] == (3 - -1) / (3 + -1) == 2.0  # beyond 1
    assert r.index[5] == 0.0
    assert r.preferred.tolist() == ["a", "a", "a", "a", "a", "a"]  # ties (features 1, 5): the smallest label


def test_preferred_and_ties_with_int_labels():
    y = np.array([7, 7, 3, 3, 5])
    x = np.array([[1.0, 2.0], [1.0, 2.0], [0.0, 2.0], [0.0, 2.0], [1.0, 0.0]])
    r = selectivity_index(x, y)
    assert r.classes.tolist() == [3, 5, 7]
    assert r.preferred.tolist() == [5, 3]  # feature 0: 5 and 7 tie at 1.0 -> 5; feature 1: 3 and 7 tie -> 3
    np.testing.assert_array_equal(r.class_means, [[0.0, 1.0, 1.0], [2.0, 0.0, 2.0]])
    assert r.index[0] == (1.0 - 0.5) / (1.0 + 0.5)  # μ_rest = mean(0, 1)
    assert r.index[1] == (2.0 - 1.0) / (2.0 + 1.0)


def test_memmap_chunks_and_int_inputs_give_identical_results(tmp_path, unbalanced, monkeypatch):
    x, labels = unbalanced
    x = np.concatenate([x, x[:, ::-1] * 3, x[:, :7]], axis=1)  # 31 features
    ref = selectivity_index(x, labels)
    np.save(tmp_path / "f.npy", x.astype(np.float32))
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    from featstudy.stats import _input

    monkeypatch.setattr(_input, "SLAB_ROWS", 13)
    in_memory = selectivity_index(x.astype(np.float32), labels)
    for v in (selectivity_index(mm, labels, chunk_size=4), selectivity_index(mm, labels, progress=True)):
        np.testing.assert_array_equal(v.class_means, in_memory.class_means)
        np.testing.assert_array_equal(v.index, in_memory.index)
        np.testing.assert_array_equal(v.preferred, in_memory.preferred)
    np.testing.assert_array_equal(selectivity_index(x, labels, chunk_size=3).index, ref.index)
    ints = np.rint(x * 100).astype(np.int64)
    np.testing.assert_allclose(selectivity_index(ints, labels).index, loop_selectivity(ints, labels)[0], rtol=1e-12)


def test_class_means_are_summed_in_float64():
    # float32 sums of 1e8 + many ones lose the ones; float64 keeps them
    x = np.ones((20_001, 1), dtype=np.float32)
    x[0, 0] = 1e8
    y = np.zeros(20_001, dtype=np.int64)
    y[-1] = 1
    r = selectivity_index(x, y)
    assert r.class_means[0, 0] == (1e8 + 19_999) / 20_000


@pytest.mark.parametrize(
    "x, y, match",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0], [2.0, 1.0]]), [0, 1, 0], r"NaN or inf.*\[1\]"),
        (np.array([[0.0, 1.0], [np.inf, 2.0], [2.0, 1.0]], dtype=np.float32), [0, 1, 0], r"NaN or inf.*\[0\]"),
        (np.array([[1e308, 0.0], [1e308, 0.0], [0.0, 1.0]]), [0, 0, 1], r"overflow float64.*\[0\]"),
        (np.zeros((3, 2)), [0, 1], "length 2 but features has 3 rows"),
        (np.zeros((3, 2)), [1, 1, 1], "at least two classes"),
    ],
)
def test_errors_name_the_problem(x, y, match):
    with pytest.raises(ValueError, match=match):
        selectivity_index(x, y)
