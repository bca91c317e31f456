"""The content fingerprint of a file dataset: what decides whether a cached embedding still describes the images.

:func:`content_fingerprint` hashes (sha256) a header (dataset name, split, classes), then for each sample in the
dataset's order (the row order of the embedding) one JSON line ``[relative path, label, sha256 of the file's
bytes]``. Any change to any byte of an image gives another fingerprint, hence another cache key and a fresh row;
the same files under another root (copied, moved, mounted elsewhere) give the same fingerprint, because only
relative paths enter it. A file that cannot be read enters as ``!<errno name>`` (``!ENOENT`` when missing) instead
of a digest: extraction lists it in ``skipped.txt``, and once it becomes readable the key changes.

Files are read in 256 KiB chunks (:func:`hashlib.file_digest`) by a small thread pool: hashlib releases the GIL on
large buffers, so hashing uses several cores. sha256 rather than blake2b: with the SHA extensions of current CPUs
(OpenSSL) it is about twice as fast here (1.8 vs 0.9 GB/s on one core).

The stat memo (optional, ``memo_dir``; extraction keeps it in ``<paths.cache_dir>/fingerprints/``) makes a repeated
fingerprint cost a ``stat`` per file instead of a read. One JSON file per dataset root maps each relative path to
``[st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns, sha256]``; a file's memoised digest is used only when all
five stat fields are unchanged. Why that is safe: every write to a file, and every ``os.utime`` / ``touch``
that puts an old mtime back, sets its ctime (inode change time) to the current time, and no user call can set
ctime back (only a root user changing the system clock or editing the raw device can). A replaced file (new
inode, or a copy) misses too. The one gap is a write within the file system's timestamp granularity of the moment
it was hashed (same ctime tick; git calls this "racily clean"): a digest is therefore memoised only when the file's
ctime and mtime lie more than :data:`RACY_NS` (2 s, above the coarsest Linux granularity of ext3/FAT) before the
hash started, and when its stat is the same before and after reading it. A memo that cannot be read or parsed is
ignored (everything is re-hashed) and rewritten atomically; failing to write it is not an error (it only costs
speed). Caveats: a network file system whose server clock runs more than 2 s behind this machine's could defeat
the racy check, and writes through a memory map update ctime only when the kernel notices the dirty page.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from json.encoder import encode_basestring_ascii as _json_str
from pathlib import Path

log = logging.getLogger(__name__)

#: a digest is memoised only for files whose ctime and mtime are at least this much older than the hash start
RACY_NS = 2_000_000_000
MEMO_VERSION = 1
#: files hashed at once by the thread pool (hashlib releases the GIL; more threads than cores only add contention)
MAX_WORKERS = 8


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes, read in chunks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _errno_marker(exc: OSError) -> str:
    return "!" + (errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__)


def memo_path(memo_dir: str | os.PathLike, root: Path) -> Path:
    """The memo file of dataset root ``root`` (absolute) under ``memo_dir``."""
    return Path(memo_dir) / f"{hashlib.sha256(str(root).encode('utf-8', 'surrogateescape')).hexdigest()[:24]}.json"


def _load_memo(path: Path | None, root: Path) -> dict[str, list]:
    """The memo's entries, or ``{}`` when absent, unreadable, of another version or root, or malformed."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("fingerprint memo %s unreadable (%s); re-hashing every file and rewriting it", path, exc)
        return {}
    ok = (isinstance(data, dict) and data.get("version") == MEMO_VERSION and data.get("root") == str(root)
          and isinstance(data.get("files"), dict))
    if not ok:
        log.warning("fingerprint memo %s malformed; re-hashing every file and rewriting it", path)
        return {}
    return data["files"]


def _memo_digest(entry, key: list[int]) -> str | None:
    """The memoised digest when ``entry`` is well-formed and its five stat fields equal ``key``, else None."""
    if type(entry) is list and len(entry) == 6 and entry[:5] == key and type(entry[5]) is str and len(entry[5]) == 64:
        return entry[5]
    return None


def _hash_one(path: str, before: os.stat_result, trust_before_ns: int) -> tuple[str, list | None]:
    """(digest or ``!ERRNO``, the memo entry or None when the file is racy, changed while read, or unreadable)."""
    try:
        digest = file_sha256(path)
        after = os.stat(path)
    except OSError as exc:
        return _errno_marker(exc), None
    key = _stat_key(before)
    if _stat_key(after) != key or max(before.st_ctime_ns, before.st_mtime_ns) >= trust_before_ns:
        return digest, None
    return digest, [*key, digest]


def content_fingerprint(root: Path, header, samples, memo_dir: str | os.PathLike | None = None,
                        workers: int | None = None) -> str:
    """sha256 hex of ``header`` (JSON) and, per sample ``(relative path, label)`` in order, the path, the label and
    the sha256 of the file's bytes (see the module docstring; ``memo_dir``: where the stat memo lives, or None)."""
    root = Path(root)
    mpath = memo_path(memo_dir, root) if memo_dir is not None else None
    memo = _load_memo(mpath, root)
    t0 = time.time_ns()
    trust_before_ns = t0 - RACY_NS
    digests: list[str | None] = [None] * len(samples)
    todo: list[tuple[int, str, os.stat_result]] = []
    base = os.fspath(root)
    for i, (rel, _) in enumerate(samples):
        path = os.path.join(base, rel)
        try:
            st = os.stat(path)
        except OSError as exc:
            digests[i] = _errno_marker(exc)
            continue
        if not stat.S_ISREG(st.st_mode):
            digests[i] = "!not-a-file"
            continue
        digests[i] = _memo_digest(memo.get(rel), _stat_key(st))
        if digests[i] is None:
            todo.append((i, path, st))
    fresh: dict[str, list] = {}
    if todo:
        n = max(1, min(workers or MAX_WORKERS, os.cpu_count() or 1, len(todo)))
        jobs = [(path, st, trust_before_ns) for _, path, st in todo]
        if n == 1:
            results = [_hash_one(*job) for job in jobs]
        else:
            with ThreadPoolExecutor(max_workers=n, thread_name_prefix="fingerprint") as pool:
                results = list(pool.map(lambda job: _hash_one(*job), jobs, chunksize=16))
        for (i, _, _), (digest, entry) in zip(todo, results):
            digests[i] = digest
            if entry is not None:
                fresh[samples[i][0]] = entry
    # one line per sample: compact JSON [path, label, digest] (ASCII-escaped: any file name is unambiguous)
    lines = [json.dumps(header, ensure_ascii=True)]
    lines += [f"[{_json_str(rel)},{int(label)},{_json_str(digest)}]" for (rel, label), digest in zip(samples, digests)]
    if mpath is not None and fresh:
        _save_memo(mpath, root, {**memo, **fresh})
    return hashlib.sha256(("\n".join(lines) + "\n").encode("ascii")).hexdigest()


def _save_memo(path: Path, root: Path, files: dict[str, list]) -> None:
    from featstudy.store import atomic_write_text

    try:
        atomic_write_text(path, json.dumps({"version": MEMO_VERSION, "root": str(root), "files": files},
                                           separators=(",", ":")))
    except (OSError, ValueError) as exc:  # an unwritable cache only costs speed here; extraction names it later
        log.info("fingerprint memo %s not written (%s)", path, exc)
