"""Extraction throughput on the real thing: JPEG photos, the paper's crops, the real loader with several workers, and
the device (CUDA when there is one, else the CPU). One command:

    python bench/extract.py                                   # 64 JPEGs 500x375, ten crops 256/224, VGG19
    python bench/extract.py --n-images 256 --model-images 64 --workers 7 --batch-size 16
    python bench/extract.py --model resnet18 --crops center --shard-latency 0.05   # sync vs background shards
    python bench/extract.py --accelerator gpu --precision bf16-mixed              # on a GPU, mixed precision

It prints one JSON object with images/s for

* ``loader``: iterating the extraction's DataLoader alone (decode + resize + uint8 crops + collate into shared
  memory; no model), and ``loader_fp32_baseline``: the previous path measured in the same run (ten fp32 crops
  normalised on the CPU, stacked by a plain ``torch.stack``); ``loader_speedup`` is their ratio;
* ``model``: random uint8 batches already on the device through ``ExtractionModule.predict_step`` (mirror +
  normalise on the device, the forward, pooling, the finite check): what the device can take;
* ``both``: the real ``get_embedding`` on a fresh cache (model build and planning excluded), with the shards written
  in the background (the default) and, for comparison, synchronously (``both_sync_shards``);

so the bottleneck is the smallest of ``loader`` and ``model``. ``--shard-latency S`` adds S seconds to every shard
write (a slow NFS or Lustre fsync; bench only) to show what the background writer hides. The images are synthetic
photos (gradients + noise + shapes, JPEG quality 90, about 100 KB at 500x375), written to a temporary folder.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from featstudy import datasets, models
from featstudy.extraction import get_embedding, plan
from featstudy.extraction import shards as _shards
from featstudy.extraction.module import (CropsDataset, ExtractionModule, ShardWriter, cpus_available, make_loader,
                                         workers_setting)
from featstudy.transforms import DeviceTransform, ImageTransform, crop_spec, ship_crops, uint8_crops


def write_photos(folder: Path, n: int, width: int, height: int, seed: int = 0) -> float:
    """n photo-like JPEGs (smooth gradients, sensor-like noise, a few shapes; quality 90) in two class folders;
    returns their mean size in KB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    sizes = []
    for i in range(n):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        base = np.stack([255 * a * xx / width, 255 * b * yy / height, 255 * c * (xx + yy) / (width + height)], -1)
        img = Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
            draw.ellipse([x0, y0, x0 + rng.integers(20, 160), y0 + rng.integers(20, 160)],
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        path = folder / f"class{i % 2}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


def make_cfg(args, data: Path, cache: Path):
    return OmegaConf.create({
        "model": {"_target_": "featstudy.models.TorchvisionModel", "name": args.model, "weights": "random", "preprocessing": "torchvision", "seed": 0,
                  "nodes": None if args.model == "vgg19" else args.nodes},
        "dataset": {"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(data),
                    "split": "all", "download": False},
        "crops": {"_target_": "featstudy.transforms.CropSpec", "name": args.crops, "resize": None if args.crops == "none" else args.resize, "size": args.size},
        "pooling": {"_target_": "featstudy.pooling.Pooling", "name": "avg"},
        "loader": {"batch_size": args.batch_size, "num_workers": args.workers},
        "trainer": {"accelerator": "gpu" if args.device.type == "cuda" else "cpu", "devices": 1, "num_nodes": 1,
                    "strategy": "auto", "precision": args.precision},
        "paths": {"cache_dir": str(cache)},
    })


def _fp32_collate(items):
    """The previous collate: a plain torch.stack (not into shared memory)."""
    ok = [it for it in items if it["image"] is not None]
    return {"images": torch.stack([it["image"] for it in ok]), "ids": torch.tensor([it["id"] for it in ok])}


def _time_loader(loader, device) -> float:
    """Images/s over the whole loader, the first batch (worker start-up) excluded; each batch is moved to the
    device as the extraction does."""
    n, t0 = 0, None
    for batch in loader:
        batch["images"].to(device, non_blocking=True)
        if t0 is None:
            t0 = time.perf_counter()
            continue
        n += len(batch["ids"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / max(time.perf_counter() - t0, 1e-9)


def loader_rates(cfg, args) -> dict:
    ds = datasets.from_config(cfg.dataset)
    crops = crop_spec(cfg.crops)
    ids = list(range(len(ds)))
    image_bytes = ship_crops(crops) * 3 * crops.size ** 2
    new, workers = make_loader(CropsDataset(ds, functools.partial(uint8_crops, crops=crops), ids),
                               batch_size=args.batch_size, num_workers=args.workers, image_bytes=image_bytes,
                               accelerator=cfg.trainer.accelerator)
    old = DataLoader(CropsDataset(ds, ImageTransform(crops, "torchvision"), ids), batch_size=args.batch_size,
                     num_workers=workers, collate_fn=_fp32_collate, pin_memory=args.device.type == "cuda")
    rate_new, rate_old = _time_loader(new, args.device), _time_loader(old, args.device)
    return {"workers": workers, "bytes_per_image": image_bytes, "bytes_per_image_fp32_baseline":
            crops.n_crops * 3 * crops.size ** 2 * 4, "loader_img_s": round(rate_new, 2),
            "loader_fp32_baseline_img_s": round(rate_old, 2), "loader_speedup": round(rate_new / rate_old, 2)}


def model_rate(cfg, args) -> float:
    """Random uint8 crops already on the device through predict_step, images/s (one warm-up batch excluded)."""
    crops = crop_spec(cfg.crops)
    model, _, _ = models.build(models.spec(cfg.model), "avg", crops.size)
    module = ExtractionModule(model, transform=DeviceTransform(crops, "torchvision")).to(args.device).eval()
    b = args.batch_size
    x = torch.randint(0, 256, (b, ship_crops(crops), 3, crops.size, crops.size), dtype=torch.uint8,
                      device=args.device)
    batch = {"images": x, "ids": torch.arange(b), "modes": ["RGB"] * b, "skipped_ids": torch.zeros(0),
             "skipped_reasons": []}
    steps = max(1, (args.model_images or args.n_images) // b)
    mixed = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    with torch.inference_mode(), torch.autocast(args.device.type, dtype=mixed or torch.float32,
                                                enabled=mixed is not None):
        module.predict_step(batch)
        if args.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            module.predict_step(batch)["features"].sum().item()
    return steps * b / (time.perf_counter() - t0)


def both_rate(cfg, n: int, background: bool, latency: float) -> tuple[float, float]:
    """get_embedding on a fresh cache: images/s without the model build and the planning, and the seconds the
    predict loop spent handing its shards over (``write_on_batch_end``, the device idle meanwhile)."""
    build, write, spent = models.build, _shards.write_shard, {"handover": 0.0}
    hand_over = ShardWriter.write_on_batch_end

    def timed_hand_over(*a, **k):
        t = time.perf_counter()
        try:
            return hand_over(*a, **k)
        finally:
            spent["handover"] += time.perf_counter() - t

    def timed_build(*a, **k):
        t = time.perf_counter()
        r = build(*a, **k)
        spent["build"] = time.perf_counter() - t
        return r

    def slow_write(*a, **k):  # a slow file system, bench only
        time.sleep(latency)
        return write(*a, **k)

    models.build, _shards.write_shard = timed_build, (slow_write if latency else write)
    ShardWriter.write_on_batch_end = timed_hand_over
    pending = ShardWriter.MAX_PENDING
    ShardWriter.MAX_PENDING = pending if background else 0
    try:
        t = time.perf_counter()
        plan(cfg)
        t_plan = time.perf_counter() - t
        t0 = time.perf_counter()
        get_embedding(cfg)
        dt = time.perf_counter() - t0 - spent["build"] - t_plan
    finally:
        models.build, _shards.write_shard, ShardWriter.MAX_PENDING = build, write, pending
        ShardWriter.write_on_batch_end = hand_over
    return n / dt, spent["handover"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-images", type=int, default=64, help="JPEGs for the loader measurement")
    ap.add_argument("--model-images", type=int, default=None,
                    help="images for the model and end-to-end measurements (default: --n-images)")
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--crops", default="ten", choices=["ten", "center", "none"])
    ap.add_argument("--resize", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", default="auto", help="loader.num_workers: an integer or auto")
    ap.add_argument("--model", default="vgg19")
    ap.add_argument("--nodes", nargs="+", default=["layer1", "layer2", "layer3", "layer4", "flatten"],
                    help="model.nodes for a model other than vgg19 (default: resnet's blocks)")
    ap.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"],
                    help="trainer.precision for the model and end-to-end measurements")
    ap.add_argument("--shard-latency", type=float, default=0.0, help="seconds added to each shard write")
    ap.add_argument("--skip-both", action="store_true", help="loader and model only")
    ap.add_argument("--repeats", type=int, default=1, help="end-to-end runs of each kind (best kept)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.workers = workers_setting(int(args.workers) if args.workers.isdigit() else args.workers)
    args.workers = "auto" if args.workers is None else args.workers
    use_cuda = args.accelerator == "gpu" or (args.accelerator == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--accelerator gpu: no CUDA device here")
    args.device = torch.device("cuda" if use_cuda else "cpu")
    if use_cuda:  # IEEE fp32 as featstudy's default path
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    m = args.model_images or args.n_images
    with tempfile.TemporaryDirectory(prefix="bench-photos-") as tmp:
        tmp = Path(tmp)
        kb = write_photos(tmp / "photos", args.n_images, args.width, args.height)
        write_photos(tmp / "model-photos", m, args.width, args.height, seed=1)
        report = {
            "device": torch.cuda.get_device_name() if use_cuda else f"cpu ({torch.get_num_threads()} threads)",
            "cpus_available": cpus_available(), "images": args.n_images, "model_images": m,
            "jpeg": f"{args.width}x{args.height} q90, {kb:.0f} KB mean", "model": args.model,
            "crops": f"{args.crops} {args.resize}/{args.size}", "batch_size": args.batch_size,
            "precision": args.precision,
        }
        report.update(loader_rates(make_cfg(args, tmp / "photos", tmp / "unused"), args))
        report["model_img_s"] = round(model_rate(make_cfg(args, tmp / "photos", tmp / "unused"), args), 2)
        if not args.skip_both:  # alternating background / sync runs, best of --repeats each (machine noise)
            runs = {"both_img_s": [], "both_sync_shards_img_s": []}
            waits = {"both_img_s": [], "both_sync_shards_img_s": []}
            for r in range(args.repeats):
                for name, background in (("both_img_s", True), ("both_sync_shards_img_s", False)):
                    cfg = make_cfg(args, tmp / "model-photos", tmp / f"cache-{name}-{r}")
                    rate, wait = both_rate(cfg, m, background, args.shard_latency)
                    runs[name].append(round(rate, 2))
                    waits[name].append(round(wait, 3))
            report.update({name: max(v) for name, v in runs.items()}, all_runs=runs,
                          loop_waiting_on_shards_s=waits, shard_latency_s=args.shard_latency)
        report["bottleneck"] = "loader" if report["loader_img_s"] < report["model_img_s"] else "model"
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
