"""A hand-built embedding small enough to derive every number by hand, and an AnalysisContext on it.

Three classes (a, b, c) of four images each; three layers: conv1_1 (3 features), conv5_4 (2), fc7 (3). Columns:

============  ===============================  =====================================================
feature       values per image (a a a a b...)  D (a, b, c), derived by hand
============  ===============================  =====================================================
conv1_1:0     0 1 2 3 | 4 5 6 7 | 8 9 10 11    -1, +0.5 (D+ = D- = 0.5: the tie goes positive), +1
conv1_1:1     11 10 ... 0 (reversed)           +1, +0.5 (tie), -1
conv1_1:2     all 0                            0, 0, 0
conv5_4:0     0 0 0 0 | 5 6 7 8 | 0 1 0 1      -0.75, +1, -0.5
conv5_4:1     3 1 4 1 | 5 9 2 6 | 5 3 5 8      -0.75, +0.375, +0.375
fc7:0         2 2 2 2 | 0 0 0 0 | 1 1 1 1      +1, -1, +0.5 (D+ = D- = 0.5: tie)
fc7:1         0 0 0 1 | 0 0 0 0 | 0 0 0 0      +0.25 (a), -0.125 (b, c)
fc7:2         7 7 7 7 | 7 7 7 7 | 7 7 7 7      0, 0, 0
============  ===============================  =====================================================
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

CLASSES = ["a", "b", "c"]
LABELS = np.repeat(np.arange(3), 4)
FEATURE_NAMES = ["conv1_1:0", "conv1_1:1", "conv1_1:2", "conv5_4:0", "conv5_4:1", "fc7:0", "fc7:1", "fc7:2"]
LAYERS = ["conv1_1", "conv5_4", "fc7"]
FEATURES = np.array([
    np.arange(12),
    np.arange(12)[::-1],
    np.zeros(12),
    [0, 0, 0, 0, 5, 6, 7, 8, 0, 1, 0, 1],
    [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8],
    [2, 2, 2, 2, 0, 0, 0, 0, 1, 1, 1, 1],
    [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    np.full(12, 7),
], dtype=np.float32).T


def write_tiny(folder: Path, dataset: str = "tiny") -> Path:
    from featstudy.store import write_embedding

    return write_embedding(folder, features=FEATURES, labels=LABELS, classes=CLASSES,
                           paths=[f"{CLASSES[c]}/{i}.png" for i, c in enumerate(LABELS)],
                           feature_names=FEATURE_NAMES, meta={"dataset": {"name": dataset, "root": None},
                                                              "model": "vgg19", "weights": "random"})


@pytest.fixture()
def tiny(tmp_path):
    """``tiny.context(**analysis)``: an AnalysisContext on the hand-built embedding, output under tmp_path/out."""
    from featstudy.analysis import AnalysisContext
    from featstudy.store import load_embedding

    folder = write_tiny(tmp_path / "embedding")

    def context(**analysis):
        settings = {"bins": None, "permutations": 1, "seed": 0, "layers": None, "chunk_size": None, **analysis}
        return AnalysisContext(load_embedding(folder), settings, tmp_path / "out", "tiny")

    return SimpleNamespace(context=context, folder=folder, out=tmp_path / "out", features=FEATURES,
                           labels=LABELS, classes=CLASSES, feature_names=FEATURE_NAMES, layers=LAYERS)
