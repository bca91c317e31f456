"""The signed two-sample Kolmogorov–Smirnov statistic for every (feature, class) pair (paper §4, Eq. 3)."""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

from featstudy.stats import _kernels

__all__ = ["KSResult", "signed_ks", "signed_ks_random", "prepare_labels"]

#: Bytes of feature values one chunk may copy out of a memory-mapped or non-float input.
CHUNK_BYTES = 512 * 2**20
#: Bytes the per-chunk integer/float outputs (K, fc, C) may take.
OUTPUT_BYTES = 256 * 2**20
#: Rows copied at a time from a memory map before its pages are released.
SLAB_ROWS = 4096
#: Binned statistics sweep a (bins × classes) count table per feature instead of sorting while the table has
#: at most this many cells per image (a cell of the vectorised sweep costs ~1/10–1/20 of an image in the sort
#: path; near 16 cells per image the two were measured even, and the table is redone for every permutation).
TABLE_CELLS_PER_IMAGE = 8
#: ... and while the table fits this many bytes per thread.
TABLE_BYTES = 8 * 2**20


@dataclass(frozen=True, eq=False)
class KSResult:
    """Signed KS statistics of every (feature, class) pair; see :func:`signed_ks`.

    Attributes
    ----------
    d, d_plus, d_minus : ndarray of float64, shape (F, C)
        Signed statistic D, and its one-sided parts D+ = max(F_out − F_in), D− = max(F_in − F_out).
    classes : ndarray, shape (C,)
        Sorted unique labels; column c of every array belongs to ``classes[c]``.
    n_in : ndarray of int64, shape (C,)
        Images per class.
    n : int
        Number of images.
    location, location_plus, location_minus : ndarray of float64, shape (F, C)
        Feature value where |D|, D+ and D− are attained (smallest such sample value when exact; the right edge
        of the bin, in feature units, when binned).
    sign : ndarray of int8, shape (F, C)
        +1 where D+ ≥ D− (ties included), −1 otherwise.
    bins : int or None
        Number of bins, or None for the exact statistic.
    """

    d: np.ndarray
    d_plus: np.ndarray
    d_minus: np.ndarray
    classes: np.ndarray
    n_in: np.ndarray
    n: int
    location: np.ndarray
    location_plus: np.ndarray
    location_minus: np.ndarray
    sign: np.ndarray
    bins: int | None

    @property
    def statistic(self) -> np.ndarray:
        """The signed statistic D (alias of ``d``)."""
        return self.d

    @property
    def n_out(self) -> np.ndarray:
        """Images outside each class, n − n_in."""
        return self.n - self.n_in


def _as_features(features) -> np.ndarray:
    if not isinstance(features, np.ndarray):
        features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D (images, features) array, got shape {features.shape}")
    if features.shape[1] == 0:
        raise ValueError("features has no columns (0 features)")
    if features.dtype.kind not in "fiub":
        raise ValueError(f"features must be numeric, got dtype {features.dtype}")
    return features


def prepare_labels(labels, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate labels; return (classes sorted, label index int32 (N,), n_in int64 (C,))."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.shape[0] != n:
        raise ValueError(f"labels has length {labels.shape[0]} but features has {n} rows (one label per image)")
    classes, index = np.unique(labels, return_inverse=True)
    if classes.size < 2:
        raise ValueError(f"labels hold {classes.size} class(es); the KS statistic needs at least two classes")
    n_in = np.bincount(index, minlength=classes.size).astype(np.int64)
    return classes, index.astype(np.int32).reshape(-1), n_in


def permuted_index(labels, classes: np.ndarray, permutations: int, seed) -> np.ndarray:
    """Class indices (K, N) int32 of ``permuted_labels(labels, permutations, seed)``, columns as ``classes``."""
    from featstudy.stats.permutation import permuted_labels

    rows = permuted_labels(labels, permutations=permutations, seed=seed)
    return np.searchsorted(classes, rows).astype(np.int32)


def _default_chunk(n: int, n_features: int, itemsize: int, k: int, c: int, copies: bool) -> int:
    by_out = OUTPUT_BYTES // max(1, 32 * k * c)
    fc = by_out
    if copies:
        fc = min(fc, CHUNK_BYTES // max(1, n * itemsize))
    fc = max(_kernels.GROUP, (fc // _kernels.GROUP) * _kernels.GROUP)
    return min(fc, n_features)


def _release_pages(features: np.ndarray) -> None:
    """Drop the pages of a memory map from this process (they stay in the page cache); keeps RSS bounded."""
    mm = getattr(features, "_mmap", None)
    if isinstance(mm, mmap.mmap) and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # pragma: no cover - platform without the advice
            pass


def _kernel_dtype(dtype: np.dtype, exact: bool) -> np.dtype:
    if exact and dtype == np.float32:
        return np.dtype(np.float32)
    if dtype == np.float64 or (not exact and dtype == np.float32):
        return dtype
    return np.dtype(np.float64)  # ints, bools, float16: represented exactly in float64 (64-bit ints: checked)


def _check_integers(features: np.ndarray, block: np.ndarray, f0: int) -> None:
    """64-bit integer features must fit ±2^53 to be exact in the float64 the kernels compute in."""
    if features.dtype.kind in "iu" and features.dtype.itemsize >= 8:
        src = features[:, f0:f0 + block.shape[1]]  # the integers themselves: 2^53 + 1 already rounded in block
        limit = np.array(2**53, dtype=features.dtype)
        wide = (src > limit).any(axis=0)
        if features.dtype.kind == "i":
            wide |= (src < -limit).any(axis=0)
        if isinstance(features, np.memmap):
            _release_pages(features)
        wide = np.flatnonzero(wide)
        if wide.size:
            cols = (wide + f0)[:5].tolist()
            raise ValueError(f"integer features beyond ±2^53 (feature column(s) {cols}) are not exact in float64, "
                             "which the kernels compute in; convert them first (e.g. to ranks: their order is all "
                             "that D depends on)")


def _raise_bad_columns(block: np.ndarray, f0: int, bad: np.ndarray) -> None:
    """The ValueError naming the columns the kernel flagged: NaN/inf, or (binned) a max − min beyond float64."""
    if bad.any():
        cols = (np.flatnonzero(bad) + f0)[:5].tolist()
        finite = np.isfinite(block[:, np.flatnonzero(bad)[:5]]).all(axis=0)
        if finite.all():
            raise ValueError(f"max − min overflows float64 in feature column(s) {cols}, so equal-width bins are "
                             "undefined; rescale these features or use bins=None (exact)")
        raise ValueError(f"features contain NaN or inf (feature column(s) {cols}); clean or drop them first")


def _read_block(features: np.ndarray, f0: int, f1: int, dtype: np.dtype, rows=None) -> np.ndarray:
    """Columns f0:f1 as an array the kernels accept; memory maps are copied slab by slab and released.

    ``rows`` (int array), when given, takes those rows in that order (a bootstrap resample): the block is then
    ``features[rows, f0:f1]``, always a fresh array.
    """
    if isinstance(features, np.memmap):
        n = features.shape[0]
        block = np.empty((n, f1 - f0), dtype=dtype)
        for r0 in range(0, n, SLAB_ROWS):
            r1 = min(n, r0 + SLAB_ROWS)
            block[r0:r1] = features[r0:r1, f0:f1]
            _release_pages(features)
        return block if rows is None else block[rows]
    if rows is not None:
        return features[rows, f0:f1].astype(dtype, copy=False)
    block = features[:, f0:f1]
    if block.dtype != dtype or not block.flags.writeable:  # the kernels' signatures take writeable arrays
        block = block.astype(dtype)
    return block


def _blocks(features, dtype: np.dtype, chunk_size, k: int, c: int, progress: bool, desc: str, rows=None):
    """Yield (f0, f1, block) over chunks of feature columns: ``block`` (N, f1 − f0) of ``dtype`` from
    :func:`_read_block`, its 64-bit integer columns checked (:func:`_check_integers`). The default chunk is sized
    for ``k``·``c`` outputs per feature (:func:`_default_chunk`; a resample by ``rows`` counts as two copies).

    The caller drops its reference to each block before asking for the next one: one block is alive at a time.
    """
    n, n_features = features.shape
    copies = (rows is not None or isinstance(features, np.memmap) or features.dtype != dtype
              or not features.flags.writeable)
    if chunk_size is None:
        chunk_size = _default_chunk(n, n_features, dtype.itemsize * (2 if rows is not None else 1), k, c, copies)
    elif int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of features, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_features, unit="feature", desc=desc)
    try:
        for f0 in range(0, n_features, chunk_size):
            f1 = min(n_features, f0 + chunk_size)
            block = _read_block(features, f0, f1, dtype, rows)
            _check_integers(features, block, f0)
            yield f0, f1, block
            del block
            if bar is not None:
                bar.update(f1 - f0)
    finally:
        if bar is not None:
            bar.close()


def binned_method(n: int, nbins: int, n_classes: int) -> str:
    """Which binned kernel runs: ``"table"`` (:func:`~featstudy.stats._kernels.binned_table`) or ``"sort"``.

    The table sweeps B·C cells per feature against N images sorted; it is also exact only while its float64
    keys stay below 2^53, i.e. N²·S < 2^53 with S the power of two ≥ B. Both give identical results.
    """
    cells = nbins * n_classes
    exact_keys = float(n) * float(n) * _kernels.table_scale(nbins) < 2.0**53
    if exact_keys and cells <= TABLE_CELLS_PER_IMAGE * n and 4 * cells <= TABLE_BYTES:
        return "table"
    return "sort"


def _run(features, label_rows: np.ndarray, n_in: np.ndarray, bins, chunk_size, progress, out=None, rows=None):
    """Drive the kernels chunk by chunk; yields (f0, f1, gmax, gmin, locp, locm) per chunk, each (K, fc, C).

    ``out(f0, f1)``, when given, returns the four arrays to write into (views of the caller's results: no copy).
    ``rows``, when given, resamples the images (:func:`_read_block`).
    """
    n = features.shape[0]
    exact = bins is None
    if not exact:
        if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
            raise ValueError(f"bins must be a positive integer or None (exact), got {bins!r}")
        bins = int(bins)
    dtype = _kernel_dtype(features.dtype, exact)
    k, c = label_rows.shape[0], n_in.size
    label_rows = np.ascontiguousarray(label_rows, dtype=np.int32)
    desc = "signed KS" if exact else f"signed KS ({bins} bins)"
    for f0, f1, block in _blocks(features, dtype, chunk_size, k, c, progress, desc, rows):
        fc = f1 - f0
        if out is not None:
            gmax, gmin, locp, locm = out(f0, f1)
        else:
            gmax = np.empty((k, fc, c), dtype=np.int64)
            gmin = np.empty((k, fc, c), dtype=np.int64)
            locp = np.empty((k, fc, c), dtype=np.float64)
            locm = np.empty((k, fc, c), dtype=np.float64)
        bad = np.zeros(fc, dtype=np.bool_)
        if exact and dtype == np.float32:
            _kernels.exact_f32(block, label_rows, n_in, gmax, gmin, locp, locm, bad)
        elif exact:
            _kernels.exact_f64(block, label_rows, n_in, gmax, gmin, locp, locm, bad)
        elif binned_method(n, bins, c) == "table":
            _kernels.binned_table(block, label_rows, n_in, bins, gmax, gmin, locp, locm, bad)
        else:
            _kernels.binned(block, label_rows, n_in, bins, gmax, gmin, locp, locm, bad)
        _raise_bad_columns(block, f0, bad)
        del block
        yield f0, f1, gmax, gmin, locp, locm


def signed_ks(features, labels, *, bins: int | None = 100, chunk_size: int | None = None, progress: bool = False):
    r"""Signed two-sample KS statistic of every feature for every class against the rest (paper Eq. 3).

    For feature f and class c let P = F_in be the EDF of f over the images of c (n_in of them) and Q = F_out the
    EDF over all other images (n_out = n − n_in). Then

    .. math::

        D^+ = \max_x \big(F_{out}(x) - F_{in}(x)\big) \ge 0, \qquad
        D^- = \max_x \big(F_{in}(x) - F_{out}(x)\big) \ge 0,

        D = +D^+ \ \text{if}\ D^+ \ge D^-, \quad D = -D^- \ \text{otherwise}.

    D > 0 means the class's values tend to be *higher* than the rest (its EDF lies below): the feature "fires"
    for that class. |D| equals ``scipy.stats.ks_2samp(out, in).statistic`` and D its ``statistic *
    statistic_sign``, except on exact ties D+ = D−.

    Parameters
    ----------
    features : array_like, shape (N, F)
        One row per image. ``np.memmap`` inputs (``np.load(path, mmap_mode="r")``) are read in chunks of
        features; the extra memory stays below the 2 GB bound whatever N (measured: +0.7 GB at N = 200,000, see
        README's Performance table). float32 data are sorted on their raw
        bits (radix sort), float64 by comparison; other dtypes are converted to float64 per chunk.
    labels : array_like, shape (N,)
        Class of each image: ints or strings. At least two classes; a class may have a single image.
    bins : int or None, default 100
        None: exact statistic on the raw values. B: the paper's binning, B equal-width bins per feature over
        [min_f, max_f] of all images, ``bin = clip(floor((x − min)/(max − min)·B), 0, B−1)`` computed in float64
        in that order, EDFs taken at the bins' right edges. Binned D equals exact D on the bin indices.
    chunk_size : int, optional
        Features per chunk (default: as many as fit 512 MB of copied values and 256 MB of outputs).
    progress : bool, default False
        Show a tqdm progress bar over features.

    Returns
    -------
    KSResult
        ``d``, ``d_plus``, ``d_minus``, ``location*``, ``sign`` of shape (F, C); ``classes``, ``n_in``, ``n``,
        ``bins``.

    Raises
    ------
    ValueError
        NaN or inf in the features (the columns are named); binned, a feature whose max − min overflows float64;
        64-bit integer features beyond ±2^53 (not exact in float64); labels of the wrong length; fewer than two
        classes.

    Notes
    -----
    EDFs are right-continuous (F(x) = #{x_i ≤ x}/n) and equal values are one step: post-ReLU features hold many
    exact zeros, and −0.0 is the same value as +0.0. Everything is computed on integer counts,
    ``g(x) = n_in·n_out·(F_out(x) − F_in(x))`` in int64 (n_in·n_out overflows int32 from about 46,341² pairs), so
    the tie rule — D+ = D− gives the *positive* sign — is decided exactly, never on rounded floats (scipy may
    report −1 on some exact ties). D+, D− are then g/(n_in·n_out) in float64 (correctly rounded). A constant
    feature gives D = 0 (+ sign), binned or not.

    Binning moves D: on ReLU-like data 100 bins change D by up to ~0.4 and flip the sign of 1–2% of pairs (see
    :func:`featstudy.stats.binned_vs_exact`).

    Cost per feature: exact, O(N) after a radix sort of the float32 bits (comparison sort for float64), plus
    O(C); binned, one pass filling a (B, C) table of counts and a vectorised O(B·C) sweep over it while B·C is
    at most 8·N, else a counting sort on the bin and the O(N + C) pass (:func:`binned_method`; both give the
    same numbers).

    References
    ----------
    .. [1] D. Garcia-Gasulla et al., "On the Behavior of Convolutional Nets for Feature Extraction",
           arXiv:1703.01127, 2017 (Eq. 3).
    .. [2] J. L. Hodges, "The significance probability of the Smirnov two-sample test", Arkiv för Matematik 3,
           1958.

    Examples
    --------
    >>> import numpy as np
    >>> from featstudy.stats import signed_ks
    >>> rng = np.random.default_rng(0)
    >>> x = np.maximum(rng.normal(size=(60, 3)), 0).astype(np.float32)
    >>> y = np.repeat(["a", "b", "c"], 20)
    >>> x[y == "b", 0] += 2.0  # feature 0 fires for class b
    >>> r = signed_ks(x, y, bins=None)
    >>> r.d.shape, r.classes.tolist(), bool(r.d[0, 1] > 0.9)
    ((3, 3), ['a', 'b', 'c'], True)
    """
    features = _as_features(features)
    n, n_features = features.shape
    classes, index, n_in = prepare_labels(labels, n)
    c = classes.size
    gmax = np.empty((n_features, c), dtype=np.int64)
    gmin = np.empty((n_features, c), dtype=np.int64)
    locp = np.empty((n_features, c), dtype=np.float64)
    locm = np.empty((n_features, c), dtype=np.float64)

    def into(f0, f1):  # the kernels write straight into the results
        return gmax[None, f0:f1], gmin[None, f0:f1], locp[None, f0:f1], locm[None, f0:f1]

    for _ in _run(features, index[None, :], n_in, bins, chunk_size, progress, into):
        pass
    d = np.empty((n_features, c), dtype=np.float64)
    d_plus = np.empty_like(d)
    d_minus = np.empty_like(d)
    location = np.empty_like(d)
    sign = np.empty((n_features, c), dtype=np.int8)
    _kernels.finish_signed(gmax, gmin, locp, locm, n_in, n, d, d_plus, d_minus, location, sign)
    return KSResult(
        d=d,
        d_plus=d_plus,
        d_minus=d_minus,
        classes=classes,
        n_in=n_in,
        n=int(n),
        location=location,
        location_plus=locp,
        location_minus=locm,
        sign=sign,
        bins=None if bins is None else int(bins),
    )


def signed_ks_random(
    features,
    labels,
    *,
    permutations: int = 1,
    seed: int = 0,
    bins: int | None = 100,
    chunk_size: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Signed KS statistic D for randomized labels (paper §5.4): shape (K, F, C), float64.

    Row k uses ``permuted_labels(labels, permutations, seed)[k]``: the same class sizes, images shuffled among
    classes. Each feature is sorted (or binned) once and the sort is reused for all K permutations. Column c
    belongs to the c-th sorted unique label, as in :func:`signed_ks`. Same ``bins``, ``chunk_size`` and checks.

    Examples
    --------
    >>> import numpy as np
    >>> from featstudy.stats import signed_ks_random
    >>> x = np.random.default_rng(0).normal(size=(40, 5))
    >>> signed_ks_random(x, np.arange(40) % 4, permutations=3, seed=1).shape
    (3, 5, 4)
    """
    features = _as_features(features)
    n, n_features = features.shape
    classes, _, n_in = prepare_labels(labels, n)
    index = permuted_index(labels, classes, permutations, seed)
    out = np.empty((index.shape[0], n_features, classes.size), dtype=np.float64)
    for f0, f1, g1, g2, _, _ in _run(features, index, n_in, bins, chunk_size, progress):
        _kernels.finish_random(g1, g2, n_in, n, out[:, f0:f1])
    return out
