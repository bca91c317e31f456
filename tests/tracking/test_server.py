"""A 4-job parallel sweep (joblib launcher) against the PostgreSQL-backed MLflow server: every run, metric and
artifact arrives, read back over HTTP.

The server is ``$FEATSTUDY_TEST_TRACKING_URI`` when set (``.ci/run`` starts one), else the ``tracking_server``
fixture (conftest.py) starts its own with ``scripts/tracking_server.sh`` in a temporary folder on free ports and
stops it afterwards. The server requires MLflow's login (its default): the jobs get the credentials the way a user
passes them, in ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from featstudy import tracking

pytestmark = pytest.mark.slow


def run_info(uri: str, run_id: str) -> dict[str, Any]:
    """Status, tags, params, metrics and artifact paths of one run, read back from the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.normalise_uri(uri))
    r = client.get_run(run_id)

    def walk(path: str | None) -> list[str]:
        out = []
        for f in client.list_artifacts(run_id, path):
            out.extend(walk(f.path) if f.is_dir else [f.path])
        return out

    return {"status": r.info.status, "tags": dict(r.data.tags), "params": dict(r.data.params),
            "metrics": dict(r.data.metrics), "artifacts": sorted(walk(None)), "name": r.info.run_name,
            "experiment_id": r.info.experiment_id,
            "history": lambda key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]}


@pytest.fixture
def server_uri(tracking_server, monkeypatch):
    for key, value in tracking_server.credentials.items():
        monkeypatch.setenv(key, value)
    return tracking_server.uri


def test_parallel_sweep_against_the_server(server_uri, tmp_path, image_folder, helpers, cache, monkeypatch):
    from mlflow.tracking import MlflowClient

    experiment = f"featstudy-test-{uuid.uuid4().hex[:8]}"
    overrides = [o for o in helpers.tiny_overrides(tmp_path, image_folder) if not o.startswith("tracking.")]
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    rc = helpers.run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", *overrides, cache,
                          "tracking=server",
                          f"tracking.uri={server_uri}", f"tracking.experiment_name={experiment}",
                          "~analysis.callbacks.figures", "~analysis.callbacks.null",
                          "analysis.bins=10,25,50,100"], monkeypatch)
    assert rc == 0

    client = MlflowClient(tracking_uri=server_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("featstudy.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(runs) == 5 and len(children) == 4
    assert sorted(int(r.data.params["analysis.bins"]) for r in children) == [10, 25, 50, 100]
    assert all(r.info.status == "FINISHED" for r in children)

    for run in children:
        folder = Path(run.data.tags["featstudy.output_dir"])
        j = tracking.Journal.read(folder)
        assert j["run_id"] == run.info.run_id
        # every journaled operation was acknowledged by the server: nothing for sync to do
        assert {op["seq"] for op in j["ops"]} == j["acks"][run.info.run_id]
        assert tracking.sync_job(folder) == ("already logged", run.info.run_id)
        expected_metrics, expected_files = {}, set()
        for op in j["ops"]:
            if op["op"] == "metrics":
                for k, v, _, step in op["metrics"]:
                    expected_metrics.setdefault(k, []).append((step, v))
            elif op["op"] == "artifact" and op.get("is_dir"):  # a folder (atlas/img), logged whole
                local = folder / op["path"] if not Path(op["path"]).is_absolute() else Path(op["path"])
                expected_files |= {str(Path(op["artifact_path"] or "") / f.relative_to(local))
                                   for f in local.rglob("*") if f.is_file()}
            elif op["op"] == "artifact":
                expected_files.add(str(Path(op["artifact_path"] or "") / Path(op["path"]).name))
            elif op["op"] == "table":
                expected_files.add(op["artifact_file"])
        assert {"t_plus", "d_avg_t_plus", "run_seconds"} <= set(run.data.metrics) == set(expected_metrics)
        for key, points in expected_metrics.items():
            got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert got == sorted(points), key
        info = run_info(server_uri, run.info.run_id)
        assert set(info["artifacts"]) == expected_files and "tables/table4.csv" in expected_files
        # the bytes served back over HTTP are the job's files
        got = tracking.download_artifact(server_uri, run.info.run_id, "tables/table4.csv", tmp_path / run.info.run_id)
        assert got.read_bytes() == (folder / "tables" / "table4.csv").read_bytes()
