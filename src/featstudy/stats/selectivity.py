"""The class selectivity index of every feature (Morcos et al. 2018) from its class means."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featstudy.stats._input import _as_features, _blocks, _raise_bad_columns, prepare_labels

__all__ = ["SelectivityResult", "selectivity_index"]


@dataclass(frozen=True, eq=False)
class SelectivityResult:
    """Class selectivity index of every feature; see :func:`selectivity_index`.

    Attributes
    ----------
    index : ndarray of float64, shape (F,)
        (μ_max − μ_rest)/(μ_max + μ_rest); 0 where both are 0, NaN where only their sum is 0.
    preferred : ndarray, shape (F,)
        The label of each feature's highest class mean (the smallest such label on ties), same dtype as
        ``classes``.
    class_means : ndarray of float64, shape (F, C)
        Mean of feature f over the images of ``classes[c]``.
    classes : ndarray, shape (C,)
        Sorted unique labels.
    n_in : ndarray of int64, shape (C,)
        Images per class.
    """

    index: np.ndarray
    preferred: np.ndarray
    class_means: np.ndarray
    classes: np.ndarray
    n_in: np.ndarray


def selectivity_index(features, labels, *, chunk_size: int | None = None,
                      progress: bool = False) -> SelectivityResult:
    r"""Class selectivity index of every feature (Morcos et al. 2018).

    With μ_c the mean of feature f over the images of class c (C classes), μ_max = max_c μ_c and μ_rest the
    mean of the *other* C − 1 class means (not the mean over the other images: every class weighs the same,
    whatever its size),

    .. math::

        \mathrm{SI}(f) = \frac{\mu_{max} - \mu_{rest}}{\mu_{max} + \mu_{rest}}, \qquad
        \mu_{rest} = \frac{1}{C - 1} \sum_{c \ne c^*} \mu_c, \quad c^* = \arg\max_c \mu_c,

    and SI = 0 when μ_max = μ_rest = 0 (a feature that never fires, e.g. a dead ReLU).

    Parameters
    ----------
    features : array_like, shape (N, F)
        One row per image (activations). ``np.memmap`` inputs are read in chunks of features, as in
        :func:`signed_ks`; values are summed in float64 whatever their dtype.
    labels : array_like, shape (N,)
        Class of each image: ints or strings. At least two classes.
    chunk_size, progress
        As for :func:`class_auroc`: features per chunk (default: 512 MB of copied values); a tqdm bar.

    Returns
    -------
    SelectivityResult
        ``index`` (F,), ``preferred`` (F,), ``class_means`` (F, C), ``classes``, ``n_in``.

    Raises
    ------
    ValueError
        NaN or inf in the features, or class sums beyond float64 (the columns are named); 64-bit integer features
        beyond ±2^53; labels of the wrong length; fewer than two classes.

    Notes
    -----
    **Non-negative features** (post-ReLU, the setting of the paper): 0 ≤ SI ≤ 1; 0 when every class has the
    same mean, 1 when only the preferred class activates the feature (μ_rest = 0).

    **Negative means are allowed, but the ratio then loses that reading** (pre-activation or standardised
    features). With μ_rest < 0 < μ_max the index exceeds 1; with μ_max + μ_rest < 0 it is ≤ 0 although
    μ_max ≥ μ_rest always holds, so a negative index does *not* mean "anti-selective"; and it grows without
    bound as μ_max + μ_rest nears 0. When μ_max + μ_rest = 0 exactly with non-zero means the index is
    undefined and returned as **NaN**, not 0: the class means do differ there (μ_max − μ_rest = 2·μ_max > 0),
    so 0 would call such a feature unselective. For such features read μ_max − μ_rest from ``class_means``, or
    use :func:`class_auroc` / :func:`signed_ks`, which depend only on the order of the values.

    Ties: ``preferred`` is the smallest label among the classes sharing the highest mean (``classes[0]`` for a
    feature that never fires). Class means are sums accumulated in float64 (images grouped by class, one sum
    over each class's rows) divided by the class size; μ_rest is clipped to at most μ_max, which it cannot
    exceed but could by one rounding.

    References
    ----------
    .. [1] A. S. Morcos, D. G. T. Barrett, N. C. Rabinowitz and M. Botvinick, "On the importance of single
           directions for generalization", ICLR 2018 (the class selectivity index).

    Examples
    --------
    >>> import numpy as np
    >>> from featstudy.stats import selectivity_index
    >>> x = np.array([[4.0, 0.0], [2.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    >>> r = selectivity_index(x, ["cat", "cat", "dog", "owl"])
    >>> r.class_means[0].tolist(), r.preferred.tolist(), r.index.tolist()  # (3 − 1)/(3 + 1); never fires: 0
    ([3.0, 1.0, 1.0], ['cat', 'cat'], [0.5, 0.0])
    """
    features = _as_features(features)
    n, n_features = features.shape
    classes, index, n_in = prepare_labels(labels, n)
    c = classes.size
    order = np.argsort(index, kind="stable")  # images grouped by class
    members = np.split(order, np.cumsum(n_in)[:-1])
    means = np.empty((n_features, c), dtype=np.float64)
    dtype = features.dtype if features.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    for f0, f1, block in _blocks(features, dtype, chunk_size, 1, c, progress, "class means"):
        sums = np.empty((c, f1 - f0), dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # NaN, inf and overflow are named below
            for k in range(c):  # the class's rows gathered (small, cache-hot), accumulated in float64
                np.add.reduce(block[members[k]], axis=0, dtype=np.float64, out=sums[k])
        bad = np.flatnonzero(~np.isfinite(sums).all(axis=0))
        if bad.size:
            nonfinite = np.zeros(f1 - f0, dtype=np.bool_)
            nonfinite[bad] = ~np.isfinite(block[:, bad]).all(axis=0)
            _raise_bad_columns(block, f0, nonfinite)
            raise ValueError(f"class means overflow float64 in feature column(s) {(bad + f0)[:5].tolist()}; "
                             "rescale them")
        means[f0:f1] = (sums / n_in[:, None]).T
        del block
    rows = np.arange(n_features)
    top = np.argmax(means, axis=1)
    mu_max = means[rows, top]
    others = means.copy()
    others[rows, top] = 0.0
    mu_rest = np.minimum(others.sum(axis=1) / (c - 1), mu_max)
    num = mu_max - mu_rest
    den = mu_max + mu_rest
    si = np.full(n_features, np.nan)
    np.divide(num, den, out=si, where=den != 0)
    si[(mu_max == 0) & (mu_rest == 0)] = 0.0
    return SelectivityResult(index=si, preferred=classes[top], class_means=means, classes=classes, n_in=n_in)
