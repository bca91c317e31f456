"""bench/gpu_check.sh --cpu: the GPU check's code paths (issue 13) run for real on the CPU, small sizes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUM = r"[0-9.]+(e[+-][0-9]+)?"


@pytest.mark.slow
def test_gpu_check_cpu_prints_every_line(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for model in ("VGG19", "ViT"):
        assert re.search(rf"^{model}\s+fp32 CPU#2 vs CPU\s+max abs {NUM}\s+max rel {NUM}", out, re.MULTILINE), out
        for mode in ("fp32", "channels_last", "bf16"):
            line = rf"^{model}\s+{mode}\s+img/s\s+{NUM}\s+model img/s\s+{NUM}"
            if mode != "fp32":
                line += rf"\s+vs fp32 max abs {NUM}\s+max rel {NUM}"
            assert re.search(line, out, re.MULTILINE), (model, mode, out)
    for ks in ("bins=100", "exact"):
        assert re.search(rf"^KS\s+signed_ks {ks}\s+{NUM} s", out, re.MULTILINE), out
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["cpu_mode"] and report["accelerator"] == "cpu"
    for model in ("vgg19", "vit"):  # the same fp32 path twice on the CPU: identical features
        assert report[model]["fp32_device_vs_cpu"]["max_abs"] == 0.0
        assert report[model]["bf16"]["vs_fp32"]["max_rel"] > 0  # bf16 really ran
        assert all(report[model][m]["img_s"] > 0 for m in ("fp32", "channels_last", "bf16"))
    assert report["ks"]["bins100_s"] > 0 and report["ks"]["exact_s"] > 0
    assert (tmp_path / "out" / "gpu_check.txt").read_text().strip()
