"""Shared test fixtures: the real Hydra config composed and shrunk, and a tiny image folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = Path(os.environ.get("FEATSTUDY_CONF", REPO / "conf")).absolute()


def make_image_folder(root: Path, n_classes: int = 3, per_class: int = 8, size: int = 40, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: small RGB images whose colour statistics differ by class (a real signal)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 90, size=(size, size, 3)).astype(np.uint8)
            img[..., c % 3] = np.clip(img[..., c % 3].astype(int) + 120 + 10 * c, 0, 255).astype(np.uint8)
            if c == 1:
                img[size // 4: size // 2, :, :] = 250  # a bright band: an edge pattern only class 1 has
            Image.fromarray(img).save(folder / f"{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def compose(overrides: list[str] | None = None, *, hydra_config: bool = False):
    """The real ``conf/config.yaml`` composed with ``overrides`` (no CLI)."""
    import featstudy.config  # noqa: F401 - the abspath resolver
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return _compose("config", overrides=list(overrides or []), return_hydra_config=hydra_config)


def tiny_overrides(root: Path, images: Path) -> list[str]:
    """The demo experiment on a tiny image folder, every location under ``root``."""
    return [
        "experiment=demo",
        "dataset=imagefolder",
        f"dataset.root={images}",
        "dataset.per_class=null",  # every image of the folder, not the demo's first 30 of each class
        f"paths.root_dir={root}",
        f"tracking.uri=sqlite:///{root}/mlruns/mlflow.db",
        "crops.resize=36",
        "crops.size=32",
        "loader.num_workers=0",
        "loader.batch_size=8",
        "trainer.accelerator=cpu",
        "analysis.callbacks.figures.formats=[png]",
        "analysis.callbacks.figures.top_k=3",
        "analysis.callbacks.figures.n_images=3",
        "analysis.callbacks.figures.dpi=60",
        "analysis.callbacks.atlas.top_k=3",  # the atlas page with a few crops, not 64 features x 4 per class
        "analysis.callbacks.atlas.crops_per_feature=1",
    ]


def run_cli(argv: list[str], monkeypatch) -> int:
    """``python -m featstudy <argv>`` in this process; returns the exit status."""
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from featstudy.__main__ import main

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["featstudy", *argv])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        GlobalHydra.instance().clear()
    return 0


def vgg19_conv_relus(net) -> dict[str, str]:
    """``conv<block>_<i>`` -> the graph node of the ReLU after that conv, found by walking torchvision's
    ``vgg19().features`` (paper Table 1: a block ends at each max-pool); independent of featstudy's own table."""
    import torch

    out, block, i = {}, 1, 0
    for index, module in enumerate(net.features):
        if isinstance(module, torch.nn.MaxPool2d):
            block, i = block + 1, 0
        elif isinstance(module, torch.nn.ReLU):
            i += 1
            out[f"conv{block}_{i}"] = f"features.{index}"
    return out


class Helpers:
    """The helpers above, handed to tests as the ``helpers`` fixture (test modules do not import conftest)."""

    compose = staticmethod(compose)
    tiny_overrides = staticmethod(tiny_overrides)
    run_cli = staticmethod(run_cli)
    make_image_folder = staticmethod(make_image_folder)
    vgg19_conv_relus = staticmethod(vgg19_conv_relus)
    conf_dir = CONF_DIR


@pytest.fixture(scope="session")
def helpers() -> type[Helpers]:
    return Helpers
