"""Writing an embedding folder, the one writer of the layout (:mod:`featstudy.store`): every file atomically, DONE
(the checksum manifest) last.

Three steps, used by extraction's shard merge (:func:`featstudy.extraction.shards.merge`) and by
:func:`write_embedding` alike:

1. :func:`begin`: the folder created, its DONE removed first (from now on the entry is unfinished), the temp files
   of a write killed before its renames removed;
2. ``features.npy``: :func:`fill_features` (a memory map over a temp file whose disk space is reserved first: memory
   flat at any N, a full disk an ``OSError``, never a SIGBUS), or :func:`~featstudy.store.atomic_save_npy` of a
   whole array;
3. :func:`finish`: labels.npy, paths.txt, classes.txt, feature_names.txt, skipped.txt (with a line per class left
   without any row), meta.json (with ``empty_classes``), then DONE.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from featstudy.store.files import (DONE_MARKER, atomic_save_npy, atomic_write_text, dropped_class_line, escape,
                                   skipped_line, write_items, write_lines)
from featstudy.store.integrity import write_manifest


def empty_classes(classes: list[str], row_labels: np.ndarray) -> list[int]:
    """Indices of the classes that have no row, in class order."""
    have = set(np.asarray(row_labels).tolist())
    return [i for i in range(len(classes)) if i not in have]


def begin(folder: str | os.PathLike) -> Path:
    """Start (re)writing the entry ``folder``: created, its DONE removed first (the entry is unfinished from here
    until :func:`finish`), and the temp files of a write killed before its renames (``.*.npy``, ``.*.tmp``) removed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DONE_MARKER).unlink(missing_ok=True)
    for stale in [*folder.glob(".*.npy"), *folder.glob(".*.tmp")]:
        stale.unlink(missing_ok=True)
    return folder


def fill_features(folder: str | os.PathLike, shape: tuple[int, int], fill: Callable[[np.ndarray], None]) -> Path:
    """Write ``folder/features.npy``, float32 of ``shape``, by ``fill(features)`` on a writable memory map.

    The map is over a temp file in ``folder`` whose disk space is reserved first (:func:`reserve_npy`); once
    ``fill`` returns it is flushed, closed, fsynced and renamed onto ``features.npy``. On any error the temp file is
    removed and ``features.npy`` untouched.
    """
    folder = Path(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".features.", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as fh:
            reserve_npy(fh, shape)
        feats = np.lib.format.open_memmap(tmp, mode="r+")
        fill(feats)
        feats.flush()
        del feats
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, folder / "features.npy")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / "features.npy"


def reserve_npy(fh, shape: tuple[int, int]) -> None:
    """Write a float32 ``.npy`` header for ``shape`` to the empty file ``fh`` and reserve the disk space of its data
    (``posix_fallocate``), so that a full disk is an ``OSError`` (ENOSPC) here, never a SIGBUS when a page of the
    memory map is filled later. Where the file system cannot reserve (EOPNOTSUPP, EINVAL), zeros are written."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(fh, header)
    fh.flush()
    offset = fh.tell()
    size = offset + int(np.prod(shape)) * 4
    try:
        os.posix_fallocate(fh.fileno(), 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        zeros = bytes(1 << 20)
        while fh.tell() < size:
            fh.write(zeros[: size - fh.tell()])
        fh.flush()
    os.fsync(fh.fileno())


def _skipped_lines(skipped: Iterable[tuple[str, str] | str]) -> list[str]:
    out = []
    for s in skipped:
        if not isinstance(s, str):
            out.append(skipped_line(*s))
        else:  # a ``<path>\t<reason>`` line as Embedding.skipped holds it
            out.append(skipped_line(*s.rsplit("\t", 1)) if "\t" in s else escape(s))
    return out


def finish(folder: str | os.PathLike, *, labels: np.ndarray, paths: Sequence[str], classes: list[str],
           feature_names: list[str], meta: dict, skipped: Iterable[tuple[str, str] | str] = (),
           class_sizes: Sequence[int] | None = None) -> dict:
    """Write every file of the entry but ``features.npy`` (already in place), then DONE, last; returns the meta.

    ``labels``/``paths``: one per row. ``skipped``: the unreadable images, each a ``(path, reason)`` pair or a
    ``<path>\\t<reason>`` line. The classes without any row are recorded in meta.json (``empty_classes``, added to
    ``meta``) and after the image lines of skipped.txt (a ``class:`` line each), with their image counts from
    ``class_sizes`` (images per class in the dataset, index = label; 0 when None).
    """
    folder = Path(folder)
    labels = np.asarray(labels, dtype=np.int64)
    atomic_save_npy(folder / "labels.npy", labels)
    write_items(folder / "paths.txt", paths)
    write_items(folder / "classes.txt", classes)
    write_items(folder / "feature_names.txt", feature_names)
    empty = empty_classes(classes, labels)
    write_lines(folder / "skipped.txt", [
        *_skipped_lines(skipped),
        *(dropped_class_line(classes[c], int(class_sizes[c]) if class_sizes is not None else 0) for c in empty)])
    meta = {**meta, "empty_classes": [classes[c] for c in empty]}
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    write_manifest(folder)  # DONE, last
    return meta


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
    class_sizes: list[int] | None = None,
) -> Path:
    """Write a whole embedding folder atomically file by file, the DONE manifest last.

    ``skipped``: ``<path>\\t<reason>`` lines of the unreadable images. The classes without any row are recorded as
    extraction does (meta.json's ``empty_classes``, a ``class:`` line each in skipped.txt); ``class_sizes`` (images
    per class in the dataset, index = label) gives their image counts, 0 when absent.

    For tests and tools that need an embedding without a forward pass; extraction's shard merge
    (:mod:`featstudy.extraction.shards`) writes through the same :func:`begin` and :func:`finish`.
    """
    folder = begin(folder)
    atomic_save_npy(folder / "features.npy", np.ascontiguousarray(features, dtype=np.float32))
    finish(folder, labels=labels, paths=paths, classes=classes, feature_names=feature_names, meta=meta,
           skipped=skipped, class_sizes=class_sizes if class_sizes else None)
    return folder
