"""Helpers shared by the extraction tests: tiny configs and awkward image folders (imported, not a conftest)."""

from __future__ import annotations

import io

import numpy as np
from omegaconf import OmegaConf
from PIL import Image


def make_cfg(cache_dir, *, weights="random", dataset=None, crops=None, **over):
    """A composed-like root config with tiny crops, CPU, no workers."""
    cfg = {
        "model": {"name": "vgg19", "weights": str(weights), "preprocessing": "torchvision", "seed": 0, "nodes": None},
        "dataset": dataset or {"name": "digits", "root": None, "split": "all", "download": False},
        "crops": crops or {"name": "ten", "resize": 40, "size": 32},
        "pooling": {"name": "avg"},
        "loader": {"batch_size": 4, "num_workers": 0},
        "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true"},
        "paths": {"cache_dir": str(cache_dir)},
    }
    c = OmegaConf.create(cfg)
    for k, v in over.items():
        OmegaConf.update(c, k, v, merge=False)
    return c


def _save(img: Image.Image, path, fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)


def awkward_folder(root, n_per_class: int = 2, truncated: bool = True, seed: int = 0):
    """root/<class>/...: RGB, L, CMYK, P, RGBA, I;16, tiny images, and (optionally) one truncated JPEG."""
    rng = np.random.default_rng(seed)

    def rgb(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")

    for c in ("cat", "dog"):
        for i in range(n_per_class):
            _save(rgb(50 + 3 * i, 61), root / c / f"rgb{i}.png")
    _save(rgb(45, 52).convert("L"), root / "cat" / "grey.png")
    _save(rgb(48, 44).convert("CMYK"), root / "cat" / "cmyk.jpg", "JPEG")
    _save(rgb(47, 60).convert("P"), root / "dog" / "palette.png")
    rgba = rgb(52, 41).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (52, 41), dtype=np.uint8), "L"))
    _save(rgba, root / "dog" / "rgba.png")
    _save(Image.fromarray(rng.integers(0, 65535, (43, 49), dtype=np.uint16)), root / "dog" / "deep16.png")
    _save(rgb(3, 2), root / "cat" / "tiny.png")
    if truncated:
        buf = io.BytesIO()
        rgb(64, 64).save(buf, format="JPEG", quality=90)
        (root / "dog" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root
