"""signed_ks: scipy oracle, exact fractions, the tie rule, ties in values, binning, chunking, memmaps, traps."""

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from featstudy.stats import permuted_labels, signed_ks, signed_ks_random
from featstudy.stats import _kernels

from ks_oracle import brute_signed_ks


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_scipy_with_ties_constants_single_image_and_strings(relu_data, dtype):
    x, labels = relu_data
    x = x.astype(dtype)
    r = signed_ks(x, labels, bins=None)
    assert r.classes.tolist() == sorted(set(labels.tolist()))
    assert r.d.shape == r.d_plus.shape == r.location.shape == (x.shape[1], r.classes.size)
    assert r.n == x.shape[0] and r.n_in.sum() == x.shape[0] and r.n_in.dtype == np.int64
    assert r.statistic is r.d
    for f in range(x.shape[1]):
        for c, cls in enumerate(r.classes):
            inside = labels == cls
            ref = stats.ks_2samp(x[~inside, f], x[inside, f], method="asymp")
            assert abs(r.d[f, c]) == pytest.approx(ref.statistic, abs=1e-12)
            if r.d_plus[f, c] != r.d_minus[f, c]:  # scipy's sign is not reliable on exact ties
                assert r.sign[f, c] == ref.statistic_sign
    assert np.all(r.d[5] == 0) and np.all(r.d[6] == 0) and np.all(r.sign[5] == 1)
    assert r.d[2, list(r.classes).index("cls03")] > 0.5  # shifted up -> positive


def test_hand_case_exact_fractions():
    # class A = {1, 2, 2, 4}, rest = {0, 2, 3}
    x = np.array([1, 2, 2, 4, 0, 2, 3], dtype=np.float32)[:, None]
    y = np.array(["A", "A", "A", "A", "B", "B", "B"])
    r = signed_ks(x, y, bins=None)
    # F_out - F_in at 0,1,2,3,4: 1/3, 1/3-1/4, 2/3-3/4, 1-3/4, 0
    assert r.d_plus[0, 0] == float(Fraction(1, 3)) and r.location_plus[0, 0] == 0.0
    assert r.d_minus[0, 0] == float(Fraction(1, 12)) and r.location_minus[0, 0] == 2.0
    assert r.d[0, 0] == float(Fraction(1, 3)) and r.sign[0, 0] == 1
    # class B is the mirror: its D+ is A's D-
    assert r.d_plus[0, 1] == float(Fraction(1, 12)) and r.d[0, 1] == -float(Fraction(1, 3))
    assert r.sign[0, 1] == -1 and r.location[0, 1] == 0.0


def test_exact_tie_takes_positive_sign():
    # in = {0, 3}, out = {1, 2}: F_out - F_in = -1/2, 0, 1/2, 0 -> D+ = D- = 1/2
    x = np.array([0.0, 3.0, 1.0, 2.0])[:, None]
    r = signed_ks(x, ["in", "in", "out", "out"], bins=None)
    assert r.d_plus[0, 0] == r.d_minus[0, 0] == 0.5
    assert r.d[0, 0] == 0.5 and r.sign[0, 0] == 1
    assert r.d[0, 1] == 0.5 and r.sign[0, 1] == 1  # the mirror class is a tie too


def test_tie_rule_is_decided_on_integers_not_floats():
    # D+ = 1/3 and D- = 1/3 reached through different float computations (n_in = 3, n_out = 6)
    x = np.array([0, 5, 5, 1, 1, 2, 3, 4, 4], dtype=np.float64)[:, None]
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1])
    dp, dm, _, _, sign = brute_signed_ks(x[:, 0], y, 0)
    r = signed_ks(x, y, bins=None)
    assert r.d_plus[0, 0] == float(dp) and r.d_minus[0, 0] == float(dm)
    assert r.sign[0, 0] == sign


small_ints = st.integers(min_value=2, max_value=14).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(-3, 3), min_size=n, max_size=n),
        st.lists(st.integers(0, 2), min_size=n, max_size=n).filter(lambda ys: len(set(ys)) >= 2),
    )
)


@settings(max_examples=150, deadline=None)
@given(small_ints, st.sampled_from([np.float32, np.float64]))
def test_property_matches_fraction_oracle(data, dtype):
    values, ys = data
    x = np.array(values, dtype=dtype)[:, None]
    r = signed_ks(x, ys, bins=None)
    for c, cls in enumerate(r.classes):
        dp, dm, lp, lm, sign = brute_signed_ks(values, ys, cls)
        assert r.d_plus[0, c] == float(dp)
        assert r.d_minus[0, c] == float(dm)
        assert r.sign[0, c] == sign
        assert r.d[0, c] == (float(dp) if sign > 0 else -float(dm))
        assert r.location_plus[0, c] == lp and r.location_minus[0, c] == lm


def _ref_bins(x, nbins):
    x = np.asarray(x, dtype=np.float64)
    lo, hi = x.min(axis=0), x.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.clip(np.floor(((x - lo) / span) * nbins), 0, nbins - 1)


@pytest.mark.parametrize("method", ["table", "sort"])
@settings(max_examples=100, deadline=None)
@given(data=small_ints, nbins=st.integers(1, 6))
def test_property_binned_equals_exact_on_bin_indices(method, data, nbins):
    from featstudy.stats import ks

    real = ks.binned_method
    ks.binned_method = lambda n, b, c: method  # hypothesis re-runs the body: no function-scoped fixture here
    try:
        _check_binned_equals_exact_on_bin_indices(data, nbins)
    finally:
        ks.binned_method = real


def _check_binned_equals_exact_on_bin_indices(data, nbins):
    values, ys = data
    x = (np.array(values, dtype=np.float32) * np.float32(0.37))[:, None]
    rb = signed_ks(x, ys, bins=nbins)
    re = signed_ks(_ref_bins(x, nbins), ys, bins=None)
    np.testing.assert_array_equal(rb.d, re.d)
    np.testing.assert_array_equal(rb.sign, re.sign)


def test_binned_formula_float64_as_written_and_clipped(binned_kernel):
    lo, hi, nbins = 0.1, 0.7, 100
    edges = lo + np.arange(nbins + 1) * ((hi - lo) / nbins)
    cand = np.concatenate([edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf)])
    cand = cand[(cand >= lo) & (cand <= hi)]
    as_written = np.clip(np.floor(((cand - lo) / (hi - lo)) * nbins), 0, nbins - 1)
    reordered = np.clip(np.floor((cand - lo) * nbins / (hi - lo)), 0, nbins - 1)
    in_f32 = np.clip(np.floor(((cand.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)) * nbins), 0, 99)
    tricky = (as_written != reordered) | (as_written != in_f32)
    assert tricky.any()  # values whose bin depends on how the formula is evaluated
    got = np.array([_kernels.bin_index(v, lo, hi, nbins) for v in cand])
    np.testing.assert_array_equal(got, as_written)
    assert _kernels.bin_index(hi, lo, hi, nbins) == nbins - 1  # the maximum is clipped into the last bin
    x = np.concatenate([[lo, hi], cand[tricky]])[:, None]
    y = np.arange(x.shape[0]) % 3
    rb = signed_ks(x, y, bins=nbins)
    ref = np.clip(np.floor(((x - lo) / (hi - lo)) * nbins), 0, nbins - 1)
    np.testing.assert_array_equal(rb.d, signed_ks(ref, y, bins=None).d)
    # locations are right bin edges in feature units
    b = ref[:, 0]
    right = lo + (hi - lo) * (b + 1) / nbins
    right[b == nbins - 1] = hi
    assert set(rb.location_plus[0]) | set(rb.location_minus[0]) <= set(right.tolist())


def test_float32_features_bin_with_a_float64_span(binned_kernel):
    # max − min of float32 data rounds in float32: (98765.43 − −1.2345678) is 98766.664 there, 98766.66425...
    # in float64. The formula's span is float64, so these values fall in the bin float64 arithmetic gives.
    lo, hi, nbins = np.float32(-1.2345678), np.float32(98765.43), 100
    span = np.float64(hi) - np.float64(lo)
    edges = (np.float64(lo) + np.arange(nbins + 1) * (span / nbins)).astype(np.float32)
    cand = np.concatenate([edges, np.nextafter(edges, np.float32(-np.inf)), np.nextafter(edges, np.float32(np.inf))])
    cand = cand[(cand >= lo) & (cand <= hi)].astype(np.float64)
    as_f64 = np.clip(np.floor(((cand - np.float64(lo)) / span) * nbins), 0, nbins - 1)
    as_f32_span = np.clip(np.floor(((cand - np.float64(lo)) / np.float64(hi - lo)) * nbins), 0, nbins - 1)
    assert (as_f64 != as_f32_span).any()
    x = np.concatenate([[lo, hi], cand]).astype(np.float32)[:, None]
    ref = np.clip(np.floor(((x.astype(np.float64) - np.float64(lo)) / span) * nbins), 0, nbins - 1)
    for seed in range(5):  # labels that make the moved values matter
        y = np.random.default_rng(seed).integers(0, 3, x.shape[0])
        got = signed_ks(x, y, bins=nbins)
        want = signed_ks(ref, y, bins=None)
        np.testing.assert_array_equal(got.d, want.d)
        np.testing.assert_array_equal(got.sign, want.sign)


def test_f32_sort_key_orders_like_the_values():
    v = np.array([-np.inf, -3.4e38, -1.5, -1e-45, -0.0, 0.0, 1e-45, 1.2e-38, 1.0, 1.5, 3.4e38, np.inf], np.float32)
    keys = [int(_kernels._f32_sort_key(b)) for b in v.view(np.uint32)]
    assert all(0 <= k < 2**32 for k in keys)
    assert keys[4] == keys[5]  # -0.0 is +0.0
    assert keys == sorted(keys) and len(set(keys)) == len(keys) - 1


def test_binned_method_picks_the_table_when_it_is_small_and_exact():
    from featstudy.stats.ks import binned_method

    assert binned_method(6000, 100, 200) == "table"  # cub200
    assert binned_method(25_000, 100, 500) == "table"  # 500 ImageNet classes
    assert binned_method(6000, 10_000, 200) == "sort"  # 2M cells against 6,000 images
    assert binned_method(200_000_000, 100, 2) == "sort"  # N²·S beyond 2^53: float64 keys would round


def test_negative_zero_equals_positive_zero(binned_kernel):
    rng = np.random.default_rng(1)
    base = np.where(rng.random((50, 4)) < 0.5, 0.0, rng.normal(size=(50, 4)))
    y = np.arange(50) % 3
    neg = base.copy()
    neg[(base == 0) & (rng.random((50, 4)) < 0.5)] = -0.0
    assert np.signbit(neg[neg == 0]).any()
    for dtype in (np.float32, np.float64):
        for bins in (None, 10):
            a = signed_ks(base.astype(dtype), y, bins=bins)
            b = signed_ks(neg.astype(dtype), y, bins=bins)
            np.testing.assert_array_equal(a.d, b.d)
            np.testing.assert_array_equal(a.sign, b.sign)
            np.testing.assert_array_equal(a.location, b.location)
            assert not np.any((b.location == 0) & np.signbit(b.location))  # reported as +0.0


def test_counts_beyond_int32():
    m = 46_341  # m * m > 2**31
    x = np.zeros((2 * m, 2), dtype=np.float32)
    x[:m, 0] = 1.0  # class 0 entirely above the rest: D = +1
    rng = np.random.default_rng(0)
    x[:, 1] = rng.normal(size=2 * m)
    y = np.repeat([0, 1], m)
    r = signed_ks(x, y, bins=None)
    assert r.d[0, 0] == 1.0 and r.d[0, 1] == -1.0
    ref = stats.ks_2samp(x[y == 1, 1], x[y == 0, 1], method="asymp")
    assert abs(r.d[1, 0]) == pytest.approx(ref.statistic, abs=1e-12)
    assert r.sign[1, 0] == ref.statistic_sign
    assert 0 <= r.d_plus[1, 0] <= 1 and 0 <= r.d_minus[1, 0] <= 1


def test_binned_counts_beyond_int32(binned_kernel):
    m = 46_341  # n_in * n_out > 2**31 in both binned kernels
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2 * m, 1)).astype(np.float32)
    y = np.repeat([0, 1], m)
    x[y == 0] += 0.05
    rb = signed_ks(x, y, bins=100)
    ref = signed_ks(_ref_bins(x, 100), y, bins=None)
    np.testing.assert_array_equal(rb.d, ref.d)
    np.testing.assert_array_equal(rb.sign, ref.sign)
    assert rb.d[0, 0] > 0


def test_constant_feature_is_zero_binned_and_exact(binned_kernel):
    x = np.full((10, 2), 3.0, dtype=np.float32)
    x[:, 1] = np.arange(10)
    for bins in (None, 100):
        r = signed_ks(x, np.arange(10) % 2, bins=bins)
        assert np.all(r.d[0] == 0) and np.all(r.d_plus[0] == 0) and np.all(r.d_minus[0] == 0)
        assert np.all(r.sign[0] == 1) and np.all(r.location[0] == 3.0)
        assert r.bins == bins


@pytest.mark.parametrize(
    "x, y, match",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0], [2.0, 1.0]]), [0, 1, 0], r"NaN or inf.*\[1\]"),
        (np.array([[0.0, 1.0], [np.inf, 2.0], [2.0, 1.0]], dtype=np.float32), [0, 1, 0], r"NaN or inf.*\[0\]"),
        (np.zeros((3, 2)), [0, 1], "length 2 but features has 3 rows"),
        (np.zeros((3, 2)), [1, 1, 1], "at least two classes"),
        (np.zeros(3), [0, 1, 0], "2-D"),
    ],
)
@pytest.mark.parametrize("bins", [None, 10])
def test_errors_name_the_problem(x, y, match, bins, binned_kernel):
    with pytest.raises(ValueError, match=match):
        signed_ks(x, y, bins=bins)


def test_overflowing_range_and_wide_integers_are_named(binned_kernel):
    x = np.array([[-1e308, 0.0], [1e308, 1.0], [0.0, 2.0], [1.0, 3.0]])
    y = [0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"max − min overflows float64 in feature column\(s\) \[0\].*bins=None"):
        signed_ks(x, y, bins=10)
    assert signed_ks(x, y, bins=None).d[0].tolist() == [-1.0, 1.0]  # exact: only the order matters
    wide = np.array([[2**53], [2**53 + 1], [2**53], [2**53 + 1]], dtype=np.int64)
    with pytest.raises(ValueError, match=r"beyond ±2\^53 \(feature column\(s\) \[0\]\)"):
        signed_ks(wide, y, bins=None)
    narrow = np.array([[2**52], [2**52 + 1], [2**52], [2**52 + 1]], dtype=np.int64)
    assert signed_ks(narrow, y, bins=None).d[0].tolist() == [-1.0, 1.0]


def test_bad_bins_and_chunk_size():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="bins"):
        signed_ks(x, [0, 1, 0, 1], bins=0)
    with pytest.raises(ValueError, match="chunk_size"):
        signed_ks(x, [0, 1, 0, 1], chunk_size=0)


@pytest.mark.parametrize("bins", [None, 100])
def test_memmap_chunking_and_dtypes_give_identical_results(tmp_path, relu_data, bins, monkeypatch, binned_kernel):
    if bins is None and binned_kernel == "sort":
        pytest.skip("exact statistics do not use a binned kernel")
    x, labels = relu_data
    x = np.concatenate([x, x[:, ::-1] * 2, x[:, :30]], axis=1)  # 78 features: several kernel groups
    ref = signed_ks(x, labels, bins=bins)
    np.save(tmp_path / "f.npy", x)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    from featstudy.stats import _input

    monkeypatch.setattr(_input, "SLAB_ROWS", 37)  # several row slabs per chunk
    variants = [
        signed_ks(mm, labels, bins=bins),
        signed_ks(mm, labels, bins=bins, chunk_size=7),
        signed_ks(x, labels, bins=bins, chunk_size=1),
        signed_ks(x, labels, bins=bins, chunk_size=65),
        signed_ks(np.asfortranarray(x), labels, bins=bins, progress=True),
    ]
    if bins is None:
        variants.append(signed_ks(x.astype(np.float64), labels, bins=None))
        variants.append(signed_ks((x * 10).astype(np.int64), labels, bins=None))  # same order, same D
    for v in variants:
        for name in ("d", "d_plus", "d_minus", "sign"):
            np.testing.assert_array_equal(getattr(v, name), getattr(ref, name))
    for v in variants[:5]:
        np.testing.assert_array_equal(v.location, ref.location)


@pytest.mark.parametrize("bins", [None, 20])
def test_random_labels_reuse_the_sort_and_match_permuted_runs(relu_data, bins, binned_kernel):
    x, labels = relu_data
    out = signed_ks_random(x, labels, permutations=3, seed=5, bins=bins, chunk_size=10)
    rows = permuted_labels(labels, permutations=3, seed=5)
    assert out.shape == (3, x.shape[1], np.unique(labels).size) and out.dtype == np.float64
    for k in range(3):
        np.testing.assert_array_equal(out[k], signed_ks(x, rows[k], bins=bins).d)
    np.testing.assert_array_equal(out, signed_ks_random(x, labels, permutations=3, seed=5, bins=bins))
    assert not np.array_equal(out, signed_ks_random(x, labels, permutations=3, seed=6, bins=bins))


def test_permuted_labels_seeded_rows_are_permutations():
    labels = np.array(list("aabbbc"))
    p = permuted_labels(labels, permutations=4, seed=3)
    assert p.shape == (4, 6)
    for row in p:
        assert sorted(row) == sorted(labels)
    np.testing.assert_array_equal(p, permuted_labels(labels, permutations=4, seed=3))
    np.testing.assert_array_equal(p[:2], permuted_labels(labels, permutations=2, seed=3))
    rng = np.random.default_rng(3)
    np.testing.assert_array_equal(p[0], rng.permutation(labels))
    with pytest.raises(ValueError, match="permutations"):
        permuted_labels(labels, permutations=0)


def test_stats_imports_no_heavy_frameworks():
    code = (
        "import sys, featstudy.stats; bad = [m for m in ('torch', 'hydra', 'lightning', 'pytorch_lightning', "
        "'mlflow') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stdout + res.stderr


def test_numba_cache_is_used_in_a_fresh_process(fresh_processes):
    # kernels that call numba.get_num_threads() silently lose cache=True and recompile in every process
    assert "get_num_threads" not in Path(_kernels.__file__).read_text().replace("``numba.get_num_threads()``", "")
    code = (
        "import numpy as np\n"
        "from featstudy.stats import signed_ks, signed_ks_random, _kernels as K\n"
        "x = np.random.default_rng(0).normal(size=(30, 3))\n"
        "for dt in (np.float32, np.float64):\n"
        "    for b in (None, 10):\n"
        "        signed_ks(x.astype(dt), np.arange(30) % 3, bins=b)\n"
        "    signed_ks(x.astype(dt), np.arange(30) % 3, bins=10_000)\n"  # the sort kernel
        "    signed_ks_random(x.astype(dt), np.arange(30) % 3, permutations=2)\n"
        "miss = {k.__name__: dict(k.stats.cache_misses) for k in (K.exact_f32, K.exact_f64, K.binned, "
        "K.binned_table, K.finish_signed, K.finish_random)}\n"
        "print(miss)\n"
        "raise SystemExit(1 if any(miss.values()) else 0)\n"
    )
    res = fresh_processes(code)
    assert res.returncode == 0, res.stdout + res.stderr
