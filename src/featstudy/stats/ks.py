"""The signed two-sample Kolmogorov–Smirnov statistic for every (feature, class) pair (paper §4, Eq. 3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featstudy.stats import _kernels
from featstudy.stats._input import (  # noqa: F401 - CHUNK_BYTES... re-exported: the engine's documented knobs
    CHUNK_BYTES, OUTPUT_BYTES, SLAB_ROWS, _as_features, _blocks, _kernel_dtype, _raise_bad_columns, permuted_index,
    prepare_labels)

__all__ = ["KSResult", "signed_ks", "signed_ks_random", "prepare_labels"]

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
