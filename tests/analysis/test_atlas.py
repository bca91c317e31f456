"""The atlas callback (issue 15): its page's data against the hand table of conftest.py and independent
computations (oracle.py, scipy, brute force), hostile names kept as data, crops written once per feature, bad
settings in one line, an atlas that cannot be written leaves the run going."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import numpy as np
import pytest
from oracle import bh, d_random, signed_d, thresholds

from featstudy.analysis.atlas import AtlasCallback, decode_strips, read_data
from featstudy.errors import ConfigError

#: conftest.py's D table with t+ = 0.375, t- = -0.375: per class, features by presence (D > t+, decreasing D, ties
#: by index) and by absence (D < t-, increasing D)
HAND = {"a": ([1, 5], [0, 3, 4]), "b": ([3, 0, 1], [5]), "c": ([0, 5], [1, 3])}
HAND_IRRELEVANT = {"conv1_1": [2], "conv5_4": [], "fc7": [6, 7]}


def _oracle(tiny):
    d = signed_d(tiny.features, tiny.labels, 3)[0]
    th = thresholds(d, d_random(tiny.features, tiny.labels, 3, 1, 0))
    return d, th["t_plus"], th["t_minus"]


def _ranked(d, t_plus, t_minus):
    """Per class, by a plain sort of (−D, index) / (D, index) pairs."""
    out = []
    for c in range(d.shape[1]):
        pos = [f for _, f in sorted((-d[f, c], f) for f in range(d.shape[0]) if d[f, c] > t_plus)]
        neg = [f for _, f in sorted((d[f, c], f) for f in range(d.shape[0]) if d[f, c] < t_minus)]
        out.append((pos, neg))
    return out


def _auroc(x, labels, c):
    inside, outside = x[labels == c], x[labels != c]
    return float(np.mean([(a > b) + 0.5 * (a == b) for a in inside for b in outside]))


def test_page_data_is_the_hand_table(tiny):
    from scipy import stats as sps

    from featstudy.analysis.selectivity import SelectivityCallback

    ctx = tiny.context()
    SelectivityCallback(formats=[]).run(ctx)  # its AUROC reaches the atlas through the context
    result = AtlasCallback(crops_per_feature=0).run(ctx)
    page = tiny.out / "atlas" / "index.html"
    assert result.files == [page] and result.metrics["atlas_written"] == 1.0
    data = read_data(page)
    d, t_plus, t_minus = _oracle(tiny)
    assert (t_plus, t_minus) == (0.375, -0.375) == (data["t_plus"], data["t_minus"])
    assert [tuple(x) for x in _ranked(d, t_plus, t_minus)] == [HAND[c] for c in tiny.classes]
    assert data["classes"] == tiny.classes and data["features"] == tiny.feature_names
    assert [[e[0] for e in lst] for lst in data["pos"]] == [HAND[c][0] for c in tiny.classes]
    assert [[e[0] for e in lst] for lst in data["neg"]] == [HAND[c][1] for c in tiny.classes]
    # the two-sided KS p of scipy (exact), then BH over the F x C pairs: the q shown beside D
    p = np.array([[sps.ks_2samp(tiny.features[tiny.labels != c, f], tiny.features[tiny.labels == c, f],
                                method="exact").pvalue for c in range(3)] for f in range(8)])
    q = bh(p)
    for c in range(3):
        for f, dv, qv, auc in data["pos"][c] + data["neg"][c]:
            assert dv == pytest.approx(d[f, c], abs=1e-4)
            assert qv == float(f"{q[f, c]:.3g}")  # 3 significant digits
            assert auc == pytest.approx(_auroc(tiny.features[:, f], tiny.labels, c), abs=1e-4)
    assert np.abs(decode_strips(data) / 127 - d).max() <= 0.5 / 127 + 1e-12
    assert data["n_pos"] == [int((d[:, c] > t_plus).sum()) for c in range(3)]
    assert data["n_neg"] == [int((d[:, c] < t_minus).sum()) for c in range(3)]
    assert data["fpos"] == [[c for c in range(3) if d[f, c] > t_plus] for f in range(8)]
    assert data["fneg"] == [[c for c in range(3) if d[f, c] < t_minus] for f in range(8)]
    assert [L["name"] for L in data["layers"]] == tiny.layers
    assert {L["name"]: L["irrelevant"] for L in data["layers"]} == HAND_IRRELEVANT
    layer = np.array([n.split(":")[0] for n in tiny.feature_names])
    for L in data["layers"]:
        counts, _ = np.histogram(d[layer == L["name"]].ravel(), bins=np.linspace(-1, 1, 41))
        assert L["hist"] == counts.tolist() and L["n"] == int((layer == L["name"]).sum())
        kept = ((d[layer == L["name"]] > t_plus) | (d[layer == L["name"]] < t_minus)).mean()
        assert L["kept"] == pytest.approx(kept)
    assert data["kept"] == pytest.approx(((d > t_plus) | (d < t_minus)).mean())
    assert data["n_in"] == [4, 4, 4] and data["n_images"] == 12
    assert data["random_weights"] is True and data["weights"] == "random" and data["model"] == "vgg19"
    assert data["run_id"] is None and data["crops"] == {}


def test_top_k_and_run_id(tiny):
    from featstudy.analysis import AnalysisContext
    from featstudy.store import load_embedding

    ctx = AnalysisContext(load_embedding(tiny.folder), tiny.context().analysis, tiny.out, "tiny", run_id="r123")
    data = AtlasCallback(top_k=1, crops_per_feature=0).run(ctx).objects["data"]
    assert [[e[0] for e in lst] for lst in data["pos"]] == [HAND[c][0][:1] for c in tiny.classes]
    assert [[e[0] for e in lst] for lst in data["neg"]] == [HAND[c][1][:1] for c in tiny.classes]
    assert data["run_id"] == "r123" and data["has_auroc"] is False
    assert all(e[3] is None for lst in data["pos"] for e in lst)


HOSTILE = ["<img src=x onerror=alert(1)>", "</script><script>alert(2)</script>", "a & \u2028 \"b\" 'c'"]


def hostile_context(tmp_path: Path, tiny):
    """The tiny embedding (the ``tiny`` fixture's arrays) with hostile class and feature names."""
    FEATURE_NAMES, FEATURES, LABELS = tiny.feature_names, tiny.features, tiny.labels

    from featstudy.analysis import AnalysisContext
    from featstudy.store import load_embedding, write_embedding

    names = [n if i != 4 else "conv5_4:<b>4</b>" for i, n in enumerate(FEATURE_NAMES)]
    folder = write_embedding(tmp_path / "hostile", features=FEATURES, labels=LABELS, classes=HOSTILE,
                             paths=[f"c{c}/{i}.png" for i, c in enumerate(LABELS)], feature_names=names,
                             meta={"dataset": {"name": "tiny<script>", "root": None}, "model": "vgg19",
                                   "weights": "random"})
    settings = {"bins": None, "permutations": 1, "seed": 0, "layers": None, "chunk_size": None}
    return AnalysisContext(load_embedding(folder), settings, tmp_path / "out", "tiny</script><b>x</b>")


def test_hostile_names_stay_data(tmp_path, tiny):
    ctx = hostile_context(tmp_path, tiny)
    AtlasCallback(crops_per_feature=0).run(ctx)
    page = tmp_path / "out" / "atlas" / "index.html"
    text = page.read_text(encoding="utf-8")
    assert text.count("</script>") == 2  # the data block's and the code's, none from a name
    assert "<img src=x" not in text and "<b>x</b>" not in text and "\u2028" not in text
    data = read_data(page)
    assert data["classes"] == HOSTILE and data["dataset"] == "tiny</script><b>x</b>"
    assert data["features"][4] == "conv5_4:<b>4</b>"
    assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text


@pytest.mark.parametrize("kwargs,key", [
    ({"colour": "red"}, "analysis.callbacks.atlas.colour"),
    ({"top_k": 0}, "analysis.callbacks.atlas.top_k"),
    ({"top_k": "many"}, "analysis.callbacks.atlas.top_k"),
    ({"crops_per_feature": -1}, "analysis.callbacks.atlas.crops_per_feature"),
    ({"jpeg_quality": 0}, "analysis.callbacks.atlas.jpeg_quality"),
    ({"jpeg_quality": 100}, "analysis.callbacks.atlas.jpeg_quality"),
    ({"crop_px": True}, "analysis.callbacks.atlas.crop_px"),
    ({"step": 2}, "analysis.callbacks.atlas.step"),
    ({"crops_of": "shown"}, "analysis.callbacks.atlas.crops_of"),
])
def test_bad_settings_are_one_line_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        AtlasCallback(**kwargs)
    assert key in str(err.value) and "\n" not in str(err.value)


def fake_crops(monkeypatch, calls: list):
    """Most activating images without a dataset: one grey square per (feature, rank); rank 2 unreadable."""
    from featstudy.analysis import images

    def top_images_many(self, names, n):
        calls.extend(names)
        return {name: [None if k == 2 else np.full((96, 96, 3), (40 * i + 30 * k) % 255, dtype=np.uint8)
                       for k in range(n)] for i, name in enumerate(names)}

    monkeypatch.setattr(images.ImageSource, "top_images_many", top_images_many)


def test_crops_once_per_feature_shown(tiny, monkeypatch):
    from PIL import Image

    calls: list[str] = []
    fake_crops(monkeypatch, calls)
    result = AtlasCallback(crops_per_feature=3, crop_px=40, jpeg_quality=70).run(tiny.context())
    data = result.objects["data"]
    shown = sorted({f for c in tiny.classes for f in HAND[c][0] + HAND[c][1]})
    assert sorted(calls) == sorted(tiny.feature_names[j] for j in shown)  # each feature asked once
    assert data["crops"] == {str(j): 2 for j in shown}  # rank 2 could not be read: two crops each
    img = tiny.out / "atlas" / "img"
    assert sorted(p.name for p in img.iterdir()) == sorted(f"f{j}_{k}.jpg" for j in shown for k in range(2))
    assert result.files == [tiny.out / "atlas" / "index.html", img]  # the crops' folder: logged in one call
    assert sorted(result.objects["crops"]) == sorted(img.iterdir())
    with Image.open(img / f"f{shown[0]}_0.jpg") as im:
        assert im.format == "JPEG" and im.size == (40, 40)
    assert result.metrics["atlas_crops"] == 2 * len(shown)


def test_crops_of_all_gives_every_feature_its_images(tiny, monkeypatch):
    calls: list[str] = []
    fake_crops(monkeypatch, calls)
    result = AtlasCallback(crops_per_feature=2, crops_of="all").run(tiny.context())
    assert sorted(calls) == sorted(tiny.feature_names)  # also the features no class view lists
    n = len(tiny.feature_names)
    assert result.objects["data"]["crops"] == {str(j): 2 for j in range(n)}
    assert sorted(p.name for p in (tiny.out / "atlas" / "img").iterdir()) == sorted(
        f"f{j}_{k}.jpg" for j in range(n) for k in range(2))


def test_crops_that_fail_leave_the_page(tiny, monkeypatch, caplog):
    from featstudy.analysis import images

    def broken(self, names, n):
        raise RuntimeError("weights not in the local cache\nsecond line")

    monkeypatch.setattr(images.ImageSource, "top_images_many", broken)
    with caplog.at_level(logging.WARNING):
        result = AtlasCallback().run(tiny.context())
    assert result.metrics["atlas_written"] == 1.0 and result.files == [tiny.out / "atlas" / "index.html"]
    assert read_data(result.files[0])["crops"] == {}
    assert [r.getMessage() for r in caplog.records if r.name.endswith("atlas")] == [
        "atlas: no image crops (RuntimeError: weights not in the local cache); the page is written without them"]


def test_unwritable_atlas_is_one_line_and_the_run_goes_on(tiny, caplog):
    tiny.out.mkdir(parents=True)
    (tiny.out / "other.txt").write_text("kept")
    (tiny.out / "atlas").write_text("a file where the folder should be")
    with caplog.at_level(logging.ERROR):
        result = AtlasCallback(crops_per_feature=2).run(tiny.context())
    assert result.metrics == {"atlas_written": 0.0} and result.files == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("atlas: not written") and "\n" not in errors[0]
    assert (tiny.out / "other.txt").read_text() == "kept"


def test_full_disk_is_one_line(tiny, caplog, monkeypatch):
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with caplog.at_level(logging.ERROR):
        result = AtlasCallback(crops_per_feature=0).run(tiny.context())
    assert result.metrics == {"atlas_written": 0.0}
    line = (f"atlas: not written (No space left on device: {tiny.out / 'atlas' / 'index.html'}); the run's other "
            "outputs stay")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [line]


@pytest.mark.slow
def test_a_run_logs_its_atlas_with_its_run_id(tmp_path, image_folder, helpers):
    """Through :func:`featstudy.app.run` (a tiny image folder, resnet18 at random weights, MLflow in tmp_path): the
    page carries the run's id, the page and its crops' folder are artifacts at atlas/index.html and atlas/img/."""
    from mlflow.tracking import MlflowClient

    from featstudy import app

    cfg = helpers.compose([*helpers.tiny_overrides(tmp_path, image_folder), "model=torchvision",
                           "model.name=resnet18", "model.weights=random", "model.nodes=[layer1,flatten]",
                           "crops=center", "crops.resize=36", "crops.size=32", "~analysis.callbacks.figures",
                           "~analysis.callbacks.null", f"paths.output_dir={tmp_path}/out"])
    metrics, objects = app.run(cfg)
    run_id = objects["run_id"]
    assert run_id and metrics["atlas_written"] == 1.0 and metrics["atlas_crops"] > 0
    data = read_data(tmp_path / "out" / "atlas" / "index.html")
    assert data["run_id"] == run_id and data["has_auroc"] is True  # the selectivity callback ran before
    client = MlflowClient(str(cfg.tracking.uri))
    assert {f.path for f in client.list_artifacts(run_id, "atlas")} == {"atlas/index.html", "atlas/img"}
    logged = sorted(f.path for f in client.list_artifacts(run_id, "atlas/img"))
    assert logged == sorted(f"atlas/img/{p.name}" for p in (tmp_path / "out" / "atlas" / "img").iterdir())
    assert len(logged) == metrics["atlas_crops"] == sum(data["crops"].values())
