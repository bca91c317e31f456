"""Cost of the content fingerprint (the dataset part of the cache key) against the old size-only one, same run.

    .venv/bin/python bench/fingerprint.py                   # CUB-sized: 11,788 files, ~1.1 GB, 200 class folders
    .venv/bin/python bench/fingerprint.py --n 2000 --mean-kb 40

Data: ``--n`` files of random bytes in ``--classes`` folders, read through :class:`featstudy.datasets.ImageFolder`
(which lists files without decoding them, so random bytes named ``.jpg`` are enough). Sizes are lognormal
(sigma 0.5) around ``--mean-kb``: 94 KB by default, since CUB_200_2011's 11,788 JPEGs fill about 1.1 GB (the
archive is 1.15 GB and JPEGs do not compress). After writing, the files are synced and the script waits out the
2 s "racy" window, so that the memo may trust every file.

Timed, best of ``--repeats`` rounds, each round running every variant back to back (the machine is shared and its
speed drifts, so ratios compare variants in the same machine state):

* ``size-only (old)``: the former fingerprint, sha256 over paths, labels and ``stat().st_size``: the baseline;
* ``content, memo warm``: a cache hit once the stat memo knows the files (a stat per file + the memo's JSON);
* ``content, no memo, page cache``: every file re-read and hashed from the page cache (a first run, or a memo lost);
  also with one thread, to show what the pool buys;
* ``content, no memo, cold disk``: the same after ``posix_fadvise(DONTNEED)`` evicted the files from the page cache
  (their pages only; no root needed), i.e. a first run after a reboot, on this machine's disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from featstudy.datasets import ImageFolder
from featstudy.datasets import fingerprint as fp

MB = 2**20


def size_only(ds) -> str:
    """The pre-fix fingerprint: classes, relative paths, labels and file sizes."""
    h = hashlib.sha256()
    h.update(json.dumps([ds.name, ds.split, ds.classes]).encode())
    for rel, label in ds.samples:
        h.update(f"{rel}\t{label}\t{(ds.root / rel).stat().st_size}\n".encode())
    return h.hexdigest()


def generate(root: Path, n: int, classes: int, mean_kb: float, seed: int) -> int:
    """``n`` files of random bytes under ``root/<class>/``; returns the total bytes. Each file is a unique 16-byte
    prefix and a slice of a 16 MB random pool at a random offset, so every digest differs."""
    rng = np.random.default_rng(seed)
    pool = rng.bytes(16 * MB)
    sigma = 0.5
    sizes = rng.lognormal(np.log(mean_kb * 1000) - sigma**2 / 2, sigma, n).astype(np.int64).clip(2000, 8 * MB)
    total = 0
    for i, size in enumerate(sizes):
        d = root / f"{i % classes:03d}.class"
        d.mkdir(parents=True, exist_ok=True)
        off = int(rng.integers(0, len(pool) - size))
        data = i.to_bytes(16, "little") + pool[off:off + size - 16]
        (d / f"img_{i:05d}.jpg").write_bytes(data)
        total += len(data)
    os.sync()
    return total


def evict(ds) -> None:
    """Drop the dataset's files from the page cache (their pages only)."""
    for rel, _ in ds.samples:
        fd = os.open(ds.root / rel, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn):
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=11788, help="files (default 11,788: CUB_200_2011)")
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--mean-kb", type=float, default=94.0, help="mean file size in KB (default 94: CUB, 1.1 GB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-disk variant")
    args = ap.parse_args(argv)

    print(f"load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())} (other processes share the cores)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"fingerprint threads {min(fp.MAX_WORKERS, os.cpu_count() or 1)}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP"), prefix="fingerprint-bench-") as tmp:
        tmp = Path(tmp)
        dt, total = timed(lambda: generate(tmp / "data", args.n, args.classes, args.mean_kb, args.seed))
        print(f"data: {args.n:,} files in {args.classes} folders, {total / MB:,.0f} MB "
              f"(mean {total / args.n / 1000:.0f} KB), written in {dt:.0f} s")
        time.sleep(fp.RACY_NS / 1e9 + 0.2)  # past the racy window: the memo may trust every file
        t_list, ds = timed(lambda: ImageFolder(tmp / "data"))
        print(f"listing the dataset (ImageFolder, not timed below): {t_list:.2f} s")
        memo = tmp / "memo"

        def no_memo():
            return ds.fingerprint()

        def one_thread():
            return fp.content_fingerprint(ds.root, [ds.name, ds.split, ds.classes], ds.samples, None, workers=1)

        def warm():
            return ds.fingerprint(memo_dir=memo)

        def cold_memo():
            shutil.rmtree(memo, ignore_errors=True)
            return ds.fingerprint(memo_dir=memo)  # the first run: hashes everything and writes the memo

        variants = {"size-only (old)": lambda: size_only(ds),
                    "content, first run (no memo yet), page cache": cold_memo,
                    "content, memo warm (a cache hit)": warm,
                    "content, no memo, page cache": no_memo,
                    "content, no memo, page cache, 1 thread": one_thread}
        best = {name: np.inf for name in variants}
        if not args.no_cold:
            best["content, no memo, cold disk"] = np.inf
        digests = set()
        size_only(ds), no_memo()  # warm-up: page cache and imports
        for _ in range(args.repeats):
            for name, fn in variants.items():
                dt, res = timed(fn)
                best[name] = min(best[name], dt)
                if name != "size-only (old)":
                    digests.add(res)
            if not args.no_cold:
                evict(ds)
                dt, res = timed(no_memo)
                best["content, no memo, cold disk"] = min(best["content, no memo, cold disk"], dt)
                digests.add(res)
        assert len(digests) == 1, "the content variants disagree"
        blob = np.random.default_rng(1).bytes(256 * MB)
        raw = min(timed(lambda: hashlib.sha256(blob).digest())[0] for _ in range(3))
        memo_size = sum(p.stat().st_size for p in memo.glob("*.json"))
        base = best["size-only (old)"]
        print()
        print(f"| {'fingerprint of ' + format(args.n, ',') + ' files':<46} | {'time (s)':>8} | {'vs size-only':>12} "
              f"| {'MB/s':>6} |")
        print(f"|{'-' * 48}|{'-' * 10}|{'-' * 14}|{'-' * 8}|")
        for name, dt in best.items():
            rate = f"{total / MB / dt:6.0f}" if "memo warm" not in name and name != "size-only (old)" else ""
            print(f"| {name:<46} | {dt:>8.3f} | {dt / base:>11.1f}x | {rate:>6} |")
        print(f"\nmemo file: {memo_size / MB:.1f} MB for {args.n:,} files; sha256 of 256 MB in memory, one core, "
              f"now: {256 / raw:,.0f} MB/s (the ceiling of one thread)")
        print(f"load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
