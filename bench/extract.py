"""Extraction throughput: featstudy's Lightning path against a hand-written torch loop, same images, same device,
same run.

Both sides do the same work: decode + resize + crops + normalise in a DataLoader (same workers), the same
FeatureModel forward (read the nodes, pool per crop, mean over crops), one shard written per batch, and the merge into
the store. The Lightning side is ``featstudy.extraction.get_embedding`` on a fresh cache folder (a cache miss); the
hand loop calls the same building blocks without Lightning. Model building is timed separately and excluded from both
images/s figures. Runs alternate (L, H, L, H, ...) and the best of ``--repeats`` is reported, so machine noise hits both
sides alike.

On a CUDA device it also measures channels_last and bf16 autocast (hand loop), their speed, and their largest
difference to fp32 (relative to each feature's fp32 spread); fp32 stays the default.

    python bench/extract.py                           # digits, 512 images, ten crops 40/32, CPU
    python bench/extract.py --crops center --n-images 1797
    python bench/extract.py --resize 256 --size 224 --n-images 64   # the paper's crops
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from featstudy import datasets, models
from featstudy.extraction import get_embedding, plan
from featstudy.extraction import shards as _shards
from featstudy.extraction.module import CropsDataset, collate
from featstudy.transforms import ImageTransform, crop_spec


def make_cfg(args, cache: Path):
    """The bench's config: VGG19 on an image folder of the first n digits (PNG files, decoded like real data)."""
    return OmegaConf.create({
        "model": {"name": "vgg19", "weights": args.weights, "preprocessing": "torchvision", "seed": 0, "nodes": None},
        "dataset": {"name": "imagefolder", "root": str(args.data), "split": "all", "download": False},
        "crops": {"name": args.crops, "resize": args.resize, "size": args.size},
        "pooling": {"name": "avg"},
        "loader": {"batch_size": args.batch_size, "num_workers": args.workers},
        "trainer": {"accelerator": args.accelerator, "devices": 1, "num_nodes": 1, "strategy": "auto",
                    "precision": "32-true"},
        "paths": {"cache_dir": str(cache)},
    })


def write_digits(folder: Path, n: int) -> Path:
    """The first n digits as PNG files in class folders (8x8 RGB)."""
    d = datasets.Digits()
    for i in range(n):
        path = folder / d.classes[d.targets[i]] / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        d.image(i).save(path)
    return folder


def hand_loop(cfg, n, device, channels_last=False, bf16=False, out: Path | None = None):
    """The same work without Lightning: DataLoader -> forward -> one shard per batch -> merge. Returns (s, features)."""
    ms = models.spec(cfg.model)
    crops = crop_spec(cfg.crops)
    ds = datasets.from_config(cfg.dataset)
    model, channels, _ = models.build(ms, "avg", crops.size)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    names = models.feature_names(channels)
    loader = DataLoader(CropsDataset(ds, ImageTransform(crops, ms.preprocessing), list(range(len(ds)))),
                        batch_size=cfg.loader.batch_size, num_workers=cfg.loader.num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    out = out or Path(tempfile.mkdtemp(prefix="hand-"))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            x = batch["images"].to(device, non_blocking=True)
            b, k = x.shape[:2]
            x = x.flatten(0, 1)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                f = model.per_crop(x)
            f = f.float().view(b, k, -1).mean(1).cpu().numpy()
            _shards.write_shard(out / "shards", 0, batch["ids"].numpy(), f, batch["skipped_ids"].numpy(),
                                batch["skipped_reasons"], modes=batch["modes"])
    _shards.merge(out / "shards", out, n_images=len(ds), n_features=len(names), paths=[s for s, _ in ds.samples],
                  labels=ds.targets, classes=ds.classes, feature_names=names, meta={})
    dt = time.perf_counter() - t0
    feats = np.load(out / "features.npy")
    shutil.rmtree(out, ignore_errors=True)
    return dt, feats


def lightning_run(cfg, n):
    """get_embedding on a fresh cache folder; returns (seconds without the model build, features)."""
    build = models.build
    spent = {}

    def timed_build(*a, **k):
        t = time.perf_counter()
        r = build(*a, **k)
        spent["build"] = time.perf_counter() - t
        return r

    models.build = timed_build
    try:
        t0 = time.perf_counter()
        h = get_embedding(cfg)
        dt = time.perf_counter() - t0 - spent["build"]
        dt -= plan_time(cfg)
        feats = np.load(h.path / "features.npy")
    finally:
        models.build = build
    return dt, feats


def plan_time(cfg):
    t = time.perf_counter()
    plan(cfg)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-images", type=int, default=512)
    ap.add_argument("--crops", default="ten", choices=["ten", "center", "none"])
    ap.add_argument("--resize", type=int, default=40)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--weights", default="random")
    ap.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--accelerator gpu: no CUDA device here")
    if device.type == "cuda":  # the same IEEE fp32 as featstudy's default path (no TF32) for the hand loop
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    n = args.n_images
    tmp_data = tempfile.TemporaryDirectory(prefix="bench-digits-")
    args.data = write_digits(Path(tmp_data.name), n)
    results = {"lightning": [], "hand": []}
    ref = None
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            dt, f_l = lightning_run(make_cfg(args, Path(tmp)), n)
        results["lightning"].append(n / dt)
        dt, f_h = hand_loop(make_cfg(args, Path("unused")), n, device)
        results["hand"].append(n / dt)
        ref = f_h
        np.testing.assert_allclose(f_l, f_h, rtol=1e-4, atol=1e-5)
    best_l, best_h = max(results["lightning"]), max(results["hand"])
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "images": n, "crops": f"{args.crops} {args.resize}/{args.size}", "batch_size": args.batch_size,
        "workers": args.workers, "lightning_img_s": round(best_l, 2), "hand_img_s": round(best_h, 2),
        "ratio_of_best": round(best_l / best_h, 3),
        "ratio_median_of_pairs": round(float(np.median(np.divide(results["lightning"], results["hand"]))), 3),
        "all_runs": {k: [round(v, 2) for v in vs] for k, vs in results.items()},
    }
    if device.type == "cuda":
        spread = ref.std(0) + 1e-12
        for name, kw in {"channels_last": {"channels_last": True}, "bf16": {"bf16": True},
                         "channels_last+bf16": {"channels_last": True, "bf16": True}}.items():
            dt, f = hand_loop(make_cfg(args, Path("unused")), n, device, **kw)
            report[name] = {"img_s": round(n / dt, 2),
                            "max_abs_diff_over_feature_std": float(np.max(np.abs(f - ref) / spread))}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
