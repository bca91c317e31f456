"""Independent reference computations for the analysis tests: scipy, brute-force loops and exact counting only.

Nothing here imports :mod:`featstudy`: an expectation never comes from the code under test or a helper it uses.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps


def signed_d(features: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(D, D+, D-) of every (feature, class), each (F, C), from ``scipy.stats.ks_2samp(out, in)`` (paper Eq. 3).

    D+ = max(F_out - F_in), D- = max(F_in - F_out), D = D+ if D+ >= D- else -D- (ties positive), from the two
    EDFs counted at every observed value; max(D+, D-) is checked against ``scipy.stats.ks_2samp(out, in)``.
    """
    x = np.asarray(features, dtype=np.float64)
    f_count = x.shape[1]
    d = np.zeros((f_count, n_classes))
    dp = np.zeros_like(d)
    dm = np.zeros_like(d)
    for f in range(f_count):
        for c in range(n_classes):
            inside, outside = x[labels == c, f], x[labels != c, f]
            # the EDFs at every observed value (right-continuous), counted directly
            grid = np.unique(x[:, f])
            # in integers (F_out - F_in = (c_out n_in - c_in n_out) / (n_in n_out)): a tie of D+ and D- is exact,
            # never decided by float rounding
            c_in = np.searchsorted(np.sort(inside), grid, side="right").astype(np.int64)
            c_out = np.searchsorted(np.sort(outside), grid, side="right").astype(np.int64)
            gap = c_out * inside.size - c_in * outside.size
            plus_n, minus_n = max(0, int(np.max(gap))), max(0, int(np.max(-gap)))
            plus, minus = plus_n / (inside.size * outside.size), minus_n / (inside.size * outside.size)
            dp[f, c], dm[f, c] = plus, minus
            d[f, c] = plus if plus_n >= minus_n else -minus
            # cross-check the magnitude against scipy
            assert abs(max(plus, minus) - sps.ks_2samp(outside, inside).statistic) < 1e-12
    return d, dp, dm


def permuted(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(K, N): row k is the k-th ``default_rng(seed).permutation(labels)`` (the documented permutation rule)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(labels) for _ in range(k)])


def d_random(features: np.ndarray, labels: np.ndarray, n_classes: int, k: int, seed: int) -> np.ndarray:
    """(K, F, C) signed D under K seeded label permutations."""
    return np.stack([signed_d(features, row, n_classes)[0] for row in permuted(labels, k, seed)])


def d_avg(d_real: np.ndarray, d_rand: np.ndarray, step: float = 0.001):
    """Brute-force Eq. 4 on the grid x_k = k/M: (grid, d_avg+, d_avg-, real #{D>x} (C, G), random #{D>x} (KC, G),
    and the exact integer numerators of d_avg+ and d_avg-)."""
    m = int(round(1 / step))
    grid = np.array([k / m for k in range(m + 1)])
    real_cols = [d_real[:, c] for c in range(d_real.shape[1])]
    rand_cols = [d_rand[k][:, c] for k in range(d_rand.shape[0]) for c in range(d_rand.shape[2])]
    real_plus = np.array([[int(np.sum(col > x)) for x in grid] for col in real_cols])
    real_minus = np.array([[int(np.sum(col < -x)) for x in grid] for col in real_cols])
    rand_plus = np.array([[int(np.sum(col > x)) for x in grid] for col in rand_cols])
    rand_minus = np.array([[int(np.sum(col < -x)) for x in grid] for col in rand_cols])
    num_plus = real_plus.sum(0) * len(rand_cols) - rand_plus.sum(0) * len(real_cols)
    num_minus = real_minus.sum(0) * len(rand_cols) - rand_minus.sum(0) * len(real_cols)
    avg_plus = real_plus.mean(0) - rand_plus.mean(0)
    avg_minus = real_minus.mean(0) - rand_minus.mean(0)
    return grid, avg_plus, avg_minus, real_plus, rand_plus, num_plus, num_minus


def thresholds(d_real: np.ndarray, d_rand: np.ndarray, step: float = 0.001) -> dict:
    """t+, t-, d_avg(t+), d_avg(t-) by Eq. 4, ties to the x nearest 0 (first maximum of the exact numerators)."""
    grid, avg_plus, avg_minus, *_, num_plus, num_minus = d_avg(d_real, d_rand, step)
    ip = int(np.flatnonzero(num_plus == num_plus.max())[0])
    im = int(np.flatnonzero(num_minus == num_minus.max())[0])
    return {"t_plus": grid[ip], "t_minus": -grid[im], "d_avg_t_plus": avg_plus[ip], "d_avg_t_minus": avg_minus[im]}


def bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values over all entries of ``p`` (scipy)."""
    p = np.asarray(p, dtype=float)
    return sps.false_discovery_control(p.ravel(), method="bh").reshape(p.shape)


def ks_p(d_abs: float, n_in: int, n_out: int) -> float:
    """Two-sided exact p of |D| for samples of n_in and n_out without ties, by enumeration: the share of the
    C(N, n_in) equally likely interleavings whose max |F_out - F_in| reaches d (small N only)."""
    from itertools import combinations

    n = n_in + n_out
    total = 0
    hits = 0
    for pos in combinations(range(n), n_in):
        inside = set(pos)
        a = b = 0
        worst = 0.0
        for i in range(n):
            if i in inside:
                a += 1
            else:
                b += 1
            worst = max(worst, abs(b / n_out - a / n_in))
        total += 1
        hits += worst >= d_abs - 1e-12
    return hits / total
