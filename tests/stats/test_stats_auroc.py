"""class_auroc: sklearn and exact-fraction oracles, ties and zeros, dtypes, memmaps, traps, its relation to KS."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from featstudy.stats import _kernels, class_auroc, signed_ks


def sklearn_auroc(x, labels, classes):
    """(F, C) from sklearn's roc_auc_score, one (feature, class) pair at a time."""
    labels = np.asarray(labels)
    return np.array([[roc_auc_score(labels == c, x[:, f]) for c in classes] for f in range(x.shape[1])])


def brute_auroc(values, labels, cls):
    """P(X_in > X_out) + ½·P(X_in = X_out) over all (in, out) pairs, as an exact Fraction."""
    inside = [float(v) for v, y in zip(values, labels) if y == cls]
    outside = [float(v) for v, y in zip(values, labels) if y != cls]
    score = sum(Fraction(1) if a > b else Fraction(1, 2) if a == b else Fraction(0) for a in inside for b in outside)
    return score / (len(inside) * len(outside))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32])
def test_matches_sklearn_on_relu_zeros_ties_strings_and_a_single_image_class(relu_data, dtype):
    x, labels = relu_data  # ~40% exact zeros, values rounded to 0.1 (ties), constant features, class "single"
    x = (x * 10).astype(dtype) if np.dtype(dtype).kind == "i" else x.astype(dtype)
    r = class_auroc(x, labels)
    assert r.classes.tolist() == sorted(set(labels.tolist())) and r.n_in.min() == 1  # the fixture's "singl"
    assert r.auroc.shape == (x.shape[1], r.classes.size) and r.auroc.dtype == np.float64
    assert r.n == x.shape[0] and r.n_in.dtype == np.int64 and r.n_in.sum() == x.shape[0]
    np.testing.assert_array_equal(r.n_out, r.n - r.n_in)
    np.testing.assert_allclose(r.auroc, sklearn_auroc(x, labels, r.classes), rtol=0, atol=1e-12)
    assert np.all(r.auroc[5] == 0.5) and np.all(r.auroc[6] == 0.5)  # constant features: every pair a tie
    assert r.auroc[2, list(r.classes).index("cls03")] > 0.75  # shifted up: above ½, as D > 0


def test_hand_case_ties_count_one_half_and_the_direction():
    # class A = {0, 0, 1}, rest = {0, 2}: pairs (0,0) ½ twice, (1,0) 1, all others 0 -> 2/6
    x = np.array([0, 0, 1, 0, 2], dtype=np.float32)[:, None]
    y = np.array(["A", "A", "A", "B", "B"])
    r = class_auroc(x, y)
    assert r.auroc[0, 0] == float(Fraction(1, 3))  # ties as 0 gives 1/6, as 1 gives 1/2
    assert r.auroc[0, 1] == float(Fraction(2, 3))  # the mirror class: 1 − AUROC(A) with two classes
    np.testing.assert_array_equal(r.u, [[2.0, 4.0]])  # U = AUROC·n_in·n_out
    up = class_auroc(np.array([[5.0], [6.0], [1.0], [2.0]]), [1, 1, 0, 0])
    assert up.auroc[0].tolist() == [0.0, 1.0]  # class 1 entirely above the rest: 1 (a flipped sign gives 0)


def test_negative_zero_is_positive_zero():
    rng = np.random.default_rng(1)
    base = np.where(rng.random((80, 6)) < 0.5, 0.0, np.round(rng.normal(size=(80, 6)), 1))
    neg = base.copy()
    neg[(base == 0) & (rng.random((80, 6)) < 0.5)] = -0.0
    assert np.signbit(neg[neg == 0]).any() and not np.signbit(neg[neg == 0]).all()
    y = np.arange(80) % 4
    for dtype in (np.float32, np.float64):
        a = class_auroc(base.astype(dtype), y)
        b = class_auroc(neg.astype(dtype), y)
        np.testing.assert_array_equal(a.auroc, b.auroc)
        np.testing.assert_allclose(b.auroc, sklearn_auroc(neg.astype(dtype), y, b.classes), rtol=0, atol=1e-12)


small_cases = st.integers(min_value=2, max_value=14).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(-3, 3), min_size=n, max_size=n),
        st.lists(st.integers(0, 2), min_size=n, max_size=n).filter(lambda ys: len(set(ys)) >= 2),
    )
)


@settings(max_examples=150, deadline=None)
@given(small_cases, st.sampled_from([np.float32, np.float64]), st.booleans())
def test_property_exact_fractions_sklearn_and_the_ks_bounds(data, dtype, negative_zeros):
    values, ys = data
    x = np.array(values, dtype=dtype)[:, None] * dtype(0.5)
    if negative_zeros:
        x[x == 0] = -0.0
    r = class_auroc(x, ys)
    ks = signed_ks(x, ys, bins=None)
    for c, cls in enumerate(r.classes):
        assert r.auroc[0, c] == float(brute_auroc(x[:, 0], ys, cls))  # correctly rounded exact fraction
        assert r.auroc[0, c] == pytest.approx(roc_auc_score(np.array(ys) == cls, x[:, 0]), abs=1e-12)
        # AUROC − ½ is a mean of mid-EDF differences, each within [−D−, D+] (the Notes of class_auroc)
        assert 0.5 - ks.d_minus[0, c] - 1e-12 <= r.auroc[0, c] <= 0.5 + ks.d_plus[0, c] + 1e-12


def test_ks_and_auroc_read_a_pair_differently():
    # the class sits on both sides of the rest: no shift (AUROC ½) but a gap of ½ in the EDFs
    rest = np.linspace(-1, 1, 200)
    cls = np.concatenate([np.linspace(-5, -4, 50), np.linspace(4, 5, 50)])
    x = np.concatenate([cls, rest])[:, None]
    y = np.repeat([1, 0], [100, 200])
    assert class_auroc(x, y).auroc[0, 1] == 0.5
    assert abs(signed_ks(x, y, bins=None).d[0, 1]) == 0.5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_memmap_chunks_layouts_and_progress_give_identical_results(tmp_path, relu_data, monkeypatch, dtype):
    x, labels = relu_data
    x = np.concatenate([x, x[:, ::-1] * 2, x[:, :30]], axis=1).astype(dtype)  # 78 features: several groups
    ref = class_auroc(x, labels)
    np.save(tmp_path / "f.npy", x)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    from featstudy.stats import _input

    monkeypatch.setattr(_input, "SLAB_ROWS", 37)  # several row slabs per chunk
    for v in (
        class_auroc(mm, labels, chunk_size=7),
        class_auroc(mm, labels),
        class_auroc(x, labels, chunk_size=1),
        class_auroc(np.asfortranarray(x), labels, chunk_size=65, progress=True),
        class_auroc(x[:, ::1].copy(), labels.tolist()),
    ):
        np.testing.assert_array_equal(v.auroc, ref.auroc)
        np.testing.assert_array_equal(v.classes, ref.classes)


def test_counts_beyond_int32():
    m = 46_341  # 2U up to 2·m·m > 2**31
    rng = np.random.default_rng(0)
    x = np.zeros((2 * m, 2), dtype=np.float32)
    x[:m, 0] = 1.0  # class 0 entirely above the rest
    x[:, 1] = rng.normal(size=2 * m)
    y = np.repeat([0, 1], m)
    r = class_auroc(x, y)
    assert r.auroc[0].tolist() == [1.0, 0.0]
    assert r.auroc[1, 0] == pytest.approx(roc_auc_score(y == 0, x[:, 1]), abs=1e-12)


@pytest.mark.parametrize(
    "x, y, match",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0], [2.0, 1.0]]), [0, 1, 0], r"NaN or inf.*\[1\]"),
        (np.array([[0.0, 1.0], [np.inf, 2.0], [2.0, 1.0]], dtype=np.float32), [0, 1, 0], r"NaN or inf.*\[0\]"),
        (np.array([[2**53], [2**53 + 1], [0]], dtype=np.int64), [0, 1, 0], r"beyond ±2\^53.*\[0\]"),
        (np.zeros((3, 2)), [0, 1], "length 2 but features has 3 rows"),
        (np.zeros((3, 2)), [1, 1, 1], "at least two classes"),
        (np.zeros(3), [0, 1, 0], "2-D"),
    ],
)
def test_errors_name_the_problem(x, y, match):
    with pytest.raises(ValueError, match=match):
        class_auroc(x, y)


def test_nan_among_many_columns_is_named_with_its_global_index():
    x = np.random.default_rng(0).normal(size=(30, 200)).astype(np.float32)
    x[3, 137] = np.nan
    with pytest.raises(ValueError, match=r"\[137\]"):
        class_auroc(x, np.arange(30) % 3, chunk_size=50)


def test_numba_cache_is_used_in_a_fresh_process(fresh_processes):
    code = (
        "import numpy as np\n"
        "from featstudy.stats import class_auroc, _kernels as K\n"
        "x = np.random.default_rng(0).normal(size=(30, 3))\n"
        "for dt in (np.float32, np.float64):\n"
        "    class_auroc(x.astype(dt), np.arange(30) % 3)\n"
        "miss = {k.__name__: dict(k.stats.cache_misses) for k in (K.auroc_f32, K.auroc_f64)}\n"
        "print(miss)\n"
        "raise SystemExit(1 if any(miss.values()) else 0)\n"
    )
    res = fresh_processes(code)
    assert res.returncode == 0, res.stdout + res.stderr
    assert callable(_kernels.auroc_f32) and callable(_kernels.auroc_f64)
