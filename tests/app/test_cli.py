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
    (["pooling.name=median"], ["pooling.name", "'median'", "avg", "max"]),
    (["analysis.bootstrap=-1"], ["analysis.bootstrap=-1", "integer >= 0"]),
    (["analysis.bootstrap=2.5"], ["analysis.bootstrap=2.5", "integer >= 0"]),
    (["analysis.bootstrap_level=1.5"], ["analysis.bootstrap_level=1.5", "(0, 1)"]),
    (["loader.num_workers=-1"], ["loader.num_workers", "auto"]),
    (["loader.num_workers=many"], ["loader.num_workers", "auto"]),
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


def _images(root: Path, classes: list[str], n: int = 2) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _bad_input(case: str, tmp: Path) -> tuple[list[str], list[str]]:
    """(overrides, what the one line must name) for each kind of bad input."""
    two = str(_images(tmp / "two", ["a", "b"]))
    if case == "missing dataset root":
        return [f"dataset.root={tmp / 'nowhere'}"], [str(tmp / "nowhere"), "dataset.root"]
    if case == "missing weights file":
        return [f"dataset.root={two}", f"model.weights={tmp / 'vgg19.pth'}"], ["model.weights", str(tmp / "vgg19.pth")]
    if case == "crops.size > crops.resize":
        return [f"dataset.root={two}", "crops.resize=36", "crops.size=64"], ["crops.size", "crops.resize 36"]
    if case == "analysis.bins=0":
        return [f"dataset.root={two}", "analysis.bins=0"], ["analysis.bins", "integer >= 2"]
    if case == "analysis.bins=-5":
        return [f"dataset.root={two}", "analysis.bins=-5"], ["analysis.bins", "integer >= 2"]
    if case == "empty dataset":
        (tmp / "empty" / "a").mkdir(parents=True)
        return [f"dataset.root={tmp / 'empty'}"], ["dataset.root", str(tmp / "empty"), "no images"]
    if case == "one-class dataset":
        one = _images(tmp / "one", ["only"])
        return [f"dataset.root={one}"], ["dataset.root", str(one), "1 class(es)", "two classes or more"]
    if case == "cache folder is a file":
        (tmp / "blocker").write_text("not a folder")
        return [f"dataset.root={two}", f"paths.cache_dir={tmp / 'blocker' / 'cache'}"], \
            ["paths.cache_dir", str(tmp / "blocker"), "Not a directory", "writable"]
    if case == "unknown analysis layer":  # found before extraction (the DONE check below), not after it
        return [f"dataset.root={two}", "analysis.layers=[fc7,nope]"], ["analysis.layers", "'nope'", "conv5_4"]
    if case == "crops.size below the model's minimum":  # VGG19 halves the crop at each max-pool, down to 1 px
        import torch
        import torchvision

        with torch.device("meta"):
            pools = sum(isinstance(m, torch.nn.MaxPool2d) for m in torchvision.models.vgg19().features)
        return [f"dataset.root={two}", f"crops.size={2 ** pools - 1}"], ["crops.size", "vgg19", f"{2 ** pools} px"]
    if case == "tracking.retries=abc":
        return [f"dataset.root={two}", "tracking.retries=abc"], ["tracking.retries", "'abc'", "integer"]
    if case == "tracking.http_timeout not a number":
        return [f"dataset.root={two}", "tracking.http_timeout=soon"], ["tracking.http_timeout", "'soon'", "number"]
    if case == "tracking.retry_delay negative":
        return [f"dataset.root={two}", "tracking.retry_delay=-1"], ["tracking.retry_delay", ">= 0"]
    if case == "300-character task_name":  # longer than a file name may be (ENAMETOOLONG)
        limit = os.pathconf(tmp, "PC_NAME_MAX")
        return [f"dataset.root={two}", f"task_name={'t' * 300}"], ["task_name", "300 bytes", str(limit)]
    if case == "analysis.bins beyond int32":  # the kernels keep each image's bin in an int32
        import numpy as np

        return [f"dataset.root={two}", "analysis.bins=100000000000"], \
            ["analysis.bins=100000000000", str(np.iinfo(np.int32).max)]
    raise AssertionError(case)


BAD_INPUT = ["missing dataset root", "missing weights file", "crops.size > crops.resize", "analysis.bins=0",
             "analysis.bins=-5", "empty dataset", "one-class dataset", "cache folder is a file",
             "unknown analysis layer", "crops.size below the model's minimum", "tracking.retries=abc",
             "tracking.http_timeout not a number", "tracking.retry_delay negative", "300-character task_name",
             "analysis.bins beyond int32"]


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """Every bad-input case run as its own ``python -m featstudy`` process, all started at once (each pays torch's
    import; in parallel the module costs about one case's wall time per core)."""
    started = {}
    for case in BAD_INPUT:
        tmp = tmp_path_factory.mktemp("bad")
        overrides, names = _bad_input(case, tmp)
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        env["PYTHONPATH"] = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
        args = ["dataset=imagefolder", "model.weights=random", "crops=center", "crops.resize=36", "crops.size=32",
                *overrides, f"paths.root_dir={tmp}", "tracking.uri=null"]
        proc = subprocess.Popen([sys.executable, "-m", "featstudy", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)
        started[case] = (proc, names, tmp)
    done = {}
    for case, (proc, names, tmp) in started.items():
        _, err = proc.communicate(timeout=300)
        done[case] = (proc.returncode, err, names, tmp)
    return done


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_2_with_one_line_naming_the_key_or_path(case, bad_input_runs):
    returncode, stderr, names, tmp = bad_input_runs[case]
    assert returncode == 2, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("featstudy: error: ")]
    assert len(lines) == 1, stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert "Traceback" not in stderr
    assert not list(tmp.rglob("DONE"))  # nothing was extracted


def test_main_leaves_hydra_full_error_as_it_found_it(monkeypatch, helpers):
    """main() sets HYDRA_FULL_ERROR=1 for Hydra while it runs; a caller in the same process (a test, a notebook)
    must find its own setting afterwards, or every later subprocess prints tracebacks instead of one line."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert helpers.run_cli(["dataset=nope"], monkeypatch) == 2
    assert "HYDRA_FULL_ERROR" not in os.environ
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    assert helpers.run_cli(["dataset=nope"], monkeypatch) == 2
    assert os.environ["HYDRA_FULL_ERROR"] == "0"


@pytest.mark.parametrize("case", ["missing dataset root", "missing weights file", "unknown analysis layer"])
def test_a_mistake_found_without_extraction_leaves_no_mlflow_run_and_at_most_4_lines(case, tmp_path):
    """Tracking on (the default SQLite store): refused before the job's MLflow run is created, so the store has no
    FAILED run to clean up; at most 4 lines on the console (issue 11, item 7)."""
    from mlflow.tracking import MlflowClient

    overrides, names = _bad_input(case, tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    proc = featstudy("dataset=imagefolder", "model.weights=random", "crops=center", "crops.resize=36",
                     "crops.size=32", *overrides, f"paths.root_dir={tmp_path}", f"tracking.uri={uri}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) <= 4, lines
    (error,) = [ln for ln in lines if ln.startswith("featstudy: error: ")]
    assert all(name in error for name in names)
    if (tmp_path / "mlruns" / "mlflow.db").exists():
        client = MlflowClient(uri)
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_job_error_is_printed_once_without_lightnings_noise(tmp_path):
    """A job failing after extraction (its only other class unreadable) on a pipe, as under SLURM or nohup: the
    error once on the console (the job's log file still has it), no Lightning tip, no deprecation warning, no
    progress-bar redraws (issue 11, items 5 and 6)."""
    two = _images(tmp_path / "data", ["a"], n=3)
    (two / "b").mkdir()
    for i in range(3):
        (two / "b" / f"{i}.png").write_bytes(b"not a png")
    proc = featstudy("dataset=imagefolder", f"dataset.root={two}", "model.weights=random", "crops=center",
                     "crops.resize=36", "crops.size=32", "~analysis.callbacks.figures", f"paths.root_dir={tmp_path}",
                     f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    console = proc.stdout + proc.stderr
    assert console.count("have no readable image") == 1, console
    for noise in ("Tip:", "litlogger", "LeafSpec", "Predicting", "it/s"):
        assert noise not in console, noise
    (log_file,) = (tmp_path / "outputs").rglob("*.log")
    assert "have no readable image" in log_file.read_text() and "extracting 6 images" in log_file.read_text()


@pytest.mark.parametrize("args,expected", [
    (["analysis.bin=50"], ["analysis.bin: no such key; did you mean analysis.bins=50?"]),
    (["model.weigths=random"], ["did you mean model.weights=random?"]),
    (["analysis.layers=conv5_4,fc7"], ["analysis.layers=[conv5_4,fc7]", "analysis.layers='conv5_4,fc7'", "add -m"]),
])
def test_an_error_keeps_its_hint(args, expected, tmp_path):
    proc = featstudy(*args, f"paths.root_dir={tmp_path}", "tracking.uri=null", cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert all(e in line for e in expected), line
