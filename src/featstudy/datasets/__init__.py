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

__all__ = ["DATASETS", "ImageDataset", "from_config", "rebuild", "safe_extract",
           *[c.__name__ for c in DATASETS.values()]]


def from_config(cfg_dataset, transform=None) -> ImageDataset:
    """Build ``cfg.dataset`` (its ``_target_`` is the dataset class) with :func:`featstudy.groups.build`; the class
    checks its split, root and settings before touching the disk."""
    from featstudy.groups import build

    return build(cfg_dataset, "dataset", transform=transform)


def rebuild(description: dict) -> ImageDataset:
    """The dataset an embedding was extracted from, from its ``meta.json`` description (:meth:`describe`): the
    class named there, given the settings of its constructor that the description holds (root, split, and e.g.
    ``per_class``, ``n_classes``, ``class_seed``), never downloading."""
    import inspect

    name = str(description.get("name"))
    if name not in DATASETS:
        raise ConfigError(f"dataset.name: {name!r} is not one of {sorted(DATASETS)}")
    cls = DATASETS[name]
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in description.items() if k in params and k not in ("self", "transform", "download")}
    return cls(**{**kwargs, "download": False})
