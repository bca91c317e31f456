"""Seeded label permutations for the randomized-label baseline (paper §5.4)."""

from __future__ import annotations

import numpy as np

__all__ = ["permuted_labels"]


def permuted_labels(labels, permutations: int = 1, seed: int = 0) -> np.ndarray:
    """K seeded random permutations of ``labels``: shape (K, N), each row a permutation of ``labels``.

    Row k is the k-th ``permutation`` drawn from ``numpy.random.default_rng(seed)``, so a (seed, K) pair always
    gives the same rows, and the first rows of a larger K equal those of a smaller one. Class sizes are kept,
    so each random class is compared with the rest exactly as a real class is. The paper used one permutation.

    Examples
    --------
    >>> from featstudy.stats import permuted_labels
    >>> permuted_labels(["a", "a", "b", "c"], permutations=2, seed=0).shape
    (2, 4)
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if isinstance(permutations, bool) or int(permutations) != permutations or permutations < 1:
        raise ValueError(f"permutations must be a positive integer, got {permutations!r}")
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(labels) for _ in range(int(permutations))])
