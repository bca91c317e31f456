"""The store never serves a silently wrong result (issue 10, items 1, 4, 5, 6), through real extractions.

* file and class names holding any line separator round-trip (paths.txt, classes.txt, skipped.txt are written and
  read with exactly ``\\n``), each row still the features of its own image;
* a damaged entry (truncated or edited features.npy, broken or edited meta.json, an old DONE without manifest) is
  named in one warning, moved aside intact and rebuilt; load_embedding refuses it naming the file;
* a disk that fills up while features.npy is being filled gives the one-line ENOSPC error, not SIGBUS (a real,
  small tmpfs in a private mount namespace);
* a class whose every image is unreadable is recorded in meta.json and skipped.txt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featstudy
from featstudy.errors import DataError
from featstudy.extraction import get_embedding, plan
from featstudy.store import EmbeddingError, is_complete, load_embedding

SCRIPT = Path(__file__).with_name("run_extraction.py")
SRC = Path(featstudy.__file__).resolve().parents[1]
LIGHT_MODEL = {"_target_": "featstudy.models.TorchvisionModel", "name": "resnet18", "weights": "random", "preprocessing": "torchvision", "seed": 5,
               "nodes": ["layer1", "flatten"]}
#: every character str.splitlines() splits on, and the store's escape characters
SEPARATORS = {"lf": "\n", "cr": "\r", "crlf": "\r\n", "vt": "\x0b", "ff": "\x0c", "fs": "\x1c", "gs": "\x1d",
              "rs": "\x1e", "nel": "\x85", "ls": "\u2028", "ps": "\u2029", "tab": "\t", "bs": "\\",
              "bsn": "\\n", "undecodable": os.fsdecode(b"\xff\xfe")}  # not UTF-8: kept as bytes


@pytest.fixture
def light(make_cfg):
    """resnet18 (random, seeded), one 32 px centre crop, batches of 3."""

    def build(cache, data):
        cfg = make_cfg(cache, dataset={"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(data), "split": "all", "download": False},
                       crops={"_target_": "featstudy.transforms.CropSpec", "name": "center", "resize": 36, "size": 32}, **{"loader.batch_size": 3})
        cfg.model = LIGHT_MODEL
        return cfg

    return build


def _rgb(rng, h=40, w=42):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# -- item 4: names holding line separators -------------------------------------------------------------------------

def test_names_with_line_separators_round_trip_and_rows_keep_their_images(tmp_path, light):
    rng = np.random.default_rng(11)
    awkward, plain = tmp_path / "awkward", tmp_path / "plain"
    plain_of = {}  # awkward relative path -> the same image under a plain name
    classes = {"a": "a", "b\u2028c": "b", "d\ne": "d"}  # class folders holding U+2028 and a newline
    for k, (cls, pcls) in enumerate(classes.items()):
        for tag, sep in SEPARATORS.items():
            if k and tag not in ("lf", "ls", "cr"):
                continue
            name = f"x{sep}{tag}.png"
            img = _rgb(rng)
            for root, c, n in ((awkward, cls, name), (plain, pcls, f"{tag}.png")):
                (root / c).mkdir(parents=True, exist_ok=True)
                img.save(root / c / n)
            plain_of[f"{cls}/{name}"] = f"{pcls}/{tag}.png"
    bad = "a/broken\nimage\u2028.png"
    (awkward / bad).write_bytes(b"not an image")
    assert len(os.listdir(awkward / "a")) == len(SEPARATORS) + 1  # the file system holds every one of them

    cfg = light(tmp_path / "cache", awkward)
    cfg.loader.batch_size = 1  # each image alone: its features do not depend on which images share its batch
    h = get_embedding(cfg)
    emb = load_embedding(h.path)
    assert sorted(emb.paths) == sorted(plain_of)
    assert emb.classes == sorted(classes)
    assert [line.rsplit("\t", 1)[0] for line in emb.skipped] == [bad]
    assert emb.skipped[0].endswith("UnidentifiedImageError: cannot identify image file " + repr(str(awkward / bad)))
    assert [emb.classes[c] for c in emb.labels] == [p.split("/", 1)[0] for p in emb.paths]
    # each file holds one line per item, split at exactly "\n"
    raw = (h.path / "paths.txt").read_bytes().decode("utf-8", "surrogateescape")
    assert raw.endswith("\n") and len(raw[:-1].split("\n")) == len(plain_of)
    # row i is the image paths.txt names on line i: the same image under a plain name gives the same features
    ref_cfg = light(tmp_path / "cache", plain)
    ref_cfg.loader.batch_size = 1
    ref = load_embedding(get_embedding(ref_cfg).path)
    ref_row = {p: i for i, p in enumerate(ref.paths)}
    order = [ref_row[plain_of[p]] for p in emb.paths]
    np.testing.assert_array_equal(emb.features, ref.features[order])
    again = get_embedding(cfg)  # and the entry is a cache hit, not bricked
    assert again.hit and load_embedding(again.path).paths == emb.paths


# -- item 1: a class whose every image is unreadable ---------------------------------------------------------------

def test_class_with_only_unreadable_images_is_recorded(tmp_path, light):
    rng = np.random.default_rng(5)
    data = tmp_path / "data"
    for c in ("a", "b", "c"):
        (data / c).mkdir(parents=True)
        for i in range(3):
            if c == "b":
                (data / c / f"{i}.png").write_bytes(b"garbage " * (i + 1))
            else:
                _rgb(rng).save(data / c / f"{i}.png")
    h = get_embedding(light(tmp_path / "cache", data))
    meta = json.loads((h.path / "meta.json").read_text(encoding="utf-8"))
    assert meta["empty_classes"] == ["b"] and meta["n_skipped"] == 3
    lines = (h.path / "skipped.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 5
    assert [line.split("\t")[0] for line in lines[:3]] == ["b/0.png", "b/1.png", "b/2.png"]
    assert lines[3] == "class:b\tdropped: all its 3 images were skipped"
    emb = load_embedding(h.path)
    assert emb.empty_classes == ["b"] and len(emb.skipped) == 3
    assert emb.classes == ["a", "b", "c"] and sorted(set(emb.labels.tolist())) == [0, 2]


# -- item 5: damaged entries ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """Nine images and their finished entry: (config, entry folder, features, paths, meta.json text)."""
    from omegaconf import OmegaConf

    root = tmp_path_factory.mktemp("intact")
    rng = np.random.default_rng(3)
    for i in range(9):
        (root / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        _rgb(rng).save(root / "data" / f"c{i % 2}" / f"{i}.png")
    cfg = OmegaConf.create({
        "model": LIGHT_MODEL, "pooling": {"_target_": "featstudy.pooling.Pooling", "name": "avg"}, "crops": {"_target_": "featstudy.transforms.CropSpec", "name": "center", "resize": 36, "size": 32},
        "dataset": {"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(root / "data"), "split": "all", "download": False},
        "loader": {"batch_size": 3, "num_workers": 0},
        "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true"},
        "paths": {"cache_dir": str(root / "cache")}})
    h = get_embedding(cfg)
    emb = load_embedding(h.path, mmap=False)
    return cfg, h.path, emb.features, emb.paths, (h.path / "meta.json").read_text(encoding="utf-8")


def _edit_value(folder: Path) -> None:
    data = bytearray((folder / "features.npy").read_bytes())
    data[-4:] = np.float32(1234.5).tobytes()  # the last feature of the last row, the size unchanged
    (folder / "features.npy").write_bytes(bytes(data))


def _edit_weights(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    meta["weights"] = "IMAGENET1K_V1"
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


DAMAGE = {
    "truncated features": ("features.npy", lambda f: os.truncate(f / "features.npy", 1000), "bytes"),
    "edited value": ("features.npy", _edit_value, "content changed"),
    "broken meta.json": ("meta.json", lambda f: (f / "meta.json").write_text("{\"model\": ", encoding="utf-8"),
                         "bytes"),
    "edited weights tag": ("meta.json", _edit_weights, ""),
    "old entry, no manifest": ("DONE", lambda f: (f / "DONE").write_text("", encoding="utf-8"), "no checksum manifest"),
    "missing labels": ("labels.npy", lambda f: (f / "labels.npy").unlink(), "missing"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_entry_is_named_moved_aside_and_rebuilt(kind, tmp_path, intact, caplog):
    cfg, src, features, paths, meta_text = intact
    cfg = cfg.copy()
    cfg.paths.cache_dir = str(tmp_path / "cache")
    folder = tmp_path / "cache" / "embeddings" / plan(cfg).key
    shutil.copytree(src, folder)
    name, damage, what = DAMAGE[kind]
    damage(folder)
    damaged_bytes = {p.name: p.read_bytes() for p in folder.iterdir()}

    with pytest.raises(EmbeddingError) as err:  # a reader is refused, naming the file, in one line
        load_embedding(folder)
    assert str(folder / name) in str(err.value) and "\n" not in str(err.value) and what in str(err.value)

    with caplog.at_level(logging.INFO, logger="featstudy.extraction"):
        h = get_embedding(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0] and "moved aside" in warnings[0], warnings
    assert not h.hit and h.weights_tag == "random" and h.meta["weights"] == "random"
    got = load_embedding(h.path)
    assert got.paths == paths
    np.testing.assert_array_equal(got.features, features)
    assert (h.path / "meta.json").read_text(encoding="utf-8").replace(str(tmp_path / "cache"), "") != ""
    # the damaged entry is kept, every byte of it, next to the new one, and never taken as finished
    [aside] = [p for p in folder.parent.iterdir() if p.name.startswith(f"{folder.name}.damaged-")]
    assert not is_complete(aside)
    kept = {p.name: p.read_bytes() for p in aside.iterdir()}
    kept["DONE"] = kept.pop("DONE.damaged")
    assert kept == damaged_bytes
    assert get_embedding(cfg).hit  # the rebuilt entry verifies


def test_intact_entry_is_a_hit_and_verifies(tmp_path, intact, caplog):
    cfg, src, features, _, _ = intact
    cfg = cfg.copy()
    cfg.paths.cache_dir = str(tmp_path / "cache")
    folder = tmp_path / "cache" / "embeddings" / plan(cfg).key
    shutil.copytree(src, folder)  # the same files elsewhere: still intact, still a hit
    with caplog.at_level(logging.INFO, logger="featstudy.extraction"):
        h = get_embedding(cfg)
    assert h.hit and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    np.testing.assert_array_equal(load_embedding(h.path).features, features)
    manifest = json.loads((folder / "DONE").read_text(encoding="utf-8"))
    import hashlib

    for name in ("features.npy", "meta.json", "paths.txt"):  # digests by hashlib, independently of the store
        assert manifest["files"][name]["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert manifest["files"][name]["size"] == (folder / name).stat().st_size


# -- item 6: the disk fills up while features.npy is filled --------------------------------------------------------

SCENARIO = textwrap.dedent(r"""
    import errno, json, os, subprocess, sys
    mnt, cfg, script, out = sys.argv[1:5]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt], check=True)
    def extract(die=None):
        env = dict(os.environ, **({"FEATSTUDY_TEST_DIE_AT": die} if die else {}))
        return subprocess.run([sys.executable, script, cfg], capture_output=True, text=True, env=env, timeout=300)
    first = extract("after:shard-:3")  # every shard written (3 batches of 3), killed before the merge
    page = os.sysconf("SC_PAGE_SIZE")
    with open(os.path.join(mnt, "filler"), "wb", buffering=0) as fh:  # fill the disk, then free 3 pages
        try:
            while True:
                fh.write(b"\0" * page)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        fh.truncate(fh.tell() - 3 * page)
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    full = extract()  # merges into the full disk: features.npy needs 7 pages
    os.unlink(os.path.join(mnt, "filler"))
    again = extract()
    emb = os.path.join(mnt, "embeddings")
    files = sorted(os.path.relpath(os.path.join(d, f), emb) for d, _, fs in os.walk(emb) for f in fs)
    key = json.loads(again.stdout.splitlines()[-1])["key"] if again.returncode == 0 else None
    if key:
        import shutil
        shutil.copy(os.path.join(emb, key, "features.npy"), os.path.join(out, "features.npy"))
    json.dump({"first": first.returncode, "free": free, "rc": full.returncode, "err": full.stderr[-4000:],
               "again": again.returncode, "again_err": again.stderr[-2000:], "files": files},
              open(os.path.join(out, "result.json"), "w"))
""")


def test_full_disk_while_filling_features_is_one_line_not_sigbus(tmp_path, intact):
    from omegaconf import OmegaConf

    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
            capture_output=True).returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm) to mount a small tmpfs")
    cfg, _, features, _, _ = intact
    cfg = cfg.copy()
    mnt = tmp_path / "small"
    mnt.mkdir()
    cfg.paths.cache_dir = str(mnt)
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    (tmp_path / "scenario.py").write_text(SCENARIO, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(["unshare", "-rm", sys.executable, str(tmp_path / "scenario.py"), str(mnt),
                           str(tmp_path / "cfg.yaml"), str(SCRIPT), str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=SCRIPT.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["first"] == 137 and r["free"] == 3 * os.sysconf("SC_PAGE_SIZE") < features.nbytes, r
    assert r["rc"] == 1, r  # an exception, not SIGBUS (-7; a shell reports 135)
    last = r["err"].rstrip("\n").splitlines()[-1]
    assert last.startswith(f"{DataError.__module__}.DataError: paths.cache_dir: cannot write the embedding cache "
                           f"under {mnt}: No space left on device"), r["err"]
    # space is back: the rerun merges the kept shards into the same numbers; no temp file was left behind
    assert r["again"] == 0, r["again_err"]
    np.testing.assert_array_equal(np.load(tmp_path / "features.npy"), features)
    assert not [f for f in r["files"] if "/." in f or f.startswith(".")], r["files"]
