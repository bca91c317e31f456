"""A class whose every image is unreadable is dropped everywhere, consistently, and said so (issue 10, item 1).

Real jobs on a tiny image folder (resnet18 at random weights, the real SQLite store): class_1's images are all
garbage bytes. Expected values come from numpy/scipy on the cached ``features.npy`` (tests/analysis/oracle.py), with
the class columns re-indexed by hand: the stored labels are 0 and 2, the analysed columns are class_0 and class_2.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("analysis_oracle", Path(__file__).parents[1] / "analysis" / "oracle.py")
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)


def break_class(images: Path, name: str) -> list[str]:
    """Overwrite every image of class ``name`` with bytes no decoder reads; returns their relative paths."""
    broken = []
    for f in sorted((images / name).iterdir()):
        f.write_bytes(b"not an image at all " * 4)
        broken.append(f"{name}/{f.name}")
    return broken


def overrides(root: Path, images: Path, helpers) -> list[str]:
    return [*helpers.tiny_overrides(root, images), "model=torchvision", "model.name=resnet18", "model.weights=random",
            "model.nodes=[layer1,flatten]", "crops=center", "crops.resize=36", "crops.size=32",
            "analysis.permutations=1", "analysis.bins=null", "analysis.threshold_step=0.01"]


@pytest.fixture(scope="module")
def dropped(tmp_path_factory, helpers):
    """One real job with class_1 unreadable; the run's objects, its MLflow run and the files it wrote."""
    from mlflow.tracking import MlflowClient

    from featstudy import app

    root = tmp_path_factory.mktemp("empty_class")
    images = helpers.make_image_folder(root / "images", n_classes=3, per_class=6)
    broken = break_class(images, "class_1")
    cfg = helpers.compose([*overrides(root, images, helpers), f"paths.output_dir={root}/out"])
    metrics, objects = app.run(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db")
    run = client.get_run(objects["run_id"])
    return {"root": root, "out": root / "out", "objects": objects, "run": run, "broken": broken,
            "emb": Path(objects["embedding"].path)}


def test_d_has_one_column_per_class_with_images_named_after_it(dropped):
    emb, out = dropped["emb"], dropped["out"]
    x, stored = np.load(emb / "features.npy"), np.load(emb / "labels.npy")
    assert sorted(set(stored.tolist())) == [0, 2]  # the store indexes classes.txt, class_1 has no row
    labels = np.where(stored == 2, 1, 0)  # by hand: class_0 -> column 0, class_2 -> column 1
    d, _, _ = oracle.signed_d(x, labels, 2)
    with np.load(out / "arrays" / "ks.npz") as z:
        assert z["classes"].tolist() == ["class_0", "class_2"]
        assert z["n_in"].tolist() == [6, 6] and z["d"].shape == (x.shape[1], 2)
        np.testing.assert_allclose(z["d"], d, atol=1e-12)
    with open(out / "tables" / "table4.csv", newline="", encoding="utf-8") as fh:
        [row] = list(csv.DictReader(fh))
    assert row["n_classes"] == "2"


def test_figures_name_only_classes_with_images(dropped):
    figs = dropped["objects"]["results"]["figures"].objects["figures"]
    named = {ax.get_ylabel().split("\n")[1] for name in ("fig2", "fig3") for ax in figs[name].axes}
    assert named and named <= {"class_0", "class_2"}
    from matplotlib.colors import to_rgba

    [ax9] = figs["fig9"].axes  # one black curve per class with images, one red per class and permutation
    curves = [line for line in ax9.lines if len(line.get_xdata()) > 2]
    colours = [to_rgba(line.get_color())[:3] for line in curves]
    assert colours.count((0.0, 0.0, 0.0)) == 2 and len(curves) == 4


def test_mlflow_records_the_dropped_class(dropped):
    run = dropped["run"]
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.tags["empty_classes"]) == ["class_1"]
    m = run.data.metrics
    assert (m["n_classes"], m["n_empty_classes"], m["n_skipped_images"], m["n_images"]) == (2, 1, 6, 12)


def test_meta_json_and_skipped_txt_record_the_dropped_class(dropped):
    emb, out = dropped["emb"], dropped["out"]
    meta = json.loads((emb / "meta.json").read_text(encoding="utf-8"))
    assert meta["empty_classes"] == ["class_1"]
    for folder in (emb, out):
        lines = (folder / "skipped.txt").read_text(encoding="utf-8").split("\n")[:-1]
        assert sorted(line.split("\t")[0] for line in lines[:6]) == dropped["broken"]
        assert lines[6:] == ["class:class_1\tdropped: all its 6 images were skipped"]


def test_fewer_than_two_classes_left_is_refused_in_one_line_naming_them(tmp_path, helpers):
    images = helpers.make_image_folder(tmp_path / "images", n_classes=2, per_class=4)
    break_class(images, "class_0")
    proc = subprocess.run([sys.executable, "-m", "featstudy", *overrides(tmp_path, images, helpers),
                           "~analysis.callbacks.figures", "~analysis.callbacks.null"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("featstudy: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "dataset.root" in errors[0] and "['class_0']" in errors[0] and "two classes or more" in errors[0]
    assert (tmp_path / "outputs").exists()
    [status] = list((tmp_path / "outputs").rglob("status.txt"))
    assert status.read_text().startswith("FAILED")
