"""Shards are written by a background thread: the forward pass goes on while a shard is being written (a slow NFS
fsync no longer stalls the GPU), at most four batches wait (memory bounded), the numbers are those of synchronous
writes, a writer's error is the same one-line error, and a kill -9 with shards still queued leaves whole shards
only, which a rerun resumes from.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

import featstudy
from featstudy.errors import DataError
from featstudy.extraction import get_embedding, plan
from featstudy.store import is_complete, load_embedding

SCRIPT = Path(__file__).with_name("run_extraction.py")
SRC = Path(featstudy.__file__).resolve().parents[1]


def _images(root: Path, n: int) -> Path:
    rng = np.random.default_rng(4)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 42, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i:02d}.png")
    return root


def test_forward_goes_on_while_a_shard_is_written_and_at_most_four_batches_wait(tmp_path, light_resnet_cfg,
                                                                                 monkeypatch):
    """The first shard's rename is held (a slow file system) until the images read stop changing for a second.
    Synchronous writes read nothing meanwhile; the background writer lets the loop go on, but only until four
    batches wait behind the held one: 1 being written + 4 queued + 1 waiting to be queued + 1 fetched ahead by
    Lightning = at most 7 batches of 2 images read, of 40."""
    data = _images(tmp_path / "data", 40)
    opens, held = [], {}
    real_open, real_replace = Image.open, os.replace

    def counting_open(fp, *a, **k):
        if str(data) in str(fp):
            opens.append(threading.current_thread().name)
        return real_open(fp, *a, **k)

    def slow_replace(src, dst, *a, **k):
        if Path(dst).name.startswith("shard-") and not held:
            held["before"] = n = len(opens)
            still, deadline = time.monotonic(), time.monotonic() + 30
            while time.monotonic() < deadline and time.monotonic() - still < 1.0:
                time.sleep(0.02)
                if len(opens) != n:
                    n, still = len(opens), time.monotonic()
            held["after"] = len(opens)
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(Image, "open", counting_open)
    monkeypatch.setattr(os, "replace", slow_replace)
    h = get_embedding(light_resnet_cfg(tmp_path / "cache", data, **{"loader.batch_size": 2}))
    monkeypatch.undo()
    assert held["after"] > held["before"], "no image was read while the first shard was being written"
    assert held["after"] <= 7 * 2, f"{held['after']} images read while one shard waited: the queue is not bounded"
    got = load_embedding(h.path)
    assert len(got.paths) == 40

    # the same extraction with synchronous writes (max_pending 0): the same numbers, to the bit
    from featstudy.extraction.module import ShardWriter

    monkeypatch.setattr(ShardWriter, "MAX_PENDING", 0)
    cfg = light_resnet_cfg(tmp_path / "cache-sync", data, **{"loader.batch_size": 2})
    sync = load_embedding(get_embedding(cfg).path)
    assert sync.paths == got.paths
    np.testing.assert_array_equal(sync.features, got.features)


def test_full_disk_at_the_last_shard_is_raised_at_the_end_as_one_line(tmp_path, light_resnet_cfg, monkeypatch):
    """The last shard fails after the loop has finished (the error can only surface when the queue is drained):
    the same one-line ``paths.cache_dir`` error, nothing merged, and a rerun resumes from the two whole shards."""
    data = _images(tmp_path / "data", 12)
    cache = tmp_path / "cache"
    cfg = light_resnet_cfg(cache, data, **{"loader.batch_size": 4})
    real_replace, seen = os.replace, []

    def full_disk(src, dst, *a, **k):
        if Path(dst).name.startswith("shard-"):
            seen.append(Path(dst).name)
            if len(seen) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(DataError) as err:
        get_embedding(cfg)
    monkeypatch.setattr(os, "replace", real_replace)
    msg = str(err.value)
    assert msg.startswith("paths.cache_dir:") and "No space left on device" in msg and "\n" not in msg
    folder = cache / "embeddings" / plan(cfg).key
    assert not is_complete(folder) and len(list((folder / "shards").glob("shard-*.npz"))) == 2
    assert not list(folder.rglob("*.tmp"))
    again = get_embedding(cfg)
    assert not again.hit and again.meta["n_resumed"] == 8
    assert len(load_embedding(again.path).paths) == 12


def test_kill_9_with_shards_queued_leaves_whole_shards_and_the_rerun_finishes(tmp_path, light_resnet_cfg):
    """Each shard's rename takes 0.2 s (``FEATSTUDY_TEST_SHARD_DELAY``), so batches queue up behind the writer; a
    SIGKILL then hits with shards queued or half-written. Every shard on disk loads whole, and a rerun extracts
    exactly the images in no shard and equals an uninterrupted run."""
    data = _images(tmp_path / "data", 30)
    cfg = light_resnet_cfg(tmp_path / "cache", data, **{"loader.batch_size": 2})
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    shards = tmp_path / "cache" / "embeddings" / plan(cfg).key / "shards"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FEATSTUDY_TEST_SHARD_DELAY": "0.2"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path / "cfg.yaml")], env=env, cwd=SCRIPT.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("shard-*.npz"))) < 2:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = set()
    for path in shards.glob("shard-*.npz"):
        with np.load(path) as z:  # whole: every array readable
            done |= set(z["ids"].tolist()) | set(z["skipped_ids"].tolist())
            assert z["features"].shape == (len(z["ids"]), 64 + 512)
    assert 2 * 2 <= len(done) < 30
    resumed = get_embedding(cfg)
    assert resumed.meta["n_resumed"] == len(done)
    whole = get_embedding(light_resnet_cfg(tmp_path / "cache2", data, **{"loader.batch_size": 2}))
    a, b = load_embedding(resumed.path), load_embedding(whole.path)
    assert a.paths == b.paths and len(a.paths) == 30
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)
