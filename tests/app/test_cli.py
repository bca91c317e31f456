"""``python -m featstudy``: bad configs exit 2 with one line; --cfg job and --help work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def featstudy(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env["PYTHONPATH"] = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "featstudy", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=120)


@pytest.mark.parametrize("args,names", [
    (["dataset=nope"], ["dataset=nope", "digits"]),
    (["crops=twelve"], ["crops=twelve", "ten"]),
    (["analysis.nokey=1"], ["analysis.nokey", "+analysis.nokey=1"]),
    (["analysis.bins=abc"], ["analysis.bins", "integer"]),
    (["analysis.permutations=0"], ["analysis.permutations", ">= 1"]),
    (["analysis.layers=fc7"], ["analysis.layers", "list"]),
    (["pooling.name=median"], ["pooling", "avg|max"]),
    (["analysis.bins=[1"], ["analysis.bins=[1"]),
])
def test_bad_config_exits_2_with_one_line(args, names, tmp_path):
    proc = featstudy(*args, f"paths.root_dir={tmp_path}", "tracking.uri=null", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("featstudy: error: ")
    for name in names:
        assert name in lines[0]
    assert "Traceback" not in proc.stderr


def test_full_error_shows_the_traceback(tmp_path):
    proc = featstudy("analysis.bins=abc", f"paths.root_dir={tmp_path}", "tracking.uri=null",
                     env={"HYDRA_FULL_ERROR": "1"}, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_cfg_job_and_help(tmp_path):
    proc = featstudy("--cfg", "job", "experiment=paper_cub200", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "name: cub200" in proc.stdout and "weights: IMAGENET1K_V1" in proc.stdout
    proc = featstudy("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "featstudy" in proc.stdout and "paper_cub200" in proc.stdout and "--cfg job" in proc.stdout
