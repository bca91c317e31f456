"""``featstudy.report`` (``python -m featstudy.report``) on a real MLflow SQLite store with hand-crafted job runs.

The store (built once per module) holds, in experiment ``featstudy``, FINISHED job runs of cub200 (conv5_4 and fc7
only), flowers102 and imagenet_val, and for mit67 an older FINISHED run, the newer FINISHED run that must be chosen,
and traps that must not be: a newer FAILED job run, a newer RUNNING job run and a newer FINISHED *report* run. Each
run's ``arrays/ks.npz`` (d, layer_of_feature, d_random, ...) and ``tables/table4.csv`` are written by hand here.
Experiment ``empty`` has no run, ``broken`` has a run without ``arrays/ks.npz`` and one whose npz lacks
``layer_of_feature``, ``partial`` a run (conv1_1 and fc7 only) without ``tables/table4.csv``.

Checked: which runs are chosen (default, ``--datasets``, ``--runs``), the logged report run, one-line errors with
exit status 2, and the data of fig5 / fig6 / fig8 and Table 4 against independent numpy computations (below).
The Figures come from the real ``main`` through a spy that calls the real ``build_report`` and keeps its result.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from featstudy import report

ALL_LAYERS = ["conv1_1", "conv3_1", "conv5_3", "conv5_4", "fc7"]
HIGH_LAYERS = ["conv5_4", "fc7"]  # paper §5.3: conv5_4 + fc7 against conv1_1 .. conv5_3
T4_HEADER = ["dataset", "t_plus", "d_avg_t_plus", "t_minus", "d_avg_t_minus", "n_classes", "n_features",
             "permutations", "bins"]
CENTRES = (np.linspace(0, 1, 51)[:-1] + np.linspace(0, 1, 51)[1:]) / 2  # the 50 bin centres of [0, 1]


# --------------------------------------------------------------------------------------------- the store

def make_d(rng, layers: list[str], n_classes: int = 8, per_layer: int = 10):
    """(d, layer_of_feature): per layer, 15% exact zeros, a cluster exactly at a bin centre on each side (the
    mode, so F(mode) counts values equal to it), +-1 and rounded uniform values."""
    cols, layer_of = [], []
    for _ in layers:
        n = per_layer * n_classes
        pos, neg = CENTRES[rng.integers(5, 45)], -CENTRES[rng.integers(5, 45)]
        vals = np.concatenate([np.zeros(n // 7), np.full(14, pos), np.full(11, neg), [1.0, -1.0]])
        vals = np.concatenate([vals, np.round(rng.uniform(-1, 1, n - vals.size), 3)])
        cols.append(rng.permutation(vals).reshape(per_layer, n_classes))
    for name in layers:
        layer_of += [name] * per_layer
    return np.concatenate(cols), np.array(layer_of)


def t4_row(dataset: str, seed: int, header=T4_HEADER) -> dict:
    """Values formatted as no float round trip would write them (trailing zeros), distinct per run."""
    values = {"dataset": dataset, "t_plus": f"0.{seed:02d}0", "d_avg_t_plus": f"{seed}.50",
              "t_minus": f"-0.{seed + 1:02d}0", "d_avg_t_minus": f"{seed + 2}.25", "n_classes": "8",
              "n_features": str(seed * 10), "permutations": "3", "bins": "exact"}
    return {k: values[k] for k in header}


def add_run(client, exp_id, folder: Path, dataset: str, start: int, *, seed: int, layers=ALL_LAYERS,
            status="FINISHED", role="job", npz=True, npz_keys=("d", "layer_of_feature"), header=T4_HEADER,
            table=True):
    rng = np.random.default_rng(seed)
    d, layer_of = make_d(rng, list(layers))
    run_id = client.create_run(exp_id, tags={"featstudy.role": role, "dataset": dataset},
                               run_name=f"{dataset}-{seed}", start_time=start).info.run_id
    local = folder / run_id
    (local / "arrays").mkdir(parents=True)
    (local / "tables").mkdir()
    every = {"d": d, "layer_of_feature": layer_of, "d_random": -d[::-1], "d_plus": np.maximum(d, 0),
             "classes": np.array([f"{dataset}-c{i}" for i in range(d.shape[1])]), "dataset": np.array(dataset),
             "feature_names": np.array([f"{name}:{i % 10}" for i, name in enumerate(layer_of)])}
    if npz:
        np.savez_compressed(local / "arrays" / "ks.npz",
                            **{k: v for k, v in every.items() if k in npz_keys or k not in ("d", "layer_of_feature")})
        client.log_artifact(run_id, str(local / "arrays" / "ks.npz"), "arrays")
    row = t4_row(dataset, seed, header)
    with open(local / "tables" / "table4.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    if table:
        client.log_artifact(run_id, str(local / "tables" / "table4.csv"), "tables")
    if status != "RUNNING":
        client.set_terminated(run_id, status=status, end_time=start + 100)
    return SimpleNamespace(id=run_id, dataset=dataset, d=d, layer_of=layer_of, row=row if table else None)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("report_store")
    (root / "mlruns").mkdir()
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    art = (root / "mlruns" / "artifacts").as_uri()
    exp = client.create_experiment("featstudy", artifact_location=art)
    src = root / "src"
    runs = {
        "mit67_old": add_run(client, exp, src, "mit67", 1_000, seed=11),
        "cub200": add_run(client, exp, src, "cub200", 2_000, seed=12, layers=HIGH_LAYERS,
                          header=T4_HEADER[:-1]),  # an older version's table: no bins column
        "flowers102": add_run(client, exp, src, "flowers102", 2_500, seed=13),
        "imagenet_val": add_run(client, exp, src, "imagenet_val", 2_600, seed=14),
        "mit67": add_run(client, exp, src, "mit67", 3_000, seed=15),
        "mit67_failed": add_run(client, exp, src, "mit67", 5_000, seed=16, status="FAILED"),
        "mit67_report": add_run(client, exp, src, "mit67", 6_000, seed=17, role="report"),
        "mit67_running": add_run(client, exp, src, "mit67", 7_000, seed=18, status="RUNNING"),
    }
    client.create_experiment("empty", artifact_location=art)
    broken = client.create_experiment("broken", artifact_location=art)
    runs["no_npz"] = add_run(client, broken, src, "dtd", 1_000, seed=19, npz=False)
    runs["bad_npz"] = add_run(client, broken, src, "sun397", 1_000, seed=20, npz_keys=("d",))
    partial = client.create_experiment("partial", artifact_location=art)
    runs["no_table"] = add_run(client, partial, src, "dtd", 1_000, seed=21, layers=["conv1_1", "fc7"], table=False)
    return SimpleNamespace(uri=uri, root=root, client=client, runs=runs)


def run_main(monkeypatch, argv: list[str]):
    """``report.main(argv)`` for real; returns (exit status, what ``build_report`` returned or None)."""
    kept = {}
    real = report.build_report

    def spy(*args, **kwargs):
        kept["result"] = real(*args, **kwargs)
        return kept["result"]

    monkeypatch.setattr(report, "build_report", spy)
    return report.main(argv), kept.get("result")


def base_args(store, out: Path, *extra: str) -> list[str]:
    return ["--tracking-uri", store.uri, "--out", str(out), "--formats", "png", "--no-log", *extra]


def read_table4(out: Path) -> tuple[list[str], list[dict]]:
    with open(out / "tables" / "table4.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("featstudy.report: error:")]


# --------------------------------------------------------------------------------------------- independent maths

def mode_68(values: np.ndarray, lo: float, hi: float) -> tuple[float, float, float]:
    """Paper Fig. 5: mode = centre of the fullest of 50 equal bins on [lo, hi]; the interval holds 34% of the
    mass on each side of it: quantiles at F(mode) - 0.34 and F(mode) + 0.34 (clipped to [0, 1])."""
    counts, edges = np.histogram(values, bins=50, range=(lo, hi))
    i = int(np.argmax(counts))
    mode = (edges[i] + edges[i + 1]) / 2
    f_mode = np.count_nonzero(values <= mode) / values.size
    return mode, np.quantile(values, max(f_mode - 0.34, 0)), np.quantile(values, min(f_mode + 0.34, 1))


def percent_curve(run, layers: list[str]) -> np.ndarray:
    """% of the group's (feature, class) pairs in each of 100 bins of [-1, 1]."""
    vals = run.d[np.isin(run.layer_of, layers)].ravel()
    return 100 * np.histogram(vals, bins=100, range=(-1, 1))[0] / vals.size


def check_fig5(fig, expected_runs: list, names: list[str], layers: list[str]):
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == layers
    assert [t.get_text() for t in ax.get_legend().get_texts()] == names
    assert len(ax.containers) == 2 * len(expected_runs)
    for k, run in enumerate(expected_runs):
        colours = set()
        for j, (lo, hi) in enumerate(((0.0, 1.0), (-1.0, 0.0))):
            cont = ax.containers[2 * k + j]
            line, _, (bars,) = cont.lines
            colours.add(to_rgba(line.get_color()))
            xs, ys, segments = line.get_xdata(), line.get_ydata(), bars.get_segments()
            assert np.allclose(np.round(xs), np.arange(len(layers)))  # each dodged point sits near its layer
            for i, layer in enumerate(layers):
                vals = run.d[run.layer_of == layer]
                vals = vals[vals > 0] if lo == 0 else vals[vals < 0]
                if vals.size == 0:
                    assert np.isnan(ys[i])
                    continue
                mode, q_lo, q_hi = mode_68(vals, lo, hi)
                assert ys[i] == pytest.approx(mode, abs=1e-12), (run.dataset, layer, lo)
                assert np.sort(segments[i][:, 1]) == pytest.approx([q_lo, q_hi], abs=1e-12), (run.dataset, layer)
        assert len(colours) == 1  # D+ and D- of one dataset share its colour
    firsts = [to_rgba(ax.containers[2 * k].lines[0].get_color()) for k in range(len(expected_runs))]
    assert len(set(firsts)) == len(firsts)  # one colour per dataset


def check_curves(fig, expected_runs: list, names: list[str], colours: dict | None = None):
    """fig6/fig8: two panels (low, high); one line per run that has layers in the panel, in percent."""
    low = [name for name in ALL_LAYERS if name not in HIGH_LAYERS]
    assert [ax.get_title() for ax in fig.axes] == ["conv1_1-conv5_3", "conv5_4+fc7"]
    drawn = [name for run, name in zip(expected_runs, names)
             if any(np.isin(run.layer_of, group).any() for group in (low, HIGH_LAYERS))]
    (legend,) = fig.legends  # one legend for both panels: every dataset drawn in either, in order
    assert [t.get_text() for t in legend.get_texts()] == drawn
    centres = np.linspace(-0.99, 0.99, 100)
    for ax, group in zip(fig.axes, (low, HIGH_LAYERS)):
        present = [(run, name) for run, name in zip(expected_runs, names) if np.isin(run.layer_of, group).any()]
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == [name for _, name in present]
        for line, (run, name) in zip(lines, present):
            assert np.allclose(line.get_xdata(), centres)
            assert np.allclose(line.get_ydata(), percent_curve(run, group), atol=1e-9), (name, group)
            assert np.sum(line.get_ydata()) == pytest.approx(100.0)
            if colours:
                assert to_rgba(line.get_color()) == to_rgba(colours[run.dataset])


# --------------------------------------------------------------------------------------------- run choice

def test_default_takes_the_latest_finished_job_run_of_each_dataset(store, tmp_path, monkeypatch):
    r = store.runs
    chosen = [r["cub200"], r["flowers102"], r["imagenet_val"], r["mit67"]]  # sorted datasets, newest FINISHED
    rc, result = run_main(monkeypatch, base_args(store, tmp_path))
    assert rc == 0
    header, rows = read_table4(tmp_path)
    assert [row["run_id"] for row in rows] == [run.id for run in chosen]
    # every column of the runs' tables plus run_id; cub200 (older, no bins column) gets an empty cell
    assert set(header) == set(T4_HEADER) | {"run_id"}
    for row, run in zip(rows, chosen):
        assert {k: row[k] for k in run.row} == run.row
    assert rows[0]["bins"] == ""
    others = [r["cub200"], r["flowers102"], r["mit67"]]
    names = ["cub200", "flowers102", "mit67"]
    # layers in network order although cub200 (first) only has conv5_4 and fc7
    check_fig5(result.figures["fig5"], others, names, ALL_LAYERS)
    check_curves(result.figures["fig6"], others, names)
    check_curves(result.figures["fig8"], chosen, [run.dataset for run in chosen],
                 colours={"imagenet_val": "tab:blue", "cub200": "tab:green", "flowers102": "tab:green",
                          "mit67": "tab:green"})
    assert {f.relative_to(tmp_path).as_posix() for f in result} == {
        "figures/fig5.png", "figures/fig6.png", "figures/fig8.png", "tables/table4.csv", "atlas/index.html"}
    assert all(f.stat().st_size > 1000 for f in result if f.suffix == ".png")


def test_datasets_keeps_the_given_order_and_fig8_needs_imagenet_and_another(store, tmp_path, monkeypatch):
    r = store.runs
    rc, result = run_main(monkeypatch, base_args(store, tmp_path / "a", "--datasets", "mit67", "imagenet_val"))
    assert rc == 0
    assert [row["run_id"] for row in read_table4(tmp_path / "a")[1]] == [r["mit67"].id, r["imagenet_val"].id]
    check_fig5(result.figures["fig5"], [r["mit67"]], ["mit67"], ALL_LAYERS)
    check_curves(result.figures["fig8"], [r["mit67"], r["imagenet_val"]], ["mit67", "imagenet_val"],
                 colours={"mit67": "tab:green", "imagenet_val": "tab:blue"})

    rc, result = run_main(monkeypatch, base_args(store, tmp_path / "b", "--datasets", "flowers102", "cub200"))
    assert rc == 0 and set(result.figures) == {"fig5", "fig6"} and not (tmp_path / "b/figures/fig8.png").exists()
    check_fig5(result.figures["fig5"], [r["flowers102"], r["cub200"]], ["flowers102", "cub200"], ALL_LAYERS)

    # ImageNet alone: it is the only dataset of fig5/fig6, and there is no fig8
    rc, result = run_main(monkeypatch, base_args(store, tmp_path / "c", "--datasets", "imagenet_val"))
    assert rc == 0 and set(result.figures) == {"fig5", "fig6"}
    check_curves(result.figures["fig6"], [r["imagenet_val"]], ["imagenet_val"])


def test_runs_of_the_same_dataset_get_distinct_names_and_are_logged(store, tmp_path, monkeypatch):
    r = store.runs
    picked = [r["mit67"], r["flowers102"], r["mit67_old"]]
    names = ["mit67", "flowers102", f"mit67 ({r['mit67_old'].id[:8]})"]
    rc, result = run_main(monkeypatch, ["--tracking-uri", store.uri, "--out", str(tmp_path), "--formats", "png",
                                        "--runs", *[run.id for run in picked]])
    assert rc == 0
    assert [row["run_id"] for row in read_table4(tmp_path)[1]] == [run.id for run in picked]
    assert [row["t_plus"] for row in read_table4(tmp_path)[1]] == [run.row["t_plus"] for run in picked]
    check_fig5(result.figures["fig5"], picked, names, ALL_LAYERS)
    check_curves(result.figures["fig6"], picked, names)
    assert "fig8" not in result.figures
    report_run = find_report_run(store, tmp_path)
    assert sorted(report_run.data.params.values()) == sorted(run.id for run in picked)  # one param per run


def test_a_run_without_table4_keeps_its_row_and_partial_layers_keep_network_order(store, tmp_path, monkeypatch):
    r = store.runs
    picked = [r["no_table"], r["cub200"]]  # layers [conv1_1, fc7] and [conv5_4, fc7]
    rc, result = run_main(monkeypatch, base_args(store, tmp_path, "--runs", *[run.id for run in picked]))
    assert rc == 0
    header, rows = read_table4(tmp_path)
    assert [(row["dataset"], row["run_id"]) for row in rows] == [("dtd", r["no_table"].id), ("cub200", r["cub200"].id)]
    assert rows[0]["t_plus"] == "" and rows[1]["t_plus"] == r["cub200"].row["t_plus"]
    # conv5_4 (only in the second run) goes between conv1_1 and fc7, as in the network
    check_fig5(result.figures["fig5"], picked, ["dtd", "cub200"], ["conv1_1", "conv5_4", "fc7"])


def find_report_run(store, out: Path):
    exp = store.client.get_experiment_by_name("featstudy")
    found = store.client.search_runs([exp.experiment_id], filter_string=f"tags.`featstudy.output_dir` = '{out}'")
    assert len(found) == 1
    return found[0]


def test_the_report_is_logged_as_a_run_naming_the_runs_it_used(store, tmp_path, monkeypatch, capsys):
    r = store.runs
    chosen = [r["cub200"], r["flowers102"], r["imagenet_val"], r["mit67"]]
    rc, _ = run_main(monkeypatch, ["--tracking-uri", store.uri, "--out", str(tmp_path), "--formats", "png"])
    assert rc == 0
    rep = find_report_run(store, tmp_path)
    assert rep.info.status == "FINISHED"
    assert rep.data.tags["featstudy.role"] == "report"
    assert rep.data.tags["featstudy.report_runs"] == ",".join(run.id for run in chosen)
    assert rep.data.params == {f"run.{run.dataset}": run.id for run in chosen}
    listed = {a.path for folder in ("figures", "tables", "atlas")
              for a in store.client.list_artifacts(rep.info.run_id, folder)}
    assert listed == {"figures/fig5.png", "figures/fig6.png", "figures/fig8.png", "tables/table4.csv",
                      "atlas/index.html"}
    assert f"logged as MLflow run {rep.info.run_id}" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("case", ["empty", "no_npz", "bad_npz", "unknown_run", "unknown_dataset", "no_experiment"])
def test_errors_exit_2_with_one_line_naming_the_problem(store, tmp_path, monkeypatch, capsys, case):
    r = store.runs
    extra, needle = {
        "empty": (["--experiment", "empty"], "no runs to compare"),
        "no_npz": (["--experiment", "broken", "--datasets", "dtd"], f"{r['no_npz'].id} (dtd) has no arrays/ks.npz"),
        "bad_npz": (["--runs", r["bad_npz"].id], "layer_of_feature"),
        "unknown_run": (["--runs", r["mit67"].id, "0" * 32], "0" * 32),
        "unknown_dataset": (["--datasets", "mit67", "nope"], "nope"),
        "no_experiment": (["--experiment", "nothere"], "nothere"),
    }[case]
    rc, result = run_main(monkeypatch, base_args(store, tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert rc == 2 and result is None
    lines = error_lines(err)
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_a_good_run_does_not_hide_a_run_without_arrays(store, tmp_path, monkeypatch, capsys):
    r = store.runs
    rc, _ = run_main(monkeypatch, base_args(store, tmp_path, "--runs", r["mit67"].id, r["no_npz"].id))
    lines = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and r["no_npz"].id in lines[0] and "arrays/ks.npz" in lines[0]


# --------------------------------------------------------------------------------------------- real process

def cli(store, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEATSTUDY_ROOT": str(store.root), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "featstudy.report", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_cli_process_defaults_to_the_root_store_and_exits_2_on_errors(store, tmp_path):
    r = store.runs
    done = cli(store, tmp_path, "--formats", "png", "--no-log")  # uri and out default to $FEATSTUDY_ROOT
    assert done.returncode == 0, done.stderr
    (first,) = [ln for ln in done.stdout.splitlines() if " -> " in ln]
    head, out = first.split(" -> ")
    used = [ln for ln in done.stdout.splitlines() if ln.startswith("[featstudy.report] ") and ": run " in ln]
    assert [ln.split(":")[0].split()[-1] for ln in used] == ["cub200", "flowers102", "imagenet_val", "mit67"]
    assert r["mit67"].id in used[-1] and "'mit67-15'" in used[-1]  # id and name of the run each dataset stands on
    assert head == "[featstudy.report] 4 runs (cub200, flowers102, imagenet_val, mit67)"
    assert Path(out).parent == store.root / "outputs" / "report"
    assert [row["run_id"] for row in read_table4(Path(out))[1]] == [
        r[k].id for k in ("cub200", "flowers102", "imagenet_val", "mit67")]
    assert {p.name for p in (Path(out) / "figures").iterdir()} == {"fig5.png", "fig6.png", "fig8.png"}
    assert "Downloading artifacts" not in done.stdout + done.stderr  # no progress bar per artifact (issue 11)

    failed = cli(store, tmp_path, "--experiment", "broken", "--no-log", "--out", str(tmp_path / "x"))
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    lines = error_lines(failed.stderr)
    assert len(lines) == 1 and r["no_npz"].id in lines[0] and "arrays/ks.npz" in lines[0]


# --------------------------------------------------------------------------------------------- which runs

@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """An experiment where the latest cub200 run is not the paper's: other weights and bins."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mixed_store")
    (root / "mlruns").mkdir()
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("featstudy", artifact_location=(root / "mlruns" / "artifacts").as_uri())
    paper = {"model.name": "vgg19", "model.weights": "IMAGENET1K_V1", "crops.name": "ten", "crops.resize": "256",
             "crops.size": "224", "pooling.name": "avg", "analysis.bins": "100"}
    runs = {}
    for key, dataset, start, seed, params, weights in (
            ("cub_paper", "cub200", 1_000, 31, paper, "IMAGENET1K_V1"),
            ("mit_paper", "mit67", 1_500, 32, paper, "IMAGENET1K_V1"),
            ("cub_later", "cub200", 2_000, 33, {**paper, "model.weights": "random", "analysis.bins": "null"},
             "random")):
        run = add_run(client, exp, root / "src", dataset, start, seed=seed)
        from mlflow.entities import Param

        client.log_batch(run.id, params=[Param(k, v) for k, v in params.items()])
        client.set_tag(run.id, "weights", weights)
        runs[key] = run
    return SimpleNamespace(uri=uri, root=root, runs=runs)


def test_runs_that_differ_are_refused_unless_allowed_and_tags_pick_the_paper_runs(mixed, tmp_path, monkeypatch,
                                                                                  capsys):
    args = ["--tracking-uri", mixed.uri, "--no-log", "--formats", "png"]
    rc, _ = run_main(monkeypatch, [*args, "--out", str(tmp_path / "a")])
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert rc == 2 and len(lines) == 1
    assert "differ in weights" in lines[0] and "IMAGENET1K_V1" in lines[0] and "random" in lines[0]
    assert "--allow-mixed" in lines[0]
    # it said which run it took for each dataset before refusing: the later cub200 run, not the paper's
    (cub,) = [ln for ln in captured.out.splitlines() if ln.startswith("[featstudy.report] cub200: run ")]
    assert mixed.runs["cub_later"].id in cub and "weights=random" in cub and "bins=exact" in cub
    assert "crops=ten 256/224" in cub and "model=vgg19" in cub and "pooling=avg" in cub

    rc, _ = run_main(monkeypatch, [*args, "--allow-mixed", "--out", str(tmp_path / "b")])
    assert rc == 0
    rc, _ = run_main(monkeypatch, [*args, "--tag", "weights=IMAGENET1K_V1", "--out", str(tmp_path / "c")])
    assert rc == 0
    used = [ln for ln in capsys.readouterr().out.splitlines() if ": run " in ln]
    assert {ln.split()[3] for ln in used[-2:]} == {mixed.runs["cub_paper"].id, mixed.runs["mit_paper"].id}
    rc, _ = run_main(monkeypatch, [*args, "--tag", "weights"])
    assert rc == 2 and "--tag 'weights': expected KEY=VALUE" in error_lines(capsys.readouterr().err)[0]


def test_the_cross_dataset_table4_shows_the_bootstrap_intervals_where_a_run_has_them(tmp_path):
    """Issue 14: a run made with analysis.bootstrap=<n> has four interval columns in its table4.csv; the report's
    Table 4 carries them for that run and leaves them empty for a run without."""
    from featstudy.report import build_report

    with_ci = {"dataset": "cub200", "t_plus": "0.15", "t_minus": "-0.12", "t_plus_ci_low": "0.14",
               "t_plus_ci_high": "0.16", "t_minus_ci_low": "-0.13", "t_minus_ci_high": "-0.11"}
    without = {"dataset": "mit67", "t_plus": "0.17", "t_minus": "-0.1"}
    runs = [{"run_id": "r1", "dataset": "cub200"}, {"run_id": "r2", "dataset": "mit67"}]
    arrays = {r: {"d": np.array([[0.5, -0.25], [0.1, 0.0]]), "layer_of_feature": np.array(["fc7", "fc7"])}
              for r in ("r1", "r2")}
    build_report(runs, arrays, {"r1": [with_ci], "r2": [without]}, tmp_path, ["png"], None)
    header, rows = read_table4(tmp_path)
    assert header == ["dataset", "t_plus", "t_minus", "t_plus_ci_low", "t_plus_ci_high", "t_minus_ci_low",
                      "t_minus_ci_high", "run_id"]
    assert rows[0] == {**with_ci, "run_id": "r1"}
    assert rows[1]["t_plus_ci_low"] == "" and rows[1]["t_plus"] == "0.17"


def test_crops_name_their_interpolation_and_differing_ones_are_refused():
    """Runs before crops.interpolation existed (no param) and bilinear runs read the same; bicubic differs."""
    base = {"crops.name": "ten", "crops.resize": "256", "crops.size": "224"}
    old = {"run_id": "a" * 32, "dataset": "cub200", "params": dict(base)}
    bilinear = {"run_id": "b" * 32, "dataset": "mit67", "params": {**base, "crops.interpolation": "bilinear"}}
    bicubic = {"run_id": "c" * 32, "dataset": "flowers102",
               "params": {**base, "crops.resize": "248", "crops.interpolation": "bicubic"}}
    assert report.run_settings(old)["crops"] == report.run_settings(bilinear)["crops"] == "ten 256/224"
    assert report.run_settings(bicubic)["crops"] == "ten 248/224 bicubic"
    report.check_comparable([old, bilinear], allow_mixed=False)
    with pytest.raises(report.FeatstudyError, match="differ in crops"):
        report.check_comparable([old, bicubic], allow_mixed=False)
