"""The textbook receptive-field recursion, for the tests of measured receptive fields (timm and open_clip): written
here from the kernel, stride and padding of the modules on a node's longest path, never from featstudy's code."""

from __future__ import annotations

import numpy as np


def kso(module) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a conv or pooling module (square: the first of each pair)."""
    first = (lambda v: v[0] if isinstance(v, (tuple, list)) else v)
    return first(module.kernel_size), first(module.stride), first(module.padding)


def recursion(path: list[tuple[int, int, int]], size: int, positions: int) -> np.ndarray:
    """(positions, 2): [first, last + 1) input index read by each map position, clipped to the image, by the
    recursion r += (k - 1) j, centre += ((k - 1) / 2 - p) j, j *= s (pixel i spans [i, i + 1))."""
    r, j, centre = 1, 1, 0.5
    for k, s, p in path:
        r += (k - 1) * j
        centre += ((k - 1) / 2 - p) * j
        j *= s
    lo = np.array([centre + y * j - r / 2 for y in range(positions)])
    assert np.all(lo == np.round(lo))  # a union of whole pixels
    return np.stack([np.clip(lo, 0, size), np.clip(lo + r, 0, size)], axis=1).astype(np.int64)


def cells_and_squares(emb, cells: dict, features: list[str], image_folder, square_of, n: int = 2):
    """For each feature's ``n`` most activating rows of ``emb`` (by its own column, stable order), yield
    (feature, node, channel, the cell the figures drew, the centre square the network saw, made by ``square_of``)."""
    from PIL import Image

    for feature in features:
        node, channel = feature.rsplit(":", 1)[0], int(feature.rsplit(":", 1)[1])
        column = np.array(emb.features[:, emb.feature_names.index(feature)])
        for cell, row in zip(cells[feature], np.argsort(-column, kind="stable")[:n]):
            yield feature, node, channel, cell, square_of(Image.open(image_folder / emb.paths[row]).convert("RGB"))
