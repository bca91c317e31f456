"""The MLflow UI, in a real (headless) Chromium: the page featstudy prints opens on the runs table with the
Dataset column filled (issue 11, item 3). Skipped where Chromium is not installed (.ci/run installs it).

Found in a browser, not in MLflow's docs: MLflow 3.17 opens an experiment in its GenAI view ("No data available")
whatever ``mlflow.experimentKind`` says, unless the URL carries ``?workflowType=machine_learning`` (or the browser
saved that choice); featstudy prints that URL.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from featstudy.tracking import log_dataset, prepare_experiment, ui_command, ui_url

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (20 s of virtual time), as Chromium renders it."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url]
    return subprocess.run([CHROMIUM, *flags], capture_output=True, text=True, timeout=180).stdout


@pytest.fixture
def ui(tmp_path):
    """A store with one finished featstudy-like run and its dataset input, served by ``mlflow ui``."""
    from mlflow.tracking import MlflowClient

    (tmp_path / "mlruns").mkdir()
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    _, exp_id = prepare_experiment(uri, "featstudy", str(tmp_path / "mlruns" / "artifacts"))
    client = MlflowClient(uri)
    run = client.create_run(exp_id, run_name="cub200 · vgg19 · IMAGENET1K_V1 · exact", tags={"featstudy.role": "job"})
    log_dataset(client, run.info.run_id, name="cub200-train", digest="0123456789abcdef", source="/data/cub",
                profile={"images": 5994, "classes": 200, "skipped": 0}, context="train")
    client.set_terminated(run.info.run_id, "FINISHED")
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", uri,
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow ui did not start"
                time.sleep(1)
        yield f"http://127.0.0.1:{port}", exp_id, uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_the_printed_page_opens_on_the_runs_with_the_dataset_column(ui, tmp_path):
    base, exp_id, uri = ui
    assert ui_url("http://127.0.0.1:5000", exp_id) in ui_command(uri, exp_id)  # what the job prints
    dom = _dom(ui_url(base, exp_id), tmp_path / "profile")
    assert ">1</strong> matching run" in dom, dom[-2000:]  # the runs table's footer: our one run
    assert "cub200-train (0123456789abcdef)" in dom  # the Dataset column
    assert "cub200 · vgg19" in dom
    assert "No data available" not in dom  # not the GenAI overview
    # the same experiment without the query opens on the GenAI overview: why featstudy prints the full URL
    plain = _dom(f"{base}/#/experiments/{exp_id}", tmp_path / "profile2")
    assert "No data available" in plain and "matching run" not in plain
