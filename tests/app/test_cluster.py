"""First contact with a cluster, simulated on CPU with real processes: ``python -m featstudy`` jobs under fake SLURM
environment variables (what srun, an interactive ``srun --pty bash`` or an sbatch script without srun give a
process), real Lightning DDP over gloo, real signals. Every run is bounded by a timeout, so a deadlock fails."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import featstudy

SRC = Path(featstudy.__file__).resolve().parents[1]  # the featstudy this process imports
LAUNCH_VARS = ("HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp_path / "tmp")  # where a helper rank's own Hydra folder goes
    return {**env, **extra}


def _cheap(root: Path, images: Path, helpers, model: str = "resnet18") -> list[str]:
    over = [*helpers.tiny_overrides(root, images), "~analysis.callbacks.figures", "~analysis.callbacks.null"]
    if model == "resnet18":
        over += ["model=torchvision", "model.name=resnet18", "model.weights=random", "model.nodes=[layer1,flatten]",
                 "crops=center", "crops.resize=36", "crops.size=32"]
    return over


def _cli(args: list[str], env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featstudy", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def _popen(args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "featstudy", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def _runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("featstudy")
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=100)


def _run_folders(root: Path) -> list[Path]:
    return [p for p in (root / "outputs").glob("*/runs/*") if p.is_dir()]


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("featstudy: error")]


DDP2 = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srun_task(rank: int, n_tasks: int, port: int, tmp_path: Path, **extra: str) -> dict:
    """The environment ``srun --ntasks-per-node=<n>`` gives task ``rank`` of a one-node batch job."""
    return _env(tmp_path, SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_JOB_NAME="featstudy",
                SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_NTASKS=str(n_tasks),
                SLURM_NTASKS_PER_NODE=str(n_tasks), SLURM_NNODES="1", SLURM_NODELIST="localhost",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)


# --- item 1: a signal during a real extraction ------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_during_a_real_extraction_marks_the_run_killed_and_the_rerun_resumes(tmp_path, helpers):
    """SIGTERM while Lightning's predict loop runs (no function replaced): Lightning turns the interrupt into
    ``sys.exit(1)``; the run must still end KILLED (MLflow and status.txt), the finished shards stay, and the
    rerun extracts only the other images."""
    images = helpers.make_image_folder(tmp_path / "images", per_class=40)  # 120 images, VGG19 at ten crops
    args = [*_cheap(tmp_path, images, helpers, model="vgg19"), "loader.batch_size=2"]
    env = _env(tmp_path)
    proc = _popen(args, env, tmp_path)
    embeddings = tmp_path / ".cache" / "featstudy" / "embeddings"
    deadline = time.time() + 240
    while time.time() < deadline and not list(embeddings.glob("*/shards/shard-*.npz")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-3000:]
    (run,) = _runs(tmp_path)
    assert run.info.status == "KILLED", err[-3000:]
    out = Path(run.data.tags["featstudy.output_dir"])
    assert (out / "status.txt").read_text().split("\t")[:2] == ["KILLED", run.info.run_id]
    (key_dir,) = [p for p in embeddings.iterdir() if p.is_dir()]
    shards = sorted((key_dir / "shards").glob("shard-*.npz"))
    assert shards and not (key_dir / "DONE").exists(), "the extraction finished before the signal"
    done = set()
    for shard in shards:
        with np.load(shard) as z:
            done.update(z["ids"].tolist() + z["skipped_ids"].tolist())
    assert 0 < len(done) < 120

    again = _cli(args, env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = sorted(_runs(tmp_path), key=lambda r: r.info.start_time)
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    import json

    meta = json.loads((key_dir / "meta.json").read_text())
    assert meta["n_resumed"] == len(done) and meta["n_images"] == 120


# --- item 4: an interactive SLURM shell, where Lightning starts the DDP children itself -------------------------

@pytest.mark.slow
def test_ddp_in_an_interactive_slurm_shell_gives_one_finished_run(tmp_path, image_folder, helpers):
    """``srun --pty bash`` then ``python -m featstudy trainer.devices=2``: SLURM_PROCID=0 is inherited by the child
    Lightning starts (SLURM is not Lightning's environment in an interactive job): the child is rank 1, not a second
    rank 0. One MLflow run, FINISHED, one run folder; no deadlock."""
    env = _env(tmp_path, SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
               SLURM_JOB_NAME="bash", SLURM_JOB_ID="777", SLURM_NNODES="1", SLURM_NODELIST="localhost")
    proc = _cli([*_cheap(tmp_path, image_folder, helpers), *DDP2], env, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.metrics["n_images"] == 24
    assert _run_folders(tmp_path) == [Path(run.data.tags["featstudy.output_dir"])]


# --- item 7: SLURM's tasks per node do not match trainer.devices ------------------------------------------------

def test_a_slurm_task_device_mismatch_is_one_line(tmp_path, image_folder, helpers):
    """An sbatch script with ``--ntasks-per-node=1`` running ``trainer.devices=2`` without srun: Lightning checks it
    inside predict (a traceback); wanted: exit 2, one line naming --ntasks-per-node and trainer.devices."""
    env = _env(tmp_path, SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_PROCID="0", SLURM_LOCALID="0",
               SLURM_NODEID="0", SLURM_NNODES="1", SLURM_JOB_NAME="batchjob", SLURM_JOB_ID="1234",
               SLURM_NODELIST="localhost", HYDRA_FULL_ERROR="0")
    proc = _cli([*_cheap(tmp_path, image_folder, helpers), *DDP2], env, tmp_path, timeout=200)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _errors(proc.stderr)
    assert "--ntasks-per-node=1" in line and "trainer.devices=2" in line
    assert "Traceback" not in proc.stderr


# --- item 6: a GPU accelerator where no GPU is visible ----------------------------------------------------------

def test_accelerator_gpu_without_a_visible_gpu_is_one_line(tmp_path, image_folder, helpers):
    env = _env(tmp_path, CUDA_VISIBLE_DEVICES="", HYDRA_FULL_ERROR="0")
    proc = _cli([*_cheap(tmp_path, image_folder, helpers), "trainer.accelerator=gpu"], env, tmp_path, timeout=200)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _errors(proc.stderr)
    assert "trainer.accelerator=gpu" in line and "CUDA_VISIBLE_DEVICES=''" in line
    assert not list(tmp_path.glob(".cache/featstudy/embeddings/*/shards/*"))


# --- item 8: srun tasks ----------------------------------------------------------------------------------------

def _two_tasks(tmp_path: Path, args0: list[str], args1: list[str], timeout: float = 300):
    port = _free_port()
    procs = [_popen(args, srun_task(r, 2, port, tmp_path), tmp_path) for r, args in ((0, args0), (1, args1))]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *out) for p, out in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_two_srun_tasks_give_one_run_folder_and_one_run(tmp_path, image_folder, helpers):
    """``srun --ntasks-per-node=2 python -m featstudy trainer.devices=2``: each task resolves Hydra's run folder;
    only global rank 0 creates one under outputs/ (the helper's Hydra files go to a temporary folder)."""
    args = [*_cheap(tmp_path, image_folder, helpers), *DDP2]
    results = _two_tasks(tmp_path, args, args)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.metrics["n_images"] == 24
    assert _run_folders(tmp_path) == [Path(run.data.tags["featstudy.output_dir"])]
    assert len(list((tmp_path / "tmp").glob("featstudy-rank1-*"))) == 1


@pytest.mark.slow
def test_a_failed_srun_task_fails_the_run_within_trainer_ddp_timeout_s(tmp_path, image_folder, helpers):
    """Task 1 fails before it joins DDP (its node cannot read the data); task 0 must not wait Lightning's 30 minutes
    for it: after trainer.ddp_timeout_s it fails, and the run and status.txt say FAILED."""
    args = [*_cheap(tmp_path, image_folder, helpers), *DDP2, "trainer.ddp_timeout_s=15"]
    broken = [a if not a.startswith("dataset.root=") else f"dataset.root={tmp_path / 'not-mounted'}" for a in args]
    t0 = time.time()
    (rc0, _, err0), (rc1, _, err1) = _two_tasks(tmp_path, args, broken, timeout=240)
    assert rc1 == 2 and "dataset.root" in err1
    assert rc0 not in (0, None) and time.time() - t0 < 200, err0[-3000:]
    (run,) = _runs(tmp_path)
    assert run.info.status == "FAILED"
    out = Path(run.data.tags["featstudy.output_dir"])
    assert (out / "status.txt").read_text().split("\t")[:2] == ["FAILED", run.info.run_id]
