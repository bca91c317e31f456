"""Credentials in ``tracking.uri`` (``http://user:password@host``) are used to connect and written nowhere: not in
MLflow params or tags, ``config.yaml``, ``.hydra/*.yaml``, ``multirun.yaml``, the journal, the logs, stdout or
stderr. A real ``python -m featstudy`` and ``python -m featstudy.sync`` talk to a real HTTP listener that records
what it receives (and answers 503, so the job goes on offline)."""

from __future__ import annotations

import base64
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from featstudy import tracking

pytestmark = pytest.mark.slow

SECRET = "s3cretXYZ"
FAST_FAILURE = ["tracking.retries=1", "tracking.retry_delay=0", "tracking.http_max_retries=0",
                "tracking.http_timeout=3", "tracking.http_backoff_factor=0"]
LIGHT = ["~analysis.callbacks.figures", "~analysis.callbacks.null"]
EXPECTED_AUTH = "Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_HTTP_REQUEST_", "MLFLOW_TRACKING_"))}


class Recorder(http.server.ThreadingHTTPServer):
    """An HTTP server on a free loopback port that records (method, path, Authorization) and answers 503."""

    def __init__(self, status: int = 503):
        self.requests: list[tuple[str, str, str | None]] = []
        self.status = status
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                recorder.requests.append((self.command, self.path, self.headers.get("Authorization")))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(recorder.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.shutdown()
    r.server_close()


def files_holding(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.mark.parametrize("mode", ["run", "multirun", "config file"])
def test_credentials_in_the_tracking_uri_are_written_nowhere(mode, recorder, tmp_path, image_folder, helpers, cache):
    """``run``/``multirun``: the URI given on the command line; ``config file``: in a ``local`` config (the
    optional ``local: default`` of conf/config.yaml) found through ``--config-dir``."""
    uri = f"http://user:{SECRET}@127.0.0.1:{recorder.port}"
    sweep = ["-m", "analysis.bins=25,50"] if mode == "multirun" else []
    overrides = [o for o in helpers.tiny_overrides(tmp_path, image_folder) if not o.startswith("tracking.uri=")]
    if mode == "config file":
        local = tmp_path / "myconf" / "local"
        local.mkdir(parents=True)
        (local / "default.yaml").write_text(f"# @package _global_\ntracking:\n  uri: {uri}\n")
        sweep = ["--config-dir", str(tmp_path / "myconf")]
    else:
        overrides.append(f"tracking.uri={uri}")
    cmd = [sys.executable, "-m", "featstudy", *sweep, *overrides, cache, *LIGHT, *FAST_FAILURE]
    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert SECRET not in done.stdout and SECRET not in done.stderr
    folders = sorted(p.parent for p in tmp_path.rglob(tracking.JOURNAL_FILE))
    assert len(folders) == (2 if mode == "multirun" else 1)
    for folder in folders:
        # the files that held it before: all there, none holds it
        for name in ("config.yaml", ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml",
                     tracking.JOURNAL_FILE):
            assert (folder / name).is_file(), name
        start = tracking.Journal.read(folder)["start"]
        assert start["uri"] == f"http://127.0.0.1:{recorder.port}"  # the right host, without the userinfo
        params = {k: v for op in tracking.Journal.read(folder)["ops"] if op["op"] == "params"
                  for k, v in op["params"].items()}
        assert params["tracking.uri"] == f"http://127.0.0.1:{recorder.port}"
    assert files_holding(tmp_path, SECRET) == ([str(local / "default.yaml")] if mode == "config file" else [])
    # the job connected to that host, with the credentials as HTTP basic auth
    assert recorder.requests and all(path.startswith("/api/") for _, path, _ in recorder.requests)
    assert {auth for _, _, auth in recorder.requests} == {EXPECTED_AUTH}

    # sync with the credentials in --tracking-uri: used, not printed, not written
    recorder.requests.clear()
    synced = subprocess.run([sys.executable, "-m", "featstudy.sync", str(folders[0]), "--tracking-uri", uri,
                             "--http-max-retries", "0"], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert synced.returncode == 1, synced.stdout + synced.stderr  # the store answers 503: still unreachable
    assert SECRET not in synced.stdout + synced.stderr
    assert files_holding(tmp_path, SECRET) == ([str(local / "default.yaml")] if mode == "config file" else [])
    assert recorder.requests and {auth for _, _, auth in recorder.requests} == {EXPECTED_AUTH}


def test_sync_takes_the_credentials_from_mlflows_environment_variables(recorder, tmp_path, image_folder, helpers,
                                                                       cache, monkeypatch):
    """The documented way: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, and a URI without userinfo."""
    rc = helpers.run_cli([*helpers.tiny_overrides(tmp_path, image_folder), cache, *LIGHT, "tracking.uri=null"],
                         monkeypatch)
    assert rc == 0
    (folder,) = [p.parent for p in tmp_path.rglob(tracking.JOURNAL_FILE)]
    env = dict(clean_env(), MLFLOW_TRACKING_USERNAME="user", MLFLOW_TRACKING_PASSWORD=SECRET)
    synced = subprocess.run([sys.executable, "-m", "featstudy.sync", str(folder), "--tracking-uri",
                             f"http://127.0.0.1:{recorder.port}", "--http-max-retries", "0"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert synced.returncode == 1 and SECRET not in synced.stdout + synced.stderr
    assert recorder.requests and {auth for _, _, auth in recorder.requests} == {EXPECTED_AUTH}
    assert json.loads((folder / tracking.JOURNAL_FILE).read_text().splitlines()[0])["uri"] is None


def test_a_database_uri_keeps_its_user_and_hands_its_password_to_the_client_library(monkeypatch):
    """By hand: the password leaves the URI for the variable libpq (``PGPASSWORD``) or libmysqlclient (``MYSQL_PWD``)
    reads; the user and everything else stay; text holding such a URI is redacted the same way."""
    for var in ("PGPASSWORD", "MYSQL_PWD"):
        monkeypatch.delenv(var, raising=False)
    uri = f"postgresql+psycopg://mlflow:{SECRET}%21@db.example.org:5433/mlflow?sslmode=require"
    assert tracking.normalise_uri(uri) == "postgresql+psycopg://mlflow@db.example.org:5433/mlflow?sslmode=require"
    assert os.environ["PGPASSWORD"] == SECRET + "!"  # URL-decoded
    assert tracking.normalise_uri(f"mysql://root:{SECRET}@h/db") == "mysql://root@h/db"
    assert os.environ["MYSQL_PWD"] == SECRET
    line = f"tracking.uri={uri} and http://u:{SECRET}@h:1"
    assert tracking.redact(line) == ("tracking.uri=postgresql+psycopg://mlflow@db.example.org:5433/mlflow?sslmode=require"
                                     " and http://h:1")
    assert tracking.normalise_uri("postgresql://mlflow@h/db") == "postgresql://mlflow@h/db"  # no password: as is


def test_a_password_in_a_database_uri_is_written_nowhere(tmp_path, image_folder, helpers, cache):
    """A real job against a PostgreSQL URI whose server is down: it goes offline (exit 0), and no file, no output
    holds the password; a URI scheme whose client reads no password variable is refused in one line (exit 2)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    overrides = [o for o in helpers.tiny_overrides(tmp_path, image_folder) if not o.startswith("tracking.uri=")]
    uri = f"postgresql+psycopg://mlflow:{SECRET}@127.0.0.1:{port}/mlflow"
    cmd = [sys.executable, "-m", "featstudy", *overrides, cache, *LIGHT, *FAST_FAILURE, f"tracking.uri={uri}"]
    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert SECRET not in done.stdout + done.stderr
    assert files_holding(tmp_path, SECRET) == []
    (folder,) = [p.parent for p in tmp_path.rglob(tracking.JOURNAL_FILE)]
    assert tracking.Journal.read(folder)["start"]["uri"] == f"postgresql+psycopg://mlflow@127.0.0.1:{port}/mlflow"

    refused = subprocess.run([*cmd[:-1], f"tracking.uri=mssql+pyodbc://sa:{SECRET}@127.0.0.1:{port}/mlflow"],
                             env=clean_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("featstudy: error: tracking.uri:"), refused.stderr[-3000:]
    assert SECRET not in refused.stdout + refused.stderr


def test_a_refused_login_is_said_so_with_the_fix(tmp_path, image_folder, helpers, cache):
    """A server that answers 401 (MLflow's basic-auth without credentials) is no outage: the job goes on offline, as
    for any store failure, and its error line says the login was refused and which variables to set; so does sync."""
    server = Recorder(status=401)
    try:
        uri = f"http://127.0.0.1:{server.port}"
        overrides = [o for o in helpers.tiny_overrides(tmp_path, image_folder) if not o.startswith("tracking.uri=")]
        done = subprocess.run([sys.executable, "-m", "featstudy", *overrides, cache, *LIGHT, *FAST_FAILURE,
                               f"tracking.uri={uri}"], env=clean_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = [x for x in done.stderr.splitlines() if "MLflow uploads incomplete" in x]
        assert len(lines) == 1, done.stderr[-3000:]
        line = lines[0]
        assert "the server refused the login" in line and "MLFLOW_TRACKING_USERNAME" in line
        (folder,) = [p.parent for p in tmp_path.rglob(tracking.JOURNAL_FILE)]
        synced = subprocess.run([sys.executable, "-m", "featstudy.sync", str(folder), "--http-max-retries", "0"],
                                env=clean_env(), capture_output=True, text=True, timeout=120)
        assert synced.returncode == 1 and "the server refused the login" in synced.stderr, synced.stderr[-2000:]
    finally:
        server.shutdown()
        server.server_close()
