"""The GPU check of issue 13 as one run: numbers a GPU gives that the CPU cannot, printed as a table and written as
JSON (``$OUT/gpu_check.json``). Run through ``bench/gpu_check.sh`` (which also runs the CUDA tests), or alone:

    PYTHONPATH=src python bench/gpu_check.py            # on a CUDA machine: the full sizes, ~4 min on an H100/H200
    PYTHONPATH=src python bench/gpu_check.py --cpu      # the same code paths on the CPU, small sizes, ~1 min

For VGG19 (torchvision, random weights seeded) and a timm ViT (``vit_small_patch16_224``, random weights seeded,
nodes ``blocks.11`` and ``norm``, token pooling ``cls``), both ten crops 256/224:

* ``fp32 cpu vs gpu``: the same ``--diff-images`` JPEGs through ``get_embedding`` on the CPU and on the GPU into two
  caches (IEEE fp32 on both: TF32 off); the max absolute and max relative difference of the features;
* ``img/s``: the real ``get_embedding`` (the real loader, background shards; model build and planning excluded, as
  ``bench/extract.py``'s ``both``) on ``--images`` JPEGs for ``fp32``, ``channels_last``
  (``trainer.channels_last=true``) and ``bf16`` (``trainer.precision=bf16-mixed``), and ``model img/s``: random
  uint8 crops already on the device through the extraction module (what the device alone can take);
  the channels_last and bf16 features are compared with the fp32 ones of the same images;

then the KS engine at cub200 scale (N=6000, F=9600, C=200 synthetic ReLU-like float32, ``bench/ks.py``'s data):
``signed_ks`` with ``bins=100`` and exact, on the CPU of the machine (the KS never runs on the GPU).

Relative difference: ``|a - b| / (|b| + 1e-3 * max|b|)``, b the reference (CPU, fp32), maxed over all entries (the
floor, a thousandth of the largest feature value, keeps the exact zeros of ReLU features from dividing by zero). ``--cpu``: everything on the CPU with small sizes (4 images,
crops 64/56, a 2-block ViT at 56 px, N=600, F=96, C=20), the "GPU" side being a second CPU run, so every code path
runs where there is no GPU. A part whose package is missing (timm; numba for the KS) is skipped with one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

BENCH = Path(__file__).resolve().parent


def _load(name: str):
    """A sibling bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sizes(cpu: bool) -> dict:
    if cpu:
        return {"diff_images": 4, "images": 8, "resize": 64, "size": 56, "batch_size": 4, "workers": 1,
                "model_batches": 2, "vit": "vit_small_patch16_224", "vit_kwargs": {"img_size": 56, "depth": 2},
                "vit_nodes": ["blocks.1", "norm"], "ks": (600, 96, 20)}
    return {"diff_images": 20, "images": 512, "resize": 256, "size": 224, "batch_size": 16, "workers": "auto",
            "model_batches": 16, "vit": "vit_small_patch16_224", "vit_kwargs": {},
            "vit_nodes": ["blocks.11", "norm"], "ks": (6000, 9600, 200)}


def model_cfg(kind: str, s: dict) -> dict:
    if kind == "vgg19":
        return {"_target_": "featstudy.models.TorchvisionModel", "name": "vgg19", "weights": "random",
                "preprocessing": "torchvision", "seed": 0, "nodes": None}
    return {"_target_": "featstudy.models.timm_source.TimmModel", "name": s["vit"], "nodes": s["vit_nodes"],
            "token_pooling": "cls", "weights": "random", "seed": 0, "preprocessing": None,
            "kwargs": s["vit_kwargs"], "download": False}


def make_cfg(model: dict, s: dict, data: Path, cache: Path, accelerator: str, precision: str = "32-true",
             channels_last: bool = False):
    return OmegaConf.create({
        "model": model,
        "dataset": {"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(data),
                    "split": "all", "download": False},
        "crops": {"_target_": "featstudy.transforms.CropSpec", "name": "ten", "resize": s["resize"],
                  "size": s["size"]},
        "pooling": {"_target_": "featstudy.pooling.Pooling", "name": "avg"},
        "loader": {"batch_size": s["batch_size"], "num_workers": s["workers"]},
        "trainer": {"accelerator": accelerator, "devices": 1, "num_nodes": 1, "strategy": "auto",
                    "precision": precision, "channels_last": channels_last},
        "paths": {"cache_dir": str(cache)},
    })


def features(cfg) -> np.ndarray:
    from featstudy.extraction import get_embedding

    return np.load(get_embedding(cfg).path / "features.npy")


def difference(a: np.ndarray, b: np.ndarray) -> dict:
    """max |a - b| and max |a - b| / (|b| + 1e-3 max|b|); b is the reference (max over all its entries)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if a.shape != b.shape:
        raise SystemExit(f"gpu_check: feature shapes differ: {a.shape} vs {b.shape}")
    d = np.abs(a - b)
    floor = 1e-3 * np.abs(b).max() + 1e-30
    return {"max_abs": float(d.max()), "max_rel": float((d / (np.abs(b) + floor)).max())}


def model_rate(cfg, device: torch.device, batches: int) -> float:
    """Random uint8 ten crops already on the device through ExtractionModule.predict_step, images/s (one warm-up
    batch excluded), with the cfg's precision and channels_last."""
    from featstudy import models
    from featstudy.extraction.module import ExtractionModule
    from featstudy.transforms import DeviceTransform, crop_spec, ship_crops

    crops = crop_spec(cfg.crops)
    ms = models.spec(cfg.model)
    model, _, _ = models.build(ms, "avg", crops.size)
    module = ExtractionModule(model, channels_last=bool(cfg.trainer.channels_last),
                              transform=DeviceTransform(crops, ms.preprocessing)).to(device).eval()
    b = int(cfg.loader.batch_size)
    x = torch.randint(0, 256, (b, ship_crops(crops), 3, crops.size, crops.size), dtype=torch.uint8, device=device)
    batch = {"images": x, "ids": torch.arange(b), "modes": ["RGB"] * b, "skipped_ids": torch.zeros(0),
             "skipped_reasons": []}
    mixed = {"bf16-mixed": torch.bfloat16}.get(str(cfg.trainer.precision))
    with torch.inference_mode(), torch.autocast(device.type, dtype=mixed or torch.float32, enabled=mixed is not None):
        module.predict_step(batch)["features"].sum().item()
        t0 = time.perf_counter()
        for _ in range(batches):
            module.predict_step(batch)["features"].sum().item()
    return batches * b / (time.perf_counter() - t0)


MODES = (("fp32", "32-true", False), ("channels_last", "32-true", True), ("bf16", "bf16-mixed", False))


def check_model(kind: str, s: dict, tmp: Path, accelerator: str, device: torch.device, bx) -> dict:
    """One model's rows: fp32 difference CPU vs the device, then img/s and differences to fp32 per mode."""
    m = model_cfg(kind, s)
    out: dict = {}
    t = time.perf_counter()
    ref = features(make_cfg(m, s, tmp / "diff-photos", tmp / f"{kind}-cache-cpu", "cpu"))
    dev = features(make_cfg(m, s, tmp / "diff-photos", tmp / f"{kind}-cache-dev", accelerator))
    out["fp32_device_vs_cpu"] = {**difference(dev, ref), "images": s["diff_images"], "features": ref.shape[1],
                                 "seconds": round(time.perf_counter() - t, 1)}
    base = None
    for mode, precision, cl in MODES:
        cfg = make_cfg(m, s, tmp / "photos", tmp / f"{kind}-cache-{mode}", accelerator, precision, cl)
        rate, _ = bx.both_rate(cfg, s["images"], True, 0.0)
        row = {"img_s": round(rate, 2), "model_img_s": round(model_rate(cfg, device, s["model_batches"]), 2)}
        folder = next(d for d in (tmp / f"{kind}-cache-{mode}" / "embeddings").iterdir() if d.is_dir())
        feats = np.load(folder / "features.npy")
        if base is None:
            base = feats
        else:
            row["vs_fp32"] = difference(feats, base)
        out[mode] = row
    return out


def check_ks(n: int, f: int, c: int, repeats: int) -> dict:
    from featstudy.stats import signed_ks

    ks = _load("ks")
    x, labels = ks.make_data(np.random.default_rng(0), n, f, c)
    signed_ks(x[:64], labels[:64] % 2, bins=100)  # warm-up: numba's cache (or its compilation)
    signed_ks(x[:64], labels[:64] % 2, bins=None)
    out = {"N": n, "F": f, "C": c, "threads": os.cpu_count()}
    for name, bins in (("bins100", 100), ("exact", None)):
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            signed_ks(x, labels, bins=bins)
            best = min(best, time.perf_counter() - t)
        out[f"{name}_s"] = round(best, 4)
    return out


def table(report: dict) -> str:
    dev = "GPU" if report["accelerator"] == "gpu" else "CPU#2"
    scope = "--cpu: small sizes" if report["cpu_mode"] else "full sizes"
    crops = f"{report['sizes']['resize']}/{report['sizes']['size']}"
    lines = [f"gpu_check on {report['device']} ({scope}; crops ten {crops})"]
    for kind, label in (("vgg19", "VGG19"), ("vit", "ViT")):
        r = report.get(kind)
        if r is None:
            lines.append(f"{label:6} skipped: {report.get(kind + '_skipped', 'not run')}")
            continue
        d = r["fp32_device_vs_cpu"]
        lines.append(f"{label:6} fp32 {dev} vs CPU      max abs {d['max_abs']:.3e}  max rel {d['max_rel']:.3e}  "
                     f"({d['images']} images, {d['features']} features)")
        for mode, _, _ in MODES:
            row = r[mode]
            extra = (f"  vs fp32 max abs {row['vs_fp32']['max_abs']:.3e}  max rel {row['vs_fp32']['max_rel']:.3e}"
                     if "vs_fp32" in row else "")
            lines.append(f"{label:6} {mode:14} img/s {row['img_s']:9.2f}  model img/s {row['model_img_s']:9.2f}{extra}")
    k = report.get("ks")
    if k is None:
        lines.append(f"KS     skipped: {report.get('ks_skipped', 'not run')}")
    else:
        for name, label in (("bins100", "bins=100"), ("exact", "exact")):
            lines.append(f"KS     signed_ks {label:9} {k[name + '_s']:9.4f} s  (N={k['N']}, F={k['F']}, C={k['C']}, "
                         f"{k['threads']} cpus)")
    lines.append(f"total {report['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="all on the CPU, small sizes (the code paths, ~1 min)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-gpu"), help="folder of gpu_check.json ($OUT)")
    ap.add_argument("--images", type=int, help="JPEGs for the img/s rows (default 512; --cpu 8)")
    ap.add_argument("--diff-images", type=int, help="JPEGs for the CPU vs device difference (default 20; --cpu 4)")
    ap.add_argument("--ks-repeats", type=int, default=2, help="runs of each KS, best kept")
    ap.add_argument("--skip", nargs="*", default=[], choices=["vgg19", "vit", "ks"], help="parts not to run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                 "lightning.pytorch.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    s = sizes(args.cpu)
    s["images"] = args.images or s["images"]
    s["diff_images"] = args.diff_images or s["diff_images"]
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu for the code paths on the CPU)", file=sys.stderr)
        return 2
    accelerator = "cpu" if args.cpu else "gpu"
    device = torch.device("cpu" if args.cpu else "cuda")
    if not args.cpu:  # IEEE fp32 as featstudy's default path
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name() if not args.cpu else
                    f"cpu ({torch.get_num_threads()} threads)", "accelerator": accelerator, "cpu_mode": args.cpu,
                    "torch": torch.__version__, "sizes": {k: v for k, v in s.items() if k != "ks"}}
    bx = _load("extract")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)
        bx.write_photos(tmp / "diff-photos", s["diff_images"], 500, 375, seed=2)
        bx.write_photos(tmp / "photos", s["images"], 500, 375, seed=1)
        for kind in ("vgg19", "vit"):
            if kind in args.skip:
                report[kind + "_skipped"] = "--skip"
                continue
            if kind == "vit":
                try:
                    import timm  # noqa: F401
                except ImportError as exc:
                    report["vit_skipped"] = f"timm cannot be imported ({exc})"
                    print(f"gpu_check: ViT skipped: {report['vit_skipped']}", flush=True)
                    continue
            t = time.perf_counter()
            report[kind] = check_model(kind, s, tmp, accelerator, device, bx)
            print(f"gpu_check: {kind} done in {time.perf_counter() - t:.0f} s", flush=True)
    if "ks" in args.skip:
        report["ks_skipped"] = "--skip"
    else:
        try:
            import numba  # noqa: F401
        except ImportError as exc:
            report["ks_skipped"] = f"numba cannot be imported ({exc})"
            print(f"gpu_check: KS skipped: {report['ks_skipped']}", flush=True)
        else:
            report["ks"] = check_ks(*s["ks"], repeats=args.ks_repeats)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
