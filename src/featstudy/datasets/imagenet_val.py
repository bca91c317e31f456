"""ILSVRC2012 validation images, a seeded subset of classes (the paper's ImageNet run: 500 classes x 50 images).

Layout: torchvision's ImageNet layout of the validation split, ``dataset.root/val/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG``
(1,000 wnid folders of 50 images). ImageNet cannot be downloaded automatically: place the official archives
``ILSVRC2012_img_val.tar`` and ``ILSVRC2012_devkit_t12.tar.gz`` in ``dataset.root`` and run once with
``dataset.download=true``: their md5s are checked (torchvision's table), the devkit's ``meta.mat`` and validation
ground truth are parsed, and the images are extracted safely into ``val/<wnid>/`` (plus ``classes.json``: wnid ->
words, JSON rather than a pickle).

The subset: the wnids found under ``val/`` are sorted, and ``numpy.random.default_rng(dataset.class_seed)
.choice(len(wnids), dataset.n_classes, replace=False)`` picks ``n_classes`` of them (default 500, seed 0); they are
kept in sorted wnid order, and every image of each chosen class is used (50 each on the real data: 25,000 images).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from featstudy.datasets.base import ImageDataset, check_file_hash, missing_root, safe_extract
from featstudy.errors import ConfigError, DataError

EXTENSIONS = (".jpeg", ".jpg", ".png")


class ImageNetVal(ImageDataset):
    name = "imagenet_val"
    splits = ("val",)
    archives = {"val": ("ILSVRC2012_img_val.tar", "29b22e2961454d5413ddabcf34fc5622"),
                "devkit": ("ILSVRC2012_devkit_t12.tar.gz", "fa75699e90414af021442c21a62c3abf")}  # md5, as torchvision

    def __init__(self, root, split: str = "val", download: bool = False, transform=None,
                 n_classes: int = 500, class_seed: int = 0, *, name: str | None = None,
                 max_pixels: int | None = None, per_class: int | None = None):
        super().__init__(root, split, download, transform, name=name, max_pixels=max_pixels, per_class=per_class)
        for key, value, low in (("n_classes", n_classes, 1), ("class_seed", class_seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"dataset.{key}: {value!r} must be an integer >= {low}")
        self.n_classes = int(n_classes)
        self.class_seed = int(class_seed)
        val = self.root / "val"
        if not val.is_dir() and self.download:
            prepare(self.root)
        if not val.is_dir():
            raise missing_root(self.name, self.root, "val/<wnid>/*.JPEG; or the official ILSVRC2012_img_val.tar and "
                               "ILSVRC2012_devkit_t12.tar.gz there, prepared once with dataset.download=true", downloadable=False)
        wnids = sorted(p.name for p in val.iterdir() if p.is_dir())
        if self.n_classes < 1 or self.n_classes > len(wnids):
            raise ConfigError(f"dataset.n_classes: {self.n_classes} not in 1..{len(wnids)} (class folders found in {val})")
        self.classes = choose_classes(wnids, self.n_classes, self.class_seed)
        for label, wnid in enumerate(self.classes):
            files = sorted(p for p in (val / wnid).iterdir() if p.suffix.lower() in EXTENSIONS)
            self.samples += [(f"val/{wnid}/{p.name}", label) for p in files]

    def key_fields(self, memo_dir=None) -> dict:
        """The base fields and the class subset's ``n_classes`` and ``class_seed``."""
        return {**super().key_fields(memo_dir), "n_classes": self.n_classes, "class_seed": self.class_seed}

    def describe(self) -> dict:
        return {**super().describe(), "n_classes": self.n_classes, "class_seed": self.class_seed}


def choose_classes(wnids: list[str], n_classes: int, seed: int) -> list[str]:
    """The documented, seeded choice: ``default_rng(seed).choice(len(sorted wnids), n, replace=False)``, sorted."""
    wnids = sorted(wnids)
    picked = np.random.default_rng(seed).choice(len(wnids), size=n_classes, replace=False)
    return [wnids[i] for i in sorted(picked.tolist())]


def parse_devkit(devkit_dir: Path) -> tuple[dict[int, tuple[str, str]], list[int]]:
    """(ILSVRC2012_ID -> (wnid, words)) for the 1,000 leaf classes, and the validation ground truth ids in file order."""
    from scipy.io import loadmat

    data = devkit_dir / "data"
    synsets = loadmat(str(data / "meta.mat"), squeeze_me=True)["synsets"]
    classes = {}
    for s in synsets:
        idx, wnid, words, children = int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"]), int(s["num_children"])
        if children == 0:
            classes[idx] = (wnid, words)
    truth = [int(x) for x in (data / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    return classes, truth


def prepare(root: Path) -> None:
    """Check the user's official archives (md5) and build ``root/val/<wnid>/`` and ``root/classes.json``."""
    paths = {}
    for key, (name, md5) in ImageNetVal.archives.items():
        p = root / name
        if not p.is_file():
            raise DataError(f"dataset.root: {p}: missing; ImageNet cannot be downloaded automatically, place the official archive there")
        check_file_hash(p, md5=md5, key="dataset.root")  # names the file, its md5 and the official one
        paths[key] = p
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp = Path(tmp)
        safe_extract(paths["devkit"], tmp / "devkit")
        kit = next((tmp / "devkit").glob("ILSVRC2012_devkit_t12*"))
        classes, truth = parse_devkit(kit)
        safe_extract(paths["val"], tmp / "val")
        files = sorted(p for p in (tmp / "val").rglob("*") if p.is_file())
        if len(files) != len(truth):
            raise DataError(f"dataset.root: {paths['val']}: {len(files)} images but {len(truth)} ground-truth labels")
        staging = tmp / "val_sorted"
        for f, cls in zip(files, truth):
            wnid = classes[cls][0]
            (staging / wnid).mkdir(parents=True, exist_ok=True)
            shutil.move(str(f), staging / wnid / f.name)
        (root / "classes.json").write_text(json.dumps({w: words for w, words in classes.values()}, indent=1) + "\n")
        staging.rename(root / "val")
