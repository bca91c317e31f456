"""The on-disk embedding store: one folder per embedding key, readable outside Python.

Layout of ``<paths.cache_dir>/embeddings/<key>/``::

    features.npy        N x F float32, row i = image i (open with np.load(mmap_mode="r"))
    labels.npy          N int64, index into classes.txt
    paths.txt           row i -> image path relative to the dataset root
    classes.txt         one class name a line, index = label
    feature_names.txt   one ``layer:channel`` a line (e.g. ``conv4_1:221``), column order of features.npy
    skipped.txt         images that could not be read, ``<path>\t<reason>`` a line; then one line per class left
                        without any row, ``class:<name>\tdropped: all its <n> images were skipped``
    meta.json           everything that made the key (model, weights and hash, layers, crops, ...), and
                        ``empty_classes``: the names of the classes without any row, in class order
    DONE                written last, the manifest: ``{"format": 1, "algorithm": "sha256", "files": {name:
                        {"size": bytes, "sha256": hex}}}`` for every file above; a folder without it is never taken
                        as a finished embedding

Text files are UTF-8, one item per line, each line ended by exactly ``\n`` (read them with ``split("\n")`` of the
content minus its final ``\n``, never ``splitlines()``, which also splits on U+2028, U+0085, \x0b...). Inside an
item four characters are escaped: backslash as ``\\``, newline as ``\n``, carriage return as ``\r`` and tab as
``\t`` (two characters each), so any file or class name survives the round trip (:func:`escape`,
:func:`unescape`); bytes of a name that are not UTF-8 are kept as they are (``surrogateescape``). A reason never
holds a tab, so a ``skipped.txt`` line splits at its last tab.

The manifest is checked (:func:`damage`) before an entry is used: extraction moves a damaged entry aside
(:func:`move_aside`, never deleting it) and extracts it again, :func:`load_embedding` refuses it naming the file.
A folder whose DONE holds no manifest (written before it existed) counts as damaged: it is moved aside and rebuilt.

Extraction writes it (``featstudy.extraction``); analyses only read it through :func:`load_embedding`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
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


def is_complete(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a finished embedding (its DONE marker exists; see :func:`damage` for intact)."""
    return (Path(folder) / DONE_MARKER).is_file()


def file_digest(path: str | os.PathLike) -> str:
    """Hex :data:`HASH` digest of a file, read in large blocks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, HASH).hexdigest()


def write_manifest(folder: str | os.PathLike) -> dict:
    """Write DONE, last, holding the size and digest of every file of the entry; returns the manifest."""
    folder = Path(folder)
    files = {name: {"size": (folder / name).stat().st_size, HASH: file_digest(folder / name)} for name in FILES}
    manifest = {"format": MANIFEST_FORMAT, "algorithm": HASH, "files": files}
    atomic_write_text(folder / DONE_MARKER, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _VERIFIED.pop(str(folder), None)
    return manifest


#: folder -> (size, mtime_ns, ctime_ns, inode) of DONE and every file when this process last found it intact: a
#: second check (get_embedding, then load_embedding) costs a stat per file, not a second read of features.npy
_VERIFIED: dict[str, tuple] = {}


def _signature(folder: Path) -> tuple:
    out = []
    for name in (DONE_MARKER, *FILES):
        st = os.stat(folder / name)
        out.append((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(out)


def damage(folder: str | os.PathLike) -> tuple[str, str] | None:
    """``(file name, what is wrong)`` when the finished entry ``folder`` differs from its DONE manifest, else None.

    Every file's size, then its digest, is compared with the manifest; a DONE without a manifest (an entry written
    before manifests existed) or an unreadable one counts as damaged. Costs one read of every file (~0.3 s for a
    450 MB features.npy with SHA-NI), once per process while the files are unchanged.
    """
    folder = Path(folder)
    try:
        sig = _signature(folder)
    except OSError:
        sig = None
    if sig is not None and _VERIFIED.get(str(folder)) == sig:
        return None
    try:
        raw = (folder / DONE_MARKER).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return DONE_MARKER, f"unreadable ({exc})"
    if not raw.strip():
        return DONE_MARKER, "holds no checksum manifest (an entry written by an older featstudy)"
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        algorithm = manifest["algorithm"]
        assert isinstance(files, dict) and algorithm in hashlib.algorithms_guaranteed
    except (ValueError, KeyError, TypeError, AssertionError):
        return DONE_MARKER, "not a valid checksum manifest"
    for name in FILES:
        if name not in files:
            return DONE_MARKER, f"the manifest lists no {name}"
        if not (folder / name).is_file():
            return name, "missing"
        size, want = (folder / name).stat().st_size, files[name].get("size")
        if size != want:
            return name, f"{size} bytes, {want} recorded at DONE (truncated or rewritten)"
    for name in FILES:
        with open(folder / name, "rb") as fh:
            got = hashlib.file_digest(fh, algorithm).hexdigest()
        want = str(files[name].get(algorithm))
        if got != want:
            return name, f"content changed since DONE ({algorithm} {got[:12]}..., {want[:12]}... recorded)"
    if sig is not None:
        _VERIFIED[str(folder)] = sig
    return None


def move_aside(folder: str | os.PathLike) -> Path:
    """Rename a damaged entry to ``<key>.damaged-<UTC timestamp>`` next to it (never deleted), its DONE renamed to
    :data:`DAMAGED_MARKER` first so that the moved folder is never taken as finished. Returns the new path."""
    folder = Path(folder)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = folder.with_name(f"{folder.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.damaged-{stamp}-{n}")
    if (folder / DONE_MARKER).exists():
        os.replace(folder / DONE_MARKER, folder / DAMAGED_MARKER)
    os.replace(folder, target)
    _VERIFIED.pop(str(folder), None)
    return target


def load_embedding(folder: str | os.PathLike, *, mmap: bool = True) -> Embedding:
    """Open a finished embedding folder; ``features`` is memory-mapped unless ``mmap=False``.

    The folder is checked against its DONE manifest first (:func:`damage`); a damaged one raises
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


def empty_classes(classes: list[str], row_labels: np.ndarray) -> list[int]:
    """Indices of the classes that have no row, in class order."""
    have = set(np.asarray(row_labels).tolist())
    return [i for i in range(len(classes)) if i not in have]


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

    For tests and tools that need an embedding without a forward pass; extraction writes the same files itself,
    merging its shards (:mod:`featstudy.extraction.shards`) with the same helpers, DONE last.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DONE_MARKER).unlink(missing_ok=True)
    labels = np.asarray(labels, dtype=np.int64)
    empty = empty_classes(classes, labels)
    atomic_save_npy(folder / "features.npy", np.ascontiguousarray(features, dtype=np.float32))
    atomic_save_npy(folder / "labels.npy", labels)
    write_items(folder / "classes.txt", classes)
    write_items(folder / "paths.txt", paths)
    write_items(folder / "feature_names.txt", feature_names)
    lines = [skipped_line(*s.rsplit("\t", 1)) if "\t" in s else escape(s) for s in skipped]
    lines += [dropped_class_line(classes[i], class_sizes[i] if class_sizes else 0) for i in empty]
    write_lines(folder / "skipped.txt", lines)
    meta = {**meta, "empty_classes": [classes[i] for i in empty]}
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    write_manifest(folder)
    return folder
