"""Analysis helpers with exact answers: receptive fields, mode intervals, Table 3, the ImageNet image source."""

from __future__ import annotations

import numpy as np
import pytest

from featstudy.analysis import images, plots
from featstudy.analysis.thresholds import table3_rows
from featstudy.store import load_embedding, write_embedding


def test_vgg19_receptive_fields():
    rf = images.receptive_fields()
    assert rf["conv1_1"] == (3, 1, 0.5)
    assert rf["conv1_2"][:2] == (5, 1)
    assert rf["conv2_1"][:2] == (10, 2)
    assert rf["conv3_1"][:2] == (24, 4)
    assert rf["conv3_4"][:2] == (48, 4)
    assert rf["conv4_1"][:2] == (68, 8)
    assert rf["conv5_1"][:2] == (156, 16)
    assert rf["conv5_4"][:2] == (252, 16)
    assert "fc7" not in rf


def test_rf_box_is_centred_and_clipped():
    # conv3_1: size 24, jump 4, position (5, 5) is centred at 0.5 + 5*4 ... in pixel units
    top, left, bottom, right = images.rf_box("conv3_1", 5, 5, 224)
    assert bottom - top == 24 and right - left == 24
    assert images.rf_box("conv5_4", 0, 0, 32) == (0, 0, 32, 32)
    assert images.rf_box("fc7", 0, 0, 32) is None


def test_mode_interval_holds_68_percent_around_the_mode():
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 0.05, 200_000)
    mode, lo, hi = plots.mode_interval(x, 0.0, 1.0, bins=100)
    assert mode == pytest.approx(0.3, abs=0.011)
    assert np.mean((x >= lo) & (x <= hi)) == pytest.approx(0.68, abs=0.01)
    assert lo < mode < hi and hi - lo == pytest.approx(0.1, abs=0.005)  # about 2 sigma
    assert all(np.isnan(plots.mode_interval(np.array([]), 0, 1)))


def test_split_low_high_follows_the_paper():
    layers = ["conv1_1", "conv5_3", "conv5_4", "fc7"]
    assert plots.split_low_high(layers) == (["conv1_1", "conv5_3"], ["conv5_4", "fc7"])
    assert plots.split_low_high(["a", "b", "c"]) == (["a"], ["b", "c"])


def test_table3_counts_and_marks_analysed_layers():
    rows = table3_rows(["conv1_1"] * 64 + ["fc7"] * 4096, {"fc7"})
    assert rows == [["conv1_1", 64, "no"], ["fc7", 4096, "yes"], ["Total", 4160, "4096"]]


def _embedding(folder, dataset, weights="random", names=("conv1_1:0", "conv1_1:1", "fc7:0"), n=12):
    rng = np.random.default_rng(0)
    return write_embedding(folder, features=rng.random((n, len(names))), labels=np.arange(n) % 3,
                           classes=["a", "b", "c"], paths=[f"x/{i}.png" for i in range(n)], feature_names=list(names),
                           meta={"dataset": {"name": dataset, "root": None}, "weights": weights, "model": "vgg19"})


def test_imagenet_embedding_of_the_same_network_supplies_the_images(tmp_path):
    root = tmp_path / "embeddings"
    own = load_embedding(_embedding(root / "cub", "cub200"))
    assert images.find_imagenet_embedding(own) is None
    _embedding(root / "inet_other_weights", "imagenet_val", weights="IMAGENET1K_V1")
    _embedding(root / "inet_other_layers", "imagenet_val", names=("conv1_1:0", "fc7:0", "fc7:1"))
    assert images.find_imagenet_embedding(own) is None
    _embedding(root / "inet", "imagenet_val")
    found = images.find_imagenet_embedding(own)
    assert found is not None and found.path == root / "inet"


def test_top_features_figure_renders_rows_with_missing_cells(tmp_path):
    rows = [{"label": "fc7:1\nb\nD=+0.9", "images": [np.zeros((8, 8, 3), np.uint8), None]},
            {"label": "conv1_1:0\na\nD=-0.8", "images": [np.full((8, 8), 200, np.uint8)],
             "class_images": [np.zeros((8, 8, 3), np.uint8)], "class_label": "class a"}]
    files = plots.save_figure(plots.fig_top_features(rows, "t"), tmp_path, "fig2", ["png"], 50)
    assert files == [tmp_path / "fig2.png"] and files[0].stat().st_size > 1000


def test_report_draws_fig8_when_imagenet_is_among_the_runs(tmp_path):
    from featstudy.report import build_report

    rng = np.random.default_rng(0)
    layer_of = np.array(["conv1_1"] * 4 + ["conv5_4"] * 2 + ["fc7"] * 2)
    runs = [{"run_id": f"r{i}", "dataset": name} for i, name in enumerate(["cub200", "mit67", "imagenet_val"])]
    arrays = {r["run_id"]: {"d": rng.uniform(-1, 1, (8, 5)), "layer_of_feature": layer_of} for r in runs}
    tables = {r["run_id"]: [{"dataset": r["dataset"], "t_plus": "0.1"}] for r in runs}
    files = build_report(runs, arrays, tables, tmp_path, ["png"])
    names = {f.relative_to(tmp_path).as_posix() for f in files}
    assert names == {"figures/fig5.png", "figures/fig6.png", "figures/fig8.png", "tables/table4.csv"}
    assert (tmp_path / "tables" / "table4.csv").read_text().splitlines() == [
        "dataset,t_plus,run_id", "cub200,0.1,r0", "mit67,0.1,r1", "imagenet_val,0.1,r2"]
    files = build_report(runs[:2], arrays, tables, tmp_path / "no_imagenet", ["png"])
    assert not any(f.name == "fig8.png" for f in files)
