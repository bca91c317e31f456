"""VGG19's table, the in-place ReLU hazard, the generic torchvision path and its errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torchvision.models.feature_extraction import create_feature_extractor

from featstudy import models
from featstudy.errors import ConfigError
from featstudy.models import vgg19


def test_table_is_the_papers_9600_features_in_order():
    assert vgg19.LAYERS == [f"conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4)) for i in range(1, n + 1)] + ["fc7"]
    assert list(vgg19.LAYER_TABLE)[:3] == ["features.1", "features.3", "features.6"]
    assert list(vgg19.LAYER_TABLE)[-2:] == ["features.35", "classifier.4"]
    assert vgg19.N_FEATURES == 9600
    names = models.feature_names({l: c for l, c in vgg19.LAYER_TABLE.values()})
    assert len(names) == 9600 and names[0] == "conv1_1:0" and names[5503] == "conv5_4:511"
    assert names[5504] == "fc7:0" and names[-1] == "fc7:4095"
    assert names.index("conv4_1:221") == 64 + 64 + 128 + 128 + 4 * 256 + 221


def test_table_nodes_are_relus_and_conv_nodes_are_overwritten_in_place():
    torch.manual_seed(0)
    net = torchvision.models.vgg19(weights=None).eval()
    for node in vgg19.LAYER_TABLE:
        parent, idx = node.split(".")
        assert isinstance(getattr(net, parent)[int(idx)], torch.nn.ReLU)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hazard = create_feature_extractor(net, {"features.0": "conv", "features.1": "relu"})(x)
        # in-place ReLU rewrote the conv node's tensor: the "conv" output has no negatives and equals the ReLU's
        assert hazard["conv"].min() >= 0
        torch.testing.assert_close(hazard["conv"], hazard["relu"])
        for m in net.modules():
            if isinstance(m, torch.nn.ReLU):
                m.inplace = False
        safe = create_feature_extractor(net, {"features.0": "conv", "features.1": "relu"})(x)
    assert safe["conv"].min() < 0  # true pre-ReLU values
    torch.testing.assert_close(safe["relu"], hazard["relu"])
    torch.testing.assert_close(safe["relu"], safe["conv"].clamp_min(0))


def _spec(**kw):
    base = {"name": "vgg19", "weights": "random", "preprocessing": "torchvision", "seed": 0, "nodes": None}
    base.update(kw)
    return models.spec(OmegaConf.create(base))


def test_generic_torchvision_model_by_node_names():
    ms = _spec(name="resnet18", nodes=["layer1", "layer4", "flatten"])
    model, channels, digest = models.build(ms, "max", 32)
    assert channels == {"layer1": 64, "layer4": 512, "flatten": 512} and digest is None
    out = model(torch.randn(3, 2, 3, 32, 32))
    assert out.shape == (3, 64 + 512 + 512)
    assert ms.weights.tag == "random"


def test_node_and_model_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model.nodes: 'layer9'.*get_graph_node_names"):
        models.build(_spec(name="resnet18", nodes=["layer1", "layer9"]), "avg", 32)
    with pytest.raises(ConfigError, match=r"model.name: 'vgg99'.*list_models"):
        _spec(name="vgg99")
    with pytest.raises(ConfigError, match=r"model.nodes: required for resnet18"):
        _spec(name="resnet18")
    with pytest.raises(ConfigError, match=r"model.preprocessing"):
        _spec(preprocessing="opencv")
