"""Faults of ``python -m featstudy.sync`` and of the tracking of a job, each with real processes, files and stores:

* two syncs of one folder at once log exactly one run per job (a lock per job folder);
* a table whose upload reached the store but was not acknowledged is not doubled when it is replayed;
* a run whose server died mid-job is findable as incomplete (``featstudy.incomplete=true``) and sync completes it;
* sync against a dead server applies the job's ``tracking.http_*`` settings (or ``--http-*``) and fails fast.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from featstudy import tracking

pytestmark = pytest.mark.slow

FAST_FAILURE = ["tracking.retries=1", "tracking.retry_delay=0", "tracking.http_max_retries=0",
                "tracking.http_timeout=3", "tracking.http_backoff_factor=0"]
LIGHT = ["~analysis.callbacks.figures", "~analysis.callbacks.null"]
HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """The environment of a fresh shell: none of MLflow's HTTP settings exported by earlier in-process jobs."""
    return {k: v for k, v in os.environ.items() if k not in HTTP_ENV and not k.startswith("MLFLOW_TRACKING_")}


def sync_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "featstudy.sync", *args]


def runs_in(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("featstudy")
    return [] if exp is None else c.search_runs([exp.experiment_id], max_results=1000)


def job_folders(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob(tracking.JOURNAL_FILE))


def journal_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / tracking.JOURNAL_FILE).read_text().splitlines()]


# --------------------------------------------------------------------------------------------- item 8: two syncs

def test_two_syncs_at_once_log_each_job_once(tmp_path, image_folder, helpers, cache, monkeypatch):
    """Two ``featstudy.sync`` processes started together on one offline sweep folder, three trials into fresh
    stores: each store ends with one parent and one child per job (no duplicate), all FINISHED."""
    dead = f"http://127.0.0.1:{free_port()}"
    rc = helpers.run_cli(["-m", *helpers.tiny_overrides(tmp_path, image_folder), cache, *LIGHT, *FAST_FAILURE,
                          f"tracking.uri={dead}", "analysis.bins=25,50"], monkeypatch)
    assert rc == 0
    (sweep_dir,) = [p.parent for p in tmp_path.rglob(tracking.SWEEP_FILE)]
    assert len(job_folders(sweep_dir)) == 2
    for trial in range(3):
        store = f"sqlite:///{tmp_path}/store{trial}/mlflow.db"
        procs = [subprocess.Popen(sync_cmd(str(sweep_dir), "--tracking-uri", store), env=clean_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=180)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        runs = runs_in(store)
        parents = [r for r in runs if r.data.tags.get("featstudy.role") == "sweep"]
        assert len(parents) == 1, (trial, outs)
        assert parents[0].info.status == "FINISHED", (trial, outs)
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        assert len(runs) == 3 and len(children) == 2, (trial, [r.info.run_name for r in runs], outs)
        assert sorted(r.data.params["analysis.bins"] for r in children) == ["25", "50"]
        assert all(r.info.status == "FINISHED" for r in children)
        # one process logged each job, the other waited and found it synced
        text = "\n".join(outs)
        assert text.count(": logged (run") == 2 and text.count(": already synced (run") == 2, text


# --------------------------------------------------------------------------------------------- item 9: tables

def _table_rows(journal: list[dict]) -> dict[str, dict]:
    return {e["artifact_file"]: e["data"] for e in journal if e.get("op") == "table"}


def _drop_acks(folder: Path, seqs: set[int]) -> None:
    kept = [line for line in (folder / tracking.JOURNAL_FILE).read_text().splitlines(keepends=True)
            if json.loads(line).get("ack") not in seqs]
    (folder / tracking.JOURNAL_FILE).write_text("".join(kept))


def _assert_tables_once(uri: str, run_id: str, tables: dict[str, dict], tmp: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for artifact_file, data in tables.items():
        columns = list(data)
        n_rows = len(data[columns[0]])
        got = json.loads(Path(client.download_artifacts(run_id, artifact_file, str(tmp / run_id))).read_text())
        assert got["columns"] == columns, artifact_file
        assert len(got["data"]) == n_rows, f"{artifact_file}: {len(got['data'])} rows, the journal has {n_rows}"
        for i, row in enumerate(got["data"]):
            assert [str(v) for v in row] == [str(data[c][i]) for c in columns], (artifact_file, i)
        # MLflow's own table reader (mlflow.load_table; it searches through the fluent API's store) sees the rows
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        exp_id = client.get_run(run_id).info.experiment_id
        assert len(client.load_table(exp_id, artifact_file, run_ids=[run_id])) == n_rows
    # the MLflow UI lists them as tables
    logged = json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert {(a["path"], a["type"]) for a in logged} >= {(f, "table") for f in tables}


@pytest.mark.parametrize("who", ["job", "sync"])
def test_a_table_replayed_after_a_lost_ack_is_not_doubled(who, tmp_path, image_folder, helpers, cache,
                                                         monkeypatch):
    """The table reached the store, the process died before writing its ack (simulated: the ack line removed from
    the journal). ``job``: the job's own run; ``sync``: a run made by sync, which died before its final tags (its
    marker and ``featstudy.sync_complete`` tag removed). The resumed sync must leave each table with the journal's
    rows, once."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    overrides = [*helpers.tiny_overrides(tmp_path, image_folder), cache, *LIGHT]
    if who == "sync":
        overrides += [*FAST_FAILURE, f"tracking.uri=http://127.0.0.1:{free_port()}"]
    assert helpers.run_cli(overrides, monkeypatch) == 0
    (folder,) = job_folders(tmp_path)
    journal = journal_lines(folder)
    tables = _table_rows(journal)
    assert all(len(col) == 1 for col in tables["tables/table4.json"].values())  # Table 4: one row per dataset
    table_seqs = {e["seq"] for e in journal if e.get("op") == "table"}
    if who == "sync":
        first = subprocess.run(sync_cmd(str(folder), "--tracking-uri", uri), env=clean_env(), capture_output=True,
                               text=True, timeout=180)
        assert first.returncode == 0, first.stderr
        (run,) = runs_in(uri)
        (folder / tracking.SYNCED_FILE).unlink()
        client = MlflowClient(tracking_uri=uri)
        client.delete_tag(run.info.run_id, "featstudy.sync_complete")
        client.update_run(run.info.run_id, status="RUNNING")
    else:
        (run,) = runs_in(uri)
    assert set().union(*tracking.Journal.read(folder)["acks"].values()) >= table_seqs
    _drop_acks(folder, table_seqs)

    args = [str(folder)] + (["--tracking-uri", uri] if who == "sync" else [])
    again = subprocess.run(sync_cmd(*args), env=clean_env(), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    (after,) = runs_in(uri)
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    _assert_tables_once(uri, run.info.run_id, tables, tmp_path, monkeypatch)


# --------------------------------------------------------------------------------------------- item 10: outage

class MlflowServer:
    """``mlflow server`` with a SQLite backend in a folder, on a fixed port; kill -9 and restart on the same port."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port, self.proc = folder, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
               "--artifacts-destination", str(self.folder / "artifacts"), "--serve-artifacts",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 - kept open for the server's lifetime
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=clean_env(), start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("mlflow server did not start: " + (self.folder / "server.log").read_text()[-3000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path / "server", free_port())
    yield s
    s.kill()


def test_outage_outlasting_the_job_leaves_the_run_findable_and_sync_completes_it(server, tmp_path, helpers):
    """The server accepts the run, then dies (kill -9) while the job runs and stays down past its end: the job
    finishes (exit 0, status.txt FINISHED); the run in the store is RUNNING and tagged
    ``featstudy.incomplete=true``; once the server is back, sync completes that run: FINISHED, incomplete=false."""
    from mlflow.tracking import MlflowClient

    server.start()
    images = helpers.make_image_folder(tmp_path / "images", per_class=20)
    cmd = [sys.executable, "-m", "featstudy", *helpers.tiny_overrides(tmp_path, images), *LIGHT, *FAST_FAILURE,
           f"paths.cache_dir={tmp_path / 'cache'}", f"tracking.uri={server.uri}"]
    job = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    created = None
    deadline = time.time() + 120
    while created is None and time.time() < deadline and job.poll() is None:
        for j in tmp_path.rglob(tracking.JOURNAL_FILE):
            created = next((json.loads(x)["run_created"] for x in j.read_text().splitlines()
                            if '"run_created"' in x), None)
        time.sleep(0.02)
    server.kill()
    out = job.communicate(timeout=300)[0]
    assert created is not None, out
    assert job.returncode == 0, out
    (folder,) = job_folders(tmp_path)
    assert (folder / "status.txt").read_text().startswith("FINISHED")
    j = tracking.Journal.read(folder)
    end = [op for op in j["ops"] if op["op"] == "end"]
    assert end and end[0]["seq"] not in j["acks"].get(created, set()), "the server died after the job's end"

    server.start()
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(created)
    assert run.info.status == "RUNNING"
    assert run.data.tags.get("featstudy.incomplete") == "true"
    exp = client.get_experiment_by_name("featstudy")
    found = client.search_runs([exp.experiment_id], filter_string="tags.`featstudy.incomplete` = 'true'")
    assert [r.info.run_id for r in found] == [created]

    done = subprocess.run(sync_cmd(str(folder)), env=clean_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "completed" in done.stdout
    run = client.get_run(created)
    assert run.info.status == "FINISHED" and run.data.tags["featstudy.incomplete"] == "false"
    journaled = {}
    for op in j["ops"]:
        if op["op"] == "metrics":
            for k, v, _, step in op["metrics"]:
                journaled.setdefault(k, []).append((step, v))
    assert set(run.data.metrics) == set(journaled)
    for key, points in journaled.items():
        assert sorted((m.step, m.value) for m in client.get_metric_history(created, key)) == sorted(points), key
    (only,) = client.search_runs([exp.experiment_id])
    assert only.info.run_id == created


def test_a_job_that_logged_everything_is_not_marked_incomplete(tmp_path, image_folder, helpers, cache, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert helpers.run_cli([*helpers.tiny_overrides(tmp_path, image_folder), cache, *LIGHT], monkeypatch) == 0
    (run,) = runs_in(uri)
    assert run.info.status == "FINISHED" and run.data.tags["featstudy.incomplete"] == "false"


# --------------------------------------------------------------------------------------------- item 11: dead server

def _untracked_job(tmp_path, image_folder, helpers, cache, monkeypatch, *http: str) -> Path:
    rc = helpers.run_cli([*helpers.tiny_overrides(tmp_path, image_folder), cache, *LIGHT, "tracking.uri=null", *http],
                         monkeypatch)
    assert rc == 0
    (folder,) = job_folders(tmp_path)
    return folder


def test_sync_against_a_dead_server_uses_the_jobs_http_settings(tmp_path, image_folder, helpers, cache,
                                                                monkeypatch):
    """The job's config says 0 HTTP retries and a 3 s timeout: sync fails within seconds (MLflow's defaults, 7
    retries with backoff factor 2, take about 4 minutes), exit 1, nothing marked synced."""
    folder = _untracked_job(tmp_path, image_folder, helpers, cache, monkeypatch, "tracking.http_max_retries=0",
                            "tracking.http_timeout=3", "tracking.http_backoff_factor=0")
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    done = subprocess.run(sync_cmd(str(folder), "--tracking-uri", dead), env=clean_env(), capture_output=True,
                          text=True, timeout=90)
    took = time.monotonic() - t0
    assert done.returncode == 1, done.stdout + done.stderr
    assert took < 30, f"{took:.0f} s"  # imports (a few s) + no retry: a refused connection fails at once
    assert "unreachable" in done.stderr and not (folder / tracking.SYNCED_FILE).exists()


def test_sync_http_flags_override_the_jobs_settings(tmp_path, image_folder, helpers, cache, monkeypatch):
    """The job's config asks for 6 retries with backoff factor 2 (2+4+...+64 = 126 s per call); ``--http-max-retries
    0`` on the command line wins: exit 1 within seconds."""
    folder = _untracked_job(tmp_path, image_folder, helpers, cache, monkeypatch, "tracking.http_max_retries=6",
                            "tracking.http_backoff_factor=2")
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    done = subprocess.run(sync_cmd(str(folder), "--tracking-uri", dead, "--http-max-retries", "0",
                                   "--http-timeout", "3"), env=clean_env(), capture_output=True, text=True,
                          timeout=90)
    took = time.monotonic() - t0
    assert done.returncode == 1, done.stdout + done.stderr
    assert took < 30, f"{took:.0f} s"
