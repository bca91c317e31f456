"""Caltech-UCSD Birds-200-2011 (CUB200): 11,788 images of 200 bird species; the paper uses ``split=train``.

Official layout (``dataset.root`` is the ``CUB_200_2011`` folder or its parent)::

    CUB_200_2011/images.txt               <image_id> <class folder>/<file>.jpg
    CUB_200_2011/image_class_labels.txt   <image_id> <class_id, 1-based>
    CUB_200_2011/train_test_split.txt     <image_id> <1 = train, 0 = test>
    CUB_200_2011/classes.txt              <class_id> <class folder name>
    CUB_200_2011/images/<class folder>/<file>.jpg

Splits: ``train`` (5,994 images), ``test`` (5,794), ``all`` (11,788), in image_id order; labels 0-based.
Source: https://www.vision.caltech.edu/datasets/cub_200_2011/
"""

from __future__ import annotations

from pathlib import Path

from featstudy.datasets.base import ImageDataset, fetch_archive, missing_root, read_pairs, safe_extract
from featstudy.errors import DataError


class CUB200(ImageDataset):
    name = "cub200"
    splits = ("train", "test", "all")
    url = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
    files = {"archive": ("CUB_200_2011.tgz", "97eceeb196236b17998738112f37df78")}  # md5
    meta_files = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")

    def __init__(self, root, split: str = "train", download: bool = False, transform=None, *, name: str | None = None,
                 max_pixels: int | None = None, per_class: int | None = None):
        super().__init__(root, split, download, transform, name=name, max_pixels=max_pixels, per_class=per_class)
        base = self._base()
        if base is None and self.download:
            name, md5 = self.files["archive"]
            safe_extract(fetch_archive(self.url, self.root, name, md5), self.root)
            base = self._base()
        if base is None:
            raise missing_root(self.name, self.root, "CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt, classes.txt")
        self.root = base
        classes = read_pairs(base / "classes.txt")
        self.classes = [name for _, name in sorted(classes, key=lambda p: int(p[0]))]
        images = dict(read_pairs(base / "images.txt"))
        labels = {i: int(c) - 1 for i, c in read_pairs(base / "image_class_labels.txt")}
        is_train = {i: v.strip() == "1" for i, v in read_pairs(base / "train_test_split.txt")}
        for image_id in sorted(images, key=int):
            if image_id not in labels or image_id not in is_train:
                raise DataError(f"dataset.root: {base}: image id {image_id} lacks a label or split line")
            if self.split == "all" or is_train[image_id] == (self.split == "train"):
                self.samples.append((f"images/{images[image_id]}", labels[image_id]))

    def _base(self) -> Path | None:
        for cand in (self.root, self.root / "CUB_200_2011"):
            if all((cand / f).is_file() for f in self.meta_files) and (cand / "images").is_dir():
                return cand
        return None
