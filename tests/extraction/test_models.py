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
    base = {"_target_": "featstudy.models.TorchvisionModel", "name": "vgg19", "weights": "random",
            "preprocessing": "torchvision", "seed": 0, "nodes": None}
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


# -- VGG19's geometry, owned by models/vgg19.py (the receptive-field crops of figures 2 and 3 read it) -------------

# Receptive fields by hand, with the standard recurrence over the layers of ``features`` in order:
#   r_l = r_{l-1} + (k - 1) * j_{l-1}     (size in input pixels)
#   s_l = s_{l-1} + ((k - 1) / 2 - p) * j_{l-1}   (centre of map position 0; pixel i spans [i, i + 1))
#   j_l = j_{l-1} * stride                (input pixels between neighbouring map positions)
# from r = 1, j = 1, s = 0.5. VGG19 has two kinds of layer: a 3x3 conv, stride 1, pad 1, adds 2j to r and leaves
# j and s (1 - 1 = 0); a 2x2 max pool, stride 2, pad 0, adds j to r, moves s by j / 2 and doubles j:
#   conv1_1 r 1 + 2 = 3, j 1, s 0.5;  conv1_2 3 + 2 = 5;           pool1 5 + 1 = 6, s 0.5 + 0.5 = 1.0, j 2
#   conv2_1 6 + 4 = 10, j 2;          conv2_2 10 + 4 = 14;         pool2 14 + 2 = 16, s 1 + 1 = 2.0, j 4
#   conv3_1 16 + 8 = 24;  conv3_2 32;  conv3_3 40;  conv3_4 48;      pool3 48 + 4 = 52, s 2 + 2 = 4.0, j 8
#   conv4_1 52 + 16 = 68; conv4_2 84;  conv4_3 100; conv4_4 116;     pool4 116 + 8 = 124, s 4 + 4 = 8.0, j 16
#   conv5_1 124 + 32 = 156; conv5_2 188; conv5_3 220; conv5_4 252
RF_BY_HAND = {
    "conv1_1": (3, 1, 0.5), "conv1_2": (5, 1, 0.5),
    "conv2_1": (10, 2, 1.0), "conv2_2": (14, 2, 1.0),
    "conv3_1": (24, 4, 2.0), "conv3_2": (32, 4, 2.0), "conv3_3": (40, 4, 2.0), "conv3_4": (48, 4, 2.0),
    "conv4_1": (68, 8, 4.0), "conv4_2": (84, 8, 4.0), "conv4_3": (100, 8, 4.0), "conv4_4": (116, 8, 4.0),
    "conv5_1": (156, 16, 8.0), "conv5_2": (188, 16, 8.0), "conv5_3": (220, 16, 8.0), "conv5_4": (252, 16, 8.0),
}


def test_vgg19_receptive_fields_are_the_hand_recurrence():
    rf = vgg19.receptive_fields()
    assert list(rf) == vgg19.LAYERS[:-1]  # the 16 conv layers in the paper's order; no pool, no fc7
    assert rf == RF_BY_HAND  # every value is exact in binary floating point
    rf["conv1_1"] = (0, 0, 0.0)  # a caller's copy: the next call is unchanged
    assert vgg19.receptive_fields()["conv1_1"] == (3, 1, 0.5)


def test_vgg19_geometry_is_torchvisions_own_modules():
    geometry = vgg19.layer_geometry()
    assert [name for name, *_ in geometry if name] == vgg19.LAYERS[:-1]
    assert {tuple(g[1:]) for g in geometry if g[0]} == {(3, 1, 1)}
    assert [g for g in geometry if g[0] is None] == [(None, 2, 2, 0)] * 5
    # the jump of each conv layer is how much smaller its map is than a 224 px input (shapes on the meta device)
    with torch.device("meta"):
        features = torchvision.models.vgg19(weights=None).features
        h = torch.empty(1, 3, 224, 224)
        sizes = {}
        for index, m in enumerate(features):
            h = m(h)
            if f"features.{index}" in vgg19.CONV_NODES:
                sizes[vgg19.CONV_NODES[f"features.{index}"]] = h.shape[-1]
    assert sizes == {name: 224 // jump for name, (_, jump, _) in RF_BY_HAND.items()}


def test_vgg19_geometry_is_read_from_the_network_not_a_table(monkeypatch):
    real = torchvision.models.vgg19

    def pools_of_three(**kw):  # the same network with 3x3 max pools, stride 3
        net = real(**kw)
        for i, m in enumerate(net.features):
            if isinstance(m, torch.nn.MaxPool2d):
                net.features[i] = torch.nn.MaxPool2d(3, 3)
        return net

    monkeypatch.setattr(torchvision.models, "vgg19", pools_of_three)
    vgg19.layer_geometry.cache_clear()
    vgg19._receptive_fields.cache_clear()
    try:
        rf = vgg19.receptive_fields()
        # pool1 now adds 2j = 2 to r = 5 and moves s by j = 1: conv2_1 r 7 + 2 * 3 = 13, j 3, s 1.5
        assert rf["conv1_2"] == (5, 1, 0.5) and rf["conv2_1"] == (13, 3, 1.5)
    finally:
        vgg19.layer_geometry.cache_clear()
        vgg19._receptive_fields.cache_clear()
    monkeypatch.undo()
    assert vgg19.receptive_fields() == RF_BY_HAND
