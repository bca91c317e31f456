"""DDP faults with real processes (gloo on CPU): fewer images left than ranks (a resume near the end, a dataset
smaller than the world size), and srun-style helper ranks that must follow rank 0's decision taken under the
embedding's lock. Every run is bounded by a timeout; expectations come from a single-process extraction."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from omegaconf import OmegaConf
from PIL import Image

import featstudy
from featstudy.extraction import get_embedding, plan
from featstudy.store import load_embedding

SCRIPT = Path(__file__).with_name("run_extraction.py")
SRC = Path(featstudy.__file__).resolve().parents[1]
#: launcher variables of the surrounding shell that would change who is rank 0
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID")


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**env, **extra}


def _images(root: Path, n: int) -> Path:
    rng = np.random.default_rng(3)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i:03d}.png")
    return root


def _run(cfg, path: Path, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    OmegaConf.save(cfg, path)
    return subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, env=env,
                          cwd=SCRIPT.parent, timeout=timeout)


def _same_as_one_process(key_dir: Path, one_cfg) -> None:
    ddp, one = load_embedding(key_dir), load_embedding(get_embedding(one_cfg).path)
    assert ddp.paths == one.paths and ddp.skipped == one.skipped
    # the reference runs batches of 4, the DDP ranks batches of 1: oneDNN sums a batch's convolutions in another
    # order, which moves small features by ~1e-6 (measured: 1.2e-6 on a 0.0015 value); a wrong or repeated image
    # moves them by the features' own spread (~0.1), far beyond this
    np.testing.assert_allclose(ddp.features, one.features, rtol=1e-5, atol=1e-5)


DDP2 = {"trainer.accelerator": "cpu", "trainer.strategy": "ddp", "trainer.devices": 2, "loader.batch_size": 1}


@pytest.mark.slow
def test_resume_with_fewer_images_left_than_ranks_finishes(tmp_path, light_resnet_cfg):
    """3 images, 2 already in shards (a single-process run killed after its 2nd shard), then ``devices=2``: one
    image for two ranks. Lightning's predict sampler asserts every rank gets one; the rerun must finish, and the
    store equals a single-process extraction, every image once."""
    data = _images(tmp_path / "data", 3)
    single = light_resnet_cfg(tmp_path / "cache", data, **{"loader.batch_size": 1, "trainer.accelerator": "cpu"})
    killed = _run(single, tmp_path / "one.yaml", _clean_env(FEATSTUDY_TEST_DIE_AT="after:shard-:2"))
    assert killed.returncode == 137, killed.stderr[-2000:]
    key_dir = tmp_path / "cache" / "embeddings" / plan(single).key
    assert len(list((key_dir / "shards").glob("shard-*.npz"))) == 2 and not (key_dir / "DONE").exists()

    ddp = _run(light_resnet_cfg(tmp_path / "cache", data, **DDP2), tmp_path / "ddp.yaml", _clean_env())
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    out = json.loads(ddp.stdout.strip().splitlines()[-1])
    assert out["key"] == key_dir.name and out["n_resumed"] == 2 and not out["hit"]
    _same_as_one_process(key_dir, light_resnet_cfg(tmp_path / "fresh", data, **{"trainer.accelerator": "cpu"}))


@pytest.mark.slow
def test_a_dataset_smaller_than_the_world_size_finishes(tmp_path, light_resnet_cfg):
    """One image, two DDP ranks: extracted once (by rank 0 alone), equal to the single-process store."""
    data = _images(tmp_path / "data", 1)
    cfg = light_resnet_cfg(tmp_path / "cache", data, **DDP2)
    proc = _run(cfg, tmp_path / "ddp.yaml", _clean_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    key_dir = tmp_path / "cache" / "embeddings" / plan(cfg).key
    assert load_embedding(key_dir).paths == ["c0/000.png"]
    _same_as_one_process(key_dir, light_resnet_cfg(tmp_path / "one", data, **{"trainer.accelerator": "cpu"}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srun_env(rank: int, n_tasks: int, port: int, job_id: str = "4242", **extra: str) -> dict:
    """What ``srun --ntasks-per-node=<n> python ...`` gives task ``rank`` of a one-node batch job."""
    return _clean_env(SLURM_JOB_ID=job_id, SLURM_STEP_ID="0", SLURM_JOB_NAME="featstudy", SLURM_PROCID=str(rank),
                      SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_NTASKS=str(n_tasks),
                      SLURM_NTASKS_PER_NODE=str(n_tasks), SLURM_NNODES="1", SLURM_NODELIST="localhost",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)


@pytest.mark.slow
def test_srun_helper_ranks_follow_rank_0_when_it_finds_the_key_done_under_the_lock(tmp_path, light_resnet_cfg):
    """Two srun tasks start while another job holds the embedding's lock (this test holds it) and the embedding is
    not there yet; the other job then finishes it (the finished folder appears) and releases the lock. Rank 0 takes
    the lock and finds DONE; rank 1, which had found no DONE, must not wait in DDP for a rank 0 that never comes:
    both end, both report the cache hit, and no forward pass ran."""
    data = _images(tmp_path / "data", 4)
    cfg = light_resnet_cfg(tmp_path / "cache", data, **{**DDP2, "trainer.ddp_timeout_s": 60})
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    done = Path(get_embedding(light_resnet_cfg(tmp_path / "elsewhere", data, **{"trainer.accelerator": "cpu"})).path)
    key_dir = tmp_path / "cache" / "embeddings" / done.name
    key_dir.parent.mkdir(parents=True)
    lock = FileLock(str(key_dir.parent / f"{done.name}.lock"))
    lock.acquire()
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path / "cfg.yaml")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=srun_env(r, 2, port), cwd=SCRIPT.parent)
             for r in (0, 1)]
    try:
        time.sleep(8)  # both tasks are past their first DONE check: the "other job" now finishes
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        done.rename(key_dir)
        lock.release()
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        rep = json.loads(out.strip().splitlines()[-1])
        assert rep["hit"] and not any("extracting" in m and "images" in m for m in rep["log"])
