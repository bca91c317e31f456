"""Reading features and labels for the engines (:mod:`~featstudy.stats.ks`, :mod:`~featstudy.stats.auroc`,
:mod:`~featstudy.stats.selectivity`, :mod:`~featstudy.stats.bootstrap`): validation, label indices, and chunks of
feature columns in bounded memory (memory maps copied slab by slab, their pages released).
"""

from __future__ import annotations

import mmap

import numpy as np

from featstudy.stats import _kernels

#: Bytes of feature values one chunk may copy out of a memory-mapped or non-float input.
CHUNK_BYTES = 512 * 2**20
#: Bytes the per-chunk integer/float outputs (K, fc, C) may take.
OUTPUT_BYTES = 256 * 2**20
#: Rows copied at a time from a memory map before its pages are released.
SLAB_ROWS = 4096

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
