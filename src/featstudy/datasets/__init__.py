"""Datasets, one class each (torchvision style), built from ``cfg.dataset`` by :func:`from_config`.

=============  ==============================================  =================  =================
``dataset=``   class                                           splits             paper (Table 2)
=============  ==============================================  =================  =================
cub200         :class:`~featstudy.datasets.cub200.CUB200`        train, test, all   train: 5,994
flowers102     :class:`~featstudy.datasets.flowers102.Flowers102`  train, val, test   test: 6,149
mit67          :class:`~featstudy.datasets.mit67.MIT67`          train, test, all   train: 5,360
imagenet_val   :class:`~featstudy.datasets.imagenet_val.ImageNetVal`  val      500 classes x 50
imagefolder    :class:`~featstudy.datasets.imagefolder.ImageFolder`  all           -
digits         :class:`~featstudy.datasets.digits.Digits`        all                - (demo)
=============  ==============================================  =================  =================
"""

from __future__ import annotations

from featstudy.datasets.base import ImageDataset, safe_extract
from featstudy.datasets.cub200 import CUB200
from featstudy.datasets.digits import Digits
from featstudy.datasets.flowers102 import Flowers102
from featstudy.datasets.imagefolder import ImageFolder
from featstudy.datasets.imagenet_val import ImageNetVal
from featstudy.datasets.mit67 import MIT67
from featstudy.errors import ConfigError

DATASETS: dict[str, type[ImageDataset]] = {
    "cub200": CUB200,
    "flowers102": Flowers102,
    "mit67": MIT67,
    "imagenet_val": ImageNetVal,
    "imagefolder": ImageFolder,
    "digits": Digits,
}

__all__ = ["DATASETS", "ImageDataset", "from_config", "safe_extract", *[c.__name__ for c in DATASETS.values()]]


def from_config(cfg_dataset, transform=None) -> ImageDataset:
    """Build the dataset named by ``cfg.dataset.name`` with its root, split and download flag."""
    name = str(cfg_dataset.get("name"))
    if name not in DATASETS:
        raise ConfigError(f"dataset.name: {name!r} is not one of {sorted(DATASETS)}")
    cls = DATASETS[name]
    split = cfg_dataset.get("split")
    from featstudy.datasets.base import verify_split

    verify_split(name, split, cls.splits)  # before touching the disk
    root = cfg_dataset.get("root")
    if root is None and name != "digits":
        raise ConfigError(f"dataset.root: not set for {name}; set dataset.root=/path/to/data")
    kwargs = {}
    if name == "imagenet_val":
        kwargs = {"n_classes": int(cfg_dataset.get("n_classes", 500)), "class_seed": int(cfg_dataset.get("class_seed", 0))}
    if name == "digits" and cfg_dataset.get("per_class") is not None:
        kwargs = {"per_class": cfg_dataset.get("per_class")}
    max_pixels = cfg_dataset.get("max_pixels")
    if max_pixels is not None and (not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1):
        raise ConfigError(f"dataset.max_pixels: {max_pixels!r} must be a positive integer, or null for PIL's limit "
                          "(Image.MAX_IMAGE_PIXELS)")
    ds = cls(root, split=split, download=bool(cfg_dataset.get("download", False)), transform=transform, **kwargs)
    ds.max_pixels = max_pixels
    return ds
