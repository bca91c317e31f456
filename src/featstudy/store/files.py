"""The store's file names, its text format and its atomic writes (layout: :mod:`featstudy.store`).

Text files are UTF-8, one item per line, each line ended by exactly ``\\n``; inside an item backslash, newline,
carriage return and tab are escaped (:func:`escape`, :func:`unescape`). Every file is written to a temp file in the
same folder, fsynced and renamed onto its name (:func:`atomic_file`), so a file of the store is always whole.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
#: the DONE of an entry moved aside is renamed to this, so that nothing takes the moved folder as finished
DAMAGED_MARKER = "DONE.damaged"
MANIFEST_FORMAT = 1
#: sha256: hardware-accelerated (SHA-NI, ARMv8 crypto) in OpenSSL, the fastest of hashlib's strong hashes there
#: (~1.5 GB/s, blake2b ~0.9 GB/s measured on the same machine)
HASH = "sha256"
CLASS_PREFIX = "class:"


class EmbeddingError(DataError):
    """An embedding folder is missing, unfinished, damaged or inconsistent."""


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
    """Atomic text write (UTF-8; undecodable name bytes kept by ``surrogateescape``), see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` onto ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, prefix=f".{Path(path).stem}.", suffix=".npy") as fh:
        np.save(fh, array)


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPES = {v[1]: k for k, v in _ESCAPES.items()}
_ESCAPE_RE = re.compile(r"[\\\n\r\t]")
_UNESCAPE_RE = re.compile(r"\\(.?)", re.DOTALL)


def escape(item: str) -> str:
    """One item of a store text file: backslash, newline, carriage return and tab as two-character escapes."""
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group()], item)


def unescape(line: str) -> str:
    """The inverse of :func:`escape` (a ``\\`` followed by anything else is refused: not written by the store)."""
    def one(m: re.Match) -> str:
        if m.group(1) not in _UNESCAPES:
            raise ValueError(f"invalid escape {m.group()!r} in {line!r}")
        return _UNESCAPES[m.group(1)]

    return _UNESCAPE_RE.sub(one, line)


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Atomically write ``lines`` (already escaped) to ``path``, each ended by exactly ``\\n``."""
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def write_items(path: str | os.PathLike, items: Iterable[str]) -> None:
    """Atomically write ``items``, each :func:`escape`-d, one a line."""
    write_lines(path, (escape(i) for i in items))


def read_items(path: str | os.PathLike) -> list[str]:
    """The items of a store text file: split at exactly ``\\n`` (never ``splitlines``), each :func:`unescape`-d."""
    text = Path(path).read_bytes().decode("utf-8", "surrogateescape")
    if not text:
        return []
    if not text.endswith("\n"):
        raise EmbeddingError(f"{path}: damaged store file (its last line has no newline)")
    try:
        return [unescape(line) for line in text[:-1].split("\n")]
    except ValueError as exc:
        raise EmbeddingError(f"{path}: damaged store file ({exc})") from exc


def skipped_line(path: str, reason: str) -> str:
    """The escaped ``skipped.txt`` line of an unreadable image (whitespace of ``reason`` collapsed: no tab in it)."""
    return f"{escape(path)}\t{escape(' '.join(reason.split()))}"


def dropped_class_line(name: str, n_images: int) -> str:
    """The escaped ``skipped.txt`` line of a class left without any row."""
    why = f"dropped: all its {n_images} images were skipped" if n_images else "dropped: it holds no images"
    return f"{CLASS_PREFIX}{escape(name)}\t{why}"


def layer_of(feature_name: str) -> str:
    """``"conv4_1:221"`` -> ``"conv4_1"``."""
    return feature_name.rsplit(":", 1)[0]
