"""Downloads and archives: a wrong hash is an error and the file is not used; members leading outside the target
(absolute names, ``..``, links) are refused, for tar (tarfile's data filter) and for zip (our equivalent)."""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
import zipfile

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


def _tar_link(tar, name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tar.addfile(info)


TAR_CASES = {
    "dotdot": lambda t: _tar_file(t, "../outside.txt"),
    "absolute": lambda t: _tar_file(t, "/tmp/featstudy-absolute-outside.txt"),
    "symlink out": lambda t: _tar_link(t, "images/link", "../../outside.txt"),
    "absolute symlink": lambda t: _tar_link(t, "images/link", "/etc/passwd"),
    "hardlink out": lambda t: _tar_link(t, "images/hard", "../outside.txt", tarfile.LNKTYPE),
}


@pytest.mark.parametrize("case", sorted(TAR_CASES))
def test_tar_members_leading_outside_are_refused(case, tmp_path):
    archive = _tar(tmp_path / "evil.tar", lambda t: (_tar_file(t, "images/ok.txt", b"ok"), TAR_CASES[case](t)))
    with pytest.raises(DataError, match=r"evil.tar: refusing to extract unsafe member"):
        safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "dest" / "images" / "link").exists()


def _zip_symlink(zf, name, target):
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zf.writestr(info, target)


ZIP_CASES = {
    "dotdot": lambda z: z.writestr("images/../../outside.txt", "bad"),
    "absolute": lambda z: z.writestr(zipfile.ZipInfo("/tmp/featstudy-absolute-outside.txt"), "bad"),
    "drive": lambda z: z.writestr("C:/outside.txt", "bad"),
    "symlink out": lambda z: _zip_symlink(z, "images/link", "../../outside.txt"),
    "absolute symlink": lambda z: _zip_symlink(z, "images/link", "/etc/passwd"),
}


@pytest.mark.parametrize("case", sorted(ZIP_CASES))
def test_zip_members_leading_outside_are_refused(case, tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("images/ok.txt", "ok")
        ZIP_CASES[case](zf)
    with pytest.raises(DataError, match=r"evil.zip: refusing to extract unsafe member"):
        safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest" / "images" / "ok.txt").exists()  # checked before anything is written
    assert not (tmp_path / "outside.txt").exists()


def test_safe_archives_extract_with_links_inside(tmp_path):
    with zipfile.ZipFile(tmp_path / "ok.zip", "w") as zf:
        zf.writestr("data/a/1.txt", "one")
        _zip_symlink(zf, "data/b/link", "../a/1.txt")
    safe_extract(tmp_path / "ok.zip", tmp_path / "z")
    assert (tmp_path / "z" / "data" / "a" / "1.txt").read_text() == "one"

    def build(t):
        _tar_file(t, "data/a/1.txt", b"one")
        _tar_link(t, "data/b/link", "../a/1.txt")

    safe_extract(_tar(tmp_path / "ok.tar", build), tmp_path / "t")
    assert (tmp_path / "t" / "data" / "b" / "link").read_text() == "one"


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
