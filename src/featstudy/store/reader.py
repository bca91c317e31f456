"""Reading a finished embedding folder: :class:`Embedding`, :func:`load_embedding` (layout: :mod:`featstudy.store`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featstudy.store.files import DONE_MARKER, EmbeddingError, layer_of, read_items
from featstudy.store.integrity import damage, is_complete


@dataclass
class Embedding:
    """A finished embedding folder, read-only. ``features`` is memory-mapped.

    ``skipped`` holds the ``<path>\\t<reason>`` lines of the unreadable images only (split them at the last tab);
    ``empty_classes`` the names of the classes left without any row (meta.json's ``empty_classes``).
    """

    path: Path
    features: np.ndarray
    labels: np.ndarray
    classes: list[str]
    paths: list[str]
    feature_names: list[str]
    meta: dict
    skipped: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        """Layer names in column order, each once."""
        return list(dict.fromkeys(layer_of(n) for n in self.feature_names))

    @property
    def layer_of_feature(self) -> np.ndarray:
        """(F,) array of layer names, one per column."""
        return np.array([layer_of(n) for n in self.feature_names])

    def layer_columns(self, layers: list[str] | None = None) -> np.ndarray:
        """Column indices of ``layers`` (all when None), in column order.

        Raises ``EmbeddingError`` naming the unknown layers and listing the valid ones.
        """
        if layers is None:
            return np.arange(len(self.feature_names))
        known = self.layers
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise EmbeddingError(
                f"analysis.layers: unknown layer(s) {unknown}; this embedding has {known}"
            )
        wanted = set(layers)
        return np.array(
            [i for i, n in enumerate(self.feature_names) if layer_of(n) in wanted], dtype=np.int64
        )


def load_embedding(folder: str | os.PathLike, *, mmap: bool = True) -> Embedding:
    """Open a finished embedding folder; ``features`` is memory-mapped unless ``mmap=False``.

    The folder is checked against its DONE manifest first (:func:`featstudy.store.damage`); a damaged one raises
    :class:`EmbeddingError` naming the file (extraction rebuilds it: rerun).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EmbeddingError(f"{folder}: no such embedding folder")
    if not is_complete(folder):
        raise EmbeddingError(f"{folder}: embedding is unfinished (no {DONE_MARKER} marker); rerun extraction to resume it")
    problem = damage(folder)
    if problem is not None:
        name, what = problem
        raise EmbeddingError(f"{folder / name}: damaged embedding cache entry: {what}; rerun the extraction, which "
                             "moves the entry aside and extracts it again")
    try:
        features = np.load(folder / "features.npy", mmap_mode="r" if mmap else None)
        labels = np.load(folder / "labels.npy")
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EmbeddingError(f"{folder}: unreadable embedding ({exc}); rerun the extraction") from exc
    empty = list(meta.get("empty_classes", []))
    skipped = read_items(folder / "skipped.txt")
    emb = Embedding(
        path=folder,
        features=features,
        labels=labels,
        classes=read_items(folder / "classes.txt"),
        paths=read_items(folder / "paths.txt"),
        feature_names=read_items(folder / "feature_names.txt"),
        meta=meta,
        skipped=skipped[: len(skipped) - len(empty)],  # the class lines come last, one per empty class
        empty_classes=empty,
    )
    n, f = features.shape
    if labels.shape != (n,) or len(emb.paths) != n or len(emb.feature_names) != f:
        raise EmbeddingError(
            f"{folder}: inconsistent store: features {features.shape}, labels {labels.shape}, "
            f"{len(emb.paths)} paths, {len(emb.feature_names)} feature names"
        )
    return emb
