"""What every featstudy dataset shares (torchvision conventions).

Each dataset exposes ``classes`` (index = label), ``class_to_idx``, ``samples`` (relative path, label), ``targets``,
``root`` and ``split``; ``__getitem__`` returns ``(transform(image), label)`` and :meth:`ImageDataset.image` the
decoded RGB PIL image (raising on an unreadable or truncated file: extraction catches it and lists it in
``skipped.txt``). Paths in ``samples`` are relative to ``root`` and are the stable ids written to ``paths.txt``.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

from torch.utils.data import Dataset

from featstudy.errors import ConfigError, DataError
from featstudy.transforms import load_rgb_and_mode


class ImageDataset(Dataset):
    """Base class: subclasses set ``name``, ``splits`` and fill ``classes`` and ``samples`` in ``__init__``."""

    name: str = ""
    splits: tuple[str, ...] = ()

    def __init__(self, root, split: str, download: bool = False, transform=None):
        self.root = Path(root).expanduser().resolve() if root is not None else None
        self.split = verify_split(self.name, split, self.splits)
        self.download = bool(download)
        self.transform = transform
        #: images with more pixels are skipped as decompression bombs (None: PIL's Image.MAX_IMAGE_PIXELS)
        self.max_pixels: int | None = None
        self.classes: list[str] = []
        self.samples: list[tuple[str, int]] = []

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int):
        """The RGB PIL image of sample ``index`` (raises on unreadable or truncated files)."""
        return self.image_and_mode(index)[0]

    def image_and_mode(self, index: int):
        """(RGB PIL image, the file's original mode) of sample ``index``."""
        return load_rgb_and_mode(self.root / self.samples[index][0], self.max_pixels)

    def __getitem__(self, index: int):
        img = self.image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1]

    def fingerprint(self) -> str:
        """sha256 of what defines the data: classes, relative paths, labels and file sizes (not the root's spelling)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.split, self.classes]).encode())
        for rel, label in self.samples:
            size = (self.root / rel).stat().st_size if self.root is not None else -1
            h.update(f"{rel}\t{label}\t{size}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, "root": str(self.root) if self.root else None,
                "n_images": len(self), "n_classes": len(self.classes)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root}, split={self.split}, n={len(self)})"


def verify_split(name: str, split, valid: tuple[str, ...]) -> str:
    if split not in valid:
        raise ConfigError(f"dataset.split: {split!r} is not a split of {name}; valid: {list(valid)}")
    return str(split)


def missing_root(name: str, path: Path, expected: str, downloadable: bool = True) -> DataError:
    fix = "set dataset.root to it, or dataset.download=true to fetch the official archives" if downloadable else \
        "set dataset.root to it (this dataset cannot be downloaded automatically)"
    return DataError(f"dataset.root: {path}: no {name} data there (expected {expected}); {fix}")


def safe_extract(archive: str | Path, dest: str | Path) -> None:
    """Extract a tar archive refusing any member outside ``dest``, links out of it and special files
    (``tarfile``'s ``data`` filter)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    except tarfile.FilterError as exc:
        raise DataError(f"{archive}: refusing to extract unsafe member ({exc})") from exc


def fetch_archive(url: str, folder: Path, filename: str, md5: str) -> Path:
    """Download ``url`` into ``folder/filename`` unless a file with that md5 is there; verify the md5 after."""
    from torchvision.datasets.utils import check_integrity, download_url

    path = folder / filename
    if not check_integrity(str(path), md5):
        try:
            download_url(url, str(folder), filename=filename, md5=md5)
        except Exception as exc:  # noqa: BLE001 - network errors of every kind
            raise DataError(f"dataset.download: fetching {url} failed ({exc}); download it elsewhere and place it at {path}") from exc
        if not check_integrity(str(path), md5):
            raise DataError(f"dataset.download: {path}: md5 mismatch (expected {md5}); delete it and retry")
    return path


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Lines ``<id> <value>`` of the CUB metadata files."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            a, b = line.split(maxsplit=1)
            out.append((a, b))
    return out
