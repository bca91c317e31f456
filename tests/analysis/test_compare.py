"""The report's comparison page (featstudy.analysis.compare): which features describe every dataset, one dataset
only, some or none, per layer, against a hand table (below) and an independent loop implementation on random data;
then through ``featstudy.report.main`` on the real SQLite store of test_report.py (thresholds from Table 4, or
recomputed by Eq. 4 with oracle.py when a run has no table; the page logged as the report run's artifact).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from oracle import thresholds as oracle_thresholds
from test_report import find_report_run, run_main, store  # noqa: F401 - the module's store fixture

from featstudy.analysis.compare import CompareRun, build_compare_data, write_compare_page
from featstudy.analysis.page_kit import read_data

# ------------------------------------------------------------------------------------------- the hand table
# Three datasets, six features in two layers (L1: f0-f3, L2: f4, f5); each run its own thresholds.
#   A: t+ 0.3, t- -0.3 (2 classes)   B: t+ 0.5, t- -0.4 (3 classes)   C: t+ 0.2, t- -0.2 (2 classes)
# Strictness: D = t+ or D = t- describes nothing (A f1, B f4). B f1 = 0.45 would describe with A's t+ (0.3).
#   feature  described in   category
#   f0       A, B, C        shared
#   f1       -              none
#   f2       A, C           some
#   f3       B              only B
#   f4       A              only A
#   f5       -              none          (C f5 = -0.19 / 0.19: inside C's thresholds)
FEATURES = ["L1:0", "L1:1", "L1:2", "L1:3", "L2:0", "L2:1"]
LAYERS = ["L1"] * 4 + ["L2"] * 2
D_A = np.array([[0.31, -0.1], [0.3, -0.3], [0.0, -0.5], [0.1, 0.1], [0.35, 0.9], [0.0, 0.0]])
D_B = np.array([[0.6, -0.45, 0.0], [0.45, 0.0, 0.0], [0.0, 0.0, 0.0], [-0.41, 0.0, 0.2], [0.0, 0.5, 0.0],
                [0.0, 0.0, 0.0], [0.9, 0.9, 0.9]])  # a seventh feature (L3:0) only B analysed
D_C = np.array([[0.25, 0.0], [0.0, 0.0], [0.21, -0.21], [0.0, 0.0], [0.0, 0.0], [-0.19, 0.19]])
C_ORDER = [5, 2, 0, 4, 1, 3]  # C's rows in another order: features are matched by name, not by row


def hand_runs() -> list[CompareRun]:
    return [CompareRun("A", "ra", D_A, FEATURES, LAYERS, ["a0", "a1"], 0.3, -0.3),
            CompareRun("B", "rb", D_B, FEATURES + ["L3:0"], LAYERS + ["L3"], ["b0", "b1", "b2"], 0.5, -0.4),
            CompareRun("C", "rc", D_C[C_ORDER], [FEATURES[i] for i in C_ORDER], [LAYERS[i] for i in C_ORDER],
                       ["c0", "c1"], 0.2, -0.2)]


def test_hand_table_categories_counts_and_layers():
    data = build_compare_data(hand_runs(), top_classes=5)
    assert data["features"] == FEATURES  # B's extra feature left out, network order kept
    assert data["left_out"] == {"A": 0, "B": 1, "C": 0}
    assert data["category"] == [-3, -1, -2, 1, 0, -1]
    assert data["layers"] == [
        {"name": "L1", "n": 4, "shared": 1, "some": 1, "none": 1, "only": [0, 1, 0]},
        {"name": "L2", "n": 2, "shared": 0, "some": 0, "none": 1, "only": [1, 0, 0]}]
    assert data["n_pos"] == [[1, 0, 0, 0, 2, 0], [1, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0]]
    assert data["n_neg"] == [[0, 0, 1, 0, 0, 0], [1, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]]
    assert [ds["described"] for ds in data["datasets"]] == [3, 2, 2]
    # kept pairs over all the run's features: A 4 of 12, B 3 + 3 (L3:0, not compared) of 21, C 3 of 12
    assert [ds["kept"] for ds in data["datasets"]] == [round(4 / 12, 6), round(6 / 21, 6), 0.25]
    assert [ds["n_features"] for ds in data["datasets"]] == [6, 7, 6]
    # top classes: by decreasing D above t+, by increasing D below t-
    assert data["tpos"][0][4] == [1, 0.9, 0, 0.35]
    assert data["tneg"][1][0] == [1, -0.45] and data["tneg"][1][3] == [0, -0.41]
    assert data["tpos"][2][2] == [0, 0.21] and data["tneg"][2][2] == [1, -0.21]
    assert data["tpos"][1][4] == [] and data["tneg"][0][1] == []  # D on the threshold: not listed
    assert data["dmax"][2][5] == 0.19 and data["amax"][2][5] == 1 and data["dmin"][2][5] == -0.19 \
        and data["amin"][2][5] == 0
    assert data["amax"][1][4] == 1 and data["dmin"][1][0] == -0.45 and data["amin"][1][0] == 1
    assert [ds["t_plus"] for ds in data["datasets"]] == [0.3, 0.5, 0.2]


def test_features_follow_network_order_whichever_run_comes_first():
    runs = hand_runs()
    data = build_compare_data([runs[2], runs[0], runs[1]])  # C (rows permuted) first
    assert data["features"] == FEATURES and data["category"] == [-3, -1, -2, 2, 1, -1]  # codes: C 0, A 1, B 2


def test_many_tied_classes_list_the_lowest_indices():
    d = np.concatenate([np.full(40, 0.7), np.full(40, -0.7)])[None, :]  # 40 ties each side (quicksort reorders)
    run = CompareRun("X", "rx", d, ["L:0"], ["L"], [f"x{i}" for i in range(80)], 0.4, -0.4)
    data = build_compare_data([run], top_classes=5)
    assert data["tpos"][0][0][::2] == [0, 1, 2, 3, 4] and data["tneg"][0][0][::2] == [40, 41, 42, 43, 44]


def test_interleaved_ties_list_the_lowest_class_indices():
    """258 classes of three values in random order: an unstable sort (numpy's default quicksort) reorders ties."""
    x = np.random.default_rng(0).choice([0.5, 0.6, 0.7], size=258)
    d = np.stack([x, -x])
    run = CompareRun("X", "rx", d, ["L:0", "L:1"], ["L", "L"], [f"x{i}" for i in range(258)], 0.4, -0.4)
    data = build_compare_data([run])
    top = [c for c in range(258) if x[c] == 0.7][:5]
    assert data["tpos"][0][0] == [v for c in top for v in (c, 0.7)]
    assert data["tneg"][0][1] == [v for c in top for v in (c, -0.7)]


def test_top_classes_caps_and_breaks_ties_by_class_index():
    d = np.array([[0.5, 0.7, 0.7, 0.6, -0.9, -0.9]])
    run = CompareRun("X", "rx", d, ["L:0"], ["L"], [f"x{i}" for i in range(6)], 0.4, -0.4)
    data = build_compare_data([run], top_classes=2)
    assert data["tpos"][0][0] == [1, 0.7, 2, 0.7]
    assert data["tneg"][0][0] == [4, -0.9, 5, -0.9]
    assert data["n_pos"] == [[4]] and data["n_neg"] == [[2]]
    assert data["category"] == [0]  # one dataset: a describing feature is "only" that one
    assert data["layers"][0]["shared"] == 0 and data["layers"][0]["only"] == [1]


def loop_oracle(runs: list[tuple[np.ndarray, float, float]]):
    """Categories and per-layer counts by plain loops (S datasets with the same features in the same order)."""
    s_count, f_count = len(runs), runs[0][0].shape[0]
    cats = []
    for f in range(f_count):
        hits = [s for s, (d, tp, tm) in enumerate(runs) if any(v > tp or v < tm for v in d[f])]
        if not hits:
            cats.append("none")
        elif len(hits) == s_count and s_count > 1:
            cats.append("shared")
        elif len(hits) == 1:
            cats.append(hits[0])
        else:
            cats.append("some")
    return cats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_runs_against_loops(seed):
    rng = np.random.default_rng(seed)
    f_count, layers = 60, ["conv1_1"] * 20 + ["conv5_4"] * 25 + ["fc7"] * 15
    names = [f"{layer}:{i}" for i, layer in enumerate(layers)]
    specs = []
    for s in range(4):
        d = np.round(rng.uniform(-0.6, 0.6, size=(f_count, rng.integers(2, 9))), 2)
        specs.append((d, float(rng.choice([0.45, 0.5, 0.55])), float(rng.choice([-0.45, -0.5, -0.55]))))
    runs = [CompareRun(f"ds{s}", f"r{s}", d, names, layers, [f"c{i}" for i in range(d.shape[1])], tp, tm)
            for s, (d, tp, tm) in enumerate(specs)]
    data = build_compare_data(runs)
    code = {"none": -1, "some": -2, "shared": -3}
    expect = [code.get(c, c) for c in loop_oracle(specs)]
    assert data["category"] == expect
    assert len(set(expect)) >= 4  # the data exercise several categories
    for i, layer in enumerate(["conv1_1", "conv5_4", "fc7"]):
        in_layer = [e for e, name in zip(expect, layers) if name == layer]
        row = data["layers"][i]
        assert (row["name"], row["n"]) == (layer, len(in_layer))
        assert row["shared"] == in_layer.count(-3) and row["some"] == in_layer.count(-2) \
            and row["none"] == in_layer.count(-1) and row["only"] == [in_layer.count(s) for s in range(4)]
    for s, (d, tp, tm) in enumerate(specs):
        assert data["n_pos"][s] == [sum(v > tp for v in row) for row in d]
        assert data["n_neg"][s] == [sum(v < tm for v in row) for row in d]
        for f in range(f_count):
            above = sorted([(-v, c) for c, v in enumerate(d[f]) if v > tp])[:5]
            assert data["tpos"][s][f] == [x for v, c in above for x in (c, round(-v, 4))]
            below = sorted([(v, c) for c, v in enumerate(d[f]) if v < tm])[:5]
            assert data["tneg"][s][f] == [x for v, c in below for x in (c, round(v, 4))]


def test_page_escapes_hostile_names_and_reads_back(tmp_path):
    evil = "</script><img src=x onerror=alert(1)>"
    runs = [CompareRun(evil, "r1", D_A, FEATURES, LAYERS, [evil, "a & \u2028"], 0.3, -0.3),
            CompareRun("B", "r2", D_A[::-1].copy(), FEATURES, LAYERS, ["<b>x</b>", "y"], 0.3, -0.3)]
    page = write_compare_page(runs, tmp_path / "atlas", figures=["figures/fig5.png"], run_id="abc")
    text = page.read_text(encoding="utf-8")
    assert evil not in text and "<b>x</b>" not in text and "\u2028" not in text
    assert text.count("</script>") == 2  # the data block's and the script's own
    assert "innerHTML" not in text and "document.write" not in text
    data = read_data(page)
    assert data["datasets"][0]["name"] == evil and data["datasets"][0]["classes"] == [evil, "a & \u2028"]
    assert data["run_id"] == "abc" and data["figures"] == ["figures/fig5.png"]
    json.dumps(data, allow_nan=False)


def test_nan_d_is_not_a_description_nor_an_extreme_and_stays_valid_json():
    d = np.array([[np.nan, 0.8], [np.nan, np.nan], [-0.5, np.nan], [0.123456, -0.654321]])
    data = build_compare_data([CompareRun("X", "r", d, ["L:0", "L:1", "L:2", "L:3"], ["L"] * 4, ["a", "b"], 0.5,
                                          -0.45)])
    assert data["n_pos"] == [[1, 0, 0, 0]] and data["n_neg"] == [[0, 0, 1, 1]] and data["category"] == [0, -1, 0, 0]
    assert data["dmax"] == [[0.8, None, -0.5, 0.1235]] and data["amax"] == [[1, None, 0, 0]]
    assert data["dmin"] == [[0.8, None, -0.5, -0.6543]] and data["amin"] == [[1, None, 0, 1]]
    assert data["tneg"] == [[[], [], [0, -0.5], [1, -0.6543]]]  # D to 4 decimals
    json.dumps(data, allow_nan=False)


@pytest.mark.parametrize("change,message", [
    ({"feature_names": ["L:1", "L:0", "L:0"], "layer_of_feature": ["L"] * 3, "d": np.zeros((3, 2))},
     "'L:0' comes twice"),
    ({"d": np.zeros((2, 0)), "classes": []}, "shape (2, 0)"),
    ({"d": np.zeros((2, 3))}, "for 2 classes"),
    ({"t_plus": float("nan")}, "not finite"),
])
def test_inputs_that_cannot_be_compared_are_refused(change, message):
    fields = {"name": "X", "run_id": "r", "d": np.array([[0.9, 0.0], [0.1, 0.0]]), "feature_names": ["L:0", "L:1"],
              "layer_of_feature": ["L", "L"], "classes": ["a", "b"], "t_plus": 0.5, "t_minus": -0.5}
    with pytest.raises(ValueError, match=re.escape(message)):
        build_compare_data([CompareRun(**{**fields, **change})])


def test_nonfinite_table_thresholds_are_recomputed_and_a_bad_npz_is_one_line(tmp_path, capsys):
    from featstudy import report

    rng = np.random.default_rng(5)
    d, d_random = np.round(rng.uniform(-1, 1, (6, 3)), 3), np.round(rng.uniform(-0.5, 0.5, (2, 6, 3)), 3)
    npz = tmp_path / "ks.npz"
    np.savez(npz, d=d, d_random=d_random)
    want = oracle_thresholds(d, d_random, step=0.01)
    assert want["t_plus"] != oracle_thresholds(d, d_random)["t_plus"]  # the run's step matters here
    with np.load(npz) as ks:
        got = report.run_thresholds({"params": {"analysis.threshold_step": "0.01"}},
                                    [{"t_plus": "nan", "t_minus": "-inf"}], ks)
        from_table = report.run_thresholds({}, [{"t_plus": "0.25", "t_minus": "-0.5"}], ks)
    assert got[:2] == (pytest.approx(want["t_plus"], abs=1e-12), pytest.approx(want["t_minus"], abs=1e-12))
    assert got[2].startswith("recomputed")
    assert from_table == (0.25, -0.5, "tables/table4.csv")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")  # a zip's magic, then nothing: a broken download
    run = {"run_id": "r" * 32, "dataset": "dtd", "params": {}, "tags": {}}
    arrays = {run["run_id"]: {"d": d, "layer_of_feature": np.array(["L"] * 6)}}
    assert report.comparison_page([run], arrays, {run["run_id"]: bad}, {}, tmp_path / "out", [], None) is None
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "no comparison page" in ln]
    assert len(lines) == 1 and "BadZipFile" in lines[0] and "the figures and Table 4 stay" in lines[0]


# --------------------------------------------------------------------------------------- through the report

def test_report_writes_and_logs_the_page_with_table4_thresholds(store, tmp_path, monkeypatch):  # noqa: F811
    r = store.runs
    picked = [r["mit67"], r["flowers102"]]
    rc, _ = run_main(monkeypatch, ["--tracking-uri", store.uri, "--out", str(tmp_path), "--formats", "png",
                                   "--runs", *[run.id for run in picked]])
    assert rc == 0
    data = read_data(tmp_path / "atlas" / "index.html")
    assert [ds["name"] for ds in data["datasets"]] == ["mit67", "flowers102"]
    assert [ds["t_plus"] for ds in data["datasets"]] == [float(run.row["t_plus"]) for run in picked]
    assert [ds["t_minus"] for ds in data["datasets"]] == [float(run.row["t_minus"]) for run in picked]
    assert data["datasets"][0]["classes"] == [f"mit67-c{i}" for i in range(8)]
    # categories from the runs' own D (the store's arrays) by the loop oracle
    specs = [(run.d, float(run.row["t_plus"]), float(run.row["t_minus"])) for run in picked]
    code = {"none": -1, "some": -2, "shared": -3}
    assert data["category"] == [code.get(c, c) for c in loop_oracle(specs)]
    assert data["figures"] == ["figures/fig5.png", "figures/fig6.png"]
    assert data["top_classes"] == 5  # the report's default: 5 classes a side, by the loops
    for s, run in enumerate(picked):
        tp = float(run.row["t_plus"])
        for f in range(len(data["features"])):
            above = sorted([(-v, c) for c, v in enumerate(run.d[f]) if v > tp])[:5]
            assert data["tpos"][s][f] == [x for v, c in above for x in (c, round(-v, 4))]
    report_run = find_report_run(store, tmp_path)
    assert data["run_id"] == report_run.info.run_id
    from importlib.metadata import version

    assert report_run.info.run_name == "report: mit67, flowers102"
    assert report_run.data.tags["featstudy.version"] == version("featstudy")
    logged = {a.path for a in store.client.list_artifacts(report_run.info.run_id, "atlas")}
    assert logged == {"atlas/index.html"}


def test_report_recomputes_missing_thresholds_by_eq4(store, tmp_path, monkeypatch, capsys):  # noqa: F811
    r = store.runs
    picked = [r["no_table"], r["mit67"]]  # no_table: conv1_1 and fc7 only, no tables/table4.csv
    rc, _ = run_main(monkeypatch, ["--tracking-uri", store.uri, "--out", str(tmp_path), "--formats", "png",
                                   "--no-log", "--runs", *[run.id for run in picked]])
    assert rc == 0
    data = read_data(tmp_path / "atlas" / "index.html")
    d = r["no_table"].d
    want = oracle_thresholds(d, (-d[::-1])[None])  # the store's d_random, as one permutation
    assert data["datasets"][0]["t_plus"] == pytest.approx(want["t_plus"], abs=1e-12)
    assert data["datasets"][0]["t_minus"] == pytest.approx(want["t_minus"], abs=1e-12)
    assert "recomputed from arrays/ks.npz" in capsys.readouterr().out
    assert {ln.split(":")[0] for ln in data["features"]} == {"conv1_1", "fc7"}  # the features both analysed
    assert data["left_out"] == {"dtd": 0, "mit67": 30}


def test_a_run_without_feature_names_gets_no_page_but_keeps_the_report(store, tmp_path, monkeypatch,  # noqa: F811
                                                                        capsys):
    """An arrays/ks.npz of an older version (no feature_names): one line naming the run, the figures and Table 4
    still written and logged."""
    client, r = store.client, store.runs
    art = client.get_experiment_by_name("featstudy").artifact_location
    exp = client.create_experiment(f"old_npz_{tmp_path.name}", artifact_location=art)
    old = client.create_run(exp, tags={"featstudy.role": "job", "dataset": "dtd"}, run_name="old").info.run_id
    folder = tmp_path / "src" / "arrays"
    folder.mkdir(parents=True)
    np.savez_compressed(folder / "ks.npz", d=r["mit67"].d, layer_of_feature=r["mit67"].layer_of,
                        classes=np.array([f"k{i}" for i in range(8)]))
    client.log_artifact(old, str(folder / "ks.npz"), "arrays")
    client.set_terminated(old, "FINISHED")
    out = tmp_path / "out"
    rc, result = run_main(monkeypatch, ["--tracking-uri", store.uri, "--out", str(out), "--formats", "png",
                                        "--runs", r["mit67"].id, old])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "no comparison page" in ln]
    assert rc == 0 and len(lines) == 1 and old in lines[0] and "feature_names" in lines[0]
    assert not (out / "atlas").exists() and (out / "tables" / "table4.csv").is_file()
    assert {f.name for f in result} == {"fig5.png", "fig6.png", "table4.csv"}
    assert find_report_run(store, out).info.status == "FINISHED"


def test_a_page_that_cannot_be_written_is_one_line_and_the_rest_stays(store, tmp_path, monkeypatch,  # noqa: F811
                                                                      capsys):
    r = store.runs
    (tmp_path / "atlas").write_text("a file where the page's folder should be")
    rc, result = run_main(monkeypatch, ["--tracking-uri", store.uri, "--out", str(tmp_path), "--formats", "png",
                                        "--runs", r["mit67"].id, r["flowers102"].id])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "no comparison page" in ln]
    assert rc == 0 and len(lines) == 1 and str(tmp_path / "atlas") in lines[0]
    assert {f.name for f in result} == {"fig5.png", "fig6.png", "table4.csv"}
    rep = find_report_run(store, tmp_path)
    assert rep.info.status == "FINISHED"
    assert store.client.list_artifacts(rep.info.run_id, "atlas") == []


def test_runs_without_a_common_feature_get_no_page(tmp_path, capsys):
    from featstudy import report

    runs, arrays, paths = [], {}, {}
    for i, prefix in enumerate(("conv5_4", "layer4")):  # e.g. VGG19 against a ResNet with --allow-mixed
        run = {"run_id": str(i) * 32, "dataset": f"ds{i}", "params": {}, "tags": {}}
        names = np.array([f"{prefix}:{j}" for j in range(3)])
        paths[run["run_id"]] = tmp_path / f"{i}.npz"
        np.savez(paths[run["run_id"]], d=np.full((3, 2), 0.9), feature_names=names, classes=np.array(["a", "b"]))
        arrays[run["run_id"]] = {"d": np.full((3, 2), 0.9), "layer_of_feature": np.array([prefix] * 3)}
        runs.append(run)
    tables = {run["run_id"]: [{"t_plus": "0.5", "t_minus": "-0.5"}] for run in runs}
    assert report.comparison_page(runs, arrays, paths, tables, tmp_path / "out", [], None) is None
    assert "no feature in common" in capsys.readouterr().out
    assert not (tmp_path / "out" / "atlas").exists()
