"""README's quick-start commands, as written, from a fresh shell (issue 11, item 1).

A new user ran ``make demo``, then the README's ``python -m featstudy ...`` ("No module named featstudy") and
``mlflow ui`` (not on PATH). This runs the commands of the quick start's second block exactly as README.md has
them, in ``bash --noprofile --norc`` with an empty environment (HOME, a system PATH, LANG), in a project folder
that holds a ``.project-root`` and the repository's ``.venv`` (as a link, so nothing is written into the
checkout): the sweep must finish with one parent and two children in the project's store, and ``mlflow ui``
must serve those runs on 127.0.0.1:5000 until it is stopped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the quick start has its make block and its commands block"
    return [ln for ln in blocks[1].splitlines() if ln.strip()]


def _fresh_env(home: Path) -> dict[str, str]:
    return {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "MPLBACKEND": "Agg"}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _get(url: str, data: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read() or b"{}")


def test_the_commands_block_enters_the_environment_first():
    lines = _quick_start_commands()
    assert lines[0].split("#")[0].strip() == "source .venv/bin/activate"
    assert any(ln.startswith("python -m featstudy -m ") for ln in lines)
    assert any(ln.startswith("mlflow ui ") for ln in lines)


@pytest.mark.slow
def test_readme_quick_start_commands_work_as_written_in_a_fresh_shell(tmp_path):
    venv = REPO / ".venv"
    if not venv.is_dir() or Path(sys.prefix).resolve() != venv.resolve():
        pytest.skip("not running from the repository's .venv (make venv builds it)")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / ".project-root").write_text("")
    (proj / ".venv").symlink_to(venv)
    activate, *commands = _quick_start_commands()
    sweep = [c for c in commands if c.startswith("python -m featstudy")]
    ui = [c for c in commands if c.startswith("mlflow ui ")]
    assert len(sweep) == 1 and len(ui) == 1

    script = "set -e\n" + activate + "\n" + sweep[0] + "\n"
    done = subprocess.run(["bash", "--noprofile", "--norc", "-c", script], cwd=proj, env=_fresh_env(tmp_path),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"project root: {proj} (.project-root found)" in done.stdout
    assert (proj / "mlruns" / "mlflow.db").is_file() and not (REPO / "proj").exists()

    if not _port_free(5000):
        pytest.skip("127.0.0.1:5000 is taken on this machine: the README's `mlflow ui` cannot start as written")
    server = subprocess.Popen(["bash", "--noprofile", "--norc", "-c", activate + "\n" + ui[0]], cwd=proj,
                              env=_fresh_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen("http://127.0.0.1:5000/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()[-3000:]
                assert time.monotonic() < deadline, "mlflow ui did not answer on 127.0.0.1:5000 within 120 s"
                time.sleep(1)
        exp = _get("http://127.0.0.1:5000/api/2.0/mlflow/experiments/get-by-name?experiment_name=featstudy")
        exp_id = exp["experiment"]["experiment_id"]
        tags = {t["key"]: t["value"] for t in exp["experiment"].get("tags", [])}
        assert tags.get("mlflow.experimentKind") == "custom_model_development"  # opens on the runs table
        runs = _get("http://127.0.0.1:5000/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
        roles = sorted(next(t["value"] for t in r["data"]["tags"] if t["key"] == "featstudy.role") for r in runs)
        assert roles == ["job", "job", "sweep"]
        assert all(r["info"]["status"] == "FINISHED" for r in runs)
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, as the README says
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
    # stopped: nothing answers on the port any more (binding it again may wait for TIME_WAIT sockets)
    deadline = time.monotonic() + 30
    while _answers(5000):
        assert time.monotonic() < deadline, "mlflow ui still answers after Ctrl-C"
        time.sleep(0.5)
