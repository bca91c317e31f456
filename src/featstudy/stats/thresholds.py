"""Thresholds t+ and t− from real against randomized labels (paper §5.4–5.5, Eq. 4, Table 4, Fig. 10)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ThresholdResult", "irrelevant_features", "kept_fraction_by_layer", "thresholds", "threshold_grid"]


@dataclass(frozen=True, eq=False)
class ThresholdResult:
    """The d_avg curves of Eq. 4 on the grid and the thresholds they give; see :func:`thresholds`.

    Attributes
    ----------
    t_plus, t_minus : float
        t+ = argmax_x d_avg+(x) ≥ 0 and t− = −argmax_x d_avg−(x) ≤ 0.
    d_avg_t_plus, d_avg_t_minus : float
        d_avg+ at t+ and d_avg− at −t− (Table 4's "d_avg").
    grid : ndarray (G,)
        x_k = k / M, k = 0…M, M = round(1/step).
    d_avg_plus, d_avg_minus : ndarray (G,)
        The curves of Eq. 4.
    real_counts_plus, real_counts_minus : ndarray of int64 (C, G)
        #{f: D(f, c) > x_k} and #{f: D(f, c) < −x_k} per real class.
    random_counts_plus, random_counts_minus : ndarray of int64 (K·C, G)
        The same per random class (permutation-major: row k·C + c).
    """

    t_plus: float
    d_avg_t_plus: float
    t_minus: float
    d_avg_t_minus: float
    grid: np.ndarray
    d_avg_plus: np.ndarray
    d_avg_minus: np.ndarray
    real_counts_plus: np.ndarray
    real_counts_minus: np.ndarray
    random_counts_plus: np.ndarray
    random_counts_minus: np.ndarray


def threshold_grid(step: float = 0.001) -> np.ndarray:
    """x_k = k / M for k = 0…M with M = round(1/step), each a single correctly rounded division.

    ``step`` must divide 1 (1/step an integer up to 1e-9), so the grid ends at exactly 1.
    """
    if not (isinstance(step, (int, float, np.floating)) and 0 < step <= 1):
        raise ValueError(f"step must be in (0, 1], got {step!r}")
    m = int(round(1.0 / step))
    if abs(m * step - 1.0) > 1e-9:
        raise ValueError(f"step={step!r} does not divide 1: use a step such as 0.001, 0.002, 0.005, 0.01")
    return np.arange(m + 1, dtype=np.float64) / m


def _counts(d2: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of d2 (F, C'): #{D > x} and #{D < −x} for every grid point → two (C', G) int64 arrays."""
    n_features, n_cols = d2.shape
    srt = np.sort(d2, axis=0)
    plus = np.empty((n_cols, grid.size), dtype=np.int64)
    minus = np.empty((n_cols, grid.size), dtype=np.int64)
    for c in range(n_cols):
        col = srt[:, c]
        plus[c] = n_features - np.searchsorted(col, grid, side="right")
        minus[c] = np.searchsorted(col, -grid, side="left")
    return plus, minus


def _as_stack(d: np.ndarray, name: str) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    if d.ndim == 2:
        d = d[None]
    if d.ndim != 3:
        raise ValueError(f"{name} must have shape (F, C) or (K, F, C), got {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError(f"{name} contains NaN or inf")
    return d


def thresholds(d_real, d_random, step: float = 0.001) -> ThresholdResult:
    r"""Thresholds t+ and t− separating real from chance-level KS values (paper Eq. 4, Table 4).

    On the grid x_k = k·step (computed as k/M, M = 1/step, not by accumulation), with C real classes and
    K·C' random classes (K permutations of C' classes each),

    .. math::

        d_{avg}^+(x) = \frac{1}{C}\sum_{c} \#\{f: D(f,c) > x\}
                     - \frac{1}{K C'}\sum_{k, c} \#\{f: D_k^{rand}(f,c) > x\},

    and d_avg−(x) likewise with #{f: D(f, c) < −x}. Then t+ = argmax d_avg+ and t− = −argmax d_avg−; ties go to
    the x nearest 0. A pair (f, c) with D > t+ or D < t− is *characteristic* of class c (§5.5).

    Parameters
    ----------
    d_real : array_like (F, C)
        Signed D with the real labels (:func:`featstudy.stats.signed_ks`).
    d_random : array_like (F, C') or (K, F, C')
        Signed D with randomized labels (:func:`featstudy.stats.signed_ks_random`).
    step : float, default 0.001
        Grid step; 1/step must be an integer. The grid has round(1/step) + 1 points.

    Returns
    -------
    ThresholdResult

    References
    ----------
    .. [1] D. Garcia-Gasulla et al., arXiv:1703.01127, 2017, Eq. 4, Table 4, §5.5.

    Examples
    --------
    >>> import numpy as np
    >>> from featstudy.stats import thresholds
    >>> real = np.array([[0.5, -0.4], [0.05, 0.0]])
    >>> rand = np.array([[0.05, -0.05], [0.0, 0.02]])
    >>> r = thresholds(real, rand, step=0.01)
    >>> float(r.t_plus), float(r.t_minus)
    (0.02, -0.05)
    """
    grid = threshold_grid(step)
    real = _as_stack(d_real, "d_real")
    if real.shape[0] != 1:
        raise ValueError(f"d_real must have shape (F, C), got {np.shape(d_real)}")
    rand = _as_stack(d_random, "d_random")
    if rand.shape[1] != real.shape[1]:
        raise ValueError(
            f"d_random has {rand.shape[1]} features but d_real has {real.shape[1]}: both must be the same features"
        )
    rp, rm = _counts(real[0], grid)
    k, f, c2 = rand.shape
    qp, qm = _counts(rand.transpose(1, 0, 2).reshape(f, k * c2), grid)
    # d_avg·C·(K·C') is an integer: computed exactly, then one division (d_avg is the correctly rounded quotient,
    # e.g. 1863.2, never 1863.1999999999998 from subtracting two rounded means). The argmax runs on the integers:
    # two grid points with equal d_avg tie exactly; np.argmax takes the first maximum = the x nearest 0
    n_real, n_rand = rp.shape[0], qp.shape[0]
    num_plus = rp.sum(axis=0) * n_rand - qp.sum(axis=0) * n_real
    num_minus = rm.sum(axis=0) * n_rand - qm.sum(axis=0) * n_real
    d_avg_plus = num_plus / (n_real * n_rand)
    d_avg_minus = num_minus / (n_real * n_rand)
    ip = int(np.argmax(num_plus))
    im = int(np.argmax(num_minus))
    return ThresholdResult(
        t_plus=float(grid[ip]),
        d_avg_t_plus=float(d_avg_plus[ip]),
        t_minus=float(-grid[im]) + 0.0,
        d_avg_t_minus=float(d_avg_minus[im]),
        grid=grid,
        d_avg_plus=d_avg_plus,
        d_avg_minus=d_avg_minus,
        real_counts_plus=rp,
        real_counts_minus=rm,
        random_counts_plus=qp,
        random_counts_minus=qm,
    )


def irrelevant_features(d, t_plus: float, t_minus: float) -> np.ndarray:
    """Bool mask (F,): True where no class has D > t_plus and none has D < t_minus (paper §5.5).

    Examples
    --------
    >>> import numpy as np
    >>> from featstudy.stats import irrelevant_features
    >>> irrelevant_features(np.array([[0.3, 0.0], [0.1, -0.1], [0.0, -0.5]]), 0.2, -0.2).tolist()
    [False, True, False]
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"d must have shape (F, C), got {d.shape}")
    return ~((d > t_plus) | (d < t_minus)).any(axis=1)


def kept_fraction_by_layer(d, t_plus: float, t_minus: float, layer_of_feature) -> dict[str, float]:
    """Share of (f, c) pairs with D > t+ or D < t− within each layer (paper Fig. 10).

    Parameters
    ----------
    d : array_like (F, C) or (K, F, C)
        Real or randomized D; with K permutations the share is over all K·F_layer·C pairs.
    layer_of_feature : array_like of str (F,)
        Layer name of each feature column (``Embedding.layer_of_feature``).

    Returns
    -------
    dict
        layer → share in [0, 1], in order of first appearance of the layer.
    """
    d = _as_stack(d, "d")
    layers = np.asarray(layer_of_feature)
    if layers.shape != (d.shape[1],):
        raise ValueError(f"layer_of_feature has shape {layers.shape} but d has {d.shape[1]} features")
    kept = ((d > t_plus) | (d < t_minus)).mean(axis=(0, 2))  # per feature
    names, first, inverse = np.unique(layers, return_index=True, return_inverse=True)
    sums = np.bincount(inverse, weights=kept, minlength=names.size)
    sizes = np.bincount(inverse, minlength=names.size)
    order = np.argsort(first, kind="stable")
    return {str(names[i]): float(sums[i] / sizes[i]) for i in order}
