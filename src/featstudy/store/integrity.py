"""DONE, the checksum manifest of a finished entry, and the checks made against it before an entry is used.

The manifest is checked (:func:`damage`) before an entry is used: extraction moves a damaged entry aside
(:func:`move_aside`, never deleting it) and extracts it again, :func:`featstudy.store.load_embedding` refuses it
naming the file. A folder whose DONE holds no manifest (written before it existed) counts as damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from featstudy.store.files import DAMAGED_MARKER, DONE_MARKER, FILES, HASH, MANIFEST_FORMAT, atomic_write_text


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
