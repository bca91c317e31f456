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
