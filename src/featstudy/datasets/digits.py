"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 grey images of 10 classes, the offline demo data.

Pixel values 0-16 are scaled to 0-255 (``round(v * 255 / 16)``), made an ``L`` image, then RGB. No files: the
relative path of image i is ``digits/<i:04d>.png`` (a name only). ``per_class=k`` keeps the first k images of each
class in index order (the demo's subset; their names keep the original index).
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from featstudy.datasets.base import ImageDataset


class Digits(ImageDataset):
    """sklearn.datasets.load_digits as an image dataset; ``root`` is ignored, ``split='all'``."""

    name = "digits"
    splits = ("all",)
    needs_root = False

    def __init__(self, root=None, split: str = "all", download: bool = False, transform=None,
                 per_class: int | None = None, *, name: str | None = None, max_pixels: int | None = None):
        super().__init__(None, split, download, transform, name=name, max_pixels=max_pixels)
        from sklearn.datasets import load_digits

        from featstudy.errors import ConfigError

        if per_class is not None and (not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 1):
            raise ConfigError(f"dataset.per_class: {per_class!r} must be a positive integer or null (all images)")
        self.per_class = per_class
        data = load_digits()
        keep = np.arange(len(data.target))
        if per_class is not None:
            keep = np.concatenate([np.flatnonzero(data.target == c)[:per_class] for c in np.unique(data.target)])
            keep.sort()
        self._pixels = np.rint(data.images[keep] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        self.classes = [str(int(c)) for c in data.target_names]
        self.samples = [(f"digits/{i:04d}.png", int(data.target[i])) for i in keep]

    def image_and_mode(self, index: int):
        return Image.fromarray(self._pixels[index], mode="L").convert("RGB"), "L"

    def _keep_first_per_class(self) -> None:
        """Nothing: ``__init__`` already kept the first ``per_class`` of each class, with their pixels."""

    def describe(self) -> dict:
        return {**super().describe(), "per_class": self.per_class}

    def fingerprint(self, memo_dir=None) -> str:
        """sha256 of the pixels and labels themselves (content already; no files, so no memo)."""
        h = hashlib.sha256(self._pixels.tobytes())
        h.update(np.asarray(self.targets, dtype=np.int64).tobytes())
        return h.hexdigest()
