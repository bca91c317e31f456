"""Numba kernels of the signed KS engine (private; the public entry points are in :mod:`featstudy.stats.ks`).

Every kernel works on a block of feature columns ``block`` (N, fc) and a matrix of label indices ``labels``
(K, N) (K = 1 for the real labels, K > 1 for randomized labels sharing one sort per feature), and writes per
(k, feature, class) the integer extrema

    g_max = max_x g(x),  g_min = min_x g(x),  g(x) = T(x)·n_in − a(x)·N = n_in·n_out·(F_out(x) − F_in(x))

where T(x) = #{i: x_i ≤ x}, a(x) = #{i in c: x_i ≤ x}. Then D+ = g_max / (n_in·n_out) and
D− = −g_min / (n_in·n_out), and the tie rule D+ ≥ D− is the integer comparison g_max ≥ −g_min (the two share the
denominator, so "cross-multiplied" comparison needs no multiplication at all). All counts are int64.

Why only O(N + C) work per (feature, permutation): between two runs of values that contain members of class c,
a(x) is constant and T(x) grows, so g only rises. Hence the maximum of g is reached at the end of the run that
precedes a run holding members of c (or at the last run, where g = 0), and the minimum at the end of a run that
holds members of c. One pass over the sorted sample, touching for each element only its own class, sees every
candidate; candidates are visited in increasing x and replaced only on strict improvement, so the reported
location is the smallest sample value at which the extremum is attained.

Binned data need no sort: :func:`binned_table` counts each class per bin in a (B, C) table and evaluates g at
every bin edge for all classes at once (a loop along classes that vectorises). Its running g and the keys that
carry the extremum's bin are float64 holding integers below 2^53, hence exact; the caller checks the bound.

The exact kernels share their sorts, inlined: :func:`_sort_f32` (radix sort of the float32 bits, the zero run
kept out of it) and :func:`_sort_f64` (merge sort) give per sorted position the image ``sidx`` and the run
[rs, re) of equal values. :func:`exact_f32` / :func:`exact_f64` run the class pass above on them;
:func:`auroc_f32` / :func:`auroc_f64` sum per class twice the midrank, rs + re + 1, for the AUROC
(:func:`featstudy.stats.class_auroc`).

Kernels never call ``numba.get_num_threads()``: that silently disables ``cache=True``.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
from numba import njit, prange

GROUP = 64  # features gathered together: 256 bytes of float32 per row

# Explicit signatures with layout "A": one compiled (and cached) version per kernel and block dtype, whatever
# the layout of the caller's arrays (C, F or a column slice), instead of one lazy compile per layout seen.
_OUT = "int64[:, :, :], int64[:, :, :], float64[:, :, :], float64[:, :, :], boolean[:]"
_SIG_F32 = f"void(float32[:, :], int32[:, :], int64[:], {_OUT})"
_SIG_F64 = f"void(float64[:, :], int32[:, :], int64[:], {_OUT})"
_SIG_BINNED = [f"void({t}[:, :], int32[:, :], int64[:], int64, {_OUT})" for t in ("float32", "float64")]
_SIG_AUROC_F32 = "void(float32[:, :], int32[:], int64[:, :], boolean[:])"
_SIG_AUROC_F64 = "void(float64[:, :], int32[:], int64[:, :], boolean[:])"



class _LazyKernel:
    """A kernel with explicit signatures, compiled (or loaded from numba's cache) on its first use, not at import.

    ``njit(signatures)`` compiles every signature when the module is imported; a fresh checkout would pay for all
    kernels (tens of seconds) even in a process that needs one of them, or none (``--help``). Attributes other
    than the call (``stats``, ``signatures``...) are those of the compiled dispatcher.
    """

    def __init__(self, pyfunc, signatures, options):
        functools.update_wrapper(self, pyfunc)
        self._pyfunc = pyfunc
        self._signatures = signatures
        self._options = options
        self._dispatcher = None
        self._lock = threading.Lock()

    def dispatcher(self):
        if self._dispatcher is None:
            with self._lock:
                if self._dispatcher is None:
                    self._dispatcher = njit(self._signatures, **self._options)(self._pyfunc)
        return self._dispatcher

    def __call__(self, *args):
        return self.dispatcher()(*args)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.dispatcher(), name)


def _lazy_njit(signatures, **options):
    return lambda pyfunc: _LazyKernel(pyfunc, signatures, options)


TILE_ROWS = 16  # rows per tile of the column gather: 16 rows x 256 bytes stay in L1 while they are transposed


@njit(cache=True)
def _gather_columns(block, j0, gw, col):
    """col[j, i] = block[i, j0 + j] for j < gw: the group's columns made contiguous, one row tile at a time.

    Reading 256-byte row segments of a tile of rows and writing contiguous runs of each column keeps both
    sides in L1, where a plain row-by-row loop would write to 64 rows of ``col`` at once.
    """
    n = block.shape[0]
    for i0 in range(0, n, TILE_ROWS):
        i1 = min(n, i0 + TILE_ROWS)
        for j in range(gw):
            for i in range(i0, i1):
                col[j, i] = block[i, j0 + j]


@njit(cache=True, inline="always")
def _shape(block, labels, n_in):
    """(N, fc, K, C, feature groups of :data:`GROUP`) of a kernel's block, label rows and class sizes."""
    n, fc = block.shape
    return n, fc, labels.shape[0], n_in.size, (fc + GROUP - 1) // GROUP


@njit(cache=True, inline="always")
def _group_columns(block, grp):
    """(j0, gw, col) of feature group ``grp``: its first column, its width (≤ GROUP) and its columns gathered.

    Inlined into the kernels (as a plain call it cost the table kernel ~10% in bench/ks.py)."""
    j0 = grp * GROUP
    gw = min(GROUP, block.shape[1] - j0)
    col = np.empty((GROUP, block.shape[0]), dtype=block.dtype)
    _gather_columns(block, j0, gw, col)
    return j0, gw, col


@njit(cache=True, inline="always")
def _sort_scratch(n):
    """Scratch of a sorted feature: per sorted position the image (sidx) and its run [rs, re) of equal values."""
    return np.empty(n, dtype=np.int32), np.empty(n, dtype=np.int32), np.empty(n, dtype=np.int32)


@njit(cache=True, inline="always")
def _pass_scratch(c_count, n):
    """Scratch of the class pass (:func:`_emit`): per class the extrema (g1, g2), their sorted positions (i1, i2)
    and counts; per sorted position the class (slab)."""
    return (np.empty(c_count, dtype=np.int64), np.empty(c_count, dtype=np.int64), np.empty(c_count, dtype=np.int64),
            np.empty(c_count, dtype=np.int64), np.empty(c_count, dtype=np.int64), np.empty(n, dtype=np.int32))


_SIGN32 = np.uint32(0x80000000)
_EXP32 = np.uint32(0x7F800000)


@njit(cache=True)
def _run_bounds(skey, rs, re):
    """For each sorted position i: start rs[i] and end re[i] (exclusive) of its run of equal keys."""
    n = skey.size
    cur = 0
    for i in range(n):
        if i > 0 and skey[i] != skey[i - 1]:
            cur = i
        rs[i] = cur
    cur = n
    for i in range(n - 1, -1, -1):
        if i < n - 1 and skey[i] != skey[i + 1]:
            cur = i + 1
        re[i] = cur


@njit(cache=True)
def _packed_runs(srt, t0, t1, offset, sidx, rs, re):
    """Copy payloads of sorted packed ``srt[t0:t1]`` to ``sidx[offset:]`` and fill their run bounds.

    Two branch-free sweeps, run starts forwards and run ends backwards (a backfill per run mispredicts on the
    mostly single-element runs of real-valued features).
    """
    if t1 <= t0:
        return
    high = np.uint64(32)
    low = np.uint64(0xFFFFFFFF)
    prev = srt[t0] >> high
    start = offset
    for t in range(t0, t1):
        v = srt[t]
        k = v >> high
        pos = offset + t - t0
        start = pos if k != prev else start
        prev = k
        sidx[pos] = np.int32(v & low)
        rs[pos] = start
    nxt = srt[t1 - 1] >> high
    stop = offset + t1 - t0
    for t in range(t1 - 1, t0 - 1, -1):
        k = srt[t] >> high
        pos = offset + t - t0
        stop = pos + 1 if k != nxt else stop
        nxt = k
        re[pos] = stop


@njit(cache=True)
def _class_pass(sidx, rs, re, lab, n_in, n, gmax, gmin, imax, imin, acount, slab):
    """Extrema of g for every class in one pass over the sorted sample.

    Element i (sorted position, class c = lab[sidx[i]], in run [s, e)) offers the D+ candidate at the end of the
    previous run, g = s·n_in − a_c·N with a_c counted before i, and the D− candidate at the end of its run,
    g = e·n_in − a_c·N with a_c counted up to i. For the first member of c in a run the D+ value is exact and for
    the last the D− value is; the other members offer a smaller D+ value and a larger D− value at the same
    location, which can never win a strict comparison against the exact one. The first run has no previous run
    (its D+ candidate, x = −inf, is skipped); the last run's g = 0 is added at the end.
    """
    c_count = n_in.size
    for c in range(c_count):
        acount[c] = 0
        gmax[c] = -1  # sentinel: the last run always offers g = 0
        gmin[c] = 1  # sentinel: the last run holding class c always offers g <= 0
        imax[c] = n - 1
        imin[c] = n - 1
    nn = np.int64(n)
    for i in range(n):  # the classes in sorted order first: the pass below then reads them in sequence (-35%)
        slab[i] = lab[np.uint64(sidx[i])]
    for i in range(n):
        c = np.uint64(slab[i])  # unsigned indices: no wraparound checks
        s = np.int64(rs[i])
        e = np.int64(re[i])
        nc = n_in[c]
        a = acount[c]
        an = a * nn
        gp = s * nc - an
        if gp > gmax[c]:
            if s > 0:
                gmax[c] = gp
                imax[c] = s - 1
        acount[c] = a + 1
        gm = e * nc - an - nn
        if gm < gmin[c]:
            gmin[c] = gm
            imin[c] = e - 1
    for c in range(c_count):
        if gmax[c] < 0:
            gmax[c] = 0
            imax[c] = n - 1


@njit(cache=True)
def _radix_sort_hi32(a, tmp, hist, kmin, kmax):
    """Sort uint64 ``a`` (key in the high 32 bits, payload below) by key; returns the array holding the result,
    whose high bits then hold key − kmin.

    LSD radix on (key − kmin): as many passes of ≤ 11 bits as the key range needs (typically 3 of 9–10 bits
    for real-valued features), each a stable counting sort.
    """
    n = a.size
    rng = np.uint64(kmax - kmin)
    bits = 0
    while rng > 0:
        bits += 1
        rng >>= np.uint64(1)
    off = np.uint64(kmin) << np.uint64(32)
    if bits == 0:
        for i in range(n):
            a[i] -= off
        return a
    passes = (bits + 10) // 11
    width = (bits + passes - 1) // passes
    mask = np.uint64((1 << width) - 1)
    hist[:, : 1 << width] = 0
    for i in range(n):
        v = a[i] - off
        a[i] = v
        k = v >> np.uint64(32)
        for p in range(passes):
            hist[p, (k >> np.uint64(p * width)) & mask] += 1
    src = a
    dst = tmp
    for p in range(passes):
        shift = np.uint64(32 + p * width)
        h = hist[p]
        if h[(src[0] >> shift) & mask] == n:
            continue
        total = 0
        for b in range(1 << width):
            cnt = h[b]
            h[b] = total
            total += cnt
        for i in range(n):
            v = src[i]
            b = (v >> shift) & mask
            d = h[b]
            dst[np.uint64(d)] = v
            h[b] = d + 1
        src, dst = dst, src
    return src


@njit(cache=True)
def _f32_sort_key(bits):
    """Order-preserving uint32 key of a float32 bit pattern; -0.0 and +0.0 get the same key."""
    bits = np.uint32(0) if bits == _SIGN32 else bits  # -0.0 is +0.0
    negative = np.uint32(np.uint32(0) - (bits >> np.uint32(31)))  # all ones for negative values: flip all bits
    return np.uint32(bits ^ (negative | _SIGN32))  # positive values: set the sign bit (numba widens to 64 bits)


@njit(cache=True)
def _emit(k, jj, sidx, lab, n_in, n, rs, re, g1, g2, i1, i2, acount, slab, gmax, gmin, locp, locm, values):
    """Class pass for permutation row k of feature jj; writes the extrema and their locations values[sidx[.]]."""
    _class_pass(sidx, rs, re, lab, n_in, n, g1, g2, i1, i2, acount, slab)
    for c in range(n_in.size):
        gmax[k, jj, c] = g1[c]
        gmin[k, jj, c] = g2[c]
        locp[k, jj, c] = values[sidx[i1[c]]]
        locm[k, jj, c] = values[sidx[i2[c]]]


@njit(cache=True, inline="always")
def _f32_scratch(n):
    """Scratch of :func:`_sort_f32`: packed (key, image) words and the radix sort's second buffer, the zeros'
    images, the radix histograms."""
    return (np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.int32),
            np.empty((3, 2048), dtype=np.int64))


@njit(cache=True, inline="always")
def _sort_f32(x, packed, tmp, zidx, hist, sidx, rs, re):
    """Sort one float32 feature ``x`` (N,) by a radix sort of its raw bits: fills ``sidx``, ``rs``, ``re``.

    Exact zeros (±0.0, the bulk of post-ReLU data) are kept out of the sort and inserted as one run between
    the negative and the positive values. Returns False, writing nothing, if ``x`` holds NaN or ±inf. Inlined
    into the kernels that share it (:func:`exact_f32`, :func:`auroc_f32`).
    """
    n = x.size
    zero_key = _f32_sort_key(np.uint32(0))
    bits = x.view(np.uint32)
    nonfinite = False
    m = 0
    nz = 0
    kmin = np.uint32(0xFFFFFFFF)
    kmax = np.uint32(0)
    for i in range(n):  # branch-free: 40% zeros in random order would mispredict every other element
        b = bits[i]
        nonfinite |= (b & _EXP32) == _EXP32
        zero = (b & np.uint32(0x7FFFFFFF)) == 0  # +0.0 or -0.0
        key = _f32_sort_key(b)
        zidx[nz] = i  # both slots are written; only the counter of the element's kind advances
        packed[m] = (np.uint64(key) << np.uint64(32)) | np.uint64(i)
        nz += zero
        m += not zero
        kmin = min(kmin, np.uint32(0xFFFFFFFF) if zero else key)
        kmax = max(kmax, np.uint32(0) if zero else key)
    if nonfinite:
        return False
    srt = packed
    if m > 1:
        srt = _radix_sort_hi32(packed[:m], tmp[:m], hist, kmin, kmax)
    # negatives (keys below the zero key) first, then the zero run, then the positives
    p = 0
    if m == 1:
        p = 1 if kmin < zero_key else 0
    elif m > 1 and kmin < zero_key:  # srt holds key - kmin in its high bits
        lim = np.uint64(zero_key - kmin) << np.uint64(32)
        lo_, hi_ = 0, m
        while lo_ < hi_:
            mid = (lo_ + hi_) // 2
            if srt[mid] < lim:
                lo_ = mid + 1
            else:
                hi_ = mid
        p = lo_
    if p > 0:
        _packed_runs(srt, 0, p, 0, sidx, rs, re)
    for z in range(nz):
        sidx[p + z] = zidx[z]
        rs[p + z] = p
        re[p + z] = p + nz
    if m > p:
        _packed_runs(srt, p, m, p + nz, sidx, rs, re)
    return True


@njit(cache=True, inline="always")
def _sort_f64(x, skey, sidx, rs, re):
    """Sort one float64 feature ``x`` (N,) by comparison (merge sort; values compare, so −0.0 == +0.0): fills
    ``sidx``, ``rs``, ``re`` (``skey``: scratch, the sorted values). Returns False, writing nothing, if ``x``
    holds NaN or ±inf. Inlined into :func:`exact_f64` and :func:`auroc_f64`.
    """
    n = x.size
    nonfinite = False  # not _value_range: exact statistics take ranges whose max − min overflows
    for i in range(n):
        if not np.isfinite(x[i]):
            nonfinite = True
    if nonfinite:
        return False
    order = np.argsort(x, kind="mergesort")
    for i in range(n):
        sidx[i] = order[i]
        skey[i] = x[order[i]]
    _run_bounds(skey, rs, re)
    return True


@_lazy_njit(_SIG_F32, parallel=True, cache=True, nogil=True)
def exact_f32(block, labels, n_in, gmax, gmin, locp, locm, bad):
    """Exact extrema for a float32 block (N, fc): radix sort of the raw bits (:func:`_sort_f32`), one sort per
    feature for all K."""
    n, fc, kperm, c_count, n_groups = _shape(block, labels, n_in)
    for grp in prange(n_groups):
        j0, gw, col = _group_columns(block, grp)
        packed, tmp, zidx, hist = _f32_scratch(n)
        sidx, rs, re = _sort_scratch(n)
        g1, g2, i1, i2, acount, slab = _pass_scratch(c_count, n)
        for j in range(gw):
            if not _sort_f32(col[j], packed, tmp, zidx, hist, sidx, rs, re):
                bad[j0 + j] = True
                continue
            for k in range(kperm):
                _emit(k, j0 + j, sidx, labels[k], n_in, n, rs, re, g1, g2, i1, i2, acount, slab, gmax, gmin, locp, locm,
                      col[j])


@_lazy_njit(_SIG_F64, parallel=True, cache=True, nogil=True)
def exact_f64(block, labels, n_in, gmax, gmin, locp, locm, bad):
    """Exact extrema for a float64 block (N, fc): comparison sort (:func:`_sort_f64`), one per feature for all K."""
    n, fc, kperm, c_count, n_groups = _shape(block, labels, n_in)
    for grp in prange(n_groups):
        j0, gw, col = _group_columns(block, grp)
        skey = np.empty(n, dtype=np.float64)
        sidx, rs, re = _sort_scratch(n)
        g1, g2, i1, i2, acount, slab = _pass_scratch(c_count, n)
        for j in range(gw):
            x = col[j]
            if not _sort_f64(x, skey, sidx, rs, re):
                bad[j0 + j] = True
                continue
            for k in range(kperm):
                _emit(k, j0 + j, sidx, labels[k], n_in, n, rs, re, g1, g2, i1, i2, acount, slab, gmax, gmin, locp, locm,
                      x)


@njit(cache=True)
def _rank_sums(sidx, rs, re, lab, r2):
    """r2[c] = Σ over the images of class c of twice their midrank, in int64 (exact).

    The element at sorted position i in the run [s, e) of equal values has the 1-based midrank (s + 1 + e)/2,
    so twice it is the integer s + e + 1.
    """
    for c in range(r2.size):
        r2[c] = 0
    for i in range(sidx.size):
        r2[np.uint64(lab[np.uint64(sidx[i])])] += np.int64(rs[i]) + np.int64(re[i]) + np.int64(1)


@_lazy_njit(_SIG_AUROC_F32, parallel=True, cache=True, nogil=True)
def auroc_f32(block, lab, r2, bad):
    """Rank sums for the AUROC of a float32 block (N, fc): r2[f, c] (:func:`_rank_sums`), after the same radix
    sort as :func:`exact_f32`."""
    n, fc = block.shape
    n_groups = (fc + GROUP - 1) // GROUP
    for grp in prange(n_groups):
        j0, gw, col = _group_columns(block, grp)
        packed, tmp, zidx, hist = _f32_scratch(n)
        sidx, rs, re = _sort_scratch(n)
        for j in range(gw):
            if not _sort_f32(col[j], packed, tmp, zidx, hist, sidx, rs, re):
                bad[j0 + j] = True
                continue
            _rank_sums(sidx, rs, re, lab, r2[j0 + j])


@_lazy_njit(_SIG_AUROC_F64, parallel=True, cache=True, nogil=True)
def auroc_f64(block, lab, r2, bad):
    """Rank sums for the AUROC of a float64 block (N, fc), after the same merge sort as :func:`exact_f64`."""
    n, fc = block.shape
    n_groups = (fc + GROUP - 1) // GROUP
    for grp in prange(n_groups):
        j0, gw, col = _group_columns(block, grp)
        skey = np.empty(n, dtype=np.float64)
        sidx, rs, re = _sort_scratch(n)
        for j in range(gw):
            if not _sort_f64(col[j], skey, sidx, rs, re):
                bad[j0 + j] = True
                continue
            _rank_sums(sidx, rs, re, lab, r2[j0 + j])


@njit(cache=True, inline="always")
def bin_index(x, lo, hi, nbins):
    """bin = clip(floor((x − min)/(max − min)·B), 0, B−1), evaluated in float64 in exactly this order."""
    lo = np.float64(lo)
    hi = np.float64(hi)
    b = np.floor(((np.float64(x) - lo) / (hi - lo)) * nbins)
    return np.int64(min(max(b, 0.0), np.float64(nbins - 1)))  # branch-free: :func:`_bin_indices` vectorises it


@njit(cache=True)
def bin_right_edge(b, lo, hi, nbins):
    """Right edge of bin ``b`` in feature units (the last bin's edge is the maximum itself)."""
    if b >= nbins - 1:
        return hi
    return lo + (hi - lo) * (b + 1) / nbins


@njit(cache=True)
def _value_range(x):
    """(min, max, finite) of one feature: min and max in float64, finite False if any value is NaN or ±inf.

    Min and max run in the data's own dtype (exact, vectorised); a NaN is counted, an inf shows in max − min.
    """
    lo = x[0]
    hi = x[0]
    nan = 0
    for i in range(x.size):
        v = x[i]
        nan += v != v
        lo = min(lo, v)
        hi = max(hi, v)
    lo64 = np.float64(lo)
    hi64 = np.float64(hi)
    return lo64, hi64, nan == 0 and np.isfinite(hi64 - lo64)


@njit(cache=True)
def _bin_indices(x, lo, hi, nbins, out):
    """out[i] = bin_index(x[i], lo, hi, nbins) for a whole feature (float64 lo, hi)."""
    for i in range(x.size):
        out[i] = np.int32(bin_index(x[i], lo, hi, nbins))


@njit(cache=True)
def _constant_feature(jj, lo, gmax, gmin, locp, locm):
    """A constant feature: D = 0 for every class and permutation, located at its value."""
    for k in range(gmax.shape[0]):
        for c in range(gmax.shape[2]):
            gmax[k, jj, c] = 0
            gmin[k, jj, c] = 0
            locp[k, jj, c] = lo
            locm[k, jj, c] = lo


@_lazy_njit(_SIG_BINNED, parallel=True, cache=True, nogil=True)
def binned(block, labels, n_in, nbins, gmax, gmin, locp, locm, bad):
    """Binned extrema by sorting: counting sort on the bin, then the class pass with EDFs at right edges.

    O(N + B + C) per feature and permutation; the choice when B·C is large against N (see :func:`binned_table`).
    """
    n, fc, kperm, c_count, n_groups = _shape(block, labels, n_in)
    for grp in prange(n_groups):
        j0, gw, col = _group_columns(block, grp)
        bins = np.empty(n, dtype=np.int32)
        loc_of = np.empty(n, dtype=np.float64)
        hist = np.empty(nbins, dtype=np.int64)
        bstart = np.empty(nbins, dtype=np.int64)
        edges = np.empty(nbins, dtype=np.float64)
        sidx, rs, re = _sort_scratch(n)
        g1, g2, i1, i2, acount, slab = _pass_scratch(c_count, n)
        for j in range(gw):
            x = col[j]
            lo, hi, finite = _value_range(x)
            if not finite:
                bad[j0 + j] = True
                continue
            if hi == lo:
                _constant_feature(j0 + j, lo, gmax, gmin, locp, locm)
                continue
            _bin_indices(x, lo, hi, nbins, bins)
            hist[:] = 0
            for i in range(n):
                hist[bins[i]] += 1
            total = 0
            for b in range(nbins):
                cnt = hist[b]
                bstart[b] = total
                hist[b] = total
                total += cnt
            for i in range(n):
                b = bins[i]
                pos = hist[b]
                sidx[pos] = i
                hist[b] = pos + 1
            for b in range(nbins):  # hist[b] is now the end of bin b
                bs = bstart[b]
                be = hist[b]
                for pos in range(bs, be):
                    rs[pos] = bs
                    re[pos] = be
            for b in range(nbins):
                edges[b] = bin_right_edge(b, lo, hi, nbins)
            for i in range(n):
                loc_of[i] = edges[bins[i]]
            for k in range(kperm):
                _emit(k, j0 + j, sidx, labels[k], n_in, n, rs, re, g1, g2, i1, i2, acount, slab, gmax, gmin, locp, locm,
                      loc_of)


@njit(cache=True)
def table_scale(nbins):
    """S, the power of two ≥ B by which :func:`binned_table` shifts g to make room for the bin in its keys."""
    scale = 1.0
    while scale < nbins:
        scale *= 2.0
    return scale


@_lazy_njit(_SIG_BINNED, parallel=True, cache=True, nogil=True)
def binned_table(block, labels, n_in, nbins, gmax, gmin, locp, locm, bad):
    """Binned extrema without sorting: a (B, C) table of counts per feature, swept bin by bin for all classes.

    With t_b the number of images in bins ≤ b and a_bc those of class c, g at the right edge of bin b is
    g_b(c) = t_b·n_c − a_bc·N (module docstring), and D+, D− are max_b g_b(c) and −min_b g_b(c); the EDFs only
    change at bin edges, so these B values per class are all the candidates (the last bin gives g = 0, the
    empty bins repeat the value before them). Filling the table is one increment per image; the sweep over
    bins runs along classes and vectorises. The smallest bin attaining each extremum rides along in one
    float64 key, max(g·S − b) and min(g·S + b) with S = :func:`table_scale` (B) (S > b, so the key orders by
    g first, then by the smaller b): every quantity is an integer below 2^53, hence exact in float64 (the
    caller checks N²·S < 2^53).

    Cost per feature and permutation O(N + B·C), against O(N) for :func:`binned`: the caller picks this kernel
    when B·C is at most a few times N (cub200: 100 × 200 cells for 6,000 images).
    """
    n, fc, kperm, c_count, n_groups = _shape(block, labels, n_in)
    scale = table_scale(nbins)
    n_scaled = np.float64(n) * scale
    for grp in prange(n_groups):
        j0, gw, col = _group_columns(block, grp)
        bins = np.empty(n, dtype=np.int32)
        total = np.empty(nbins, dtype=np.int64)
        table = np.empty(nbins * c_count, dtype=np.int32)  # table[b·C + c]: images of class c in bin b
        g = np.empty(c_count, dtype=np.float64)  # g_b(c)·S, running over b
        key_max = np.empty(c_count, dtype=np.float64)
        key_min = np.empty(c_count, dtype=np.float64)
        n_in_scaled = np.empty(c_count, dtype=np.float64)
        for c in range(c_count):
            n_in_scaled[c] = np.float64(n_in[c]) * scale
        for j in range(gw):
            jj = j0 + j
            x = col[j]
            lo, hi, finite = _value_range(x)
            if not finite:
                bad[jj] = True
                continue
            if hi == lo:
                _constant_feature(jj, lo, gmax, gmin, locp, locm)
                continue
            _bin_indices(x, lo, hi, nbins, bins)
            total[:] = 0
            for i in range(n):
                total[bins[i]] += 1
            for k in range(kperm):
                lab = labels[k]
                table[:] = 0
                for i in range(n):
                    table[np.uint32(bins[i]) * np.uint32(c_count) + np.uint32(lab[i])] += 1
                for c in range(c_count):
                    g[c] = 0.0
                    key_max[c] = -np.inf
                    key_min[c] = np.inf
                for b in range(nbins):
                    tb = np.float64(total[b])
                    if tb == 0.0:  # an empty bin repeats g of the bin before it: never a strict improvement
                        continue
                    bf = np.float64(b)
                    row = b * c_count
                    for c in range(c_count):
                        gc = g[c] + tb * n_in_scaled[c] - np.float64(table[row + c]) * n_scaled
                        g[c] = gc
                        key_max[c] = np.fmax(key_max[c], gc - bf)  # fmax/fmin: no masked stores
                        key_min[c] = np.fmin(key_min[c], gc + bf)
                for c in range(c_count):
                    hi_key = key_max[c]
                    g_hi = -np.floor(-hi_key / scale)  # key = g·S − b with 0 ≤ b < S
                    lo_key = key_min[c]
                    g_lo = np.floor(lo_key / scale)  # key = g·S + b
                    gmax[k, jj, c] = np.int64(g_hi)
                    gmin[k, jj, c] = np.int64(g_lo)
                    locp[k, jj, c] = bin_right_edge(np.int64(g_hi * scale - hi_key), lo, hi, nbins)
                    locm[k, jj, c] = bin_right_edge(np.int64(lo_key - g_lo * scale), lo, hi, nbins)


@njit(parallel=True, cache=True, nogil=True)
def finish_signed(gmax, gmin, locp, locm, n_in, n, d, d_plus, d_minus, location, sign):
    """The statistics from the extrema, in one pass (F, C): D+ = g_max/(n_in·n_out), D− = −g_min/(n_in·n_out)
    (int64 product, then float64 division: correctly rounded), the tie rule g_max ≥ −g_min on the integers, D and
    its location by that sign; locations −0.0 become +0.0 (in place)."""
    for f in prange(gmax.shape[0]):
        for c in range(gmax.shape[1]):
            denom = np.float64(n_in[c] * (n - n_in[c]))
            g1 = gmax[f, c]
            g2 = gmin[f, c]
            dp = np.float64(g1) / denom
            dm = np.float64(-g2) / denom
            d_plus[f, c] = dp
            d_minus[f, c] = dm
            lp = locp[f, c] + 0.0
            lm = locm[f, c] + 0.0
            locp[f, c] = lp
            locm[f, c] = lm
            if g1 >= -g2:
                d[f, c] = dp
                location[f, c] = lp
                sign[f, c] = 1
            else:
                d[f, c] = -dm
                location[f, c] = lm
                sign[f, c] = -1


@njit(parallel=True, cache=True, nogil=True)
def finish_random(gmax, gmin, n_in, n, d):
    """D of every (permutation, feature, class) from the extrema (K, fc, C), as :func:`finish_signed` does."""
    for f in prange(gmax.shape[1]):
        for k in range(gmax.shape[0]):
            for c in range(gmax.shape[2]):
                denom = np.float64(n_in[c] * (n - n_in[c]))
                g1 = gmax[k, f, c]
                g2 = gmin[k, f, c]
                d[k, f, c] = np.float64(g1) / denom if g1 >= -g2 else np.float64(g2) / denom
