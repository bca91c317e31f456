"""End to end: equality with an independent torchvision computation, the store, skips, cache, resume, lock, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from omegaconf import OmegaConf
from PIL import Image

import featstudy
from featstudy import models
from featstudy.errors import ConfigError, DataError
from featstudy.extraction import get_embedding, plan
from featstudy.models.vgg19 import LAYER_TABLE
from featstudy.store import load_embedding

SCRIPT = Path(__file__).with_name("run_extraction.py")
SRC = Path(featstudy.__file__).resolve().parents[1]  # the featstudy this process imports, for the helpers


def independent_vgg19_features(weights_file, root: Path, rel_paths, resize=40, size=32):
    """The paper's embedding computed with torchvision only: Resize -> TenCrop -> ToTensor -> Normalize -> forward
    hooks (clone) on the ReLUs -> spatial mean per crop -> mean over crops."""
    net = torchvision.models.vgg19(weights=None)
    net.load_state_dict(torch.load(weights_file, weights_only=True))
    net.eval()
    grabbed = {}
    hooks = []
    for node in LAYER_TABLE:
        parent, idx = node.split(".")
        module = getattr(net, parent)[int(idx)]
        hooks.append(module.register_forward_hook(lambda m, i, o, node=node: grabbed.__setitem__(node, o.detach().clone())))
    tf = T.Compose([T.Resize(size=resize), T.TenCrop(size),
                    T.Lambda(lambda crops: torch.stack([T.ToTensor()(c) for c in crops])),
                    T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
    rows = []
    with torch.no_grad():
        for rel in rel_paths:
            x = tf(Image.open(root / rel).convert("RGB"))
            net(x)
            parts = []
            for node in LAYER_TABLE:
                a = grabbed[node]
                parts.append((a.mean(dim=(2, 3)) if a.dim() == 4 else a).mean(dim=0))
            rows.append(torch.cat(parts))
    for h in hooks:
        h.remove()
    return torch.stack(rows).numpy()


def _imagefolder(root):
    return {"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(root), "split": "all", "download": False}


def test_default_path_equals_independent_torchvision_and_store_is_complete(tmp_path, vgg_file, make_cfg, awkward_folder):
    awkward = awkward_folder(tmp_path / "awkward", n_per_class=1)
    cfg = make_cfg(tmp_path / "cache", weights=vgg_file, dataset=_imagefolder(awkward))
    h = get_embedding(cfg)
    assert not h.hit and h.weights_tag.startswith("file:") and h.path == tmp_path / "cache" / "embeddings" / h.key
    emb = load_embedding(h.path)
    assert emb.features.shape == (len(emb.paths), 9600)
    assert emb.feature_names[0] == "conv1_1:0" and emb.feature_names[-1] == "fc7:4095"
    assert emb.layers == [name for name, _ in LAYER_TABLE.values()]
    # the truncated JPEG is skipped, listed with its reason, counted; all others are rows in sorted order
    assert "dog/truncated.jpg" not in emb.paths and len(emb.skipped) == 1
    assert emb.skipped[0].startswith("dog/truncated.jpg\tOSError") and "truncated" in emb.skipped[0]
    expected = sorted(p.relative_to(awkward).as_posix() for p in awkward.rglob("*") if p.is_file() and p.name != "truncated.jpg")
    assert emb.paths == expected
    assert emb.classes == ["cat", "dog"]
    assert emb.labels.tolist() == [0 if p.startswith("cat/") else 1 for p in emb.paths]
    m = h.meta
    assert m["n_images"] == len(expected) and m["n_skipped"] == 1 and m["model"] == "vgg19"
    assert m["weights"] == h.weights_tag and m["weights_sha256"] == h.weights_tag[5:]
    assert m["layers"][0] == "conv1_1" and m["n_features_per_layer"]["fc7"] == 4096 and m["key"] == h.key
    assert m["crops"] == {"name": "ten", "resize": 40, "size": 32, "n_crops": 10}
    assert m["pooling"] == "avg" and m["preprocessing"] == "torchvision" and m["dataset"]["split"] == "all"
    assert m["image_modes"] == {"CMYK": 1, "I;16": 1, "L": 1, "P": 1, "RGB": 3, "RGBA": 1}
    # 16-bit images are scaled to 8 bits (documented), where PIL's convert("RGB") would clip them at 255
    rows = [i for i, p in enumerate(emb.paths) if p != "dog/deep16.png"]
    ref = independent_vgg19_features(vgg_file, awkward, [emb.paths[i] for i in rows])
    np.testing.assert_allclose(emb.features[rows], ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_cache_hit_runs_no_forward_and_key_ignores_loader_and_root_spelling(tmp_path, awkward, vgg_file, monkeypatch, make_cfg):
    cfg = make_cfg(tmp_path / "cache", weights=vgg_file, dataset=_imagefolder(awkward),
                   crops={"_target_": "featstudy.transforms.CropSpec", "name": "center", "resize": 40, "size": 32})
    first = get_embedding(cfg)
    monkeypatch.setattr(models, "build", lambda *a, **k: pytest.fail("a cache hit must not build the model"))
    link = tmp_path / "same-data"
    link.symlink_to(awkward)
    again = make_cfg(tmp_path / "cache", weights=vgg_file, dataset=_imagefolder(str(link) + "/"),
                     crops={"_target_": "featstudy.transforms.CropSpec", "name": "center", "resize": 40, "size": 32}, **{"loader.batch_size": 7, "loader.num_workers": 1})
    hit = get_embedding(again)
    assert hit.hit and hit.key == first.key and hit.path == first.path and hit.meta == first.meta
    # what changes the numbers changes the key
    for change in ({"crops.size": 24}, {"crops.name": "ten"}, {"pooling.name": "max"}, {"model.preprocessing": "caffe"},
                   {"trainer.precision": "bf16-mixed"}):
        assert plan(make_cfg(tmp_path / "cache", weights=vgg_file, dataset=_imagefolder(awkward),
                             crops={"_target_": "featstudy.transforms.CropSpec", "name": "center", "resize": 40, "size": 32}, **change)).key != first.key, change
    assert plan(make_cfg(tmp_path / "c", weights="random", **{"model.seed": 1})).key != plan(make_cfg(tmp_path / "c")).key
    assert plan(make_cfg(tmp_path / "c", **{"trainer.precision": 32})).key == plan(make_cfg(tmp_path / "c")).key
    (awkward / "cat" / "rgb0.png").unlink()  # other data, other key
    assert plan(cfg).key != first.key


def test_config_errors_before_any_work(tmp_path, make_cfg):
    with pytest.raises(ConfigError, match=r"dataset.split: 'train' is not a split of digits; valid: \['all'\]"):
        get_embedding(make_cfg(tmp_path, **{"dataset.split": "train"}))
    with pytest.raises(DataError, match=r"dataset.root: .*nowhere.*dataset.download=true"):
        get_embedding(make_cfg(tmp_path, dataset={"_target_": "featstudy.datasets.CUB200", "name": "cub200", "root": str(tmp_path / "nowhere"), "split": "train", "download": False}))
    with pytest.raises(ConfigError, match=r"crops.size: 64 > crops.resize 40"):
        get_embedding(make_cfg(tmp_path, **{"crops.size": 64}))
    with pytest.raises(ConfigError, match=r"pooling.name"):
        get_embedding(make_cfg(tmp_path, **{"pooling.name": "median"}))


LIGHT = {"model": {"_target_": "featstudy.models.TorchvisionModel", "name": "resnet18", "weights": "random", "preprocessing": "torchvision", "seed": 5,
                   "nodes": ["layer1", "layer4", "flatten"]}}


@pytest.fixture
def light_cfg(make_cfg):
    """resnet18 (random, seeded) at 32 px: the loop machinery without VGG19's cost."""

    def build(cache, data, **over):
        cfg = make_cfg(cache, dataset=_imagefolder(data), **over)
        cfg.model = LIGHT["model"]
        return cfg

    return build


def _run(cfg_file, env=None):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(cfg_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=SCRIPT.parent)


def _many(root, n, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + i % 5, 44, 3), dtype=np.uint8)).save(root / f"c{i % 3}" / f"{i:03d}.png")
    return root


def test_resume_after_kill_9_equals_uninterrupted_run(tmp_path, light_cfg):
    data = _many(tmp_path / "data", 60)
    cfg = light_cfg(tmp_path / "cache", data, **{"loader.batch_size": 1})
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    key_dir = tmp_path / "cache" / "embeddings" / plan(cfg).key
    proc = _run(tmp_path / "cfg.yaml")
    deadline = time.time() + 120
    while time.time() < deadline and not any((key_dir / "shards").glob("shard-*.npz")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (key_dir / "DONE").exists(), "the run finished before it could be killed"
    # what the killed run finished: each shard's ids and file identity (inode, mtime, size)
    from featstudy.extraction import shards as _shards

    def identity(path):
        st = path.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size

    finished = {}
    for path in (key_dir / "shards").glob("shard-*.npz"):
        with np.load(path) as z:
            finished[path.name] = (identity(path), set(z["ids"].tolist()) | set(z["skipped_ids"].tolist()))
    done_before = set().union(*(ids for _, ids in finished.values()))
    written, at_merge = [], {}
    real_write, real_merge = _shards.write_shard, _shards.merge

    def recording_write(folder, rank, ids, *args, **kwargs):
        written.extend(ids.tolist())
        return real_write(folder, rank, ids, *args, **kwargs)

    def checking_merge(shard_dir, *args, **kwargs):
        at_merge.update({name: identity(shard_dir / name) for name in finished})
        return real_merge(shard_dir, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_shards, "write_shard", recording_write)
        mp.setattr(_shards, "merge", checking_merge)
        resumed = get_embedding(cfg)
    assert not resumed.hit and 0 < resumed.meta["n_resumed"] < 60
    assert resumed.meta["n_resumed"] == len(done_before)
    # no finished shard redone (each untouched until the merge), no image twice, every image once
    assert at_merge == {name: ident for name, (ident, _) in finished.items()}
    assert not done_before & set(written) and len(written) == len(set(written))
    assert sorted(done_before | set(written)) == list(range(60))
    assert not (key_dir / "shards").exists()
    whole = get_embedding(light_cfg(tmp_path / "cache2", data, **{"loader.batch_size": 5}))
    a, b = load_embedding(resumed.path), load_embedding(whole.path)
    assert a.paths == b.paths and len(a.paths) == 60
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)


WAITED = "another process is extracting it; waiting for its lock"


def _race(root: Path, data: Path, light_cfg) -> list[dict]:
    """Two processes started at once on the same config (the extracting one slowed to ~0.1 s per shard of 4
    images); each one's JSON line (key, hit, times, what its extraction logged)."""
    cfg = light_cfg(root / "cache", data)
    root.mkdir(parents=True)
    OmegaConf.save(cfg, root / "cfg.yaml")
    procs = [_run(root / "cfg.yaml", {"FEATSTUDY_TEST_SHARD_DELAY": "0.1"}) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_two_processes_same_key_one_extracts_one_reuses(tmp_path, light_cfg):
    """The second process finds the lock taken, waits, and reuses what the first extracted. The test proves the two
    overlapped: the reusing one logged that it waited for the lock (and their get_embedding calls overlap in time);
    a run where it only found the finished embedding is retried once, then reported as a skip."""
    data = _many(tmp_path / "data", 30)
    for attempt in range(2):
        outs = _race(tmp_path / f"try{attempt}", data, light_cfg)
        assert outs[0]["key"] == outs[1]["key"]
        assert sorted(o["hit"] for o in outs) == [False, True]  # exactly one extracted
        extractor, reuser = sorted(outs, key=lambda o: o["hit"])
        if any(WAITED in m for m in reuser["log"]):
            break
    else:
        pytest.skip("the two processes never overlapped at the lock in 2 tries (the second found the embedding "
                    "already finished); the lock was not exercised")
    assert not any(WAITED in m for m in extractor["log"])
    assert any("finished by another process, reusing" in m for m in reuser["log"])
    assert not any("extracting" in m and "images" in m for m in reuser["log"])  # it ran no forward pass
    assert reuser["t_start"] < extractor["t_end"] and extractor["t_start"] < reuser["t_end"]


def test_channels_last_is_an_opt_in_with_the_same_numbers(tmp_path, light_cfg):
    data = _many(tmp_path / "data", 6)
    plain = get_embedding(light_cfg(tmp_path / "a", data))
    fast = get_embedding(light_cfg(tmp_path / "b", data, **{"trainer.channels_last": True}))
    assert fast.key == plain.key and fast.meta["channels_last"] and not plain.meta["channels_last"]
    a, b = load_embedding(plain.path), load_embedding(fast.path)
    np.testing.assert_allclose(b.features, a.features, rtol=1e-5, atol=1e-5 * float(np.abs(a.features).max()))


@pytest.mark.slow
def test_ddp_two_cpu_processes_equal_one(tmp_path, light_cfg):
    data = _many(tmp_path / "data", 13)
    (data / "c0" / "broken.png").write_bytes(b"\x89PNG not really")
    cfg = light_cfg(tmp_path / "ddp", data, **{"trainer.strategy": "ddp", "trainer.devices": 2,
                                               "loader.batch_size": 2, "loader.num_workers": 1})
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    p = _run(tmp_path / "cfg.yaml")
    out, err = p.communicate(timeout=400)
    assert p.returncode == 0, err
    ddp = load_embedding(tmp_path / "ddp" / "embeddings" / json.loads(out.strip().splitlines()[-1])["key"])
    one = load_embedding(get_embedding(light_cfg(tmp_path / "one", data)).path)
    assert ddp.paths == one.paths and len(one.paths) == 13 and ddp.skipped == one.skipped and len(one.skipped) == 1
    np.testing.assert_allclose(ddp.features, one.features, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fp32_equals_cpu(tmp_path, awkward, vgg_file, make_cfg):
    common = dict(weights=vgg_file, dataset=_imagefolder(awkward))
    gpu = get_embedding(make_cfg(tmp_path / "gpu", **common, **{"trainer.accelerator": "gpu"}))
    cpu = get_embedding(make_cfg(tmp_path / "cpu", **common))
    assert gpu.key == cpu.key  # the device does not enter the key
    a, b = load_embedding(gpu.path), load_embedding(cpu.path)
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-5 * float(np.abs(b.features).max()))
