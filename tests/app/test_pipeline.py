"""The demo pipeline end to end on a tiny image folder against a temporary SQLite store.

Real extraction (VGG19, random weights, ten 32 px crops), real statistics, real MLflow: a sweep with one parent
and a child per job that extracts once; metrics, tags and artifacts of the children; FAILED and KILLED runs; the
cross-run report.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

JOB_METRICS = {"t_plus", "t_minus", "d_avg_t_plus", "d_avg_t_minus", "n_irrelevant_features",
               "n_irrelevant_features.fc7", "n_irrelevant_features.conv1_1", "kept_fraction.fc7",
               "kept_fraction_random.fc7", "n_features", "n_images", "n_classes", "null_significant_share",
               "null_significant_share.fc7"}
FIGURES = {f"figures/{name}.png" for name in ("fig1", "fig2", "fig3", "fig5", "fig6", "fig9", "fig10")}
ARTIFACTS = FIGURES | {"tables/table3.csv", "tables/table4.csv", "arrays/ks.npz", "config.yaml", "skipped.txt",
                       "tables/null_by_layer.csv", "tables/table4.json", "tables/irrelevant_by_layer.json"}


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def all_runs(uri: str):
    c = client_for(uri)
    exp = c.get_experiment_by_name("featstudy")
    return c.search_runs([exp.experiment_id], max_results=1000)


def artifacts(uri: str, run_id: str, path: str | None = None) -> set[str]:
    c = client_for(uri)
    out = set()
    for f in c.list_artifacts(run_id, path):
        out |= artifacts(uri, run_id, f.path) if f.is_dir else {f.path}
    return out


def run_sweep(helpers, root, image_folder, *overrides: str) -> int:
    """``python -m featstudy -m`` on the tiny image folder with ``overrides``; its exit code."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYDRA_FULL_ERROR", "0")
        return helpers.run_cli(["-m", *helpers.tiny_overrides(root, image_folder), *overrides], mp)


LIGHT = ("~analysis.callbacks.figures", "~analysis.callbacks.null")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, image_folder, helpers):
    """``-m analysis.bins=25,null`` (binned and exact) on a fresh cache and a fresh SQLite file."""
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    return root, uri, run_sweep(helpers, root, image_folder, "analysis.bins=25,null")


def test_sweep_has_one_parent_and_a_child_per_job(sweep):
    root, uri, rc = sweep
    assert rc == 0
    runs = all_runs(uri)
    parents = [r for r in runs if r.data.tags.get("featstudy.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2 == len(runs) - 1
    assert sorted(r.data.params["analysis.bins"] for r in children) == ["25", "null"]
    assert all(r.info.status == "FINISHED" for r in children)


def test_sweep_extracts_once(sweep):
    root, uri, _ = sweep
    children = sorted((r for r in all_runs(uri) if r.data.tags.get("featstudy.role") == "job"),
                      key=lambda r: r.info.start_time)
    assert [r.data.tags["embedding_cache"] for r in children] == ["miss", "hit"]
    assert len({r.data.tags["embedding_key"] for r in children}) == 1
    folders = [p for p in (root / ".cache" / "featstudy" / "embeddings").iterdir() if p.is_dir()]
    assert len(folders) == 1


def test_child_metrics_tags_params_and_artifacts(sweep, tmp_path):
    from featstudy import stats

    _, uri, _ = sweep
    run = next(r for r in all_runs(uri) if r.data.params.get("analysis.bins") == "null")
    assert JOB_METRICS <= set(run.data.metrics)
    tags = run.data.tags
    assert tags["weights"] == "random" and tags["dataset"] == "imagefolder"
    assert tags["version"] and tags["featstudy.version"]
    assert run.data.params["model.weights"] == "random" and run.data.params["crops.name"] == "ten"
    assert ARTIFACTS <= artifacts(uri, run.info.run_id)
    status_file = Path(tags["featstudy.output_dir"]) / "status.txt"
    assert status_file.read_text().split("\t")[:2] == ["FINISHED", run.info.run_id]
    # the logged thresholds are the ones the stored D arrays give
    local = client_for(uri).download_artifacts(run.info.run_id, "arrays/ks.npz", str(tmp_path))
    with np.load(local) as z:
        d, d_random = z["d"], z["d_random"]
        assert d.shape == (9600, 3) and d_random.shape == (1, 9600, 3)
    th = stats.thresholds(d, d_random, step=0.001)
    assert run.data.metrics["t_plus"] == pytest.approx(float(th.t_plus))
    assert run.data.metrics["t_minus"] == pytest.approx(float(th.t_minus))
    n_irr = int(np.sum(stats.irrelevant_features(d, th.t_plus, th.t_minus)))
    assert run.data.metrics["n_irrelevant_features"] == n_irr
    history = client_for(uri).get_metric_history(run.info.run_id, "d_avg_plus")
    assert len(history) == len(th.grid) and {m.step for m in history} == set(range(len(th.grid)))
    table4 = client_for(uri).download_artifacts(run.info.run_id, "tables/table4.csv", str(tmp_path))
    row = dict(zip(*[line.split(",") for line in Path(table4).read_text().splitlines()]))
    assert row["dataset"] == "imagefolder" and row["bins"] == "exact" and float(row["t_plus"]) == pytest.approx(th.t_plus)
    table3 = client_for(uri).download_artifacts(run.info.run_id, "tables/table3.csv", str(tmp_path))
    lines = Path(table3).read_text().splitlines()
    assert lines[1].startswith("conv1_1,64,") and lines[-1].startswith("Total,9600")


def test_layer_subsets_reuse_the_cache(sweep, image_folder, helpers):
    root, uri, _ = sweep
    rc = run_sweep(helpers, root, image_folder, *LIGHT, "analysis.layers=[conv1_1,conv1_2],[conv5_4,fc7]")
    assert rc == 0
    runs = [r for r in all_runs(uri) if r.data.params.get("analysis.layers", "null") != "null"]
    assert len(runs) == 2
    assert {r.data.tags["embedding_cache"] for r in runs} == {"hit"}
    assert sorted(r.data.metrics["n_features"] for r in runs) == [128, 4608]
    assert all("figures/fig9.png" not in artifacts(uri, r.info.run_id) for r in runs)


def test_a_failing_job_is_failed_and_so_is_its_sweep(sweep, image_folder, helpers, capsys):
    root, uri, _ = sweep
    before = {r.info.run_id for r in all_runs(uri)}
    rc = run_sweep(helpers, root, image_folder, *LIGHT, "analysis.layers=[fc7],[nope]")
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("featstudy: error")]
    assert len(err) == 1 and "analysis.layers" in err[0] and "nope" in err[0]
    new = [r for r in all_runs(uri) if r.info.run_id not in before]
    parent = next(r for r in new if r.data.tags.get("featstudy.role") == "sweep")
    children = {r.data.params["analysis.layers"]: r.info.status for r in new if r is not parent}
    assert children == {"['fc7']": "FINISHED", "['nope']": "FAILED"}
    assert parent.info.status == "FAILED"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_a_signal_marks_the_run_killed(sig, sweep, image_folder, helpers, monkeypatch):
    import featstudy.app

    root, uri, _ = sweep
    before = {r.info.run_id for r in all_runs(uri)}

    def terminated(cfg):
        os.kill(os.getpid(), sig)
        time.sleep(10)
        raise AssertionError(f"{sig} was not delivered")

    monkeypatch.setattr(featstudy.app, "_get_embedding", terminated)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(KeyboardInterrupt):
        helpers.run_cli(helpers.tiny_overrides(root, image_folder), monkeypatch)
    new = [r for r in all_runs(uri) if r.info.run_id not in before]
    assert [r.info.status for r in new] == ["KILLED"]
    assert signal.getsignal(sig) is not featstudy.app._raise_terminated


def test_resume_skips_finished_jobs_and_reruns_failed_ones(sweep, image_folder, helpers, capsys):
    root, uri, _ = sweep
    before = {r.info.run_id for r in all_runs(uri)}
    rc = run_sweep(helpers, root, image_folder, *LIGHT, "analysis.layers=[fc7],[conv1_1]", "tracking.resume=true")
    assert rc == 0
    out = capsys.readouterr()
    new = [r for r in all_runs(uri) if r.info.run_id not in before]
    jobs = [r for r in new if r.data.tags.get("featstudy.role") == "job"]
    # [fc7] finished in the failing sweep above: skipped; [conv1_1] never ran with these settings: runs now
    assert [r.data.params["analysis.layers"] for r in jobs] == ["['conv1_1']"]
    assert "tracking.resume: skipped, identical FINISHED run" in out.err


def test_report_compares_runs_and_is_logged(sweep, tmp_path):
    from featstudy import report

    _, uri, _ = sweep
    jobs = [r for r in all_runs(uri) if r.data.tags.get("featstudy.role") == "job" and r.info.status == "FINISHED"
            and r.data.params.get("analysis.layers") == "null"]
    ids = [r.info.run_id for r in jobs]
    assert report.main(["--tracking-uri", uri, "--runs", *ids, "--out", str(tmp_path / "rep"),
                        "--formats", "png"]) == 0
    for name in ("figures/fig5.png", "figures/fig6.png", "tables/table4.csv"):
        assert (tmp_path / "rep" / name).is_file()
    rows = (tmp_path / "rep" / "tables" / "table4.csv").read_text().splitlines()
    assert len(rows) == 1 + len(ids) and "t_plus" in rows[0]
    rep = next(r for r in all_runs(uri) if r.data.tags.get("featstudy.role") == "report")
    assert rep.info.status == "FINISHED" and set(rep.data.tags["featstudy.report_runs"].split(",")) == set(ids)
    assert {"figures/fig5.png", "tables/table4.csv"} <= artifacts(uri, rep.info.run_id)
    # a run without a D array is refused in one line
    assert report.main(["--tracking-uri", uri, "--datasets", "nope", "--no-log"]) == 2
