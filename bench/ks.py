"""Benchmark of the signed KS engine against a scipy.stats.ks_2samp loop, measured in the same run.

    .venv/bin/python bench/ks.py                       # cub200 scale + a 30,000-image memory-mapped run
    .venv/bin/python bench/ks.py --memmap-n 200000     # the big case: 200,000 x 9,600 float32 (7.7 GB on disk)

Data: ReLU-like float32 features, max(0, z + 0.25 + class shift) with z ~ N(0, 1), so ~40% exact zeros, seeded.
The scipy baseline times ``ks_2samp(out, in, method='asymp')`` calls alone (only the statistic matters here; the
two samples are cut out before the clock starts) over random (feature, class) pairs and extrapolates the time
per pair to all F·C pairs. Ours: ``signed_ks`` with 100 bins and exact (``bins=None``) on the full problem, after
a warm-up that loads the numba cache. ``--repeats`` rounds each time a scipy batch and one run of each of ours,
back to back, and the best round of each is reported: the machine is shared and its speed drifts, so the ratio
compares the two in the same machine state. Memory: peak of numpy allocations (tracemalloc) and of the resident
set above its level before the call (the kernel's high-water mark VmHWM, reset before the call), i.e. the
*extra* memory of the call.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy
from scipy import stats

from featstudy.stats import signed_ks

MB = 2**20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Extra memory of a block: peak numpy allocations (tracemalloc) and peak RSS above the level at entry.

    The RSS peak is the kernel's high-water mark (VmHWM), reset at entry through /proc/self/clear_refs, so it
    also sees numba's own allocations and touched pages of memory maps, with no sampling thread.
    """

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        self.base = _status_kb("VmRSS")
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        _, self.traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.rss = _status_kb("VmHWM") - self.base
        return False


def make_data(rng, n, f, c, out=None, rows=4096):
    """ReLU-like float32 features (N, F) with ~40% zeros; a tenth of the features shift for a few classes."""
    labels = np.arange(n) % c
    rng.shuffle(labels)
    shift = np.zeros((c, f), dtype=np.float32)
    hit = rng.random((c, f)) < 0.02
    shift[hit] = rng.normal(0, 1.0, hit.sum()).astype(np.float32)
    x = np.empty((n, f), dtype=np.float32) if out is None else out
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        block = rng.standard_normal((r1 - r0, f), dtype=np.float32)
        block += 0.25
        block += shift[labels[r0:r1]]
        np.maximum(block, 0, out=block)
        x[r0:r1] = block
    return x, labels


def scipy_batch(x, labels, classes, pairs, rng):
    """Seconds per ks_2samp(out, in) call over one batch of ``pairs`` random (feature, class) pairs.

    Only the calls are timed: each pair's two samples are cut out of ``x`` (a strided column) before the clock
    starts, as a loop that takes each column once and reuses it for every class would.
    """
    f_idx = rng.integers(0, x.shape[1], pairs)
    c_idx = rng.integers(0, classes.size, pairs)
    samples = []
    for f, c in zip(f_idx, c_idx):
        col = np.ascontiguousarray(x[:, f])
        inside = labels == classes[c]
        samples.append((col[~inside], col[inside]))
    t0 = time.perf_counter()
    for out, ins in samples:
        stats.ks_2samp(out, ins, method="asymp")
    return (time.perf_counter() - t0) / pairs


def wall(fn):
    """Wall time of one call."""
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def peak_memory(fn):
    """Extra memory of one call (see PeakMemory)."""
    with PeakMemory() as mem:
        res = fn()
    return res, mem


def setup(args, versions: str = ""):
    """Print the load, the machine and the data; return (rng, x, labels, classes, n_pairs) of cub200 scale
    (``args.n``, ``args.features``, ``args.classes``, ``args.seed``). ``versions``: more ``name x.y`` to print."""
    import numba

    print(f"load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())} (other processes share the cores)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, numba threads {numba.config.NUMBA_NUM_THREADS}, "
          f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"{versions}numba {numba.__version__}")
    rng = np.random.default_rng(args.seed)
    x, labels = make_data(rng, args.n, args.features, args.classes)
    classes = np.unique(labels)
    n_pairs = args.features * classes.size
    print(f"data: N={args.n} F={args.features} C={classes.size} ({n_pairs:,} pairs), "
          f"{(x == 0).mean():.1%} exact zeros, {x.nbytes / MB:.0f} MB float32")
    return rng, x, labels, classes, n_pairs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6000, help="images (default 6000, cub200)")
    ap.add_argument("--features", type=int, default=9600, help="features (default 9600, VGG19)")
    ap.add_argument("--classes", type=int, default=200, help="classes (default 200)")
    ap.add_argument("--pairs", type=int, default=300, help="(feature, class) pairs timed with scipy, in all")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds of (scipy batch, binned run, exact run); the best round of each is reported")
    ap.add_argument("--memmap-n", type=int, default=30000, help="images of the memory-mapped run (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng, x, labels, classes, n_pairs = setup(args)

    # warm-up: load (or build) the numba cache for these array layouts
    signed_ks(x[:64], labels[:64] % 2, bins=100)
    signed_ks(x[:64], labels[:64] % 2, bins=None)

    from featstudy.stats.ks import binned_method

    print(f"binned kernel at this size: {binned_method(args.n, 100, classes.size)}")
    # rounds interleave a scipy batch with one run of each of ours, so that both see the same machine (it is
    # shared: its speed drifts); each is reported as its best round
    stats.ks_2samp(x[:50, 0], x[50:100, 0], method="asymp")  # warm-up (lazy imports)
    methods = (("binned (100 bins)", 100), ("exact", None))
    per_pair = np.inf
    best = {bins: np.inf for _, bins in methods}
    per_batch = max(1, args.pairs // args.repeats)
    for _ in range(args.repeats):
        per_pair = min(per_pair, scipy_batch(x, labels, classes, per_batch, rng))
        for _, bins in methods:
            dt, res = wall(lambda b=bins: signed_ks(x, labels, bins=b))
            best[bins] = min(best[bins], dt)
            del res
    scipy_total = per_pair * n_pairs
    print(f"scipy ks_2samp: {per_pair * 1e3:.3f} ms/pair (best of {args.repeats} batches of {per_batch} pairs) "
          f"-> {scipy_total:,.0f} s for all")

    rows, results = [], {}
    for name, bins in methods:
        res, mem = peak_memory(lambda b=bins: signed_ks(x, labels, bins=b))
        results[bins] = res
        rows.append((name, best[bins], scipy_total / best[bins], mem.traced / MB, mem.rss / MB))
    print()
    targets = {"binned (100 bins)": 4000, "exact": 2500}
    print(f"| {'method':<18} | {'time (s)':>8} | {'vs scipy':>9} | {'target':>8} | {'numpy peak MB':>13} | {'RSS +MB':>8} |")
    print(f"|{'-' * 20}|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 15}|{'-' * 10}|")
    print(f"| {'scipy (extrap.)':<18} | {scipy_total:>8.0f} | {1:>8.0f}x | {'':>8} | {'':>13} | {'':>8} |")
    for name, dt, ratio, traced, rss in rows:
        target = f">={targets[name]}x"
        print(f"| {name:<18} | {dt:>8.2f} | {ratio:>8.0f}x | {target:>8} | {traced:>13.0f} | {rss:>8.0f} |")
    diff = np.abs(results[100].d - results[None].d)
    flips = np.mean(results[100].sign != results[None].sign)
    print(f"\nbinned vs exact on these data: max |dD| {diff.max():.3f}, mean {diff.mean():.4f}, "
          f"sign flips {flips:.2%} of pairs")
    print(f"load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    del x

    if args.memmap_n:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            path = Path(tmp) / "features.npy"
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(args.memmap_n, args.features))
            _, mlabels = make_data(np.random.default_rng(args.seed + 1), args.memmap_n, args.features,
                                   args.classes, out=mm)
            mm.flush()
            del mm
            feats = np.load(path, mmap_mode="r")
            print(f"\nmemmap: N={args.memmap_n} F={args.features} ({path.stat().st_size / MB:,.0f} MB on disk)")
            for name, bins in (("binned (100 bins)", 100), ("exact", None)):
                dt, (_, mem) = wall(lambda b=bins: peak_memory(lambda: signed_ks(feats, mlabels, bins=b)))
                print(f"  {name:<18} {dt:8.1f} s   numpy peak {mem.traced / MB:6.0f} MB   RSS +{mem.rss / MB:6.0f} MB")
            del feats


if __name__ == "__main__":
    main()
