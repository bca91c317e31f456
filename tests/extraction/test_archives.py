"""Downloads and archives: a wrong hash is an error and the file is not used; an archive is extracted only when every
member is a regular file or a folder inside the target.

Every link (symbolic or hard, pointing inside or outside), device and fifo member is refused before anything is
written, for tar and zip: the official archives hold none, and link checks can be bypassed (CVE-2025-4517 on the
venv's Python 3.11.7, reproduced below). Extraction goes to a hidden temporary folder inside the target and is moved
into place only on success, so a refused or failed archive leaves nothing behind.

(Before issue 10, links pointing inside the target were accepted; ``test_links_inside_are_refused_too`` replaces
that expectation.)
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from featstudy.datasets import CUB200, safe_extract
from featstudy.datasets import base as dsbase
from featstudy.errors import DataError


def _tar(path, build):
    with tarfile.open(path, "w") as tar:
        build(tar)
    return path


def _tar_file(tar, name, data=b"bad"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tar_dir(tar, name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o777
    tar.addfile(info)


def _tar_link(tar, name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tar.addfile(info)


def _tar_special(tar, name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
    tar.addfile(info)


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (not following links): relative path -> bytes (None for folders and links)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(folder))] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


@pytest.fixture
def box(tmp_path):
    """``box/dest`` is the target; ``box`` holds a bystander file; anything else appearing in ``box`` escaped."""
    (tmp_path / "box").mkdir()
    (tmp_path / "box" / "bystander.txt").write_text("untouched")
    return tmp_path / "box"


def _assert_nothing_written(box: Path, dest: Path, before: dict | None = None) -> None:
    assert _tree(box) == {"bystander.txt": b"untouched", **({"dest": None} if dest.exists() else {}),
                          **{f"dest/{k}": v for k, v in (before or {}).items()}}


TAR_CASES = {
    "dotdot": lambda t: _tar_file(t, "../outside.txt"),
    "absolute": lambda t: _tar_file(t, "/tmp/featstudy-absolute-outside.txt"),
    "symlink out": lambda t: _tar_link(t, "images/link", "../../outside.txt"),
    "absolute symlink": lambda t: _tar_link(t, "images/link", "/etc/passwd"),
    "hardlink out": lambda t: _tar_link(t, "images/hard", "../outside.txt", tarfile.LNKTYPE),
    "symlink inside": lambda t: _tar_link(t, "images/link", "ok.txt"),
    "hardlink inside": lambda t: _tar_link(t, "images/hard", "images/ok.txt", tarfile.LNKTYPE),
    "fifo": lambda t: _tar_special(t, "images/fifo", tarfile.FIFOTYPE),
    "char device": lambda t: _tar_special(t, "images/null", tarfile.CHRTYPE),
    "block device": lambda t: _tar_special(t, "images/blk", tarfile.BLKTYPE),
}


@pytest.mark.parametrize("case", sorted(TAR_CASES))
def test_tar_unsafe_members_are_refused_and_nothing_is_left(case, box):
    """A regular file comes first, then the unsafe member: the file must not be left behind in ``dest``."""
    archive = _tar(box.parent / "evil.tar", lambda t: (_tar_file(t, "images/ok.txt", b"ok"), TAR_CASES[case](t)))
    with pytest.raises(DataError, match=r"evil.tar: refusing to extract unsafe member '") as err:
        safe_extract(archive, box / "dest")
    assert "\n" not in str(err.value)
    _assert_nothing_written(box, box / "dest")
    assert not Path("/tmp/featstudy-absolute-outside.txt").exists()


def _zip_with_mode(zf, name, mode, data="x"):
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix: the high 16 bits of external_attr are st_mode
    info.external_attr = mode << 16
    zf.writestr(info, data)


ZIP_CASES = {
    "dotdot": lambda z: z.writestr("images/../../outside.txt", "bad"),
    "absolute": lambda z: z.writestr(zipfile.ZipInfo("/tmp/featstudy-absolute-outside.txt"), "bad"),
    "drive": lambda z: z.writestr("C:/outside.txt", "bad"),
    "symlink out": lambda z: _zip_with_mode(z, "images/link", stat.S_IFLNK | 0o777, "../../outside.txt"),
    "absolute symlink": lambda z: _zip_with_mode(z, "images/link", stat.S_IFLNK | 0o777, "/etc/passwd"),
    "symlink inside": lambda z: _zip_with_mode(z, "images/link", stat.S_IFLNK | 0o777, "ok.txt"),
    "fifo": lambda z: _zip_with_mode(z, "images/fifo", stat.S_IFIFO | 0o644, ""),
    "char device": lambda z: _zip_with_mode(z, "images/null", stat.S_IFCHR | 0o644, ""),
}


@pytest.mark.parametrize("case", sorted(ZIP_CASES))
def test_zip_unsafe_members_are_refused_and_nothing_is_left(case, box):
    archive = box.parent / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("images/ok.txt", "ok")
        ZIP_CASES[case](zf)
    with pytest.raises(DataError, match=r"evil.zip: refusing to extract unsafe member '"):
        safe_extract(archive, box / "dest")
    _assert_nothing_written(box, box / "dest")


def _cve_2025_4517_tar(path: Path, dest: Path) -> None:
    """CPython's own reproducer of CVE-2025-4517 (test_tarfile's ``test_realpath_limit_attack``): nested symlinks
    whose expansion exceeds PATH_MAX, so ``os.path.realpath`` stops resolving and the ``data`` filter judges the
    last link lexically, as inside; the OS follows it to ``dest``'s parent. A file is then written through it."""
    steps = "abcdefghijklmnop"
    max_path = os.pathconf(dest.parent, "PC_PATH_MAX")
    component = "d" * ((max_path - (len(str(dest)) + 1)) // (len(steps) + 1))
    with tarfile.open(path, "w") as tar:
        walked = ""
        for step in steps:
            _tar_dir(tar, os.path.join(walked, component))
            _tar_link(tar, os.path.join(walked, step), component)
            walked = os.path.join(walked, component)
        linkpath = os.path.join(*steps, "l" * 254)
        _tar_link(tar, linkpath, os.path.join(*[".."] * len(steps)))
        _tar_link(tar, "escape", os.path.join(linkpath, ".."))
        _tar_file(tar, "escape/escaped.txt", b"written outside the target")


def test_long_symlink_chain_cve_2025_4517_is_refused(box):
    dest = box / "dest"
    archive = box.parent / "chain.tar"
    _cve_2025_4517_tar(archive, dest)
    with pytest.raises(DataError, match=r"chain.tar: refusing to extract unsafe member 'a'"):
        safe_extract(archive, dest)
    assert not (box / "escaped.txt").exists()  # where today's code wrote it
    _assert_nothing_written(box, dest)


def test_a_refused_archive_leaves_an_existing_target_as_it_was(box):
    dest = box / "dest"
    (dest / "images").mkdir(parents=True)
    (dest / "images" / "mine.txt").write_text("mine")
    (dest / "archive.tgz").write_bytes(b"the user's archive")
    before = _tree(dest)
    archive = _tar(box.parent / "evil.tar",
                   lambda t: (_tar_file(t, "new/ok.txt", b"ok"), _tar_link(t, "new/link", "ok.txt")))
    with pytest.raises(DataError, match=r"evil.tar: refusing to extract unsafe member 'new/link'"):
        safe_extract(archive, dest)
    _assert_nothing_written(box, dest, before)


def _clean_members() -> dict[str, bytes]:
    return {"CUB_200_2011/images/001.Black_footed_Albatross/1.jpg": b"\xff\xd8 one",
            "CUB_200_2011/images/002.Laysan_Albatross/2.jpg": b"\xff\xd8 two",
            "CUB_200_2011/images.txt": b"1 001.Black_footed_Albatross/1.jpg\n2 002.Laysan_Albatross/2.jpg\n",
            "attributes.txt": b"1 has_bill_shape::curved\n"}


def _expected_tree(members: dict[str, bytes]) -> dict[str, bytes | None]:
    """The tree a correct extraction gives, derived from the member list: every file, every parent folder."""
    out: dict[str, bytes | None] = {}
    for name, data in members.items():
        parts = name.split("/")
        for i in range(1, len(parts)):
            out["/".join(parts[:i])] = None
        out[name] = data
    return out


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_a_clean_archive_extracts_identically_next_to_what_is_there(kind, box):
    members = _clean_members()
    archive = box.parent / f"clean.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(archive, "w:gz") as tar:
            for name, data in members.items():
                _tar_file(tar, name, data)
    dest = box / "dest"
    dest.mkdir()
    (dest / "CUB_200_2011.tgz").write_bytes(b"the archive itself lives in the target (cub200)")
    safe_extract(archive, dest)
    assert _tree(dest) == {**_expected_tree(members),
                           "CUB_200_2011.tgz": b"the archive itself lives in the target (cub200)"}
    # a new, absent target is created
    safe_extract(archive, box / "fresh" / "dest")
    assert _tree(box / "fresh" / "dest") == _expected_tree(members)
    # extracting again never overwrites: refused naming the entry already there, nothing changed
    before = _tree(dest)
    with pytest.raises(DataError, match=r"clean\.\w+: .*CUB_200_2011' already exists.*move it aside"):
        safe_extract(archive, dest)
    assert _tree(dest) == before


def test_a_tar_of_dot_extracts(box):
    """``tar -C folder .`` writes a ``./`` folder member first and ``./`` before every name: that is the target."""
    def build(t):
        _tar_dir(t, "./")
        _tar_dir(t, "./a")
        _tar_file(t, "./a/1.txt", b"one")

    safe_extract(_tar(box.parent / "dot.tar", build), box / "dest")
    assert _tree(box / "dest") == {"a": None, "a/1.txt": b"one"}
    with pytest.raises(DataError, match=r"dot2.tar: refusing to extract unsafe member '\.'"):
        safe_extract(_tar(box.parent / "dot2.tar", lambda t: _tar_file(t, ".", b"x")), box / "dest2")


def test_archive_with_a_wrong_hash_is_an_error_and_is_not_used(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def build(t):
        _tar_file(t, "CUB_200_2011/images.txt", b"1 a/1.jpg\n")

    _tar(tmp_path / "CUB_200_2011.tgz", build)  # present locally, but not the official archive
    monkeypatch.setattr(tvu, "download_url", lambda *a, **k: pytest.fail("a present file is never re-downloaded"))
    with pytest.raises(DataError) as err:
        CUB200(tmp_path, split="train", download=True)
    actual = hashlib.md5((tmp_path / "CUB_200_2011.tgz").read_bytes()).hexdigest()
    msg = str(err.value)
    assert "CUB_200_2011.tgz: md5 " + actual in msg and CUB200.files["archive"][1] in msg and "not used" in msg
    assert not (tmp_path / "CUB_200_2011").exists()  # never extracted
    # sha256 too
    with pytest.raises(DataError, match=r"sha256 [0-9a-f]{64} is not the expected 00"):
        dsbase.check_file_hash(tmp_path / "CUB_200_2011.tgz", sha256="00" * 32)
    dsbase.check_file_hash(tmp_path / "CUB_200_2011.tgz", md5=actual)


def test_a_download_is_checked_after_it_arrives(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def fake_download(url, root, filename=None, md5=None):  # a server handing out something else
        (tmp_path / filename).write_bytes(b"an error page")

    monkeypatch.setattr(tvu, "download_url", fake_download)
    with pytest.raises(DataError, match=r"CUB_200_2011.tgz: md5 .* is not the expected"):
        CUB200(tmp_path, split="train", download=True)
    assert not (tmp_path / "CUB_200_2011").exists()
