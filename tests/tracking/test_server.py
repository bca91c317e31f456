"""A 4-job parallel sweep (joblib launcher) against the PostgreSQL-backed MLflow server: every run, metric and
artifact arrives, read back over HTTP.

The server is ``$FEATSTUDY_TEST_TRACKING_URI`` when set (``.ci/run`` starts one), else this module starts its own
with ``scripts/tracking_server.sh`` in a temporary folder on free ports and stops it afterwards.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from featstudy import tracking

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "tracking_server.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_obtainable() -> str | None:
    """None when PostgreSQL is installed or the script can install it, else the reason it cannot."""
    if glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return None
    if os.geteuid() != 0:
        return "PostgreSQL is not installed and this user is not root (cannot apt-get install postgresql)"
    if shutil.which("apt-get") is None:
        return "PostgreSQL is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="module")
def server_uri(tmp_path_factory):
    uri = os.environ.get("FEATSTUDY_TEST_TRACKING_URI")
    if uri:
        yield uri
        return
    reason = postgres_obtainable()
    if reason:
        pytest.skip(reason)
    # not under pytest's tmp folder: it is private to this user, and PostgreSQL runs as 'postgres' when we are root
    folder = Path(tempfile.mkdtemp(prefix="featstudy-tracking-"))
    folder.chmod(0o755)
    mlport = free_port()
    env = dict(os.environ, FEATSTUDY_TRACKING_DIR=str(folder), PGPORT=str(free_port()), MLFLOW_PORT=str(mlport),
               MLFLOW_WORKERS="2", MLFLOW_BIN=str(Path(sys.executable).with_name("mlflow")))
    started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{mlport}"
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


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
            elif op["op"] == "artifact":
                expected_files.add(str(Path(op["artifact_path"] or "") / Path(op["path"]).name))
            elif op["op"] == "table":
                expected_files.add(op["artifact_file"])
        assert {"t_plus", "d_avg_t_plus", "run_seconds"} <= set(run.data.metrics) == set(expected_metrics)
        for key, points in expected_metrics.items():
            got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert got == sorted(points), key
        info = tracking.run_info(server_uri, run.info.run_id)
        assert set(info["artifacts"]) == expected_files and "tables/table4.csv" in expected_files
        # the bytes served back over HTTP are the job's files
        got = tracking.download_artifact(server_uri, run.info.run_id, "tables/table4.csv", tmp_path / run.info.run_id)
        assert got.read_bytes() == (folder / "tables" / "table4.csv").read_bytes()
