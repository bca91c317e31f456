"""Faults during extraction: awkward and hostile image files, a full or unwritable cache, a kill at any moment.

Every image is either a row or a line of ``skipped.txt`` with its reason; nothing half-written is ever taken as
done, and a rerun gives the embedding an uninterrupted run gives.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featstudy
from featstudy.errors import DataError
from featstudy.extraction import get_embedding, plan
from featstudy.store import EmbeddingError, is_complete, load_embedding

SCRIPT = Path(__file__).with_name("run_extraction.py")
SRC = Path(featstudy.__file__).resolve().parents[1]  # the featstudy this process imports, for the helpers
LIGHT_MODEL = {"_target_": "featstudy.models.TorchvisionModel", "name": "resnet18", "weights": "random", "preprocessing": "torchvision", "seed": 5,
               "nodes": ["layer1", "flatten"]}


@pytest.fixture
def light(make_cfg):
    """resnet18 (random, seeded), one 32 px centre crop: the extraction machinery at almost no cost."""

    def build(cache, data, **over):
        cfg = make_cfg(cache, dataset={"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(data), "split": "all", "download": False},
                       crops={"_target_": "featstudy.transforms.CropSpec", "name": "center", "resize": 36, "size": 32}, **over)
        cfg.model = LIGHT_MODEL
        return cfg

    return build


def _rgb(rng, h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def hostile_folder(root: Path) -> dict[str, str]:
    """Images PIL reads in every odd way; returns {relative path: expected outcome ("row" or a reason pattern)}."""
    rng = np.random.default_rng(7)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            _rgb(rng, 40, 44).save(root / c / f"ok{i}.png")
    expect = {f"{c}/ok{i}.png": "row" for c in ("a", "b") for i in range(2)}
    _rgb(rng, 30, 34).convert("P").save(root / "a" / "gif_named.jpg", format="GIF")  # a real GIF, a .jpg name
    Image.fromarray(rng.integers(0, 65535, (38, 41), dtype=np.uint16)).save(root / "a" / "deep16.png")
    _rgb(rng, 42, 40).convert("CMYK").save(root / "a" / "cmyk.jpg", format="JPEG")
    expect.update({"a/gif_named.jpg": "row", "a/deep16.png": "row", "a/cmyk.jpg": "row"})
    (root / "b" / "zero.jpg").write_bytes(b"")
    (root / "b" / "corrupt.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    _rgb(rng, 48, 48).save(buf, format="JPEG", quality=90)
    (root / "b" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    # with dataset.max_pixels=3000: 70x60 = 4,200 is PIL's warning zone (limit..2x limit), 100x100 its error zone
    _rgb(rng, 60, 70).save(root / "b" / "bomb_warn.png")
    _rgb(rng, 100, 100).save(root / "b" / "bomb_error.png")
    expect.update({"b/zero.jpg": "UnidentifiedImageError: cannot identify image file",
                   "b/corrupt.png": "UnidentifiedImageError: cannot identify image file",
                   "b/truncated.jpg": "OSError: image file is truncated",
                   "b/bomb_warn.png": "DecompressionBombError: Image size (4200 pixels) exceeds limit of 3000 pixels",
                   "b/bomb_error.png": "DecompressionBombError: Image size (10000 pixels) exceeds limit of 6000 pixels"})
    return expect


def test_hostile_images_are_rows_or_skipped_with_their_reason(tmp_path, light):
    data = tmp_path / "data"
    expect = hostile_folder(data)
    h = get_embedding(light(tmp_path / "cache", data, **{"dataset.max_pixels": 3000}))
    emb = load_embedding(h.path)
    rows = sorted(p for p, e in expect.items() if e == "row")
    assert emb.paths == rows
    skipped = dict(line.split("\t", 1) for line in emb.skipped)
    assert sorted(skipped) == sorted(p for p, e in expect.items() if e != "row")
    for path, reason in skipped.items():
        assert reason.startswith(expect[path]), (path, reason)
        if "Decompression" in reason:
            assert "dataset.max_pixels=3000" in reason
    # none silently: every file is a row or a skip, and meta.json counts them; the GIF is read as the GIF it is
    assert h.meta["n_images"] + h.meta["n_skipped"] == h.meta["n_dataset"] == len(expect)
    assert h.meta["image_modes"] == {"CMYK": 1, "I;16": 1, "P": 1, "RGB": 4}
    assert np.isfinite(emb.features).all() and not (emb.features == 0).all(axis=1).any()
    # PIL's default limit (dataset.max_pixels=null) reads the two large images: another key, two more rows
    default = get_embedding(light(tmp_path / "cache", data))
    assert default.key != h.key and default.meta["n_skipped"] == 3
    assert "b/bomb_warn.png" in load_embedding(default.path).paths


def test_max_pixels_is_validated(tmp_path, light):
    from featstudy.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dataset.max_pixels: 0 must be a positive integer"):
        plan(light(tmp_path, tmp_path, **{"dataset.max_pixels": 0}))


def _images(root: Path, n: int) -> Path:
    rng = np.random.default_rng(3)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        _rgb(rng, 40, 42).save(root / f"c{i % 2}" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Twelve images and their embedding from an uninterrupted run (batch 3: four shards)."""
    from omegaconf import OmegaConf

    root = tmp_path_factory.mktemp("ref")
    data = _images(root / "data", 12)
    cfg = OmegaConf.create({
        "model": LIGHT_MODEL, "pooling": {"_target_": "featstudy.pooling.Pooling", "name": "avg"}, "crops": {"_target_": "featstudy.transforms.CropSpec", "name": "center", "resize": 36, "size": 32},
        "dataset": {"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(data), "split": "all", "download": False},
        "loader": {"batch_size": 3, "num_workers": 0},
        "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true"},
        "paths": {"cache_dir": str(root / "cache")}})
    return data, cfg, load_embedding(get_embedding(cfg).path)


def _with_cache(cfg, cache: Path):
    cfg = cfg.copy()
    cfg.paths.cache_dir = str(cache)
    return cfg


@pytest.mark.parametrize("fail_at", ["second shard", "features.npy", "meta.json", "DONE"])
def test_full_disk_is_one_line_naming_the_cache_and_nothing_half_written_is_done(fail_at, tmp_path, reference,
                                                                                monkeypatch):
    data, ref_cfg, ref = reference
    cache = tmp_path / "cache"
    cfg = _with_cache(ref_cfg, cache)
    real_replace = os.replace
    shards_done = []

    def full_disk(src, dst, *a, **k):  # the disk fills up at the rename that would commit ``fail_at``
        name = Path(dst).name
        if name.startswith("shard-"):
            shards_done.append(name)
        hit = len(shards_done) == 2 and name.startswith("shard-") if fail_at == "second shard" else name == fail_at
        if hit and str(cache) in str(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(DataError) as err:
        get_embedding(cfg)
    msg = str(err.value)
    assert msg.startswith("paths.cache_dir:") and str(cache) in msg and "No space left on device" in msg
    assert "\n" not in msg
    monkeypatch.setattr(os, "replace", real_replace)
    folder = cache / "embeddings" / plan(cfg).key
    assert not is_complete(folder)
    with pytest.raises(EmbeddingError, match="unfinished"):
        load_embedding(folder)
    assert not list(folder.rglob("*.tmp")) and not list(folder.glob(".*.npy"))  # no temp file left behind
    again = get_embedding(cfg)  # space is back: resumes from the finished shards, the same numbers
    expected_resumed = 3 if fail_at == "second shard" else 12
    assert not again.hit and again.meta["n_resumed"] == expected_resumed
    got = load_embedding(again.path)
    assert got.paths == ref.paths
    np.testing.assert_array_equal(got.features, ref.features)


def test_cache_folder_that_cannot_be_created_is_one_line(tmp_path, reference):
    _, ref_cfg, _ = reference
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache should be")
    with pytest.raises(DataError, match=r"^paths.cache_dir: cannot write the embedding cache under .*not-a-folder"):
        get_embedding(_with_cache(ref_cfg, blocker / "cache"))


def _die(cfg_file: Path, spec: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FEATSTUDY_TEST_DIE_AT": spec}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(cfg_file)], capture_output=True, text=True, env=env,
                          cwd=SCRIPT.parent, timeout=300)
    assert proc.returncode == 137, proc.stderr[-3000:]


def test_killed_at_each_kind_of_moment_the_reruns_finish_it_identically(tmp_path, reference):
    """Three processes die like ``kill -9`` (``os._exit``: no cleanup) one after the other, each resuming the
    previous: between writing a shard and renaming it, in the merge after features.npy is in place but before
    meta.json, and right after DONE (the shards not yet deleted). Nothing half-written is taken as done, no finished
    shard is redone, and the result equals an uninterrupted run."""
    from omegaconf import OmegaConf

    data, ref_cfg, ref = reference
    cfg = _with_cache(ref_cfg, tmp_path / "cache")
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    folder = tmp_path / "cache" / "embeddings" / plan(cfg).key
    shards = folder / "shards"

    _die(tmp_path / "cfg.yaml", "before:shard-:3")  # the third shard is written but never renamed
    finished = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.npz")}
    assert len(finished) == 2 and list(shards.glob(".shard-*.tmp")) and not is_complete(folder)

    _die(tmp_path / "cfg.yaml", "before:meta.json:1")  # resumed, merged half-way, killed
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.npz")}.items() >= finished.items()
    assert len(list(shards.glob("shard-*.npz"))) == 4 and (folder / "features.npy").is_file()
    assert not is_complete(folder) and list(folder.glob(".meta.json.*.tmp"))
    with pytest.raises(EmbeddingError, match="unfinished"):
        load_embedding(folder)

    _die(tmp_path / "cfg.yaml", "after:DONE:1")  # merged again from the same shards, killed before the cleanup
    assert is_complete(folder) and shards.is_dir()
    handle = get_embedding(cfg)
    assert handle.hit and not shards.exists() and not list(folder.glob(".*"))
    got = load_embedding(handle.path)
    assert got.paths == ref.paths and got.meta["n_resumed"] == 12
    np.testing.assert_array_equal(got.features, ref.features)
