"""The dataset fingerprint in the cache key hashes image content (issue 10 item 2).

An image rewritten with the same byte size and its old mtime put back (``os.utime``) must give a cache miss and a
fresh row, also once the stat memo under ``<paths.cache_dir>/fingerprints/`` knows the file; the same files copied
elsewhere (new inodes, new mtimes) must still hit. Every file dataset (cub200, mit67, flowers102, imagenet_val,
imagefolder) goes through the content hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from featstudy.datasets import CUB200, MIT67, Flowers102, ImageFolder, ImageNetVal
from featstudy.extraction import get_embedding, plan

CROPS = {"_target_": "featstudy.transforms.CropSpec", "name": "center", "resize": 36, "size": 32}


def _bmp(path, seed):
    """An uncompressed 20x17 BMP of seeded noise: every such file has the same byte size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (17, 20, 3), dtype=np.uint8)).save(path, format="BMP")


def _folder(root):
    for c, cls in enumerate(("cat", "dog")):
        for j in range(2):
            _bmp(root / cls / f"img{j}.bmp", 10 * c + j)
    return root


def _rewrite_same_size(path, seed):
    """New pixels, same byte size, and the old atime/mtime put back (ns precision)."""
    st = os.stat(path)
    _bmp(path, seed)
    assert os.stat(path).st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns


def _wait_past_racy_window(root):
    """Sleep until every file under root is older than 2.1 s, so that the memo trusts their stat."""
    newest = max(os.stat(p).st_ctime_ns for p in root.rglob("*"))
    time.sleep(max(0.0, (newest + 2_100_000_000 - time.time_ns()) / 1e9))


def _row(handle, rel):
    paths = (handle.path / "paths.txt").read_text(encoding="utf-8").split("\n")
    return np.load(handle.path / "features.npy")[paths.index(rel)]


def test_same_size_edit_with_old_mtime_is_a_miss_and_a_fresh_row(tmp_path, make_cfg):
    data = _folder(tmp_path / "data")
    _wait_past_racy_window(data)
    cache = tmp_path / "cache"
    cfg = make_cfg(cache, dataset={"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(data), "split": "all"}, crops=CROPS)
    first = get_embedding(cfg)
    assert not first.hit
    assert get_embedding(cfg).hit  # unchanged files: a hit
    memo_files = list((cache / "fingerprints").glob("*.json"))
    assert len(memo_files) == 1 and len(json.loads(memo_files[0].read_text())["files"]) == 4  # the memo knows them
    stale = _row(first, "cat/img1.bmp")

    _rewrite_same_size(data / "cat" / "img1.bmp", seed=99)
    edited = get_embedding(cfg)
    assert not edited.hit and edited.key != first.key
    fresh = _row(edited, "cat/img1.bmp")
    assert not np.allclose(fresh, stale)
    np.testing.assert_array_equal(_row(edited, "dog/img0.bmp"), _row(first, "dog/img0.bmp"))  # others unchanged

    # the edited image's own embedding, computed on a fresh cache from a folder holding only it
    alone = tmp_path / "alone"
    _bmp(alone / "cat" / "img1.bmp", 99)
    _bmp(alone / "dog" / "img0.bmp", 10)
    solo = get_embedding(make_cfg(tmp_path / "cache2", crops=CROPS,
                                  dataset={"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(alone), "split": "all"}))
    np.testing.assert_allclose(fresh, _row(solo, "cat/img1.bmp"), rtol=1e-5, atol=1e-6)
    assert get_embedding(cfg).hit and get_embedding(cfg).key == edited.key  # and the edited data now hits


def test_copied_dataset_still_hits(tmp_path, make_cfg):
    data = _folder(tmp_path / "data")
    cache = tmp_path / "cache"

    def cfg(root):
        return make_cfg(cache, dataset={"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(root), "split": "all"}, crops=CROPS)

    first = get_embedding(cfg(data))
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(data, copy, copy_function=shutil.copy)  # new inodes, new mtimes
    assert os.stat(copy / "cat" / "img0.bmp").st_ino != os.stat(data / "cat" / "img0.bmp").st_ino
    again = get_embedding(cfg(copy))
    assert again.hit and again.key == first.key and again.path == first.path


def test_memo_corrupt_or_absent_gives_the_same_fingerprint(tmp_path):
    data = _folder(tmp_path / "data")
    _wait_past_racy_window(data)
    memo = tmp_path / "memo"
    plain = ImageFolder(data).fingerprint()
    assert ImageFolder(data).fingerprint(memo_dir=memo) == plain  # writes the memo
    (memo_file,) = memo.glob("*.json")
    assert ImageFolder(data).fingerprint(memo_dir=memo) == plain  # read from the memo
    for junk in ("{not json", json.dumps({"version": 1, "files": []}), "\x00\xff"):
        memo_file.write_text(junk, encoding="latin-1")
        assert ImageFolder(data).fingerprint(memo_dir=memo) == plain
        assert len(json.loads(memo_file.read_text())["files"]) == 4  # rebuilt
    # an entry whose digest is wrong-shaped is ignored, not used
    good = json.loads(memo_file.read_text())
    rel = "cat/img0.bmp"
    good["files"][rel][5] = "zz"
    memo_file.write_text(json.dumps(good))
    assert ImageFolder(data).fingerprint(memo_dir=memo) == plain


def test_fingerprint_follows_content_not_size_or_mtime(tmp_path):
    """Independent of the code: files with equal bytes agree, and the old size-only notion would not see the edit."""
    data = _folder(tmp_path / "data")
    before = ImageFolder(data).fingerprint()
    sizes = {p: p.stat().st_size for p in data.rglob("*.bmp")}
    digest = hashlib.sha256((data / "dog" / "img1.bmp").read_bytes()).hexdigest()
    _rewrite_same_size(data / "dog" / "img1.bmp", seed=5)
    assert {p: p.stat().st_size for p in data.rglob("*.bmp")} == sizes
    assert hashlib.sha256((data / "dog" / "img1.bmp").read_bytes()).hexdigest() != digest
    after = ImageFolder(data).fingerprint()
    assert after != before
    _rewrite_same_size(data / "dog" / "img1.bmp", seed=11)  # the original bytes back: the original fingerprint
    assert hashlib.sha256((data / "dog" / "img1.bmp").read_bytes()).hexdigest() == digest
    assert ImageFolder(data).fingerprint() == before


def test_missing_file_does_not_crash_and_changes_the_fingerprint_when_it_appears(tmp_path):
    base = _cub(tmp_path)
    victim = base / "images" / "001.A" / "a1.jpg"
    kept = victim.read_bytes()
    victim.unlink()
    missing = CUB200(base, split="all").fingerprint()
    victim.write_bytes(kept)
    assert CUB200(base, split="all").fingerprint() != missing


# --- every file dataset uses the content hash -------------------------------------------------------------------

def _jpg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path, format="JPEG")


def _cub(root):
    base = root / "CUB_200_2011"
    rels = ["001.A/a0.jpg", "001.A/a1.jpg", "002.B/b0.jpg"]
    for k, rel in enumerate(rels):
        _jpg(base / "images" / rel, k)
    (base / "classes.txt").write_text("1 001.A\n2 002.B\n")
    (base / "images.txt").write_text("".join(f"{k} {rel}\n" for k, rel in enumerate(rels, 1)))
    (base / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n")
    (base / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    return base


def _mit67(root):
    for cls in ("bakery", "kitchen"):
        for j in range(2):
            _jpg(root / "Images" / cls / f"{cls}{j}.jpg", j + len(cls))
    (root / "TrainImages.txt").write_text("kitchen/kitchen0.jpg\nbakery/bakery0.jpg\n")
    (root / "TestImages.txt").write_text("kitchen/kitchen1.jpg\nbakery/bakery1.jpg\n")
    return root


def _imagenet(root):
    for c, w in enumerate(("n00000001", "n00000002")):
        for j in range(2):
            _jpg(root / "val" / w / f"ILSVRC2012_val_{2 * c + j + 1:08d}.JPEG", 2 * c + j)
    return root


def _flowers(root, monkeypatch):
    from scipy.io import savemat

    base = root / "flowers-102"
    for k in range(1, 5):
        _jpg(base / "jpg" / f"image_{k:05d}.jpg", k)
    savemat(base / "imagelabels.mat", {"labels": np.array([[1, 1, 2, 2]])})
    savemat(base / "setid.mat", {"trnid": np.array([[1]]), "valid": np.array([[2]]), "tstid": np.array([[3, 4]])})

    def md5(p):
        return hashlib.md5(p.read_bytes()).hexdigest()

    monkeypatch.setattr(Flowers102, "files", {**Flowers102.files, "labels": ("imagelabels.mat", md5(base / "imagelabels.mat")),
                                              "setid": ("setid.mat", md5(base / "setid.mat"))})
    return root


BUILDERS = {
    "cub200": (lambda r, mp: _cub(r), lambda r: CUB200(r, split="all")),
    "mit67": (lambda r, mp: _mit67(r), lambda r: MIT67(r, split="all")),
    "imagenet_val": (lambda r, mp: _imagenet(r), lambda r: ImageNetVal(r, n_classes=2)),
    "flowers102": (_flowers, lambda r: Flowers102(r, split="test")),
    "imagefolder": (lambda r, mp: _folder(r), lambda r: ImageFolder(r)),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_file_dataset_hashes_content(name, tmp_path, monkeypatch):
    build, open_ds = BUILDERS[name]
    root = build(tmp_path / "orig", monkeypatch)
    ds = open_ds(root)
    before = ds.fingerprint(memo_dir=tmp_path / "memo")
    target = ds.root / ds.samples[-1][0]
    st = os.stat(target)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one byte flipped: same size
    target.write_bytes(bytes(raw))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    edited = open_ds(root).fingerprint(memo_dir=tmp_path / "memo")
    assert edited != before
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, copy_function=shutil.copy)
    assert open_ds(copy).fingerprint(memo_dir=tmp_path / "memo") == edited
    p_orig = plan_key(tmp_path, name, root)
    assert p_orig == plan_key(tmp_path, name, copy)


def plan_key(tmp_path, name, root):
    from omegaconf import OmegaConf

    split = {"cub200": "all", "mit67": "all", "imagenet_val": "val", "flowers102": "test", "imagefolder": "all"}[name]
    classes = {"cub200": "CUB200", "mit67": "MIT67", "imagenet_val": "ImageNetVal", "flowers102": "Flowers102",
               "imagefolder": "ImageFolder"}
    ds = {"_target_": f"featstudy.datasets.{classes[name]}", "name": name, "root": str(root), "split": split,
          "download": False}
    if name == "imagenet_val":
        ds["n_classes"] = 2
    cfg = OmegaConf.create({"model": {"_target_": "featstudy.models.TorchvisionModel", "name": "vgg19", "weights": "random", "preprocessing": "torchvision", "seed": 0,
                                      "nodes": None}, "dataset": ds, "crops": CROPS, "pooling": {"_target_": "featstudy.pooling.Pooling", "name": "avg"},
                            "trainer": {"precision": "32-true"}, "paths": {"cache_dir": str(tmp_path / "cache")}})
    return plan(cfg).key
