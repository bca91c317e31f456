"""The report's comparison page at the paper's scale: the four datasets (mit67 67, cub200 200, flowers102 102 and
ImageNet 500 classes) x VGG19's 9,600 features, synthetic D (heavier-tailed in deeper layers). Prints the time to
build and write the page, its size against the atlas's 25 MB bound, and, where Chromium is installed, the time until
the index is interactive (bound 2 s) and to open a layer, a feature and a dataset view.

    .venv/bin/python bench/report_page.py [--out DIR] [--seed 0] [--screenshot PNG]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests" / "analysis"), str(ROOT / "bench")]

DATASETS = {"mit67": 67, "cub200": 200, "flowers102": 102, "imagenet_val": 500}


def synthetic_runs(seed: int):
    from atlas import CHANNELS

    from featstudy.analysis.compare import CompareRun

    rng = np.random.default_rng(seed)
    names = [f"{layer}:{i}" for layer, n in CHANNELS.items() for i in range(n)]
    layer_of = [n.split(":")[0] for n in names]
    layers = list(CHANNELS)
    depth = np.array([layers.index(x) for x in layer_of]) / (len(layers) - 1)
    runs = []
    for name, c in DATASETS.items():
        d = np.clip(rng.normal(0.0, 0.06 + 0.12 * depth[:, None], (len(names), c)), -1, 1)
        runs.append(CompareRun(name, f"{name:0<32}"[:32], d, names, layer_of,
                               [f"{name}_class_{i}" for i in range(c)], 0.3, -0.25, "vgg19", "IMAGENET1K_V1"))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--screenshot", type=Path, default=None)
    args = ap.parse_args()
    from atlas import measure

    from featstudy.analysis.compare import write_compare_page

    runs = synthetic_runs(args.seed)
    out = args.out or Path(tempfile.mkdtemp(prefix="report-page-"))
    t0 = time.perf_counter()
    page = write_compare_page(runs, out / "atlas")
    build_s = time.perf_counter() - t0
    size = page.stat().st_size
    print(f"datasets {len(runs)} ({', '.join(f'{r.name} {len(r.classes)}' for r in runs)}), features 9600")
    print(f"page {size / 2**20:.2f} MiB ({size / 25e6:.2f} of the 25 MB bound), built and written in {build_s:.1f} s")
    routes = [("#/layer/conv5_4", "layer"), ("#/feature/9000", "feature"), ("#/dataset/1", "dataset")]
    for key, value in measure(page, args.screenshot, routes).items():
        note = f" ({value / 2:.2f} of the 2 s bound)" if key == "index_wall_s" else ""
        print(f"{key}: {value if isinstance(value, list) else round(float(value), 3)}{note}")
    print(f"page: {page}")


if __name__ == "__main__":
    main()
