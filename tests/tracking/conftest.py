"""Fixtures of the tracking tests."""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> str:
    """One embedding cache for the tracking tests: the first job extracts, the others reuse it."""
    return f"paths.cache_dir={tmp_path_factory.mktemp('tracking_cache')}"


@pytest.fixture(autouse=True)
def _restore_mlflow_http_settings(monkeypatch):
    """Jobs export ``tracking.http_*`` as ``MLFLOW_HTTP_REQUEST_*``; undo that after each test."""
    from featstudy.tracking import HTTP_SETTINGS

    for env in HTTP_SETTINGS.values():
        monkeypatch.setenv(env, "")
        monkeypatch.delenv(env)


# ---- the PostgreSQL-backed MLflow server of scripts/tracking_server.sh (test_server.py, test_server_auth.py) ----

REPO = Path(__file__).resolve().parents[2]
SERVER_SCRIPT = REPO / "scripts" / "tracking_server.sh"


@dataclass
class TrackingServer:
    """A server started by ``scripts/tracking_server.sh``: its URI, folder (secrets under ``folder/secrets``),
    PostgreSQL port and the MLflow credentials a client passes (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``)."""

    uri: str
    folder: Path
    pgport: int
    credentials: dict[str, str]


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


def _credentials(env: dict[str, str]) -> dict[str, str]:
    """The export lines of ``tracking_server.sh env``, parsed (the script's documented way for a client)."""
    out = subprocess.run(["bash", str(SERVER_SCRIPT), "env"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    creds = dict(re.findall(r"^export (MLFLOW_TRACKING_\w+)='([^']*)'$", out.stdout, re.M))
    assert set(creds) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}, out.stdout
    return creds


@pytest.fixture(scope="session")
def tracking_server():
    """``.ci/run``'s server when ``FEATSTUDY_TEST_TRACKING_URI`` is set (with its ``FEATSTUDY_TRACKING_DIR`` and
    ``PGPORT``), else one started here with the real script in a temporary folder on free ports, stopped after."""
    uri = os.environ.get("FEATSTUDY_TEST_TRACKING_URI")
    if uri:
        folder, pgport = os.environ.get("FEATSTUDY_TRACKING_DIR"), os.environ.get("PGPORT")
        assert folder and pgport, "FEATSTUDY_TEST_TRACKING_URI needs FEATSTUDY_TRACKING_DIR and PGPORT (.ci/run exports all three)"
        yield TrackingServer(uri, Path(folder), int(pgport), _credentials(dict(os.environ)))
        return
    reason = postgres_obtainable()
    if reason:
        pytest.skip(reason)
    # not under pytest's tmp folder: it is private to this user, and PostgreSQL runs as 'postgres' when we are root
    folder = Path(tempfile.mkdtemp(prefix="featstudy-tracking-"))
    folder.chmod(0o755)
    mlport, pgport = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "FEATSTUDY_TRACKING_AUTH"))}
    env.update(FEATSTUDY_TRACKING_DIR=str(folder), PGPORT=str(pgport), MLFLOW_PORT=str(mlport),
               MLFLOW_WORKERS="2", MLFLOW_BIN=str(Path(sys.executable).with_name("mlflow")))
    started = subprocess.run(["bash", str(SERVER_SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield TrackingServer(f"http://127.0.0.1:{mlport}", folder, pgport, _credentials(env))
    finally:
        subprocess.run(["bash", str(SERVER_SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
