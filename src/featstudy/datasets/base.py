"""What every featstudy dataset shares (torchvision conventions).

Each dataset exposes ``classes`` (index = label), ``class_to_idx``, ``samples`` (relative path, label), ``targets``,
``root`` and ``split``; ``__getitem__`` returns ``(transform(image), label)`` and :meth:`ImageDataset.image` the
decoded RGB PIL image (raising on an unreadable or truncated file: extraction catches it and lists it in
``skipped.txt``). Paths in ``samples`` are relative to ``root`` and are the stable ids written to ``paths.txt``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path

from torch.utils.data import Dataset

from featstudy.errors import ConfigError, DataError
from featstudy.transforms import load_rgb_and_mode


class _SubsetAfterInit(type):
    """Metaclass of :class:`ImageDataset`: once a dataset's own ``__init__`` has listed its samples, keeps the first
    ``per_class`` of each class (:meth:`ImageDataset._keep_first_per_class`), so no subclass can forget to."""

    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        obj._keep_first_per_class()
        return obj


class ImageDataset(Dataset, metaclass=_SubsetAfterInit):
    """Base class: subclasses set ``name``, ``splits`` and fill ``classes`` and ``samples`` in ``__init__``.

    Built from ``conf/dataset/<name>.yaml`` (whose ``_target_`` is the subclass) by :func:`featstudy.groups.build`;
    the constructor checks the fields every dataset shares: ``split`` (one of ``splits``), ``root`` (required unless
    ``needs_root`` is False), ``max_pixels``, ``per_class`` and ``name`` (the config's ``dataset.name``, which must
    be the class's own: ``dataset=cub200 dataset.name=mit67`` is refused rather than half-applied).

    ``per_class=k`` keeps the first k samples of each class in the dataset's own order (a quick look at any
    dataset, and the demo's 30 digits per class); the fingerprint, hence the cache key, covers the subset.
    """

    name: str = ""
    splits: tuple[str, ...] = ()
    #: False for datasets without files (digits): ``root`` may then be null
    needs_root: bool = True

    def __init__(self, root, split: str, download: bool = False, transform=None, *, name: str | None = None,
                 max_pixels: int | None = None, per_class: int | None = None):
        if name is not None and str(name) != self.name:
            raise ConfigError(f"dataset.name: {name!r} but dataset._target_ builds {type(self).__name__} "
                              f"({self.name!r}); choose the dataset with dataset={name}")
        self.split = verify_split(self.name, split, self.splits)  # before touching the disk
        if root is None and self.needs_root:
            raise ConfigError(f"dataset.root: not set for {self.name}; set dataset.root=/path/to/data")
        if max_pixels is not None and (not isinstance(max_pixels, int) or isinstance(max_pixels, bool)
                                       or max_pixels < 1):
            raise ConfigError(f"dataset.max_pixels: {max_pixels!r} must be a positive integer, or null for PIL's "
                              "limit (Image.MAX_IMAGE_PIXELS)")
        if per_class is not None and (not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 1):
            raise ConfigError(f"dataset.per_class: {per_class!r} must be a positive integer or null (all images)")
        self.per_class: int | None = per_class
        self.root = Path(root).expanduser().resolve() if root is not None else None
        self.download = bool(download)
        self.transform = transform
        #: images with more pixels are skipped as decompression bombs (None: PIL's Image.MAX_IMAGE_PIXELS)
        self.max_pixels: int | None = max_pixels
        self.classes: list[str] = []
        self.samples: list[tuple[str, int]] = []

    def _keep_first_per_class(self) -> None:
        """``samples`` cut to the first ``per_class`` of each class, in order (nothing when ``per_class`` is None)."""
        if self.per_class is None:
            return
        seen: dict[int, int] = {}
        kept = []
        for path, label in self.samples:
            if seen.get(label, 0) < self.per_class:
                kept.append((path, label))
                seen[label] = seen.get(label, 0) + 1
        self.samples = kept

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

    def fingerprint(self, memo_dir=None) -> str:
        """sha256 of what defines the data: name, split, classes, and per sample its relative path, label and the
        sha256 of the file's bytes (not the root's spelling: a copy elsewhere has the same fingerprint). See
        :mod:`featstudy.datasets.fingerprint`; ``memo_dir`` holds the stat memo that makes a repeat cheap."""
        from featstudy.datasets.fingerprint import content_fingerprint

        if self.root is None:
            raise ValueError(f"{type(self).__name__} has no root: override fingerprint() to hash its data")
        return content_fingerprint(self.root, [self.name, self.split, self.classes], self.samples, memo_dir)

    def key_fields(self, memo_dir=None) -> dict:
        """What about the data changes the numbers (hashed into the embedding key): name, split, the content
        :meth:`fingerprint`, and ``max_pixels`` when set (it decides which images are skipped; absent when it is
        PIL's default, so older keys are unchanged)."""
        fields = {"name": self.name, "split": self.split, "fingerprint": self.fingerprint(memo_dir=memo_dir)}
        if self.max_pixels is not None:
            fields["max_pixels"] = self.max_pixels
        return fields

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, "root": str(self.root) if self.root else None,
                "n_images": len(self), "n_classes": len(self.classes),
                **({"per_class": self.per_class} if self.per_class is not None else {})}

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
    """Extract a tar or zip archive into ``dest``, accepting only regular files and folders inside it.

    Every member is checked before anything is written: an absolute or drive name, a name leading outside
    ``dest`` (``..``), and any symlink, hardlink, device or fifo member (tar types; zip ``external_attr`` modes)
    raise :class:`DataError` naming the archive and the member. Links are refused outright, even pointing inside:
    the official archives hold none, and link checks can be bypassed (CVE-2025-4517, a symlink chain longer than
    PATH_MAX, defeats tarfile's ``data`` filter on Python < 3.11.13).

    The members are extracted into a hidden temporary folder inside ``dest`` (same filesystem, even when ``dest``
    is a mount point) and each top-level entry is then renamed into ``dest``; an error on the way removes the
    temporary folder, so nothing of a refused or failed archive is left behind. ``dest`` may already hold other
    files (cub200 extracts next to its archive), but an entry already there is never overwritten or merged into:
    that is refused, naming it, before anything is moved.
    """
    dest = Path(dest)
    created = [p for p in (dest, *dest.parents) if not p.exists()]  # deepest first
    is_zip = zipfile.is_zipfile(archive)
    with (zipfile.ZipFile(archive) if is_zip else _open_tar(archive)) as arc:
        if is_zip:
            check_zip_members(arc, dest, archive)
        else:
            try:
                members = arc.getmembers()
            except (tarfile.TarError, EOFError) as exc:
                raise DataError(f"{archive}: a damaged archive ({exc}); delete it and download it again") from exc
            check_tar_members(members, archive)
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".featstudy-extract-", dir=dest))
        try:
            if is_zip:
                arc.extractall(tmp)
            else:
                if TAR_FILTERS:
                    arc.extractall(tmp, filter=_tar_filter)  # the data filter too: modes, and a second opinion
                else:  # Python < 3.10.12 / 3.11.4: the members were checked above, by featstudy alone
                    arc.extractall(tmp)
            entries = sorted(os.listdir(tmp))
            for name in entries:
                if os.path.lexists(dest / name):
                    raise DataError(f"{archive}: '{dest / name}' already exists and extraction never overwrites "
                                    "or merges; move it aside (or delete it) and rerun")
            for name in entries:
                os.rename(tmp / name, dest / name)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in created:  # only folders this call created, and only when left empty
                try:
                    folder.rmdir()
                except OSError:
                    break
            if TAR_FILTERS and isinstance(exc, tarfile.FilterError):
                raise DataError(f"{archive}: refusing to extract unsafe member ({exc})") from exc
            raise
        shutil.rmtree(tmp, ignore_errors=True)


#: tarfile's extraction filters (PEP 706: Python >= 3.10.12, 3.11.4, 3.12); without them :func:`check_tar_members`
#: alone decides (it refuses links, devices, absolute and escaping names before anything is written)
TAR_FILTERS = hasattr(tarfile, "data_filter")


def _open_tar(archive) -> tarfile.TarFile:
    try:
        return tarfile.open(archive)
    except tarfile.TarError as exc:
        raise DataError(f"{archive}: not a readable tar or zip archive ({exc}); delete it and download it again") from exc


def _tar_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
    """tarfile's ``data`` filter, which would strip a leading ``/``; an absolute name is refused instead."""
    if member.name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member.name):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, path)


def _unsafe(archive, name: str, why: str) -> DataError:
    return DataError(f"{archive}: refusing to extract unsafe member {name!r} ({why}; only regular files and folders "
                     "are extracted): the archive is not the official one, delete it and download it again")


def _check_name(archive, name: str, is_dir: bool) -> None:
    """Absolute, drive or NUL names, names whose ``..`` lead outside the target, and a file named like the target
    itself (``.``; a folder so named, as ``tar -C dir .`` writes, is fine) raise :class:`DataError`."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\x00" in name:
        raise _unsafe(archive, name, "an absolute path")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            raise _unsafe(archive, name, "a path leading outside the target")
    if not parts and not is_dir:
        raise _unsafe(archive, name, "a file named like the target folder")


def check_tar_members(members: list[tarfile.TarInfo], archive) -> None:
    """Every tar member must be a regular file or a folder with a safe name; raise :class:`DataError` on the first
    that is not (symlink, hardlink, character or block device, fifo, or anything else)."""
    kinds = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
             tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a fifo"}
    for m in members:
        _check_name(archive, m.name, m.isdir())
        if not (m.isreg() or m.isdir()):
            why = kinds.get(m.type, f"tar member type {m.type!r}")
            if m.issym() or m.islnk():
                why += f" to {m.linkname!r}"
            raise _unsafe(archive, m.name, why)


def check_zip_members(zf: zipfile.ZipFile, dest: Path, archive) -> None:
    """The same rules for zip: safe names, and only regular files and folders, read from the unix mode in the high
    16 bits of ``external_attr`` (S_IFLNK is a symlink; 0, as written on Windows, is a regular file)."""
    kinds = {stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
             stat.S_IFIFO: "a fifo", stat.S_IFSOCK: "a socket"}
    for info in zf.infolist():
        _check_name(archive, info.filename, info.is_dir())
        fmt = stat.S_IFMT(info.external_attr >> 16)
        if fmt not in (0, stat.S_IFREG, stat.S_IFDIR):
            why = kinds.get(fmt, f"zip entry mode {oct(fmt)}")
            if fmt == stat.S_IFLNK:
                why += f" to {zf.read(info)[:200].decode('utf-8', 'replace')!r}"
            raise _unsafe(archive, info.filename, why)


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
