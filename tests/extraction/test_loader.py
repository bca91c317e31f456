"""The loader ships uint8 crops and the device normalises them: the same numbers as the fp32 CPU crops, a collate
into shared memory, workers sized to the CPUs given and to ``/dev/shm``, and one-line errors for what does not fit.

The reference crops come from torchvision's own ``Resize -> TenCrop/CenterCrop -> ToTensor -> Normalize`` on the
CPU (what the extraction computed before the uint8 path), fed to the same seeded network in one batch of the same
shape: the features must be equal to the bit.
"""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from featstudy import models
from featstudy.errors import ConfigError
from featstudy.extraction import get_embedding, plan
from featstudy.store import load_embedding
from featstudy.transforms import CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD

MB = 1 << 20
# (height, width): after the shorter side -> 40, the width minus the 32 px crop is odd (53), even (54), a
# portrait (57 x 40) and a resized-and-rounded one (45 x 61 -> 40 x 54)
SIZES = [(40, 53), (40, 54), (57, 40), (45, 61)]


def _folder(root, sizes=SIZES, seed=11):
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:h, 0:w]
        grad = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (h + w)], -1)
        img = np.clip(grad + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def _reference_crops(path, crops: str, preprocessing: str) -> torch.Tensor:
    """The fp32 crops as the CPU path made them, by torchvision's transforms alone."""
    img = Image.open(path).convert("RGB")
    to_tensor = T.ToTensor()
    if crops == "ten":
        x = torch.stack([to_tensor(c) for c in T.TenCrop(32)(T.Resize(40)(img))])
    elif crops == "center":
        x = to_tensor(T.CenterCrop(32)(T.Resize(40)(img))).unsqueeze(0)
    else:
        x = to_tensor(T.Resize((32, 32))(img)).unsqueeze(0)
    if preprocessing == "torchvision":
        return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(x)
    return x.flip(-3) * 255.0 - torch.tensor(CAFFE_MEAN_BGR).view(3, 1, 1)  # BGR, 0-255, minus the Caffe mean


@pytest.mark.parametrize("preprocessing", ["torchvision", "caffe"])
@pytest.mark.parametrize("crops", ["ten", "center", "none"])
def test_uint8_crops_normalised_on_the_device_equal_the_fp32_cpu_path_exactly(tmp_path, make_cfg, crops,
                                                                              preprocessing):
    data = _folder(tmp_path / "data")
    cfg = make_cfg(tmp_path / "cache", dataset={"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(data), "split": "all",
                                                "download": False},
                   crops={"name": crops, "resize": None if crops == "none" else 40, "size": 32},
                   **{"loader.batch_size": len(SIZES), "model.preprocessing": preprocessing})
    got = load_embedding(get_embedding(cfg).path)
    paths = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    assert got.paths == paths
    x = torch.stack([_reference_crops(data / p, crops, preprocessing) for p in paths])  # (B, K, 3, 32, 32)
    model, _, _ = models.build(models.spec(cfg.model), "avg", 32)  # the same seeded random VGG19
    with torch.inference_mode():
        parts = model.pooled_layers(x.flatten(0, 1))
        ref = torch.cat(list(parts.values()), dim=1).view(x.shape[0], x.shape[1], -1).mean(dim=1).numpy()
    np.testing.assert_array_equal(got.features, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preprocessing", ["torchvision", "caffe"])
def test_device_normalisation_on_cuda_is_bit_identical_to_torchvision_on_cpu(tmp_path, preprocessing):
    from featstudy.transforms import CropSpec, DeviceTransform, uint8_crops

    data = _folder(tmp_path / "data")
    for path in sorted(data.rglob("*.png")):
        shipped = uint8_crops(Image.open(path).convert("RGB"), CropSpec("ten", 40, 32)).unsqueeze(0)
        on_gpu = DeviceTransform(CropSpec("ten", 40, 32), preprocessing).cuda()(shipped.cuda()).cpu()[0]
        assert torch.equal(on_gpu, _reference_crops(path, "ten", preprocessing))


def test_collate_in_a_worker_stacks_uint8_into_shared_memory(tmp_path):
    """A real DataLoader with one worker over the dataset the extraction uses: the batch arrives as uint8 in shared
    memory (no copy on the way to the main process), six crops per image for ten crops (a sixth of the bytes of ten
    fp32 crops)."""
    import functools

    from featstudy import datasets
    from featstudy.extraction.module import CropsDataset, make_loader
    from featstudy.transforms import CropSpec, uint8_crops

    data = _folder(tmp_path / "data")
    ds = datasets.from_config({"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(data), "split": "all", "download": False})
    crops = CropSpec("ten", 40, 32)
    loader, workers = make_loader(CropsDataset(ds, functools.partial(uint8_crops, crops=crops), [0, 1, 2, 3]),
                                  batch_size=4, num_workers=1, image_bytes=6 * 3 * 32 * 32, accelerator="cpu")
    assert workers == 1 and loader.persistent_workers and not loader.pin_memory
    batch = next(iter(loader))
    images = batch["images"]
    assert images.dtype == torch.uint8 and images.shape == (4, 6, 3, 32, 32) and images.is_shared()
    assert images.numel() * images.element_size() * 40 // 6 == 4 * 10 * 3 * 32 * 32 * 4  # x 6.67 fewer bytes
    assert batch["ids"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("slurm,expected", [("3", 2), ("20", 8), ("1", 0), (None, None)])
def test_num_workers_auto_follows_the_cpus_given(tmp_path, make_cfg, monkeypatch, caplog, slurm, expected):
    if slurm is None:
        monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
        expected = min(8, len(os.sched_getaffinity(0)) - 1)
    else:
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", slurm)
    data = _folder(tmp_path / "data", sizes=SIZES[:2])
    cfg = make_cfg(tmp_path / "cache", dataset={"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(data), "split": "all",
                                                "download": False},
                   crops={"_target_": "featstudy.transforms.CropSpec", "name": "center", "resize": 36, "size": 32}, **{"loader.num_workers": "auto"})
    cfg.model = {"_target_": "featstudy.models.TorchvisionModel", "name": "resnet18", "weights": "random", "preprocessing": "torchvision", "seed": 5,
                 "nodes": ["layer1"]}
    with caplog.at_level(logging.INFO, logger="featstudy.extraction"):
        h = get_embedding(cfg)
    assert f"loader with {expected} workers" in caplog.text
    assert load_embedding(h.path).features.shape == (2, 64)


@pytest.mark.parametrize("value", [-1, "many", 1.5, True])
def test_bad_num_workers_is_one_line_naming_the_key_before_any_image_is_read(tmp_path, make_cfg, value):
    data = _folder(tmp_path / "data", sizes=SIZES[:1])
    cfg = make_cfg(tmp_path / "cache", dataset={"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(data), "split": "all",
                                                "download": False}, **{"loader.num_workers": value})
    with pytest.raises(ConfigError) as err:
        get_embedding(cfg)
    msg = str(err.value)
    assert msg.startswith(f"loader.num_workers={value!r} is not allowed") and "auto" in msg and "\n" not in msg
    assert not (plan(cfg).folder / "shards").exists()


def test_docker_default_shm_fits_one_worker_of_default_batches_at_224_not_two():
    """By hand: 16 images x 6 crops x 3 x 224 x 224 bytes = 14,450,688 bytes a batch; with 2 batches ahead per
    worker plus the one in use, n workers need (2n + 1) batches; Docker's 64 MiB holds 4.64 batches: n = 1 (the
    fp32 ten crops, 96 MB a batch, never fitted)."""
    from featstudy.extraction.module import fit_workers

    per_image = 6 * 3 * 224 * 224
    assert 16 * per_image == 14_450_688 and 64 * MB / (16 * per_image) < 5
    assert fit_workers(None, 16, per_image, 64 * MB, cpus=16) == 1  # auto: 8 wanted, 1 fits
    assert fit_workers(None, 4, per_image, 64 * MB, cpus=16) == 8  # 17 batches of 3.6 MB: all 8 fit
    assert fit_workers(1, 16, per_image, 64 * MB) == 1
    with pytest.raises(ConfigError) as err:
        fit_workers(2, 16, per_image, 64 * MB)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("loader.batch_size=16 with loader.num_workers=2 needs 69 MB")
    for part in ("/dev/shm has 64 MB free", "lower loader.batch_size or loader.num_workers", "--shm-size"):
        assert part in msg
    assert fit_workers(0, 10**6, per_image, 64 * MB) == 0  # no workers: the batches never go through /dev/shm


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm here")
def test_batches_larger_than_dev_shm_stop_before_extraction_or_auto_uses_fewer_workers(tmp_path, make_cfg,
                                                                                         monkeypatch, caplog):
    """With this machine's real /dev/shm: an explicit worker count whose batches cannot fit is a one-line error
    before any image is read; ``auto`` (4 CPUs given: 3 workers wanted) takes the most workers that fit (2)."""
    per_image = 3 * 32 * 32  # one 32 px centre crop, uint8
    free = shutil.disk_usage("/dev/shm").free
    data = _folder(tmp_path / "data", sizes=SIZES[:2])

    def cfg_for(batch_size, workers, cache):
        cfg = make_cfg(tmp_path / cache, dataset={"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(data), "split": "all",
                                                  "download": False},
                       crops={"_target_": "featstudy.transforms.CropSpec", "name": "center", "resize": 36, "size": 32},
                       **{"loader.batch_size": batch_size, "loader.num_workers": workers})
        cfg.model = {"_target_": "featstudy.models.TorchvisionModel", "name": "resnet18", "weights": "random", "preprocessing": "torchvision", "seed": 5,
                     "nodes": ["layer1"]}
        return cfg

    too_big = free // per_image // 3 + 1  # 1 worker: 3 batches in flight > free
    cfg = cfg_for(too_big, 1, "a")
    with pytest.raises(ConfigError) as err:
        get_embedding(cfg)
    msg = str(err.value)
    assert msg.startswith(f"loader.batch_size={too_big} with loader.num_workers=1 needs") and "\n" not in msg
    assert "/dev/shm has" in msg and "--shm-size" in msg
    assert not (plan(cfg).folder / "shards").exists()

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    batch = free // (per_image * 6)  # 2 workers: 5 batches <= 5/6 of free; 3 workers: 7 batches > free
    with caplog.at_level(logging.INFO, logger="featstudy"):
        h = get_embedding(cfg_for(batch, "auto", "b"))
    assert "loader.num_workers=auto: 2 workers instead of 3" in caplog.text and "--shm-size" in caplog.text
    assert "loader with 2 workers" in caplog.text
    assert load_embedding(h.path).features.shape == (2, 64)
