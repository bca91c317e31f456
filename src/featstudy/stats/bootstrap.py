"""Bootstrap confidence intervals for the thresholds t+ and t− (paper Eq. 4, Table 4)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from featstudy.stats import _kernels
from featstudy.stats._input import _as_features, permuted_index, prepare_labels
from featstudy.stats.ks import _run
from featstudy.stats.thresholds import threshold_grid, thresholds

__all__ = ["BootstrapResult", "bootstrap_thresholds"]

#: The ThresholdResult fields a bootstrap replicates, in :meth:`BootstrapResult.interval`'s names.
FIELDS = ("t_plus", "t_minus", "d_avg_t_plus", "d_avg_t_minus")


def _check_level(level) -> float:
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0 < float(level) < 1:
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")
    return float(level)


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _replicate_seeds(seed: int, b: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """(resampling, permutation) seeds of replicate b: the two children of ``SeedSequence(seed).spawn(n_boot)[b]``."""
    return (np.random.SeedSequence(seed, spawn_key=(b, 0)), np.random.SeedSequence(seed, spawn_key=(b, 1)))


def _resample(index: np.ndarray, n_in: np.ndarray, seed: np.random.SeedSequence) -> np.ndarray:
    """Row indices (N,) int64: position i gets an image of its own class, drawn uniformly with replacement."""
    members = np.argsort(index, kind="stable")  # images grouped by class, in their original order
    starts = np.concatenate([[0], np.cumsum(n_in)[:-1]])
    draw = np.random.default_rng(seed).integers(0, n_in[index])  # one draw per position, below its class size
    return members[starts[index] + draw].astype(np.int64)


@dataclass(frozen=True, eq=False)
class BootstrapResult:
    """Bootstrap replicates of the thresholds; see :func:`bootstrap_thresholds`.

    Attributes
    ----------
    t_plus, t_minus, d_avg_t_plus, d_avg_t_minus : ndarray of float64, shape (n_boot,)
        Per replicate, the fields of :class:`~featstudy.stats.ThresholdResult` of the same names: t+ ≥ 0,
        t− ≤ 0, d_avg+ at t+ and d_avg− at −t−.
    level : float
        Default coverage of :meth:`interval`.
    seed, n_boot, permutations : int
        The arguments: replicate b is regenerated from ``seed`` and b alone.
    bins : int or None
        Bins of the KS statistic (None: exact).
    step : float
        Grid step of the thresholds.
    classes : ndarray, shape (C,)
        Sorted unique labels.
    n_in : ndarray of int64, shape (C,)
        Images per class (the same in every replicate).
    label_index : ndarray of int32, shape (N,)
        Column of each image's class in ``classes``: what :meth:`replicate_indices` regenerates resamples from.
    """

    t_plus: np.ndarray
    t_minus: np.ndarray
    d_avg_t_plus: np.ndarray
    d_avg_t_minus: np.ndarray
    level: float
    seed: int
    n_boot: int
    bins: int | None
    permutations: int
    step: float
    classes: np.ndarray
    n_in: np.ndarray
    label_index: np.ndarray = field(repr=False)

    def interval(self, name: str, level: float | None = None) -> tuple[float, float]:
        """Percentile interval (low, high) of field ``name`` at ``level`` (default: the result's ``level``).

        The (1 − level)/2 and (1 + level)/2 quantiles of the n_boot replicates, linearly interpolated
        (``numpy.percentile``'s default).
        """
        if name not in FIELDS:
            raise ValueError(f"name must be one of {', '.join(FIELDS)}, got {name!r}")
        level = self.level if level is None else _check_level(level)
        low, high = np.percentile(getattr(self, name), [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
        return float(low), float(high)

    def replicate_indices(self, b: int) -> np.ndarray:
        """Row indices (N,) int64 of replicate ``b``'s resample: features[indices], labels[indices] (== labels)."""
        return _resample(self.label_index, self.n_in, _replicate_seeds(self.seed, self._replicate(b))[0])

    def permutation_seed(self, b: int) -> np.random.SeedSequence:
        """Seed of replicate ``b``'s label permutations: its rows are ``permuted_labels(labels, permutations,
        seed=permutation_seed(b))``; pass it as ``seed`` to :func:`~featstudy.stats.signed_ks_random`."""
        return _replicate_seeds(self.seed, self._replicate(b))[1]

    def _replicate(self, b) -> int:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 0 <= b < self.n_boot:
            raise ValueError(f"b must be a replicate number in [0, {self.n_boot}), got {b!r}")
        return int(b)


def bootstrap_thresholds(features, labels, *, n_boot: int = 200, seed: int = 0, bins: int | None = 100,
                         permutations: int = 1, step: float = 0.001, level: float = 0.95,
                         chunk_size: int | None = None, progress: bool = False) -> BootstrapResult:
    r"""Stratified bootstrap of the thresholds t+ and t− (paper Eq. 4, Table 4): their sampling variability.

    Replicate b (b = 0…n_boot − 1):

    1. resamples the images with replacement *within each class*: every image position keeps its class and gets
       an image of that class drawn uniformly, so the class sizes n_in are those of the data;
    2. draws its own label permutation(s), ``permuted_labels(labels, permutations, seed=s_b)`` as
       :func:`signed_ks_random` does (class sizes kept);
    3. computes D with the real labels and with the permuted ones on the resampled features (:func:`signed_ks`
       and :func:`signed_ks_random` with ``bins``), then :func:`thresholds` (d_real, d_random, step), exactly as
       the real run (``AnalysisContext.thresholds``) does.

    The replicate's two seeds (resampling, permutation) are the children of ``SeedSequence(seed).spawn(n_boot)[b]``:
    replicates are independent streams, and each is reproducible from (seed, b) alone
    (:meth:`BootstrapResult.replicate_indices`, :meth:`BootstrapResult.permutation_seed`).

    Parameters
    ----------
    features : array_like, shape (N, F)
        As in :func:`signed_ks` (memory maps are read in chunks; each replicate reads them again).
    labels : array_like, shape (N,)
        Class of each image: ints or strings; at least two classes.
    n_boot : int, default 200
        Number of replicates (≥ 1).
    seed : int, default 0
        Non-negative seed of the whole bootstrap.
    bins : int or None, default 100
        Bins of the KS statistic (None: exact), as in the real run.
    permutations : int, default 1
        Label permutations per replicate (the real run's ``analysis.permutations``).
    step : float, default 0.001
        Grid step of :func:`thresholds`.
    level : float, default 0.95
        Default coverage of :meth:`BootstrapResult.interval`, in (0, 1).
    chunk_size, progress
        Features per chunk (default: as many as fit 256 MB of copied values); a tqdm bar over replicates.

    Returns
    -------
    BootstrapResult
        ``t_plus``, ``t_minus``, ``d_avg_t_plus``, ``d_avg_t_minus`` (n_boot,); ``interval(name, level)``.

    Raises
    ------
    ValueError
        A bad ``n_boot``, ``seed``, ``permutations``, ``step``, ``level`` or ``bins`` (named); the errors of
        :func:`signed_ks` for the features and labels.

    Notes
    -----
    A stratified (by class) nonparametric bootstrap with percentile intervals [1]_ [2]_: the design fixes the
    class sizes (each class of the dataset is a given number of images), so resampling keeps them, and the
    interval is the (1 ∓ level)/2 quantiles of the replicates. It answers "how much would t+, t− move with
    another draw of images of the same classes, and another permutation?", the randomness of the baseline
    included. Caveats: t± live on the grid (multiples of ``step``), so the interval is discrete and may be a
    single point; duplicated images add ties, which the KS statistic handles exactly but which make the
    replicates' D slightly coarser than the data's; the percentile interval assumes the bootstrap distribution
    is roughly unbiased for the real one (a BCa correction [1]_ is not applied).

    Cost: each replicate sorts (or bins) every feature once and runs the class pass for the real and the K
    permuted labels together (one :func:`signed_ks` run with 1 + K label rows), plus a resampled copy of the
    features and :func:`thresholds`: it reruns the KS n_boot times. At cub200 scale (N = 6,000, F = 9,600,
    C = 200, K = 1) on this project's shared 2-core machine that is 0.6–1 s a replicate with 100 bins (2–3.5 min
    for n_boot = 200) and 1–2 s exact (4–7 min), up to 1.7x less than copying the resample and calling
    :func:`signed_ks` and :func:`signed_ks_random` (``bench/beyond_ks.py``, docs/engine.md). That is why the
    app leaves it off by default.

    References
    ----------
    .. [1] B. Efron and R. J. Tibshirani, *An Introduction to the Bootstrap*, Chapman & Hall, 1993 (ch. 13, the
           percentile interval; ch. 14, BCa).
    .. [2] A. C. Davison and D. V. Hinkley, *Bootstrap Methods and their Application*, Cambridge University
           Press, 1997 (§3.2, stratified resampling; §5.3, percentile intervals).

    Examples
    --------
    >>> import numpy as np
    >>> from featstudy.stats import bootstrap_thresholds
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat([0, 1, 2], 40)
    >>> x = np.maximum(rng.normal(size=(120, 30)), 0).astype(np.float32)
    >>> x[y == 1, :10] += 1.0
    >>> b = bootstrap_thresholds(x, y, n_boot=20, bins=None, step=0.01)
    >>> b.t_plus.shape, b.interval("t_plus")[0] <= b.interval("t_plus")[1]
    ((20,), True)
    """
    n_boot = _check_count(n_boot, "n_boot")
    permutations = _check_count(permutations, "permutations")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    level = _check_level(level)
    threshold_grid(step)  # refuses a bad step before any replicate runs
    if bins is not None and (isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 1):
        raise ValueError(f"bins must be a positive integer or None (exact), got {bins!r}")
    features = _as_features(features)
    n, n_features = features.shape
    labels = np.asarray(labels)
    classes, index, n_in = prepare_labels(labels, n)
    out = {name: np.empty(n_boot, dtype=np.float64) for name in FIELDS}
    d = np.empty((1 + permutations, n_features, classes.size), dtype=np.float64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_boot, unit="replicate", desc="bootstrap thresholds")
    try:
        for b in range(n_boot):
            resample_seed, permutation_seed = _replicate_seeds(seed, b)
            rows = _resample(index, n_in, resample_seed)
            # labels[rows] == labels (each position keeps its class): row 0 is the real labels, rows 1… the
            # permutations of signed_ks_random(features[rows], labels[rows], seed=permutation_seed); one sort each
            label_rows = np.concatenate([index[None], permuted_index(labels, classes, permutations, permutation_seed)])
            for f0, f1, g1, g2, _, _ in _run(features, label_rows, n_in, bins, chunk_size, False, rows=rows):
                _kernels.finish_random(g1, g2, n_in, n, d[:, f0:f1])  # D as signed_ks gives it, row by row
            th = thresholds(d[0], d[1:], step=step)
            for name in FIELDS:
                out[name][b] = getattr(th, name)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return BootstrapResult(**out, level=level, seed=seed, n_boot=n_boot, bins=None if bins is None else int(bins),
                           permutations=permutations, step=float(step), classes=classes, n_in=n_in,
                           label_index=index)
