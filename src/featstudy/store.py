"""The on-disk embedding store: one folder per embedding key, readable outside Python.

Layout of ``<paths.cache_dir>/embeddings/<key>/``::

    features.npy        N x F float32, row i = image i (open with np.load(mmap_mode="r"))
    labels.npy          N int64, index into classes.txt
    paths.txt           row i -> image path relative to the dataset root
    classes.txt         one class name a line, index = label
    feature_names.txt   one ``layer:channel`` a line (e.g. ``conv4_1:221``), column order of features.npy
    skipped.txt         images that could not be read, ``<path>\t<reason>`` a line
    meta.json           everything that made the key (model, weights and hash, layers, crops, ...)
    DONE                written last: a folder without it is never taken as a finished embedding

Extraction writes it (``featstudy.extraction``); analyses only read it through :func:`load_embedding`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from featstudy.errors import DataError

FILES = (
    "features.npy",
    "labels.npy",
    "paths.txt",
    "classes.txt",
    "feature_names.txt",
    "skipped.txt",
    "meta.json",
)
DONE_MARKER = "DONE"


class EmbeddingError(DataError):
    """An embedding folder is missing, unfinished or inconsistent."""


@contextmanager
def atomic_file(path: str | os.PathLike, *, prefix: str | None = None, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` atomically: written to a temp file in the same folder, flushed and
    fsynced, then renamed onto ``path``. On any error (or a kill) ``path`` is untouched and the temp file removed
    (a kill -9 may leave the temp file, named ``<prefix>*<suffix>``, which a finished reader never takes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic text write (UTF-8), see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` onto ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, prefix=f".{Path(path).stem}.", suffix=".npy") as fh:
        np.save(fh, array)


def layer_of(feature_name: str) -> str:
    """``"conv4_1:221"`` -> ``"conv4_1"``."""
    return feature_name.rsplit(":", 1)[0]


@dataclass
class Embedding:
    """A finished embedding folder, read-only. ``features`` is memory-mapped."""

    path: Path
    features: np.ndarray
    labels: np.ndarray
    classes: list[str]
    paths: list[str]
    feature_names: list[str]
    meta: dict
    skipped: list[str] = field(default_factory=list)

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


def is_complete(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a finished embedding (its DONE marker exists)."""
    return (Path(folder) / DONE_MARKER).is_file()


def _read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return text.splitlines()


def load_embedding(folder: str | os.PathLike, *, mmap: bool = True) -> Embedding:
    """Open a finished embedding folder; ``features`` is memory-mapped unless ``mmap=False``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EmbeddingError(f"{folder}: no such embedding folder")
    if not is_complete(folder):
        raise EmbeddingError(f"{folder}: embedding is unfinished (no {DONE_MARKER} marker); rerun extraction to resume it")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise EmbeddingError(f"{folder}: missing {missing}")
    features = np.load(folder / "features.npy", mmap_mode="r" if mmap else None)
    labels = np.load(folder / "labels.npy")
    emb = Embedding(
        path=folder,
        features=features,
        labels=labels,
        classes=_read_lines(folder / "classes.txt"),
        paths=_read_lines(folder / "paths.txt"),
        feature_names=_read_lines(folder / "feature_names.txt"),
        meta=json.loads((folder / "meta.json").read_text(encoding="utf-8")),
        skipped=_read_lines(folder / "skipped.txt"),
    )
    n, f = features.shape
    if labels.shape != (n,) or len(emb.paths) != n or len(emb.feature_names) != f:
        raise EmbeddingError(
            f"{folder}: inconsistent store: features {features.shape}, labels {labels.shape}, "
            f"{len(emb.paths)} paths, {len(emb.feature_names)} feature names"
        )
    return emb


def write_embedding(
    folder: str | os.PathLike,
    *,
    features: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    paths: list[str],
    feature_names: list[str],
    meta: dict,
    skipped: list[str] = (),
) -> Path:
    """Write a whole embedding folder atomically file by file, the DONE marker last.

    For tests and tools that need an embedding without a forward pass; extraction writes the same files itself,
    merging its shards (:mod:`featstudy.extraction.shards`) with the same atomic helpers, DONE last.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DONE_MARKER).unlink(missing_ok=True)
    atomic_save_npy(folder / "features.npy", np.ascontiguousarray(features, dtype=np.float32))
    atomic_save_npy(folder / "labels.npy", np.asarray(labels, dtype=np.int64))
    atomic_write_text(folder / "classes.txt", "".join(f"{c}\n" for c in classes))
    atomic_write_text(folder / "paths.txt", "".join(f"{p}\n" for p in paths))
    atomic_write_text(folder / "feature_names.txt", "".join(f"{n}\n" for n in feature_names))
    atomic_write_text(folder / "skipped.txt", "".join(f"{s}\n" for s in skipped))
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    atomic_write_text(folder / DONE_MARKER, "")
    return folder
