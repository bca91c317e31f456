"""Memory of the forward pass and of the figures' network (issue 16, item 12).

* Each node is pooled where it is produced: the peak is one conv's input and output maps, not all 16 layer maps
  (measured by the bytes of the tensors alive, tracked op by op with a TorchDispatchMode), and the features are
  exactly those of an independent torchvision forward pooled layer by layer.
* The figures' network runs where ``trainer.accelerator`` says and is dropped once the figures are drawn.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from featstudy import models
from featstudy.analysis import AnalysisContext, image_io
from featstudy.analysis.figures import FiguresCallback
from featstudy.extraction.module import ExtractionModule
from featstudy.store import load_embedding, write_embedding

#: VGG19's conv layers (channels, number of convs at that width) and the side of their maps at a 112 px crop
VGG_BLOCKS = [(64, 2, 112), (128, 2, 56), (256, 4, 28), (512, 4, 14), (512, 4, 7)]
RELU_AFTER_CONV = [1, 3, 6, 8, 11, 13, 15, 17, 20, 22, 24, 26, 29, 31, 33, 35]  # torchvision's features indices


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops allocate and that are still referenced, and their peak. A storage an op
    returns that one of its inputs already had (a view, an in-place op, a parameter's transpose) is not new."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.live = self.peak = 0

    def _dropped(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.size.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self.refs:
                if key in inputs:
                    continue
                self.refs[key], self.size[key] = 0, t.untyped_storage().nbytes()
                self.live += self.size[key]
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._dropped, key)
        return out


def _spec(name="vgg19", nodes=None):
    return models.spec(OmegaConf.create({"_target_": "featstudy.models.TorchvisionModel", "name": name, "weights": "random", "seed": 0,
                                         "preprocessing": "torchvision", "nodes": nodes}))


def _independent_vgg19(x: torch.Tensor, pooling: str) -> torch.Tensor:
    """torchvision's VGG19 with featstudy's documented random weights (seed 0), run module by module; each ReLU
    after a conv, then fc7's, pooled over space."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torchvision.models.vgg19(weights=None).eval()
    parts = []
    with torch.no_grad():
        for i, layer in enumerate(net.features):
            x = layer(x)
            if i in RELU_AFTER_CONV:
                parts.append(x.mean(dim=(2, 3)) if pooling == "avg" else x.amax(dim=(2, 3)))
        x = torch.flatten(net.avgpool(x), 1)
        for layer in net.classifier[:5]:
            x = layer(x)
        parts.append(x)
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_features_pooled_where_produced_equal_an_independent_forward_exactly(pooling):
    model, channels, _ = models.build(_spec(), pooling, 48)
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model.per_crop(x)
    assert got.dtype == torch.float32 and got.shape == (3, 9600)
    assert torch.equal(got, _independent_vgg19(x, pooling))
    assert list(channels.values()) == [c for c, n, _ in VGG_BLOCKS for _ in range(n)] + [4096]


def test_a_node_overwritten_in_place_later_keeps_its_final_value():
    # resnet18: `layer1.0.add` (out += identity) is overwritten by the ReLU(inplace=True) that follows; the maps
    # were read at the end of the forward pass, so its features are those of `layer1.0.relu_1`
    from torchvision.models.feature_extraction import create_feature_extractor

    model, _, _ = models.build(_spec("resnet18", ["layer1.0.add", "layer1.0.bn2"]), "max", 32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.pooled_layers(x)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = torchvision.models.resnet18(weights=None).eval()
        ref = create_feature_extractor(net, {"layer1.0.relu_1": "after_relu", "layer1.0.bn2": "bn2"})(x)
    assert torch.equal(got["layer1.0.add"], ref["after_relu"].amax(dim=(2, 3)))
    assert torch.equal(got["layer1.0.bn2"], ref["bn2"].amax(dim=(2, 3)))


def test_peak_memory_is_one_conv_s_maps_not_all_layers():
    size, crops = 112, 2
    model, _, _ = models.build(_spec(), "avg", size)
    module = ExtractionModule(model)
    images = torch.randn(1, crops, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = {"images": images, "ids": torch.tensor([0]), "modes": ["RGB"],
             "skipped_ids": torch.zeros(0, dtype=torch.int64), "skipped_reasons": []}
    # by hand: conv1_x maps are the largest (64 x 112 x 112 floats per crop); all 16 conv maps plus fc7 per crop
    largest = crops * 64 * size * size * 4
    all_maps = crops * 4 * (sum(c * n * s * s for c, n, s in VGG_BLOCKS) + 4096)
    assert all_maps == 29_736_960
    with torch.inference_mode(), LiveBytes() as mem:
        out = module.predict_step(batch)
    assert out["features"].shape == (1, 9600)
    # a conv reads one map and writes the next: two conv1 maps at once are the floor; the pooled vectors are 77 kB
    assert mem.peak <= 2 * largest + 200_000, (mem.peak, largest, all_maps)
    assert mem.peak < 0.5 * all_maps


# ------------------------------------------------------------------ the figures' network


@pytest.mark.parametrize(("accelerator", "cuda", "device"), [
    ("cpu", True, "cpu"), ("gpu", True, "cuda"), ("cuda", True, "cuda"), ("auto", True, "cuda"), (None, True, "cuda"),
    ("mps", True, "cpu"), ("gpu", False, "cpu"), ("auto", False, "cpu"),
])
def test_the_figures_network_runs_where_trainer_accelerator_says(monkeypatch, accelerator, cuda, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert image_io.network_device(accelerator) == device


def _small_embedding(root):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        rel = f"{'ab'[i % 2]}/{i}.png"
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(root / "images" / rel)
        paths.append(rel)
    names = ["conv1_1:3", "conv2_1:5", "fc7:7"]
    meta = {"dataset": {"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(root / "images"), "split": "all"}, "model": "vgg19",
            "weights": "random", "weights_source": "random", "weights_seed": 0, "weights_sha256": None,
            "weights_path": None, "preprocessing": "torchvision", "pooling": "avg",
            "crops": {"name": "ten", "resize": 36, "size": 32, "n_crops": 10}}
    features = rng.normal(size=(6, 3)).astype(np.float32)
    return write_embedding(root / "emb", features=features, labels=np.arange(6) % 2, classes=["a", "b"],
                           paths=paths, feature_names=names, meta=meta)


def test_the_figures_callback_builds_the_network_on_cpu_and_releases_it(tmp_path, monkeypatch, caplog):
    import torchvision.models.feature_extraction as fe

    emb = load_embedding(_small_embedding(tmp_path))
    built = []
    real = fe.create_feature_extractor

    def counting(*args, **kwargs):  # torchvision's, counted: shows the network was really rebuilt
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fe, "create_feature_extractor", counting)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU "visible": cpu must still be chosen
    image_io._network.cache_clear()
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu"}})
    ctx = AnalysisContext(emb, {"bins": None, "layers": None}, tmp_path / "out", "tiny", cfg=cfg)
    cb = FiguresCallback(formats=["png"], top_k=2, n_images=2, n_class_images=2, dpi=30, which=["fig2"])
    with caplog.at_level(logging.WARNING, logger="featstudy"):
        result = cb.run(ctx)
    assert [p.name for p in result.files] == ["fig2.png"]
    assert built, "the figures never rebuilt the network"
    assert not [r for r in caplog.records if "cannot rebuild the network" in r.getMessage()]  # it ran, on cpu
    assert image_io._network.cache_info().currsize == 0  # released once the figures were drawn


def test_the_model_survives_pickling_for_ddp_spawn_and_still_shares_its_weights():
    import pickle

    model, _, _ = models.build(_spec("resnet18", ["layer1.0.add", "layer2.1.relu_1"]), "avg", 32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    copy = pickle.loads(pickle.dumps(model))  # what ddp_spawn does to the module
    with torch.no_grad():
        assert torch.equal(copy.per_crop(x), model.per_crop(x))
        copy.body.get_submodule("conv1").weight.mul_(2)  # the pooled forward reads the body's weights
        assert not torch.equal(copy.per_crop(x), model.per_crop(x))
