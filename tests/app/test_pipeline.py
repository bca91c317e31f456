"""The demo pipeline end to end on a tiny image folder against a temporary SQLite store.

Real extraction (VGG19, random weights, ten 32 px crops), real statistics, real MLflow: a sweep with one parent
and a child per job that extracts once; metrics, tags and artifacts of the children; FAILED and KILLED runs;
``tracking.resume``; the cross-run report.

Order independence: the module fixture ``history`` runs every sweep the tests look at, in a fixed order, on its own
store, and records per step the exit code, the ids of the runs it added, its stderr and the cache folders. Tests
read only the runs of the step they are about, so any order (pytest-randomly) and any single test gives the same
result. Tests that add runs (the signals, the report) use their own store or look only at what they added.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import time
from dataclasses import dataclass
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
LIGHT = ("~analysis.callbacks.figures", "~analysis.callbacks.null")


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def all_runs(uri: str):
    c = client_for(uri)
    exp = c.get_experiment_by_name("featstudy")
    return [] if exp is None else c.search_runs([exp.experiment_id], max_results=1000)


def artifacts(uri: str, run_id: str, path: str | None = None) -> set[str]:
    c = client_for(uri)
    out = set()
    for f in c.list_artifacts(run_id, path):
        out |= artifacts(uri, run_id, f.path) if f.is_dir else {f.path}
    return out


def cache_folders(root: Path) -> list[str]:
    emb = root / ".cache" / "featstudy" / "embeddings"
    return sorted(p.name for p in emb.iterdir() if p.is_dir()) if emb.is_dir() else []


@dataclass
class Step:
    """One sweep of the history: exit code, the runs it added (oldest first), what it printed on stderr, and the
    embedding folders in the cache after it."""

    rc: int
    runs: list
    err: str
    cache: list[str]
    out: str = ""

    def jobs(self) -> list:
        return [r for r in self.runs if r.data.tags.get("featstudy.role") == "job"]

    def parent(self):
        (parent,) = [r for r in self.runs if r.data.tags.get("featstudy.role") == "sweep"]
        return parent


def run_sweep(helpers, root: Path, images: Path, uri: str, *overrides: str, mp=None) -> Step:
    """``python -m featstudy -m`` on the tiny image folder with ``overrides``; what it did (see :class:`Step`)."""
    before = {r.info.run_id for r in all_runs(uri)}
    err, out = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        mp = mp or stack.enter_context(pytest.MonkeyPatch.context())
        mp.setenv("HYDRA_FULL_ERROR", "0")
        # main() reports on the sys.stderr it finds when it starts; the sweep's end is printed on stdout
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = helpers.run_cli(["-m", *helpers.tiny_overrides(root, images), *overrides], mp)
    new = sorted((r for r in all_runs(uri) if r.info.run_id not in before), key=lambda r: r.info.start_time)
    return Step(rc, new, err.getvalue(), cache_folders(root), out.getvalue())


def _inject_failure(cfg, dataset=None):
    from featstudy.errors import DataError

    raise DataError("dataset: injected failure (test)")


@pytest.fixture(scope="module")
def history(tmp_path_factory, image_folder, helpers) -> tuple[Path, str, dict[str, Step]]:
    """Every sweep of this module, in this order, on a fresh cache and a fresh SQLite file:

    ``sweep``:    ``analysis.bins=25,null`` (binned and exact; the first job extracts, the second reuses)
    ``layers``:   ``analysis.layers=[conv1_1,conv1_2],[conv5_4,fc7]`` (light: no figures, no null)
    ``failing``:  ``analysis.layers=[fc7],[nope]`` (light; [nope] is not a layer: FAILED)
    ``failed``:   ``analysis.layers=[conv1_1]`` (light) whose job fails (an injected DataError): FAILED
    ``resume``:   ``analysis.layers=[fc7],[conv1_1] tracking.resume=true`` (light)
    """
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    steps = {"sweep": run_sweep(helpers, root, image_folder, uri, "analysis.bins=25,null"),
             "layers": run_sweep(helpers, root, image_folder, uri, *LIGHT,
                                 "analysis.layers=[conv1_1,conv1_2],[conv5_4,fc7]"),
             "failing": run_sweep(helpers, root, image_folder, uri, *LIGHT, "analysis.layers=[fc7],[nope]")}
    import featstudy.app

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(featstudy.app, "_get_embedding", _inject_failure)
        steps["failed"] = run_sweep(helpers, root, image_folder, uri, *LIGHT, "analysis.layers=[conv1_1]", mp=mp)
    steps["resume"] = run_sweep(helpers, root, image_folder, uri, *LIGHT, "analysis.layers=[fc7],[conv1_1]",
                                "tracking.resume=true")
    return root, uri, steps


def test_sweep_has_one_parent_and_a_child_per_job(history):
    _, _, steps = history
    step = steps["sweep"]
    assert step.rc == 0
    parent = step.parent()
    assert parent.info.status == "FINISHED"
    children = [r for r in step.runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 == len(step.runs) - 1  # nothing else was created
    assert sorted(r.data.params["analysis.bins"] for r in children) == ["25", "null"]
    assert all(r.info.status == "FINISHED" for r in children)


def test_sweep_extracts_once(history):
    _, _, steps = history
    children = steps["sweep"].jobs()  # oldest first
    assert [r.data.tags["embedding_cache"] for r in children] == ["miss", "hit"]
    (key,) = {r.data.tags["embedding_key"] for r in children}
    assert steps["sweep"].cache == [key]


def test_child_metrics_tags_params_and_artifacts(history, tmp_path):
    from featstudy import stats

    _, uri, steps = history
    run = next(r for r in steps["sweep"].jobs() if r.data.params.get("analysis.bins") == "null")
    assert JOB_METRICS <= set(run.data.metrics)
    tags = run.data.tags
    assert tags["weights"] == "random" and tags["dataset"] == "imagefolder"
    assert tags["version"] and tags["featstudy.version"]
    assert run.data.params["model.weights"] == "random" and run.data.params["crops.name"] == "ten"
    assert ARTIFACTS <= artifacts(uri, run.info.run_id)
    status_file = Path(tags["featstudy.output_dir"]) / "status.txt"
    assert status_file.read_text().split("\t")[:2] == ["FINISHED", run.info.run_id]
    # the logged thresholds are the ones the stored D arrays give (3 classes of 8 images, 9,600 VGG19 features)
    local = client_for(uri).download_artifacts(run.info.run_id, "arrays/ks.npz", str(tmp_path))
    with np.load(local) as z:
        d, d_random = z["d"], z["d_random"]
        assert d.shape == (9600, 3) and d_random.shape == (1, 9600, 3)
    th = stats.thresholds(d, d_random, step=0.001)
    assert run.data.metrics["t_plus"] == pytest.approx(float(th.t_plus))
    assert run.data.metrics["t_minus"] == pytest.approx(float(th.t_minus))
    n_irr = int(np.sum(stats.irrelevant_features(d, th.t_plus, th.t_minus)))
    assert run.data.metrics["n_irrelevant_features"] == n_irr
    history_points = client_for(uri).get_metric_history(run.info.run_id, "d_avg_plus")
    assert len(history_points) == len(th.grid) and {m.step for m in history_points} == set(range(len(th.grid)))
    table4 = client_for(uri).download_artifacts(run.info.run_id, "tables/table4.csv", str(tmp_path))
    row = dict(zip(*[line.split(",") for line in Path(table4).read_text().splitlines()]))
    assert row["dataset"] == "imagefolder" and row["bins"] == "exact" and float(row["t_plus"]) == pytest.approx(th.t_plus)
    table3 = client_for(uri).download_artifacts(run.info.run_id, "tables/table3.csv", str(tmp_path))
    lines = Path(table3).read_text().splitlines()
    assert lines[1].startswith("conv1_1,64,") and lines[-1].startswith("Total,9600")


def test_layer_subsets_reuse_the_cache(history):
    _, uri, steps = history
    step = steps["layers"]
    assert step.rc == 0
    runs = step.jobs()
    assert len(runs) == 2 and step.parent().info.status == "FINISHED"
    assert {r.data.tags["embedding_cache"] for r in runs} == {"hit"}
    assert step.cache == steps["sweep"].cache  # no second extraction
    # conv1_1 + conv1_2: 64 + 64 channels; conv5_4 + fc7: 512 + 4096
    assert sorted(r.data.metrics["n_features"] for r in runs) == [128, 4608]
    assert all("figures/fig9.png" not in artifacts(uri, r.info.run_id) for r in runs)


def test_a_failing_job_is_failed_and_so_is_its_sweep(history):
    _, _, steps = history
    step = steps["failing"]
    assert step.rc == 2
    err = [ln for ln in step.err.splitlines() if ln.startswith("featstudy: error")]
    assert len(err) == 1 and "analysis.layers" in err[0] and "nope" in err[0]
    # [nope] is refused before its MLflow run exists (issue 11): no run, but the sweep lists it and fails
    children = {r.data.params["analysis.layers"]: r.info.status for r in step.jobs()}
    assert children == {"['fc7']": "FINISHED"}
    assert len(step.runs) == 2 and step.parent().info.status == "FAILED"
    assert "[featstudy] sweep FAILED: 1/2 jobs FINISHED" in step.out
    (listed,) = [ln for ln in step.out.splitlines() if ln.strip().startswith("REFUSED")]
    assert "layers=[nope]" in listed and "analysis.layers: unknown layer(s) ['nope']" in listed


def test_resume_skips_finished_jobs_and_reruns_failed_ones(history):
    _, _, steps = history
    (fc7_done,) = [r for r in steps["failing"].jobs() if r.data.params["analysis.layers"] == "['fc7']"]
    (conv_failed,) = steps["failed"].jobs()
    assert steps["failed"].rc == 2 and conv_failed.info.status == "FAILED"  # what the resume has to redo
    step = steps["resume"]
    assert step.rc == 0
    # [fc7] FINISHED in the failing sweep: skipped (no new run), naming that run; [conv1_1] FAILED: runs again
    jobs = step.jobs()
    assert [r.data.params["analysis.layers"] for r in jobs] == ["['conv1_1']"]
    assert jobs[0].info.status == "FINISHED"
    assert jobs[0].data.tags["featstudy.config_hash"] == conv_failed.data.tags["featstudy.config_hash"]
    skipped = [ln for ln in step.err.splitlines() if "tracking.resume: skipped, identical FINISHED run" in ln]
    assert len(skipped) == 1 and fc7_done.info.run_id in skipped[0]


@pytest.fixture(scope="module")
def kill_store(tmp_path_factory) -> tuple[Path, str]:
    """A root folder with a ready SQLite store for the signal tests (creating the tables costs seconds); each test
    looks only at the runs it adds."""
    root = tmp_path_factory.mktemp("killed")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    (root / "mlruns").mkdir()
    client_for(uri).search_experiments()
    return root, uri


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_a_signal_marks_the_run_killed(sig, kill_store, image_folder, helpers, monkeypatch):
    import featstudy.app
    import featstudy.job

    root, uri = kill_store
    before = {r.info.run_id for r in all_runs(uri)}

    def terminated(cfg, dataset=None):
        os.kill(os.getpid(), sig)
        time.sleep(10)
        raise AssertionError(f"{sig} was not delivered")

    monkeypatch.setattr(featstudy.app, "_get_embedding", terminated)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(KeyboardInterrupt):
        helpers.run_cli(helpers.tiny_overrides(root, image_folder), monkeypatch)
    (run,) = [r for r in all_runs(uri) if r.info.run_id not in before]
    assert run.info.status == "KILLED"
    status = (Path(run.data.tags["featstudy.output_dir"]) / "status.txt").read_text().split("\t")
    assert status[:2] == ["KILLED", run.info.run_id]
    assert signal.getsignal(sig) is not featstudy.job.raise_terminated


def test_report_compares_runs_and_is_logged(history, tmp_path):
    from featstudy import report

    _, uri, steps = history
    jobs = steps["sweep"].jobs()
    ids = [r.info.run_id for r in jobs]
    before = {r.info.run_id for r in all_runs(uri)}
    # binned against exact on purpose: refused as a mix of settings unless asked for (issue 11)
    assert report.main(["--tracking-uri", uri, "--runs", *ids, "--out", str(tmp_path / "mixed"), "--no-log",
                        "--formats", "png"]) == 2
    assert report.main(["--tracking-uri", uri, "--runs", *ids, "--out", str(tmp_path / "rep"),
                        "--formats", "png", "--allow-mixed"]) == 0
    for name in ("figures/fig5.png", "figures/fig6.png", "tables/table4.csv"):
        assert (tmp_path / "rep" / name).is_file()
    with open(tmp_path / "rep" / "tables" / "table4.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # one row per run, each with that run's own t+ (binned and exact differ in general)
    assert sorted(r["run_id"] for r in rows) == sorted(ids)
    for r in jobs:
        (row,) = [x for x in rows if x["run_id"] == r.info.run_id]
        assert float(row["t_plus"]) == pytest.approx(r.data.metrics["t_plus"])
    (rep,) = [r for r in all_runs(uri) if r.info.run_id not in before]
    assert rep.data.tags["featstudy.role"] == "report" and rep.info.status == "FINISHED"
    assert set(rep.data.tags["featstudy.report_runs"].split(",")) == set(ids)
    assert {"figures/fig5.png", "tables/table4.csv"} <= artifacts(uri, rep.info.run_id)
    # no run of that dataset: refused in one line
    assert report.main(["--tracking-uri", uri, "--datasets", "nope", "--no-log"]) == 2


def test_children_are_named_by_what_differs_first(history):
    """Sweep children start with their swept setting, short key first (issue 11): not "demo: analysis.…" cut off
    by the runs table's column; a list value is one setting, not a sweep of its items."""
    _, _, steps = history
    names = sorted(r.info.run_name for r in steps["layers"].jobs())
    assert [n.split(" · ")[0] for n in names] == ["layers=[conv1_1,conv1_2]", "layers=[conv5_4,fc7]"]
    assert all(n.split(" · ")[1:3] == ["imagefolder", "vgg19"] for n in names)
    assert sorted(r.info.run_name.split(" · ")[0] for r in steps["sweep"].jobs()) == ["bins=25", "bins=null"]


def test_each_run_logs_its_dataset_as_an_mlflow_input(history):
    """The runs table's Dataset column: name-split, a content digest shared by every run on the same images,
    the split as context, the image and class counts as profile (3 classes x 8 images in the fixture)."""
    import json

    _, _, steps = history
    jobs = steps["sweep"].jobs() + steps["layers"].jobs()
    inputs = [r.inputs.dataset_inputs for r in jobs]
    assert all(len(i) == 1 for i in inputs)
    assert {i[0].dataset.name for i in inputs} == {"imagefolder-all"}
    (digest,) = {i[0].dataset.digest for i in inputs}
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert all(json.loads(i[0].dataset.profile) == {"classes": 3, "images": 24, "skipped": 0} for i in inputs)
    assert all({t.key: t.value for t in i[0].tags} == {"mlflow.data.context": "all"} for i in inputs)


def test_each_job_prints_the_ui_url_of_its_experiment(history):
    """The job's last line names its experiment's page (the experiment id comes from the run's tracker, and for a
    job skipped by tracking.resume from the FINISHED run it names)."""
    from featstudy.tracking import ui_url

    _, _, steps = history
    for name in ("sweep", "resume"):
        (exp_id,) = {r.info.experiment_id for r in steps[name].jobs()}
        lines = [ln for ln in steps[name].out.splitlines() if ln.startswith("[featstudy] browse the runs: ")]
        assert len(lines) == 2  # one per job, the skipped one included
        assert all(ln.endswith(f"then open {ui_url('http://127.0.0.1:5000', exp_id)}") for ln in lines), lines
