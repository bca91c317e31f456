"""MIT Indoor Scene Recognition (MIT67): 67 indoor categories; the paper uses ``split=train`` (5,360 images).

Official layout (``dataset.root``)::

    Images/<class>/<file>.jpg      (from indoorCVPR_09.tar)
    TrainImages.txt                <class>/<file>.jpg a line: 80 per class, 5,360
    TestImages.txt                 20 per class, 1,340

Classes are the sorted folder names of ``Images/``; images follow the order of the split file. ``split=all`` is
both files. The official archives carry no published checksum, so ``dataset.download`` is refused: download
http://groups.csail.mit.edu/vision/LabelMe/NewImages/indoorCVPR_09.tar and
https://web.mit.edu/torralba/www/{TrainImages,TestImages}.txt and place them as above.
"""

from __future__ import annotations

from featstudy.datasets.base import ImageDataset, missing_root
from featstudy.errors import ConfigError, DataError


class MIT67(ImageDataset):
    name = "mit67"
    splits = ("train", "test", "all")
    split_files = {"train": ("TrainImages.txt",), "test": ("TestImages.txt",), "all": ("TrainImages.txt", "TestImages.txt")}

    def __init__(self, root, split: str = "train", download: bool = False, transform=None, *, name: str | None = None,
                 max_pixels: int | None = None, per_class: int | None = None):
        super().__init__(root, split, download, transform, name=name, max_pixels=max_pixels, per_class=per_class)
        images = self.root / "Images"
        needed = self.split_files[self.split]
        if not images.is_dir() or not all((self.root / f).is_file() for f in needed):
            if self.download:
                raise ConfigError("dataset.download: mit67 has no published checksums; download indoorCVPR_09.tar, "
                                  f"TrainImages.txt and TestImages.txt by hand into {self.root} (see the README)")
            raise missing_root(self.name, self.root, "Images/<class>/, TrainImages.txt, TestImages.txt", downloadable=False)
        self.classes = sorted(p.name for p in images.iterdir() if p.is_dir())
        idx = self.class_to_idx
        for f in needed:
            for line in (self.root / f).read_text(encoding="utf-8").splitlines():
                rel = line.strip()
                if not rel:
                    continue
                cls = rel.split("/", 1)[0]
                if cls not in idx:
                    raise DataError(f"dataset.root: {self.root / f}: class {cls!r} of {rel!r} has no folder in {images}")
                self.samples.append((f"Images/{rel}", idx[cls]))
