"""The class-vs-rest AUROC of every (feature, class) pair: the Mann–Whitney reading of the pair (beyond KS)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featstudy.stats import _kernels
from featstudy.stats._input import _as_features, _blocks, _kernel_dtype, _raise_bad_columns, prepare_labels

__all__ = ["AUROCResult", "class_auroc"]


@dataclass(frozen=True, eq=False)
class AUROCResult:
    """Class-vs-rest AUROC of every (feature, class) pair; see :func:`class_auroc`.

    Attributes
    ----------
    auroc : ndarray of float64, shape (F, C)
        P(X_in > X_out) + ½·P(X_in = X_out) for feature f, class c.
    classes : ndarray, shape (C,)
        Sorted unique labels; column c belongs to ``classes[c]``.
    n_in : ndarray of int64, shape (C,)
        Images per class.
    n : int
        Number of images.
    """

    auroc: np.ndarray
    classes: np.ndarray
    n_in: np.ndarray
    n: int

    @property
    def n_out(self) -> np.ndarray:
        """Images outside each class, n − n_in."""
        return self.n - self.n_in

    @property
    def u(self) -> np.ndarray:
        """The Mann–Whitney statistic U = AUROC·n_in·n_out of each pair (float64, exact: a multiple of ½)."""
        return self.auroc * (self.n_in * self.n_out)


def class_auroc(features, labels, *, chunk_size: int | None = None, progress: bool = False) -> AUROCResult:
    r"""Area under the ROC curve of every feature for every class against the rest, from exact midranks.

    For feature f and class c let X_in be the value of f on an image of c (n_in of them) and X_out its value on
    any other image (n_out = n − n_in). Then

    .. math::

        \mathrm{AUROC}(f, c) = P(X_{in} > X_{out}) + \tfrac12 P(X_{in} = X_{out})
                             = \frac{U}{n_{in} n_{out}}, \qquad
        U = R - \frac{n_{in}(n_{in} + 1)}{2},

    with R the sum of the class's midranks in the pooled sample (Mann–Whitney). It equals
    ``sklearn.metrics.roc_auc_score(labels == c, features[:, f])``. AUROC > ½ means the class's values tend to be
    *higher* than the rest, the same direction as D > 0 in :func:`signed_ks`; ½ is no shift, 1 a perfect split.

    Parameters
    ----------
    features : array_like, shape (N, F)
        One row per image. ``np.memmap`` inputs are read in chunks of features, as in :func:`signed_ks`.
        float32 data are sorted on their raw bits (radix sort), float64 by comparison; other dtypes are
        converted to float64 per chunk (64-bit integers must fit ±2^53).
    labels : array_like, shape (N,)
        Class of each image: ints or strings. At least two classes; a class may have a single image.
    chunk_size : int, optional
        Features per chunk (default: as many as fit 512 MB of copied values).
    progress : bool, default False
        Show a tqdm progress bar over features.

    Returns
    -------
    AUROCResult
        ``auroc`` (F, C) float64; ``classes``, ``n_in``, ``n``.

    Raises
    ------
    ValueError
        NaN or inf in the features (the columns are named); 64-bit integer features beyond ±2^53; labels of the
        wrong length; fewer than two classes.

    Notes
    -----
    **Exact ties.** Each feature is sorted once for all classes (the sort of the exact :func:`signed_ks`: equal
    values, −0.0 and +0.0 included, form one run). The element at sorted position i (0-based) of the run
    [s, e) has midrank (s + 1 + e)/2, so twice it, s + e + 1, is an integer; per class

    .. math::

        R_2 = \sum_{i \in c} (s_i + e_i + 1) = 2R, \qquad 2U = R_2 - n_{in}(n_{in} + 1),
        \qquad \mathrm{AUROC} = \frac{2U}{2\,n_{in} n_{out}},

    all in int64, then one float64 division of two integers below 2^53: the correctly rounded quotient. A tie
    between an image of the class and another counts ½ exactly, never decided on rounded floats; a constant
    feature gives ½ for every class. Cost per feature: the sort, then O(N + C).

    **AUROC and KS read the same pair differently.** AUROC averages over all (in, out) pairs: it measures how
    far the *whole* class distribution is shifted against the rest (AUROC − ½ is the mean, over the class's
    images, of F̄_out − F̄_in, the mid-distribution functions F̄(x) = ½(F(x) + F(x⁻))). The KS statistic D
    (paper Eq. 3) is the largest gap between the two EDFs at *one* point. Hence always

    .. math::

        \tfrac12 - D^- \le \mathrm{AUROC} \le \tfrac12 + D^+,

    but the two can disagree. A class whose values lie on both sides of the rest (half below, half above) has
    AUROC ≈ ½ and |D| ≈ ½: KS sees the gap, AUROC no shift. A pure shift δ of a normal class moves both
    (AUROC − ½ ≈ 0.28·δ, D ≈ 0.40·δ for small δ), and there the rank-sum reading, which uses every pair, is the
    more powerful test. On post-ReLU data a class that fires more often (fewer exact zeros) moves both; AUROC
    also counts the order of the non-zero values everywhere, D only where the EDFs part most.

    References
    ----------
    .. [1] H. B. Mann and D. R. Whitney, "On a test of whether one of two random variables is stochastically
           larger than the other", Ann. Math. Statist. 18, 1947.
    .. [2] J. A. Hanley and B. J. McNeil, "The meaning and use of the area under a receiver operating
           characteristic (ROC) curve", Radiology 143, 1982.

    Examples
    --------
    >>> import numpy as np
    >>> from featstudy.stats import class_auroc
    >>> x = np.array([[0.0], [2.0], [1.0], [0.0], [-0.0], [3.0]], dtype=np.float32)
    >>> r = class_auroc(x, ["a", "a", "b", "b", "c", "c"])
    >>> r.classes.tolist(), r.auroc[0].tolist()  # ties count ½, and −0.0 is +0.0
    (['a', 'b', 'c'], [0.5, 0.375, 0.625])
    """
    features = _as_features(features)
    n, n_features = features.shape
    classes, index, n_in = prepare_labels(labels, n)
    c = classes.size
    dtype = _kernel_dtype(features.dtype, exact=True)
    kernel = _kernels.auroc_f32 if dtype == np.float32 else _kernels.auroc_f64
    r2 = np.empty((n_features, c), dtype=np.int64)
    for f0, f1, block in _blocks(features, dtype, chunk_size, 1, c, progress, "class AUROC"):
        bad = np.zeros(f1 - f0, dtype=np.bool_)
        kernel(block, index, r2[f0:f1], bad)
        _raise_bad_columns(block, f0, bad)
        del block
    two_u = r2 - n_in * (n_in + 1)
    auroc = two_u / (2 * n_in * (n - n_in))  # int64 / int64 in float64: both exact below 2^53
    return AUROCResult(auroc=auroc, classes=classes, n_in=n_in, n=int(n))
