"""Each job's own output folder, and full disks under the output folder or the MLflow store (issue 10, items 3, 7).

Real ``python -m featstudy`` processes on a tiny image folder; the full disks are real: a small tmpfs mounted for the
test (root only; skipped with the reason elsewhere). Every expectation is counted from what the processes printed
and from the folders and the SQLite file themselves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
#: the run folder's name: the second it started, then microseconds and the process id
FOLDER_NAME = re.compile(r"^\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}-\d+$")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    return env


def _job_args(root: Path, images: Path, *extra: str) -> list[str]:
    """The light demo job: VGG19 (random weights) on 32 px centre crops, KS and thresholds only."""
    return ["experiment=demo", "dataset=imagefolder", f"dataset.root={images}", "model.weights=random",
            "crops=center", "crops.resize=36", "crops.size=32", "loader.num_workers=0", "trainer.accelerator=cpu",
            "~analysis.callbacks.figures", "~analysis.callbacks.null", f"paths.root_dir={root}", *extra]


def _featstudy(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featstudy", *args], capture_output=True, text=True, env=_env(),
                          cwd=cwd, timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("featstudy: error: ")]


@pytest.fixture(scope="module")
def images(tmp_path_factory, helpers) -> Path:
    return helpers.make_image_folder(tmp_path_factory.mktemp("img"), n_classes=2, per_class=3)


# --------------------------------------------------------------------------------------------- item 3

#: each child imports everything first, then waits for the same instant: both compose (and name their run folder)
#: within a few milliseconds of each other, in the same second, as two jobs a scheduler starts together
_AT_ONCE = """
import runpy, sys, time
import featstudy.app, featstudy.tracking, hydra, mlflow  # the slow imports, before the start line
print("ready", flush=True)
start = float(sys.stdin.readline())
time.sleep(max(0.0, start - time.time()))
sys.argv = ["featstudy", *sys.argv[1:]]
runpy.run_module("featstudy", run_name="__main__", alter_sys=True)
"""


def _outputs_of(stderr: str) -> list[str]:
    return re.findall(r"^\[featstudy\] \w+: outputs in (.+)$", stderr, flags=re.M)


@pytest.mark.slow
def test_two_jobs_started_in_the_same_second_get_their_own_folder(tmp_path, images):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    args = _job_args(tmp_path, images, f"tracking.uri={uri}")
    procs = [subprocess.Popen([sys.executable, "-c", _AT_ONCE, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    start = float(int(time.time()) + 1) + 0.05  # the next whole second, plus 50 ms: both in that second
    for p in procs:  # both get the start time before either is waited for
        p.stdin.write(f"{start}\n")
        p.stdin.flush()
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    folders = [_outputs_of(err) for _, err in results]
    assert all(len(f) == 1 for f in folders), folders
    (a,), (b,) = folders
    assert a != b
    for folder in (Path(a), Path(b)):
        assert FOLDER_NAME.match(folder.name), folder.name
        assert folder.parent == tmp_path / "outputs" / "demo" / "runs"
        # its own journal: one start record, naming this folder, and no other job's journal set aside in it
        lines = [json.loads(ln) for ln in (folder / "tracking_journal.jsonl").read_text().splitlines()]
        starts = [e for e in lines if e.get("op") == "start"]
        assert len(starts) == 1 and starts[0]["tags"]["featstudy.output_dir"] == str(folder)
        assert len([e for e in lines if "run_created" in e]) == 1
        assert not list(folder.glob("tracking_journal.jsonl.*"))
        assert (folder / "status.txt").read_text().startswith("FINISHED\t")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("featstudy").experiment_id])
    assert len(runs) == 2
    assert {r.data.tags["featstudy.output_dir"] for r in runs} == {a, b}
    assert {r.info.status for r in runs} == {"FINISHED"}
    # the run ids in the status files are the two runs, one each
    assert {Path(f).joinpath("status.txt").read_text().split("\t")[1] for f in (a, b)} == \
        {r.info.run_id for r in runs}


def test_each_composition_gets_its_own_run_and_sweep_folder_and_keeps_it(tmp_path, helpers):
    """Composed twice in a row (well within one second): two run folders and two sweep folders; each resolves to
    the same folder every time it is read, and exactly the folders read exist."""
    overrides = [f"paths.root_dir={tmp_path}", "task_name=t"]
    first = helpers.compose(overrides, hydra_config=True)
    second = helpers.compose(overrides, hydra_config=True)
    runs = [first.hydra.run.dir, second.hydra.run.dir]
    sweeps = [first.hydra.sweep.dir, second.hydra.sweep.dir]
    assert runs[0] != runs[1] and sweeps[0] != sweeps[1]
    assert [first.hydra.run.dir, second.hydra.run.dir] == runs  # read again: the same folder
    assert [first.hydra.sweep.dir, second.hydra.sweep.dir] == sweeps
    assert sorted(str(p) for p in (tmp_path / "outputs" / "t" / "runs").iterdir()) == sorted(runs)
    assert sorted(str(p) for p in (tmp_path / "multirun" / "t").iterdir()) == sorted(sweeps)
    for folder in runs + sweeps:
        assert FOLDER_NAME.match(Path(folder).name), folder


def test_a_hand_picked_folder_in_use_by_a_running_job_is_refused(tmp_path, images):
    """``hydra.run.dir=<folder>`` for two jobs: the second, started while the first runs (held stopped with
    SIGSTOP once its journal exists), is refused in one line; the first then finishes alone in its folder."""
    import signal

    folder = tmp_path / "mine"
    first = subprocess.Popen([sys.executable, "-m", "featstudy",
                              *_job_args(tmp_path, images, "tracking.uri=null", f"hydra.run.dir={folder}")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while not (folder / "tracking_journal.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        try:
            second = _featstudy(tmp_path, *_job_args(tmp_path, images, "tracking.uri=null", f"hydra.run.dir={folder}"))
        finally:
            first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    _assert_one_line(second, "paths.output_dir", str(folder), "in use by another running job")
    assert first.returncode == 0, err[-3000:]
    lines = [json.loads(ln) for ln in (folder / "tracking_journal.jsonl").read_text().splitlines()]
    assert len([e for e in lines if e.get("op") == "start"]) == 1
    assert not list(folder.glob("tracking_journal.jsonl.*"))
    assert (folder / "status.txt").read_text().startswith("FINISHED\t")


# --------------------------------------------------------------------------------------------- item 7

@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of a given size: ``small_disk(kib)`` mounts a tmpfs and returns its folder."""
    mounted = []

    def make(kib: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a full disk needs a small tmpfs: mounting one needs root")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(disk: Path, leave_kib: int) -> None:
    """Fill ``disk`` until ``leave_kib`` KiB are free."""
    free = shutil.disk_usage(disk).free // 1024
    with open(disk / "filler", "wb") as fh:
        try:
            fh.write(b"\0" * max(0, (free - leave_kib) * 1024))
            fh.flush()
        except OSError:
            pass
    assert shutil.disk_usage(disk).free // 1024 <= leave_kib


def _assert_one_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.mark.parametrize("leave_kib", [0, 40], ids=["full-at-start", "fills-during-the-job"])
def test_output_folder_on_a_full_disk_is_one_line_and_no_empty_status(leave_kib, tmp_path, images, small_disk):
    disk = small_disk(400)
    _fill(disk, leave_kib)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    proc = _featstudy(tmp_path, *_job_args(tmp_path, images, f"paths.log_dir={disk}/out", f"tracking.uri={uri}"))
    line = _assert_one_line(proc, str(disk / "out"), "No space left on device", "paths.")
    assert "free space" in line
    for status in (disk / "out").rglob("status.txt"):  # atomic: absent or whole, never empty
        assert status.read_text().startswith(("FAILED\t", "FINISHED\t")), status
    if leave_kib:  # the job had started: its MLflow run is not left RUNNING
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("featstudy").experiment_id])
        assert [r.info.status for r in runs] in ([], ["FAILED"])


def test_store_on_a_full_disk_is_one_line_and_leaves_no_half_created_store(tmp_path, images, small_disk):
    disk = small_disk(200)  # MLflow's migrations need about 1.5 MB: they stop half-way
    proc = _featstudy(tmp_path, *_job_args(tmp_path, images, f"paths.mlruns_dir={disk}", "tracking.uri="
                                           f"sqlite:///{disk}/mlflow.db"))
    _assert_one_line(proc, "tracking.uri", str(disk), "paths.mlruns_dir")
    assert not (disk / "mlflow.db").exists()
    assert not [p.name for p in disk.iterdir() if "mlflow.db" in p.name and not p.name.endswith(".lock")]


def _half_created_by_mlflow(disk: Path, dst: Path) -> Path:
    """A store as MLflow leaves it when its disk fills up while it creates the tables (MLflow itself, no
    featstudy), copied to ``dst`` on a disk with room."""
    script = ("import sys\nfrom mlflow.tracking import MlflowClient\n"
              "try:\n    MlflowClient(tracking_uri=sys.argv[1]).search_experiments()\nexcept Exception as e:\n"
              "    print(type(e).__name__)\n")
    subprocess.run([sys.executable, "-c", script, f"sqlite:///{disk}/mlflow.db"], capture_output=True, text=True,
                   cwd=disk.parent, timeout=300)
    assert (disk / "mlflow.db").stat().st_size > 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(disk / "mlflow.db", dst)
    return dst


def _stamped_nowhere(dst: Path) -> Path:
    """Tables but no alembic_version: a creation cut short before MLflow stamped the schema."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(dst)
    con.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
    con.commit()
    con.close()
    return dst


@pytest.fixture(scope="module")
def offline_job(tmp_path_factory, images) -> Path:
    """A job folder with its journal (tracking off), for ``featstudy.sync`` to log."""
    root = tmp_path_factory.mktemp("offline")
    job = root / "job"
    ran = _featstudy(root, *_job_args(root, images, "tracking.uri=null", f"hydra.run.dir={job}"))
    assert ran.returncode == 0, ran.stderr[-3000:]
    return job


@pytest.mark.parametrize("kind", ["mlflow-on-a-full-disk", "no-alembic-version"])
def test_half_created_store_is_named_with_its_fix(kind, tmp_path, images, small_disk, offline_job):
    db = tmp_path / "store" / "mlflow.db"
    if kind == "mlflow-on-a-full-disk":
        _half_created_by_mlflow(small_disk(200), db)
    else:
        _stamped_nowhere(db)
    before = db.read_bytes()
    proc = _featstudy(tmp_path, *_job_args(tmp_path, images, f"tracking.uri=sqlite:///{db}"))
    _assert_one_line(proc, "tracking.uri", str(db), "half-created", "move it aside", "delete it")
    assert db.read_bytes() == before  # named, never touched
    # `featstudy.sync` on it names it too, instead of "table ... already exists" on every try
    proc = subprocess.run([sys.executable, "-m", "featstudy.sync", str(offline_job), "--tracking-uri",
                           f"sqlite:///{db}"],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "half-created" in proc.stderr + proc.stdout and str(db) in proc.stderr + proc.stdout
    assert "already exists" not in proc.stderr + proc.stdout
    assert db.read_bytes() == before
