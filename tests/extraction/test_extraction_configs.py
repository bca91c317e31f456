"""Every option of the extraction config groups (model, crops, pooling, dataset, loader, trainer), composed with the
root config and built into the object the extraction uses, checked against an independent torchvision computation
or a generated miniature of the dataset's layout. A new option without an expectation here fails
(:func:`test_each_group_has_an_expectation_for_every_option`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from hydra import compose, initialize_config_dir
from PIL import Image

from featstudy import datasets, models, pooling
from featstudy.transforms import ImageTransform, crop_spec

CONF = Path(os.environ.get("FEATSTUDY_CONF", Path(__file__).resolve().parents[2] / "conf")).absolute()
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's weight transforms
RESNET18 = ["model=torchvision", "model.name=resnet18", "model.weights=random"]


def _compose(*overrides):
    import featstudy.config  # noqa: F401 - the abspath resolver

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _png(path: Path, seed: int, size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


# crops: torchvision's own pipelines at the option's sizes (ten, center: shorter side 256, crops 224; none: 224x224)
def _tensor_stack(crops):
    return torch.stack([T.Normalize(MEAN, STD)(T.ToTensor()(c)) for c in crops])


CROPS = {
    "ten": T.Compose([T.Resize(256), T.TenCrop(224), T.Lambda(_tensor_stack)]),
    "center": T.Compose([T.Resize(256), T.CenterCrop(224), T.Lambda(lambda c: _tensor_stack([c]))]),
    "none": T.Compose([T.Resize((224, 224)), T.Lambda(lambda c: _tensor_stack([c]))]),
}
POOLING = {"avg": lambda a: a.mean(dim=(2, 3)), "max": lambda a: a.amax(dim=(2, 3))}


def test_each_group_has_an_expectation_for_every_option():
    assert options("crops") == sorted(CROPS) and options("pooling") == sorted(POOLING)
    assert options("dataset") == sorted(DATASETS) and options("model") == ["open_clip", "timm", "torchvision", "vgg19"]
    assert options("loader") == ["default"] and options("trainer") == ["default"]


@pytest.mark.parametrize("option", sorted(CROPS))
def test_crops_option_equals_torchvisions_transform(option):
    cfg = _compose(f"crops={option}")
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))  # not square
    got = ImageTransform(crop_spec(cfg.crops), cfg.model.preprocessing)(img)
    torch.testing.assert_close(got, CROPS[option](img), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("option", sorted(POOLING))
def test_pooling_option_pools_each_crop_then_averages_the_crops(option):
    """The built model against the same seeded resnet18 read by a forward hook: pooled per crop, mean over crops."""
    cfg = _compose(f"pooling={option}", *RESNET18, "model.nodes=[layer1]", "model.seed=3")
    model, channels, _ = models.build(models.spec(cfg.model), pooling.check(cfg.pooling.name), 32)
    x = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # 2 images x 3 crops
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        net = torchvision.models.resnet18(weights=None).eval()
    grabbed = []
    net.layer1.register_forward_hook(lambda m, i, o: grabbed.append(o.detach().clone()))
    with torch.no_grad():
        net(x.flatten(0, 1))
        got = model(x)
    expected = POOLING[option](grabbed[0]).view(2, 3, 64).mean(dim=1)
    assert channels == {"layer1": 64}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_model_vgg19_reads_the_relus_after_the_16_convs_and_fc7(helpers):
    """``model=vgg19``: the graph nodes are the ReLUs that follow each conv of torchvision's VGG19 and fc7's ReLU
    (classifier.4), named conv<block>_<i> (paper Table 1); ImageNet weights from torchvision's own URL."""
    ms = models.spec(_compose("model=vgg19").model)
    with torch.device("meta"):
        net = torchvision.models.vgg19(weights=None)
    layers = {node: name for name, node in helpers.vgg19_conv_relus(net).items()}
    assert isinstance(net.classifier[4], torch.nn.ReLU)  # fc6, ReLU, Dropout, fc7, ReLU
    layers["classifier.4"] = "fc7"
    assert ms.name == "vgg19" and ms.nodes == layers and len(layers) == 17
    assert ms.weights.url == torchvision.models.VGG19_Weights.IMAGENET1K_V1.url


def test_model_torchvision_reads_resnet50_at_its_nodes():
    """``model=torchvision``: resnet50 at layer1..layer4 and flatten (bottleneck widths 64·4 … 512·4, and the 2048
    pooled features); built here with random weights."""
    cfg = _compose("model=torchvision")
    assert models.spec(cfg.model).weights.url == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    cfg = _compose("model=torchvision", "model.weights=random")
    model, channels, digest = models.build(models.spec(cfg.model), "avg", 32)
    assert channels == {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048, "flatten": 2048}
    assert digest is None and model(torch.zeros(1, 1, 3, 32, 32)).shape == (1, 5888)


# dataset: a miniature of each official layout where the option's default root points (under paths.root_dir/data);
# each returns (extra overrides, class name, images in the option's default split)
def _cub200(data: Path, monkeypatch):
    base, lines = data / "CUB_200_2011", {"images": [], "labels": [], "split": []}
    for c, cls in enumerate(["001.Albatross", "002.Auklet"], 1):
        for j in range(3):  # j < 2 train (1), j = 2 test (0): train = 2 x 2
            k = 3 * (c - 1) + j + 1
            _png(base / "images" / cls / f"{j}.jpg", k)
            lines["images"].append(f"{k} {cls}/{j}.jpg")
            lines["labels"].append(f"{k} {c}")
            lines["split"].append(f"{k} {int(j < 2)}")
    (base / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n")
    for name, file in (("images", "images.txt"), ("labels", "image_class_labels.txt"), ("split", "train_test_split.txt")):
        (base / file).write_text("\n".join(lines[name]) + "\n")
    return [], "CUB200", 4


def _flowers102(data: Path, monkeypatch):
    import hashlib

    from scipy.io import savemat

    base = data / "flowers-102"
    for k in range(1, 7):
        _png(base / "jpg" / f"image_{k:05d}.jpg", k)
    savemat(base / "imagelabels.mat", {"labels": np.array([[1, 1, 2, 2, 3, 3]])})
    savemat(base / "setid.mat", {"trnid": np.array([[1]]), "valid": np.array([[3]]), "tstid": np.array([[2, 4, 5, 6]])})
    md5 = {n: hashlib.md5((base / n).read_bytes()).hexdigest() for n in ("imagelabels.mat", "setid.mat")}
    from featstudy.datasets import Flowers102

    monkeypatch.setattr(Flowers102, "files", {**Flowers102.files, "labels": ("imagelabels.mat", md5["imagelabels.mat"]),
                                              "setid": ("setid.mat", md5["setid.mat"])})
    return [], "Flowers102", 4


def _mit67(data: Path, monkeypatch):
    for cls in ("bakery", "kitchen"):
        for j in range(2):
            _png(data / "mit67" / "Images" / cls / f"{j}.jpg", j)
    (data / "mit67" / "TrainImages.txt").write_text("bakery/0.jpg\nkitchen/0.jpg\nkitchen/1.jpg\n")
    (data / "mit67" / "TestImages.txt").write_text("bakery/1.jpg\n")
    return [], "MIT67", 3


def _imagenet_val(data: Path, monkeypatch):
    for c, wnid in enumerate(("n01440764", "n01443537", "n01484850")):
        for j in range(2):
            _png(data / "imagenet" / "val" / wnid / f"ILSVRC2012_val_{2 * c + j + 1:08d}.JPEG", c + j)
    return ["dataset.n_classes=2"], "ImageNetVal", 4  # 2 of the 3 classes, all their images


def _imagefolder(data: Path, monkeypatch):
    for cls, n in (("a", 2), ("b", 3)):
        for j in range(n):
            _png(data / "folder" / cls / f"{j}.png", j)
    return [f"dataset.root={data / 'folder'}"], "ImageFolder", 5


def _digits(data: Path, monkeypatch):
    return [], "Digits", 1797  # scikit-learn's bundled digits, all of them


DATASETS = {"cub200": _cub200, "flowers102": _flowers102, "mit67": _mit67, "imagenet_val": _imagenet_val,
            "imagefolder": _imagefolder, "digits": _digits}


@pytest.mark.parametrize("option", sorted(DATASETS))
def test_dataset_option_reads_its_layout_under_the_data_folder(option, tmp_path, monkeypatch):
    overrides, cls, n_images = DATASETS[option](tmp_path / "data", monkeypatch)
    cfg = _compose(f"dataset={option}", f"paths.root_dir={tmp_path}", *overrides)
    ds = datasets.from_config(cfg.dataset)
    assert type(ds).__name__ == cls and ds.name == option and len(ds) == n_images
    img, label = ds[len(ds) - 1]
    assert img.mode == "RGB" and 0 <= label < len(ds.classes)


def test_loader_and_trainer_defaults_are_what_the_extraction_runs(tmp_path, monkeypatch):
    """A real extraction with ``loader=default trainer=default`` (and ``loader.batch_size=4``, unlike the default
    16): the DataLoader and the Lightning Trainer that ``get_embedding`` builds, caught as they reach
    ``Trainer.predict`` (which then runs)."""
    import pytorch_lightning as pl
    from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator
    from pytorch_lightning.strategies import SingleDeviceStrategy
    from torch.utils.data import DataLoader

    from featstudy.extraction import get_embedding
    from featstudy.store import load_embedding

    for j in range(6):
        _png(tmp_path / "data" / f"c{j % 2}" / f"{j}.png", j, size=(40, 44))
    cfg = _compose("loader=default", "loader.batch_size=4", "trainer=default", *RESNET18, "model.nodes=[layer1]", "crops=center",
                   "crops.resize=36", "crops.size=32", "dataset=imagefolder", f"dataset.root={tmp_path / 'data'}",
                   f"paths.cache_dir={tmp_path / 'cache'}")
    seen = {}
    real_predict = pl.Trainer.predict

    def predict(trainer, model=None, dataloaders=None, **kwargs):
        seen.update(trainer=trainer, loader=dataloaders)
        return real_predict(trainer, model, dataloaders=dataloaders, **kwargs)

    monkeypatch.setattr(pl.Trainer, "predict", predict)
    handle = get_embedding(cfg)
    loader, trainer = seen["loader"], seen["trainer"]
    # loader.num_workers: auto = min(8, CPUs this process may use - 1); 4 tiny 32x32 crops always fit in /dev/shm
    cpus = int(os.environ["SLURM_CPUS_PER_TASK"]) if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit() \
        else len(os.sched_getaffinity(0))
    assert isinstance(loader, DataLoader) and (loader.batch_size, loader.num_workers) == (4, max(0, min(8, cpus - 1)))
    assert loader.persistent_workers == (loader.num_workers > 0)
    assert len(loader) == 2  # 6 images in batches of 4
    assert isinstance(trainer.accelerator, CUDAAccelerator if torch.cuda.is_available() else CPUAccelerator)
    assert isinstance(trainer.strategy, SingleDeviceStrategy) and (trainer.num_devices, trainer.num_nodes) == (1, 1)
    assert trainer.precision == "32-true"
    assert load_embedding(handle.path).features.shape == (6, 64)


@pytest.mark.parametrize("overrides,strategy,devices,precision", [
    (["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"], "DDPStrategy", 2, "32-true"),
    (["trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=ddp"], "DDPStrategy", 1, "32-true"),
    (["trainer.accelerator=cpu", "trainer.precision=bf16"], "SingleDeviceStrategy", 1, "bf16-mixed"),
])
def test_trainer_settings_reach_lightning(overrides, strategy, devices, precision):
    """``cfg.trainer`` through the extraction's own keyword builder into a real (not started) Trainer; the old
    precision spelling ``bf16`` becomes Lightning's ``bf16-mixed``."""
    import pytorch_lightning as pl

    from featstudy.extraction.extract import trainer_kwargs as _trainer_kwargs

    trainer = pl.Trainer(**_trainer_kwargs(_compose(*overrides)), logger=False, enable_checkpointing=False)
    assert type(trainer.strategy).__name__ == strategy
    assert trainer.num_devices == devices and trainer.precision == precision
