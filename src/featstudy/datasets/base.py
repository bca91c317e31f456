"""What every featstudy dataset shares (torchvision conventions).

Each dataset exposes ``classes`` (index = label), ``class_to_idx``, ``samples`` (relative path, label), ``targets``,
``root`` and ``split``; ``__getitem__`` returns ``(transform(image), label)`` and :meth:`ImageDataset.image` the
decoded RGB PIL image (raising on an unreadable or truncated file: extraction catches it and lists it in
``skipped.txt``). Paths in ``samples`` are relative to ``root`` and are the stable ids written to ``paths.txt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
import zipfile
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
    """Extract a tar or zip archive, refusing any member that would land outside ``dest``.

    tar: ``tarfile``'s ``data`` filter (``..``, links leading outside ``dest``, device files and setuid bits are
    refused), plus absolute names refused rather than stripped. zip has no such filter, so :func:`check_zip_members` does the same checks on every
    member before anything is written. A refused archive raises :class:`DataError` naming it and the member.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            check_zip_members(zf, dest, archive)
            zf.extractall(dest)
        return
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter=_tar_filter)
    except tarfile.FilterError as exc:
        raise DataError(f"{archive}: refusing to extract unsafe member ({exc})") from exc


def _tar_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
    """tarfile's ``data`` filter, which would strip a leading ``/``; an absolute name is refused instead."""
    if member.name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member.name):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, path)


def _inside(root: Path, target: Path) -> bool:
    return os.path.commonpath([root, target]) == str(root)


def check_zip_members(zf: zipfile.ZipFile, dest: Path, archive) -> None:
    """The ``data`` filter's rules for zip: no absolute or drive names, no ``..`` leading out of ``dest``, no
    symlink entry (``external_attr`` S_IFLNK) pointing outside ``dest``; raise :class:`DataError` on the first."""
    root = Path(os.path.realpath(dest))
    for info in zf.infolist():
        name = info.filename
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\x00" in name:
            raise DataError(f"{archive}: refusing to extract unsafe member {name!r} (absolute path)")
        target = Path(os.path.normpath(root / name.replace("\\", "/")))
        if not _inside(root, target):
            raise DataError(f"{archive}: refusing to extract unsafe member {name!r} (outside {dest})")
        if stat.S_ISLNK(info.external_attr >> 16):
            link = zf.read(info).decode("utf-8", "replace")
            dest_of_link = Path(os.path.normpath(target.parent / link))
            if os.path.isabs(link) or not _inside(root, dest_of_link):
                raise DataError(f"{archive}: refusing to extract unsafe member {name!r} (a link to {link!r}, outside {dest})")


def check_file_hash(path: Path, *, md5: str | None = None, sha256: str | None = None,
                    key: str = "dataset.download") -> None:
    """Raise :class:`DataError` naming ``key``, ``path`` and both digests unless its md5 / sha256 (hashed in chunks)
    match."""
    for algo, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        h = hashlib.new(algo)
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        if h.hexdigest() != expected.lower():
            raise DataError(f"{key}: {path}: {algo} {h.hexdigest()} is not the expected {expected}; the file "
                            "is not used: delete it (a partial or different download) and retry")


def fetch_archive(url: str, folder: Path, filename: str, md5: str) -> Path:
    """``folder/filename``, downloaded from ``url`` unless present; its md5 is checked before it is used.

    A file already there with another md5 is an error (never extracted, never silently replaced)."""
    path = folder / filename
    if path.is_file():
        check_file_hash(path, md5=md5)
        return path
    from torchvision.datasets.utils import download_url

    try:
        download_url(url, str(folder), filename=filename, md5=md5)
    except Exception as exc:  # noqa: BLE001 - network errors of every kind
        raise DataError(f"dataset.download: fetching {url} failed ({exc}); download it elsewhere and place it at {path}") from exc
    check_file_hash(path, md5=md5)
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
