"""Fixtures for extraction tests: a seeded random VGG19 saved to a file, tiny configs, awkward image folders.

Helpers are handed out as fixtures (``make_cfg``, ``awkward_folder``) because the suite runs in pytest's importlib
mode, where test modules cannot import each other.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image


@pytest.fixture(scope="session")
def vgg_file(tmp_path_factory):
    """Seeded random VGG19 weights saved as a state_dict file (what a user's local .pth looks like)."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        net = torchvision.models.vgg19(weights=None)
    path = tmp_path_factory.mktemp("weights") / "vgg19-random-1234.pth"
    torch.save(net.state_dict(), path)
    return path


def _make_cfg(cache_dir, *, weights="random", dataset=None, crops=None, **over):
    """A composed-like root config with tiny crops, CPU, no workers."""
    cfg = {
        "model": {"_target_": "featstudy.models.TorchvisionModel", "name": "vgg19", "weights": str(weights), "preprocessing": "torchvision", "seed": 0, "nodes": None},
        "dataset": dataset or {"_target_": "featstudy.datasets.Digits", "name": "digits", "root": None, "split": "all", "download": False},
        "crops": crops or {"_target_": "featstudy.transforms.CropSpec", "name": "ten", "resize": 40, "size": 32},
        "pooling": {"_target_": "featstudy.pooling.Pooling", "name": "avg"},
        "loader": {"batch_size": 4, "num_workers": 0},
        "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true"},
        "paths": {"cache_dir": str(cache_dir)},
    }
    for group, target in (("crops", "featstudy.transforms.CropSpec"), ("pooling", "featstudy.pooling.Pooling"),
                          ("model", "featstudy.models.TorchvisionModel")):
        cfg[group] = {"_target_": target, **cfg[group]}  # what conf/<group>/*.yaml carries
    c = OmegaConf.create(cfg)
    for k, v in over.items():
        OmegaConf.update(c, k, v, merge=False)
    return c


def _save(img: Image.Image, path, fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)


def _awkward_folder(root, n_per_class: int = 2, truncated: bool = True, seed: int = 0):
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


@pytest.fixture
def make_cfg():
    """``make_cfg(cache_dir, weights=..., dataset=..., crops=..., **{"dotted.key": value})`` -> DictConfig."""
    return _make_cfg


@pytest.fixture
def awkward_folder():
    """``awkward_folder(root, n_per_class=2, truncated=True)`` -> root, filled with images of every PIL mode."""
    return _awkward_folder


@pytest.fixture
def awkward(tmp_path):
    return _awkward_folder(tmp_path / "awkward")


@pytest.fixture
def light_resnet_cfg(make_cfg):
    """``build(cache, data, **over)``: resnet18 (random, seeded) on one 32 px centre crop of an image folder, the
    extraction machinery (DDP, shards) at little cost."""

    def build(cache, data, **over):
        cfg = make_cfg(cache, dataset={"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(data), "split": "all", "download": False},
                       crops={"_target_": "featstudy.transforms.CropSpec", "name": "center", "resize": 36, "size": 32}, **over)
        cfg.model = {"_target_": "featstudy.models.TorchvisionModel", "name": "resnet18", "weights": "random", "preprocessing": "torchvision", "seed": 5,
                     "nodes": ["layer1", "flatten"]}
        return cfg

    return build
