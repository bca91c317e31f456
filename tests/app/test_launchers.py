"""Launchers beyond one process: SLURM through hydra-submitit-launcher (the real launcher's sbatch array, handed to
a fake ``sbatch``), the same kind of sweep end to end with submitit's local executor, 4 parallel joblib jobs on one
fresh SQLite file, DDP refused inside a sweep, and a real 2-process CPU DDP run (gloo) of one job; one device per
sweep job, and the local preset's GPUs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest


SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def _sweep_task(cfg) -> None:  # the task function handed to the launcher (pickled with it, never run here)
    raise AssertionError("the fake sbatch never runs a job")


def test_slurm_launcher_submits_one_sbatch_array_with_our_settings(helpers, tmp_path, monkeypatch):
    """``hydra/launcher=slurm`` as Hydra builds it (the plugin class instantiated from the composed config) and its
    own ``launch``: the sbatch script it hands to ``sbatch`` (a fake that records it) carries the partition, GPUs per
    node, time limit, array parallelism and the SIGUSR2 warning; each array task gets its own job's overrides. Only
    the wait for the cluster's results is cut short (there is no SLURM here)."""
    import pickle

    import submitit.slurm.slurm as submitit_slurm
    from hydra.utils import instantiate

    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", 'cp "$1" "$SBATCH_RECORD"; echo "Submitted batch job 4242"')):
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_RECORD", str(tmp_path / "submitted.sh"))
    monkeypatch.setattr(submitit_slurm.SlurmJob, "results", lambda job: [job.job_id])

    def submit(overrides: list[str], n_jobs: int) -> str:
        sweep = tmp_path / f"sweep{n_jobs}"
        cfg = helpers.compose(["hydra/launcher=slurm", f"hydra.sweep.dir={sweep}", "hydra.job.name=featstudy",
                               *overrides], hydra_config=True)
        launcher = instantiate(cfg.hydra.launcher)
        # by name: Hydra's plugin scan loads hydra_plugins modules a second time, so class identity differs
        assert type(launcher).__module__ + "." + type(launcher).__qualname__ == SLURM_LAUNCHER
        launcher.setup(hydra_context=None, task_function=_sweep_task, config=cfg)
        jobs = [[f"analysis.bins={b}"] for b in range(10, 10 + n_jobs)]
        assert launcher.launch(jobs, initial_job_idx=0) == [f"4242_{i}" for i in range(n_jobs)]
        for i, job in enumerate(jobs):  # array task i runs sweep job i
            (pkl,) = sweep.glob(f".submitit/4242_{i}/*_submitted.pkl")
            with open(pkl, "rb") as fh:
                assert pickle.load(fh).args[:3] == (job, "hydra.sweep.dir", i)
        return (tmp_path / "submitted.sh").read_text()

    script = submit(["hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
                     "hydra.launcher.timeout_min=90", "hydra.launcher.array_parallelism=3"], 5)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90",
                 "#SBATCH --array=0-4%3", "#SBATCH --signal=USR2@120", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --job-name=featstudy"):
        assert line in script.splitlines(), line
    # conf/hydra/launcher/slurm.yaml's own settings: one GPU and 8 CPUs per job, 2 h, 32 jobs at once
    script = submit([], 40)
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --time=120",
                 "#SBATCH --array=0-39%32", "#SBATCH --signal=USR2@120"):
        assert line in script.splitlines(), line
    assert not any(line.startswith("#SBATCH --partition") for line in script.splitlines())


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("featstudy")
    return client, client.search_runs([exp.experiment_id], max_results=100)


def _cheap(root: Path, images: Path, helpers) -> list[str]:
    """The tiny pipeline: tiny images, resnet18 (random) at one 32 px centre crop, no figures, no analytic null."""
    return [*helpers.tiny_overrides(root, images), "model=torchvision", "model.name=resnet18", "model.weights=random",
            "model.nodes=[layer1,flatten]", "crops=center", "crops.resize=36", "crops.size=32",
            "~analysis.callbacks.figures", "~analysis.callbacks.null"]


def _check_sweep(root: Path, n_jobs: int) -> list:
    client, runs = _runs(f"sqlite:///{root}/mlruns/mlflow.db")
    parent = [r for r in runs if r.data.tags.get("featstudy.role") == "sweep"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(runs) == n_jobs + 1 and len(children) == n_jobs
    for r in children:  # nothing lost: status, metrics, the D curve and the artifacts of every job
        assert r.info.status == "FINISHED", r.info
        assert {"t_plus", "t_minus", "n_irrelevant_features"} <= set(r.data.metrics)
        assert len(client.get_metric_history(r.info.run_id, "d_avg_plus")) == 1001
        logged = {f.path for f in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "skipped.txt", "arrays"} <= logged
        assert (Path(r.data.tags["featstudy.output_dir"]) / "status.txt").read_text().startswith("FINISHED")
    # two jobs wanting the same embedding: one extracts it, the others reuse it
    assert sorted(r.data.tags["embedding_cache"] for r in children) == ["hit"] * (n_jobs - 1) + ["miss"]
    assert len(list((root / ".cache" / "featstudy" / "embeddings").glob("*/DONE"))) == 1
    return children


WAITED = "another process is extracting it; waiting for its lock"


def _skip_unless_they_overlapped(children: list) -> None:
    """Call after every other check: the jobs must have run at the same time (their MLflow runs overlap) and one
    of them must have found the embedding's lock taken (its job log says it waited), else the parallel launcher and
    the lock were not exercised, and the test says so."""
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    concurrent = any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1))
    logs = [p.read_text() for r in children for p in Path(r.data.tags["featstudy.output_dir"]).glob("*.log")]
    waited = sum(WAITED in text for text in logs)
    if not (concurrent and waited):
        pytest.skip(f"the {len(children)} jobs did not overlap (runs concurrent: {concurrent}, jobs that waited for "
                    f"the extraction lock: {waited}); the launcher's parallelism and the lock were not exercised")


@pytest.mark.slow
def test_submitit_local_sweep_end_to_end(tmp_path, image_folder, helpers):
    """The SLURM code path (submitit) with its local executor: 2 jobs in their own processes, both FINISHED."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYDRA_FULL_ERROR", "0")
        rc = helpers.run_cli(["-m", "hydra/launcher=local", "hydra.launcher.timeout_min=10",
                              *_cheap(tmp_path, image_folder, helpers), "analysis.bins=25,null"], mp)
    assert rc == 0
    children = _check_sweep(tmp_path, 2)
    assert sorted(r.data.params["analysis.bins"] for r in children) == ["25", "null"]
    assert list(tmp_path.glob("multirun/*/*/.submitit/*/*_result.pkl"))  # they really ran through submitit
    _skip_unless_they_overlapped(children)


@pytest.mark.slow
def test_four_parallel_joblib_jobs_on_one_fresh_sqlite_file(tmp_path, image_folder, helpers):
    """4 jobs start at once in loky workers on a SQLite file that does not exist yet: 4 FINISHED children of one
    parent, each with all its metrics and artifacts; one extraction, three cache hits."""
    assert not (tmp_path / "mlruns").exists()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYDRA_FULL_ERROR", "0")
        over = [a for a in _cheap(tmp_path, image_folder, helpers) if not a.startswith("loader.num_workers")]
        rc = helpers.run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", *over,
                              "analysis.bins=25,50,100,null"], mp)
    assert rc == 0
    children = _check_sweep(tmp_path, 4)
    assert sorted(r.data.params["analysis.bins"] for r in children) == ["100", "25", "50", "null"]
    # the default loader.num_workers=auto decodes in the job's own process under joblib (no workers in loky workers)
    assert [r.data.params["loader.num_workers"] for r in children] == ["0"] * 4
    # names put the swept setting first (issue 11): the runs table's name column tells the children apart
    assert sorted(r.info.run_name for r in children) == [f"bins={b} · imagefolder · resnet18 · random · {d}" for b, d in
                                                         (("100", "100 bins"), ("25", "25 bins"), ("50", "50 bins"),
                                                          ("null", "exact"))]
    _skip_unless_they_overlapped(children)


def test_a_sweep_of_ddp_jobs_is_refused_in_one_line(tmp_path, image_folder, helpers, capsys):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYDRA_FULL_ERROR", "0")
        rc = helpers.run_cli(["-m", *_cheap(tmp_path, image_folder, helpers), "tracking.uri=null", "trainer.devices=2",
                              "trainer.strategy=ddp", "analysis.bins=25,50"], mp)
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("featstudy: error")]
    assert len(err) == 1 and "trainer.devices=2" in err[0] and "without -m" in err[0]
    assert not list(tmp_path.glob(".cache/featstudy/embeddings/*/DONE"))


@pytest.mark.slow
def test_ddp_two_cpu_processes_give_one_run_of_all_images(tmp_path, image_folder, helpers):
    """``python -m featstudy ... trainer.devices=2 trainer.strategy=ddp`` on CPU: Lightning re-launches the command
    as rank 1 (gloo); both ranks extract, rank 0 alone tracks, analyses and writes: one FINISHED MLflow run with
    every image, one output folder with status.txt and config.yaml, one journal."""
    import featstudy

    src = Path(featstudy.__file__).resolve().parents[1]  # the featstudy this process imports
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                             "SLURM_PROCID", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])
    args = [*_cheap(tmp_path, image_folder, helpers), "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.strategy=ddp"]
    proc = subprocess.run([sys.executable, "-m", "featstudy", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    n_images = sum(1 for p in image_folder.rglob("*.png"))  # 3 classes x 8 (conftest.make_image_folder)

    client, runs = _runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.metrics["n_images"] == n_images == 24 and run.data.metrics["n_classes"] == 3
    out = Path(run.data.tags["featstudy.output_dir"])
    assert [p for p in (tmp_path / "outputs").glob("*/runs/*") if p.is_dir()] == [out]
    assert (out / "status.txt").read_text().split("\t")[:2] == ["FINISHED", run.info.run_id]
    assert (out / "config.yaml").is_file() and "strategy: ddp" in (out / "config.yaml").read_text()
    # the embedding holds every image once, in the dataset's order, although each rank saw half of them
    from featstudy.store import load_embedding

    emb = load_embedding(run.data.tags["featstudy.embedding_path"])
    assert emb.paths == sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png"))

    # two processes ran: rank 1 logged (Lightning names its Hydra job train_ddp_process_1) that it only extracts ...
    rank1_log = (out / "train_ddp_process_1.log").read_text()
    assert "global rank 1: extraction only" in rank1_log and "extracting" in rank1_log
    # ... and only one of them wrote outputs: one journal start, one end-of-run line, one "figures:" line
    journal = [json.loads(line) for line in (out / "tracking_journal.jsonl").read_text().splitlines()]
    assert [e.get("op") for e in journal].count("start") == 1 and not list(out.glob("tracking_journal.jsonl.*"))
    assert proc.stderr.count("[featstudy] FINISHED: outputs in") == 1
    assert proc.stdout.count("[featstudy] figures:") == 1


@pytest.mark.parametrize("n_gpus", [0, 1, 4])
def test_each_sweep_job_gets_one_device_of_its_own(n_gpus):
    """``trainer.devices`` of sweep job j: ``auto`` (Lightning: every GPU, then DDP re-running the sweep) and 1
    become one device; with several GPUs visible to the job (joblib jobs share the machine's), GPU j mod n."""
    from featstudy.extraction.distributed import sweep_devices

    for job in range(6):
        expected = [job % n_gpus] if n_gpus > 1 else 1
        for devices in ("auto", 1):
            for accelerator in ("auto", "gpu", "cuda"):
                assert sweep_devices(devices, accelerator, job, n_gpus) == expected, (devices, accelerator, job)
            assert sweep_devices(devices, "cpu", job, n_gpus) == 1
        for explicit in ([3], 2, -1):  # an explicit choice is kept (a DDP one is refused elsewhere)
            assert sweep_devices(explicit, "gpu", job, n_gpus) == explicit


def _machine_gpus() -> int:
    """The machine's GPUs, counted without torch: ``nvidia-smi -L`` (0 where there is none)."""
    import shutil

    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def test_the_local_preset_gives_its_jobs_the_machines_gpus(helpers):
    """``hydra/launcher=local`` asks submitit for as many GPUs as the machine has (submitit exports
    CUDA_VISIBLE_DEVICES=0..n-1 to every job; with the old ``gpus_per_node: 0`` it exported "" and hid them)."""
    n = _machine_gpus()
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        n = len([d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    from omegaconf import OmegaConf

    cfg = helpers.compose(["hydra/launcher=local", "hydra.sweep.dir=/nonexistent/never-created"], hydra_config=True)
    assert OmegaConf.to_container(cfg.hydra.launcher, resolve=True)["gpus_per_node"] == n


@pytest.mark.slow
def test_a_local_sweep_runs_one_device_per_job_where_the_command_said(tmp_path, image_folder, helpers):
    """Two jobs through submitit's local executor with the default ``trainer.devices=auto``: each job runs one
    device (recorded in its params: ``1`` on this machine, ``[j % n]`` with n GPUs) and sees the GPUs of the
    launching command: here it ran under CUDA_VISIBLE_DEVICES=7, which submitit would have replaced."""
    from featstudy.config import LAUNCHER_GPUS

    n = _machine_gpus()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYDRA_FULL_ERROR", "0")
        mp.delenv(LAUNCHER_GPUS, raising=False)
        mp.setenv("CUDA_VISIBLE_DEVICES", "7")
        over = [a for a in _cheap(tmp_path, image_folder, helpers) if not a.startswith("trainer.accelerator")]
        rc = helpers.run_cli(["-m", "hydra/launcher=local", "hydra.launcher.timeout_min=10", *over,
                              "analysis.bins=25,null"], mp)
    assert rc == 0
    children = _check_sweep(tmp_path, 2)
    expected = ["1", "1"] if n < 2 else [str([job % n]) for job in range(2)]
    assert sorted(r.data.params["trainer.devices"] for r in children) == expected
    assert [r.data.tags["featstudy.cuda_visible_devices"] for r in children] == ["7", "7"]


def test_inside_a_local_job_the_gpu_count_is_the_launchers_and_is_not_overwritten(monkeypatch):
    """A submitit local job runs under submitit's CUDA_VISIBLE_DEVICES=0..n-1; when its Hydra config is resolved
    again, ``${visible_gpu_count:}`` must count the launching command's GPUs (here 2: "2,3"), leave that value as
    it is (not replace it with submitit's "0,1"), and ``restore_launcher_gpus`` must then put "2,3" back."""
    import torch

    from featstudy.config import LAUNCHER_GPUS, _visible_gpu_count, restore_launcher_gpus

    def no_cuda_query():  # asking CUDA here would fix submitit's CUDA_VISIBLE_DEVICES for the whole job
        raise AssertionError("CUDA queried inside the job before the launcher's GPUs were restored")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda_query)
    monkeypatch.setattr(torch.cuda, "device_count", no_cuda_query)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv(LAUNCHER_GPUS, "2,3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert _visible_gpu_count() == 2
    assert os.environ[LAUNCHER_GPUS] == "2,3"
    restore_launcher_gpus()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    monkeypatch.setenv(LAUNCHER_GPUS, "")  # the launching command saw no GPU: its jobs see none either
    assert _visible_gpu_count() == 0
