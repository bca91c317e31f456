"""Each dataset class on a generated miniature of its official layout: counts, labels, splits, errors."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from featstudy import datasets
from featstudy.datasets import CUB200, MIT67, Digits, Flowers102, ImageFolder, ImageNetVal
from featstudy.datasets.imagenet_val import choose_classes
from featstudy.errors import ConfigError, DataError


def _img(path, seed=0, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_cub(root):
    base = root / "CUB_200_2011"
    classes = ["001.Albatross", "002.Auklet", "003.Bunting"]
    images, labels, split = [], [], []
    i = 0
    for c, cls in enumerate(classes, 1):
        for j in range(3):
            i += 1
            rel = f"{cls}/{cls[4:]}_{j}.jpg"
            _img(base / "images" / rel, i)
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
            split.append(f"{i} {1 if j < 2 else 0}")
    (base / "classes.txt").write_text("".join(f"{k} {c}\n" for k, c in enumerate(classes, 1)))
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return base


def test_cub200_official_layout(tmp_path):
    base = make_cub(tmp_path)
    train = CUB200(tmp_path, split="train")  # the parent of CUB_200_2011 works too
    assert train.root == base and len(train) == 6 and train.classes[0] == "001.Albatross"
    assert train.targets == [0, 0, 1, 1, 2, 2]
    assert train.samples[0][0] == "images/001.Albatross/Albatross_0.jpg"
    assert len(CUB200(base, split="test")) == 3 and len(CUB200(base, split="all")) == 9
    img, label = CUB200(base, split="test")[1]
    assert img.mode == "RGB" and label == 1
    with pytest.raises(ConfigError, match=r"dataset.split: 'val'.*\['train', 'test', 'all'\]"):
        CUB200(base, split="val")
    with pytest.raises(DataError, match=r"dataset.root: .*empty: no cub200 data.*dataset.download=true"):
        CUB200(tmp_path / "empty", split="train")


def _flowers(root: Path, monkeypatch, labels=(1, 1, 2, 2, 3, 3, 102, 102), setid=None) -> Path:
    """A miniature flowers-102/ in the official layout; featstudy's md5 table is pointed at these generated .mat
    files (the official digests are for the official files)."""
    from scipy.io import savemat

    base = root / "flowers-102"
    for k in range(1, len(labels) + 1):
        _img(base / "jpg" / f"image_{k:05d}.jpg", k)
    savemat(base / "imagelabels.mat", {"labels": np.array([list(labels)])})
    savemat(base / "setid.mat", setid or {"trnid": np.array([[3, 1]]), "valid": np.array([[5, 7]]),
                                          "tstid": np.array([[8, 2, 4, 6]])})
    monkeypatch.setattr(Flowers102, "files", {**Flowers102.files,
                                              "labels": ("imagelabels.mat", _md5(base / "imagelabels.mat")),
                                              "setid": ("setid.mat", _md5(base / "setid.mat"))})
    return base


def test_flowers102_reads_the_official_files(tmp_path, monkeypatch):
    """Splits in setid.mat's order, labels from imagelabels.mat minus 1, the published class names (compared with
    torchvision's public list), the same sample paths as torchvision's layout gives (so cache keys do not move)."""
    from torchvision.datasets import Flowers102 as TV

    base = _flowers(tmp_path, monkeypatch)
    test = Flowers102(tmp_path, split="test")
    assert [s for s, _ in test.samples] == [f"flowers-102/jpg/image_{k:05d}.jpg" for k in (8, 2, 4, 6)]
    assert test.targets == [101, 0, 1, 2] and test.classes == list(TV.classes)
    assert [s for s, _ in Flowers102(tmp_path, split="train").samples] == ["flowers-102/jpg/image_00003.jpg",
                                                                            "flowers-102/jpg/image_00001.jpg"]
    assert Flowers102(tmp_path, split="val").targets == [2, 101]
    img, label = Flowers102(base, split="test")[0]  # dataset.root may be flowers-102/ itself
    assert label == 101 and img.mode == "RGB"
    assert Flowers102(base, split="test").samples[0][0] == "jpg/image_00008.jpg"
    with pytest.raises(DataError, match=r"dataset.root: .*no flowers102 data"):
        Flowers102(tmp_path / "nope", split="test")


def test_flowers102_refuses_a_changed_or_inconsistent_mat_file(tmp_path, monkeypatch):
    from scipy.io import savemat

    base = _flowers(tmp_path, monkeypatch)
    savemat(base / "setid.mat", {"trnid": np.array([[1]]), "valid": np.array([[2]]), "tstid": np.array([[3]])})
    with pytest.raises(DataError, match=r"dataset.root: .*setid.mat: md5 [0-9a-f]{32} is not the expected"):
        Flowers102(tmp_path, split="test")
    _flowers(tmp_path / "b", monkeypatch, setid={"trnid": np.array([[1]]), "valid": np.array([[2]]),
                                                 "tstid": np.array([[3, 9]])})
    with pytest.raises(DataError, match=r"setid.mat: tstid holds image numbers outside 1..8"):
        Flowers102(tmp_path / "b", split="test")
    _flowers(tmp_path / "c", monkeypatch, labels=(1, 103, 2, 2, 3, 3, 4, 4))
    with pytest.raises(DataError, match=r"imagelabels.mat: labels must lie in 1..102"):
        Flowers102(tmp_path / "c", split="test")
    _flowers(tmp_path / "d", monkeypatch, setid={"trnid": np.array([[1]]), "valid": np.array([[2]])})
    with pytest.raises(DataError, match=r"setid.mat: no variable 'tstid'"):
        Flowers102(tmp_path / "d", split="test")


def test_flowers102_does_not_use_torchvisions_private_attributes():
    import ast
    import inspect

    import featstudy.datasets.flowers102 as mod

    private = {n.attr for n in ast.walk(ast.parse(inspect.getsource(mod))) if isinstance(n, ast.Attribute)
               and n.attr.startswith("_") and not n.attr.startswith("__")}
    assert private <= {"_base", "_read_mat"}, private


def test_mit67_official_layout(tmp_path):
    for cls in ("bakery", "kitchen", "airport_inside"):
        for j in range(3):
            _img(tmp_path / "Images" / cls / f"{cls}{j}.jpg", j)
    (tmp_path / "TrainImages.txt").write_text("kitchen/kitchen0.jpg\r\nbakery/bakery0.jpg\r\nbakery/bakery1.jpg\r\nairport_inside/airport_inside2.jpg\r\n")
    (tmp_path / "TestImages.txt").write_text("kitchen/kitchen2.jpg\n")
    train = MIT67(tmp_path, split="train")
    assert train.classes == ["airport_inside", "bakery", "kitchen"]
    assert [s for s, _ in train.samples][0] == "Images/kitchen/kitchen0.jpg" and train.targets == [2, 1, 1, 0]
    assert len(MIT67(tmp_path, split="test")) == 1 and len(MIT67(tmp_path, split="all")) == 5
    with pytest.raises(ConfigError, match=r"dataset.download: mit67 has no published checksums"):
        MIT67(tmp_path / "none", split="train", download=True)


def make_imagenet_val(root, n_classes=6, per_class=2):
    wnids = [f"n{1000 + 7 * k:08d}" for k in range(n_classes)]
    for c, w in enumerate(wnids):
        for j in range(per_class):
            _img(root / "val" / w / f"ILSVRC2012_val_{c * per_class + j + 1:08d}.JPEG", c + j)
    return wnids


def test_imagenet_val_seeded_class_subset(tmp_path):
    wnids = make_imagenet_val(tmp_path)
    ds = ImageNetVal(tmp_path, n_classes=3, class_seed=0)
    picked = np.random.default_rng(0).choice(6, size=3, replace=False)
    assert ds.classes == [wnids[i] for i in sorted(picked)] == choose_classes(wnids[::-1], 3, 0)
    assert len(ds) == 6 and ds.targets == [0, 0, 1, 1, 2, 2]
    assert ImageNetVal(tmp_path, n_classes=3, class_seed=0).classes == ds.classes  # seeded: the same every time
    assert len(ImageNetVal(tmp_path, n_classes=6)) == 12
    with pytest.raises(ConfigError, match=r"dataset.n_classes: 500 not in 1..6"):
        ImageNetVal(tmp_path)
    with pytest.raises(DataError, match=r"no imagenet_val data.*ILSVRC2012_img_val.tar"):
        ImageNetVal(tmp_path / "none")


def test_imagenet_val_prepared_from_official_archives(tmp_path, monkeypatch):
    from scipy.io import savemat

    kit = tmp_path / "build" / "ILSVRC2012_devkit_t12" / "data"
    kit.mkdir(parents=True)
    synsets = np.zeros((4,), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    for k, (wnid, words, children) in enumerate([("n01", "tench", 0), ("n02", "goldfish", 0), ("n03", "shark", 0), ("n99", "fish", 3)]):
        synsets[k] = (k + 1, wnid, words, children)
    savemat(kit / "meta.mat", {"synsets": synsets})
    (kit / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n3\n2\n")
    with tarfile.open(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "build" / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    for k in range(1, 5):
        _img(tmp_path / "build" / "val" / f"ILSVRC2012_val_{k:08d}.JPEG", k)
    with tarfile.open(tmp_path / "ILSVRC2012_img_val.tar", "w") as tar:
        for k in range(1, 5):
            tar.add(tmp_path / "build" / "val" / f"ILSVRC2012_val_{k:08d}.JPEG", arcname=f"ILSVRC2012_val_{k:08d}.JPEG")
    with pytest.raises(DataError, match=r"no imagenet_val data"):
        ImageNetVal(tmp_path, n_classes=3)  # archives alone: nothing is written without download=true
    monkeypatch.setattr(ImageNetVal, "archives", {"val": ("ILSVRC2012_img_val.tar", _md5(tmp_path / "ILSVRC2012_img_val.tar")),
                                                  "devkit": ("ILSVRC2012_devkit_t12.tar.gz", "0" * 32)})
    devkit_md5 = _md5(tmp_path / "ILSVRC2012_devkit_t12.tar.gz")
    with pytest.raises(DataError, match=rf"^dataset.root: {tmp_path}/ILSVRC2012_devkit_t12.tar.gz: md5 {devkit_md5} "
                                        rf"is not the expected 0{{32}}; the file is not used"):
        ImageNetVal(tmp_path, n_classes=3, download=True)
    monkeypatch.setattr(ImageNetVal, "archives", {**ImageNetVal.archives, "devkit": ("ILSVRC2012_devkit_t12.tar.gz", _md5(tmp_path / "ILSVRC2012_devkit_t12.tar.gz"))})
    ds = ImageNetVal(tmp_path, n_classes=3, download=True)
    assert ds.classes == ["n01", "n02", "n03"] and ds.targets == [0, 1, 1, 2]
    assert [s for s, _ in ds.samples] == ["val/n01/ILSVRC2012_val_00000002.JPEG", "val/n02/ILSVRC2012_val_00000001.JPEG",
                                          "val/n02/ILSVRC2012_val_00000004.JPEG", "val/n03/ILSVRC2012_val_00000003.JPEG"]


def test_imagefolder_and_digits(tmp_path):
    for cls, n in (("b", 2), ("a", 3)):
        for j in range(n):
            _img(tmp_path / "f" / cls / f"{j}.png", j)
    (tmp_path / "f" / "a" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path / "f")
    assert ds.classes == ["a", "b"] and len(ds) == 5 and ds.targets == [0, 0, 0, 1, 1]
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images in class subfolders"):
        ImageFolder(tmp_path / "empty")
    d = Digits()
    assert len(d) == 1797 and d.classes == [str(i) for i in range(10)] and d.targets[:3] == [0, 1, 2]
    img = d.image(0)
    assert img.mode == "RGB" and img.size == (8, 8)
    from sklearn.datasets import load_digits

    raw = load_digits().images[0]
    np.testing.assert_array_equal(np.asarray(img)[..., 0], np.rint(raw * 255 / 16).astype(np.uint8))


def test_from_config_and_safe_extract(tmp_path):
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match=r"dataset._target_: cannot import 'featstudy.datasets.COCO'"):
        datasets.from_config(OmegaConf.create({"_target_": "featstudy.datasets.COCO", "split": "all"}))
    with pytest.raises(ConfigError, match=r"dataset.root: not set for mit67"):
        datasets.from_config(OmegaConf.create({"_target_": "featstudy.datasets.MIT67", "root": None, "split": "train"}))
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(DataError, match=r"refusing to extract"):
        datasets.safe_extract(evil, tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()


def test_flowers102_download_fetches_the_three_official_files_md5_checked(tmp_path, monkeypatch):
    """dataset.download=true over real HTTP (a local server holding the three files of the official site): the
    archive is extracted into flowers-102/, the .mat files are checked, and the split reads as from local files."""
    import functools
    import http.server
    import threading

    site = tmp_path / "site"
    made = _flowers(tmp_path / "made", monkeypatch)
    site.mkdir()
    with tarfile.open(site / "102flowers.tgz", "w:gz") as tar:
        tar.add(made / "jpg", arcname="jpg")
    for name in ("imagelabels.mat", "setid.mat"):
        (site / name).write_bytes((made / name).read_bytes())
    monkeypatch.setattr(Flowers102, "files", {**Flowers102.files, "images": ("102flowers.tgz", _md5(site / "102flowers.tgz"))})
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(Flowers102, "url", f"http://127.0.0.1:{server.server_address[1]}/")
        got = Flowers102(tmp_path / "data", split="test", download=True)
    finally:
        server.shutdown()
    assert [s for s, _ in got.samples] == [f"flowers-102/jpg/image_{k:05d}.jpg" for k in (8, 2, 4, 6)]
    assert got.targets == [101, 0, 1, 2] and got[0][0].mode == "RGB"
    (site / "setid.mat").write_bytes(b"not the file")  # a server handing out something else: refused, not used
    with pytest.raises(DataError, match=r"dataset.download: fetching http://127.0.0.1:\d+/setid.mat failed"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            monkeypatch.setattr(Flowers102, "url", f"http://127.0.0.1:{server.server_address[1]}/")
            Flowers102(tmp_path / "data2", split="test", download=True)
        finally:
            server.shutdown()
