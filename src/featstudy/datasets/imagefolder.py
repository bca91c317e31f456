"""Any folder of class subfolders: ``root/<class>/<image>``; classes in sorted order, files in sorted order."""

from __future__ import annotations

from torchvision.datasets.folder import IMG_EXTENSIONS

from featstudy.datasets.base import ImageDataset, missing_root
from featstudy.errors import DataError


class ImageFolder(ImageDataset):
    """``root/<class>/**/<image>`` with extensions in torchvision's ``IMG_EXTENSIONS``; ``split='all'``."""

    name = "imagefolder"
    splits = ("all",)

    def __init__(self, root, split: str = "all", download: bool = False, transform=None, *, name: str | None = None,
                 max_pixels: int | None = None, per_class: int | None = None):
        super().__init__(root, split, download, transform, name=name, max_pixels=max_pixels, per_class=per_class)
        if self.root is None or not self.root.is_dir():
            raise missing_root(self.name, self.root, "one subfolder per class", downloadable=False)
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for label, cls in enumerate(self.classes):
            files = sorted(p for p in (self.root / cls).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            self.samples += [(p.relative_to(self.root).as_posix(), label) for p in files]
        if not self.samples:
            raise DataError(f"dataset.root: {self.root}: no images in class subfolders (extensions {list(IMG_EXTENSIONS)})")
