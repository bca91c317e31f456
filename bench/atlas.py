"""The atlas page at cub200 scale (issue 15's bound: under 25 MB): synthetic D of 9,600 features (VGG19's layers,
paper Table 1) x 200 classes, the page written by :func:`featstudy.analysis.atlas.build_data` / ``render`` with the
default ``top_k`` (32 + 32 per class), its size, and, where Chromium is installed, the time until the index view is
interactive (and a class, a layer and a feature view), measured over the DevTools protocol.

    .venv/bin/python bench/atlas.py [--out DIR] [--classes 200] [--seed 0] [--spread 1] [--screenshot PNG]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests" / "analysis")]

CHANNELS = {"conv1_1": 64, "conv1_2": 64, "conv2_1": 128, "conv2_2": 128, **{f"conv3_{i}": 256 for i in range(1, 5)},
            **{f"conv4_{i}": 512 for i in range(1, 5)}, **{f"conv5_{i}": 512 for i in range(1, 5)}, "fc7": 4096}


class SyntheticContext:
    """What the atlas reads from an AnalysisContext, on synthetic D (heavier-tailed in deeper layers)."""

    def __init__(self, n_classes: int, seed: int, out: Path, spread: float = 1.0):
        from featstudy.analysis.base import AnalysisContext, KeptFractions

        rng = np.random.default_rng(seed)
        self.feature_names = [f"{layer}:{i}" for layer, n in CHANNELS.items() for i in range(n)]
        self.layer_of_feature = np.array([n.split(":")[0] for n in self.feature_names])
        self.layers = list(CHANNELS)
        depth = np.array([self.layers.index(x) for x in self.layer_of_feature]) / (len(self.layers) - 1)
        f_count = len(self.feature_names)
        d = rng.normal(0.0, spread * (0.06 + 0.12 * depth[:, None]), (f_count, n_classes))
        d = np.clip(d, -1, 1)
        self.classes = [f"{i + 1:03d}.Synthetic_bird_{i}" for i in range(n_classes)]
        self.labels = np.repeat(np.arange(n_classes), 30)
        self.dataset, self.output_dir, self.extra = "cub200 (synthetic D)", out, {"run_id": "0" * 32}
        self.embedding = SimpleNamespace(meta={"model": "vgg19", "weights": "IMAGENET1K_V1"})
        self._cache: dict = {}
        n_in = np.full(n_classes, 30)
        self._ks = SimpleNamespace(d=d, n_in=n_in, n=int(n_in.sum()))
        t_plus, t_minus = 0.25, -0.2
        self._th = SimpleNamespace(t_plus=t_plus, t_minus=t_minus)
        kept = (d > t_plus) | (d < t_minus)
        by_layer = {layer: float(kept[self.layer_of_feature == layer].mean()) for layer in self.layers}
        self._kept = KeptFractions(by_layer, {k: v / 10 for k, v in by_layer.items()}, float(kept.mean()),
                                   float(kept.mean()) / 10)
        self._timed = AnalysisContext._timed.__get__(self)

    def ks(self):
        return self._ks

    def thresholds(self, step=0.001):
        return self._th

    def kept(self, step=0.001):
        return self._kept


ROUTES = [("#/class/0", "class"), ("#/layer/fc7", "layer"), ("#/feature/9000", "feature")]


def measure(page: Path, screenshot: Path | None, routes: list[tuple[str, str]] = ROUTES) -> dict:
    """Seconds to the index being interactive (and ``performance.now()`` then) and to each of ``routes``, in
    headless Chromium; console errors. Empty where Chromium is not installed."""
    from cdp import CHROMIUM, Browser

    if CHROMIUM is None:
        return {}
    out = {}
    with Browser() as b:
        t0 = time.perf_counter()
        b.goto(page.as_uri())
        b.wait("document.body && document.body.dataset.ready === '1'", timeout=120)
        out["index_wall_s"] = time.perf_counter() - t0
        out["index_ready_ms"] = b.eval("window.atlasReady")  # performance.now() when the index was built
        if screenshot:
            b.screenshot(screenshot)
        out.update(b.route_timings(routes))
        out["errors"] = list(b.errors)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spread", type=float, default=1.0, help="scale of the synthetic D (more kept pairs)")
    ap.add_argument("--screenshot", type=Path, default=None)
    args = ap.parse_args()
    from featstudy.analysis.atlas import build_data, render

    out = args.out or Path(tempfile.mkdtemp(prefix="atlas-bench-"))
    ctx = SyntheticContext(args.classes, args.seed, out, args.spread)
    t0 = time.perf_counter()
    data = build_data(ctx, top_k=32)
    html = render(data)
    build_s = time.perf_counter() - t0
    page = out / "atlas" / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(html, encoding="utf-8")
    shown = {e[0] for lists in (data["pos"], data["neg"]) for entries in lists for e in entries}
    size = page.stat().st_size
    print(f"features {len(ctx.feature_names)}, classes {len(ctx.classes)}, pairs kept {ctx.kept().overall:.1%}")
    print(f"page {size / 2**20:.2f} MiB (bound 25 MB: {'ok' if size < 25e6 else 'OVER'}), built in {build_s:.1f} s")
    print(f"features shown in class views: {len(shown)} -> at most {4 * len(shown)} crops at 4 per feature")
    for key, value in measure(page, args.screenshot).items():
        print(f"{key}: {value if isinstance(value, list) else round(float(value), 3)}")
    print(f"page: {page}")


if __name__ == "__main__":
    main()
