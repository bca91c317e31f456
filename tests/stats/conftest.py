"""Fixtures of the statistics-engine tests."""

import numpy as np
import pytest


@pytest.fixture
def relu_data():
    rng = np.random.default_rng(7)
    n, f = 240, 24
    x = np.maximum(rng.normal(0.2, 1.0, (n, f)), 0).astype(np.float32)
    x = np.round(x, 1)  # many ties besides the zeros
    x[:, 5] = 1.5  # constant feature
    x[:, 6] = 0.0  # constant zero feature
    labels = np.array(["cls%02d" % (i % 7) for i in range(n)])
    labels[0] = "single"  # a class with one image
    x[labels == "cls03", 2] += 1.0
    return x, labels


@pytest.fixture(params=["table", "sort"])
def binned_kernel(request, monkeypatch):
    """Run a binned test through both binned kernels (which one runs is otherwise chosen by problem size)."""
    from featstudy.stats import ks

    monkeypatch.setattr(ks, "binned_method", lambda n, nbins, n_classes: request.param)
    return request.param


def run_twice_in_fresh_processes(code: str):
    """Run ``code`` (Python source) in two fresh interpreters with featstudy's src on the path; the first warms
    numba's on-disk cache, the second's CompletedProcess is returned (for the cache-hit tests)."""
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {"PYTHONPATH": src, "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)


@pytest.fixture
def fresh_processes():
    """:func:`run_twice_in_fresh_processes`, as a fixture (test modules do not import conftest)."""
    return run_twice_in_fresh_processes

