"""The embedding folder: written atomically, read memory-mapped, unfinished folders refused."""

import numpy as np
import pytest

from featstudy.store import EmbeddingError, is_complete, load_embedding, write_embedding


def _write(tmp_path, **over):
    rng = np.random.default_rng(0)
    kw = dict(
        features=rng.random((5, 4), dtype=np.float32),
        labels=np.array([0, 1, 0, 1, 1]),
        classes=["a", "b"],
        paths=[f"img{i}.png" for i in range(5)],
        feature_names=["conv1_1:0", "conv1_1:1", "fc7:0", "fc7:1"],
        meta={"model": "vgg19"},
        skipped=["bad.jpg\ttruncated"],
    )
    kw.update(over)
    return write_embedding(tmp_path / "emb", **kw), kw


def test_roundtrip_is_memory_mapped(tmp_path):
    folder, kw = _write(tmp_path)
    emb = load_embedding(folder)
    assert isinstance(emb.features, np.memmap)
    np.testing.assert_array_equal(emb.features, kw["features"])
    assert emb.labels.dtype == np.int64
    assert emb.classes == ["a", "b"]
    assert emb.layers == ["conv1_1", "fc7"]
    assert emb.skipped == ["bad.jpg\ttruncated"]
    np.testing.assert_array_equal(emb.layer_columns(["fc7"]), [2, 3])


def test_unknown_layer_names_valid_ones(tmp_path):
    folder, _ = _write(tmp_path)
    with pytest.raises(EmbeddingError, match=r"analysis.layers.*conv9_9.*conv1_1"):
        load_embedding(folder).layer_columns(["conv9_9"])


def test_unfinished_folder_is_refused(tmp_path):
    folder, _ = _write(tmp_path)
    (folder / "DONE").unlink()
    assert not is_complete(folder)
    with pytest.raises(EmbeddingError, match="unfinished"):
        load_embedding(folder)


def test_inconsistent_folder_is_refused(tmp_path):
    folder, _ = _write(tmp_path, paths=["only-one.png"])
    with pytest.raises(EmbeddingError, match="inconsistent"):
        load_embedding(folder)


# -- issue 10: names with line separators, checksums at DONE, empty classes ------------------------------------------

AWKWARD = ["a\nb.png", "c\rd.png", "e\r\nf.png", "g\u2028h.png", "i\u2029j.png", "k\x85l.png", "m\x0bn.png",
           "o\x0cp.png", "q\x1cr\x1ds\x1et.png", "tab\tbed.png", "back\\slash.png", "literal\\n.png", "end\\",
           "", "plain.png"]


def test_every_name_round_trips_and_files_hold_one_line_per_item(tmp_path):
    n = len(AWKWARD)
    classes = ["x\u2028y", "z\nw"]
    folder, _ = _write(tmp_path, features=np.zeros((n, 4), np.float32), labels=np.arange(n) % 2, paths=AWKWARD,
                       classes=classes, skipped=["bad\nname.png\tOSError: broken", "tab\there.png\tValueError: x"])
    emb = load_embedding(folder)
    assert emb.paths == AWKWARD and emb.classes == classes
    assert emb.skipped == ["bad\nname.png\tOSError: broken", "tab\there.png\tValueError: x"]
    for name, count in (("paths.txt", n), ("classes.txt", 2), ("skipped.txt", 2)):
        text = (folder / name).read_bytes().decode("utf-8")
        assert text.endswith("\n") and text.count("\n") == count and "\r" not in text and "\t" not in text.replace(
            "\tOSError", "").replace("\tValueError", "")


def test_manifest_records_every_file_and_names_the_damaged_one(tmp_path):
    import hashlib
    import json

    folder, _ = _write(tmp_path)
    manifest = json.loads((folder / "DONE").read_text(encoding="utf-8"))
    assert manifest["algorithm"] == "sha256"
    assert sorted(manifest["files"]) == sorted(p.name for p in folder.iterdir() if p.name != "DONE")
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    load_embedding(folder)  # verified once in this process...
    raw = bytearray((folder / "labels.npy").read_bytes())
    raw[-8:] = np.int64(7).tobytes()  # ...then edited, the size unchanged
    (folder / "labels.npy").write_bytes(bytes(raw))
    with pytest.raises(EmbeddingError, match=r"labels\.npy: damaged embedding cache entry: content changed"):
        load_embedding(folder)


def test_entry_without_manifest_is_refused(tmp_path):
    folder, _ = _write(tmp_path)
    (folder / "DONE").write_text("")  # as the previous format wrote it
    with pytest.raises(EmbeddingError, match=r"DONE: damaged embedding cache entry: holds no checksum manifest"):
        load_embedding(folder)


def test_classes_without_rows_are_recorded_after_the_image_lines(tmp_path):
    folder, _ = _write(tmp_path, labels=np.array([0, 2, 0, 2, 2]), classes=["a", "b", "c", "d"],
                       class_sizes=[2, 4, 3, 0])
    emb = load_embedding(folder)
    assert emb.empty_classes == ["b", "d"] and emb.meta["empty_classes"] == ["b", "d"]
    assert emb.skipped == ["bad.jpg\ttruncated"]
    assert (folder / "skipped.txt").read_text(encoding="utf-8").split("\n") == [
        "bad.jpg\ttruncated", "class:b\tdropped: all its 4 images were skipped", "class:d\tdropped: it holds no images",
        ""]
