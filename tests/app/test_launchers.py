"""Launchers beyond one process: SLURM through hydra-submitit-launcher (its config and the sbatch script it makes),
the same kind of sweep end to end with submitit's local executor, and 4 parallel joblib jobs on one fresh SQLite
file."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from omegaconf import OmegaConf


def test_slurm_launcher_composes_into_the_sbatch_script(helpers, tmp_path, monkeypatch):
    """``hydra/launcher=slurm`` composes against the plugin's schema, and the launcher's own parameter mapping gives
    an sbatch script with the partition, GPUs per node, time limit, array parallelism and SIGUSR2 warning."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = helpers.compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
                           "hydra.launcher.timeout_min=90", "hydra.launcher.array_parallelism=3",
                           f"hydra.sweep.dir={tmp_path}", "hydra.job.name=featstudy"], hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min, launcher.array_parallelism) == \
        ("gpu", 2, 90, 3)
    assert launcher.max_num_timeout == 0 and launcher.signal_delay_s == 120
    defaults = helpers.compose(["hydra/launcher=slurm"], hydra_config=True).hydra.launcher
    assert (defaults.gpus_per_node, defaults.tasks_per_node, defaults.timeout_min, defaults.array_parallelism) == \
        (1, 1, 120, 32)

    # what SlurmLauncher.launch does with these keys (submitit only wants to see `srun` on the PATH)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{fake}:{__import__('os').environ['PATH']}")
    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_")
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    executor._executor.parameters["map_count"] = 5  # a 5-job sweep is one array
    script = executor._executor._make_submission_file_text("python -m featstudy", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90",
                 "#SBATCH --array=0-4%3", "#SBATCH --signal=USR2@120", "#SBATCH --ntasks-per-node=1"):
        assert line in script, line


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


@pytest.mark.slow
def test_four_parallel_joblib_jobs_on_one_fresh_sqlite_file(tmp_path, image_folder, helpers):
    """4 jobs start at once in loky workers on a SQLite file that does not exist yet: 4 FINISHED children of one
    parent, each with all its metrics and artifacts; one extraction, three cache hits."""
    assert not (tmp_path / "mlruns").exists()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYDRA_FULL_ERROR", "0")
        rc = helpers.run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
                              *_cheap(tmp_path, image_folder, helpers), "analysis.bins=25,50,100,null"], mp)
    assert rc == 0
    children = _check_sweep(tmp_path, 4)
    assert sorted(r.data.params["analysis.bins"] for r in children) == ["100", "25", "50", "null"]


def test_a_sweep_of_ddp_jobs_is_refused_in_one_line(tmp_path, image_folder, helpers, capsys):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYDRA_FULL_ERROR", "0")
        rc = helpers.run_cli(["-m", *_cheap(tmp_path, image_folder, helpers), "tracking.uri=null", "trainer.devices=2",
                              "trainer.strategy=ddp", "analysis.bins=25,50"], mp)
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("featstudy: error")]
    assert len(err) == 1 and "trainer.devices=2" in err[0] and "without -m" in err[0]
    assert not list(tmp_path.glob(".cache/featstudy/embeddings/*/DONE"))


def test_a_ddp_helper_rank_only_extracts(tmp_path, image_folder, helpers, monkeypatch):
    """What Lightning's re-launched rank 1 (or an srun task with SLURM_PROCID>0) does with the same command line:
    it joins the extraction and nothing else: no MLflow store, run or output files, no analysis. (Checked by hand
    with 2 CPU processes: ``trainer.devices=2 trainer.strategy=ddp`` gives one FINISHED run of all images.)"""
    import featstudy.app

    calls = []
    monkeypatch.setattr(featstudy.app, "_get_embedding", lambda cfg: calls.append(cfg.paths.cache_dir) or "handle")
    monkeypatch.setattr(featstudy.app, "_check_classes", lambda cfg: pytest.fail("rank 1 must not check the dataset"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    out = tmp_path / "out"
    assert helpers.run_cli([*_cheap(tmp_path, image_folder, helpers), f"hydra.run.dir={out}"], monkeypatch) == 0
    assert calls == [str(tmp_path / ".cache" / "featstudy")]
    assert not (tmp_path / "mlruns").exists()
    assert not (out / "status.txt").exists() and not (out / "config.yaml").exists()
