"""Receptive fields and the ImageNet source rule of figures 2 and 3 (:mod:`featstudy.analysis.images`).

* :func:`receptive_fields` against the recursion worked out by hand for the 16 conv layers of VGG19;
* :func:`rf_box` on interior, corner and clipped positions at 224 and 32 px (boxes derived by hand), and against
  the receptive field measured by autograd on VGG19's own layer stack (the set of input pixels a map position
  depends on);
* the displayed centre square is the very crop the network is fed;
* :func:`find_imagenet_embedding`: only a finished ``imagenet_val`` embedding of the same network is a source.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featstudy.analysis import images
from featstudy.store import load_embedding, write_embedding

# Receptive field of every conv layer by hand: (size, jump, centre of map position 0), in input pixels, pixel i
# spanning [i, i + 1). Start: size 1, jump 1, centre 0.5. A 3x3 conv, stride 1, pad 1 adds 2 * jump to the size
# and leaves jump and centre; a 2x2 max pool, stride 2, adds jump to the size, moves the centre by jump / 2
# ((k - 1) / 2 - p = 0.5 jumps) and doubles the jump.
#   conv1_1   3  1 0.5   conv1_2   5  1 0.5   pool1   6  2 1.0
#   conv2_1  10  2 1.0   conv2_2  14  2 1.0   pool2  16  4 2.0
#   conv3_1  24  4 2.0   conv3_2  32  ...     conv3_3  40   conv3_4  48   pool3  52  8 4.0
#   conv4_1  68  8 4.0   conv4_2  84  ...     conv4_3 100   conv4_4 116   pool4 124 16 8.0
#   conv5_1 156 16 8.0   conv5_2 188  ...     conv5_3 220   conv5_4 252
VGG19_RF = {
    "conv1_1": (3, 1, 0.5), "conv1_2": (5, 1, 0.5),
    "conv2_1": (10, 2, 1.0), "conv2_2": (14, 2, 1.0),
    "conv3_1": (24, 4, 2.0), "conv3_2": (32, 4, 2.0), "conv3_3": (40, 4, 2.0), "conv3_4": (48, 4, 2.0),
    "conv4_1": (68, 8, 4.0), "conv4_2": (84, 8, 4.0), "conv4_3": (100, 8, 4.0), "conv4_4": (116, 8, 4.0),
    "conv5_1": (156, 16, 8.0), "conv5_2": (188, 16, 8.0), "conv5_3": (220, 16, 8.0), "conv5_4": (252, 16, 8.0),
}


def test_receptive_fields_are_the_hand_recursion():
    rf = images.receptive_fields()
    assert list(rf) == list(VGG19_RF)  # the 16 conv layers in order, no pools, no fc7
    assert rf == VGG19_RF  # every value is exact in binary floating point


# (top, left, bottom, right), bottom/right exclusive: centre c = start + position * jump, rows [c - size/2,
# c + size/2) clipped to [0, image size).
RF_BOXES = [
    # conv1_1 (0, 0): c = 0.5 -> [-1, 2) -> [0, 2)
    ("conv1_1", 0, 0, 224, (0, 0, 2, 2)),
    # conv1_1 (223, 100): rows 223.5 -> [222, 225) -> [222, 224); cols 100.5 -> [99, 102)
    ("conv1_1", 223, 100, 224, (222, 99, 224, 102)),
    # conv2_1 (3, 10): rows 1 + 6 = 7 -> [2, 12); cols 1 + 20 = 21 -> [16, 26)
    ("conv2_1", 3, 10, 224, (2, 16, 12, 26)),
    # conv3_1 (5, 9): rows 2 + 20 = 22 -> [10, 34); cols 2 + 36 = 38 -> [26, 50)
    ("conv3_1", 5, 9, 224, (10, 26, 34, 50)),
    # conv4_1 (13, 2): rows 4 + 104 = 108 -> [74, 142); cols 4 + 16 = 20 -> [-14, 54) -> [0, 54)
    ("conv4_1", 13, 2, 224, (74, 0, 142, 54)),
    # conv5_1 (6, 7): rows 8 + 96 = 104 -> [26, 182); cols 8 + 112 = 120 -> [42, 198)
    ("conv5_1", 6, 7, 224, (26, 42, 182, 198)),
    # conv5_4 (0, 0): 8 -> [-118, 134) -> [0, 134); (13, 13): 216 -> [90, 342) -> [90, 224)
    ("conv5_4", 0, 0, 224, (0, 0, 134, 134)),
    ("conv5_4", 13, 13, 224, (90, 90, 224, 224)),
    # at 32 px: conv1_1 (31, 0): rows 31.5 -> [30, 33) -> [30, 32); cols [-1, 2) -> [0, 2)
    ("conv1_1", 31, 0, 32, (30, 0, 32, 2)),
    # conv2_2 (15, 4): rows 1 + 30 = 31 -> [24, 38) -> [24, 32); cols 1 + 8 = 9 -> [2, 16)
    ("conv2_2", 15, 4, 32, (24, 2, 32, 16)),
    # conv3_1 (3, 7): rows 2 + 12 = 14 -> [2, 26); cols 2 + 28 = 30 -> [18, 42) -> [18, 32)
    ("conv3_1", 3, 7, 32, (2, 18, 26, 32)),
    # conv3_4 (7, 0): rows 2 + 28 = 30 -> [6, 54) -> [6, 32); cols 2 -> [-22, 26) -> [0, 26)
    ("conv3_4", 7, 0, 32, (6, 0, 32, 26)),
    # conv5_4 (1, 1) at 32: [24 - 126, 24 + 126) covers the whole crop
    ("conv5_4", 1, 1, 32, (0, 0, 32, 32)),
]


@pytest.mark.parametrize("layer, y, x, size, box", RF_BOXES)
def test_rf_box_by_hand(layer, y, x, size, box):
    assert images.rf_box(layer, y, x, size) == box


def test_rf_box_is_none_without_a_spatial_receptive_field():
    assert images.rf_box("fc7", 0, 0, 32) is None
    assert images.rf_box("conv6_1", 0, 0, 32) is None


def linear_twin(features: nn.Sequential) -> tuple[list[nn.Module], dict[int, str]]:
    """VGG19's ``features`` with each layer's own geometry (kernel, stride, padding, dilation), one channel,
    all-ones kernels, average instead of max pooling and no ReLU: a linear map with positive weights, so the
    gradient of an output position is > 0 exactly on the input pixels it depends on (max pooling would route the
    gradient through one pixel of each window). Returns the layers and {layer index: conv<block>_<i>}."""
    layers: list[nn.Module] = []
    names: dict[int, str] = {}
    block, i = 1, 0
    for m in features:
        if isinstance(m, nn.Conv2d):
            conv = nn.Conv2d(1, 1, m.kernel_size, m.stride, m.padding, m.dilation, bias=False)
            nn.init.ones_(conv.weight)
            conv.weight.requires_grad_(False)
            i += 1
            names[len(layers)] = f"conv{block}_{i}"
            layers.append(conv)
        elif isinstance(m, nn.MaxPool2d):
            layers.append(nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode))
            block, i = block + 1, 0
    return layers, names


@pytest.mark.parametrize("size", [224, 32])
def test_rf_box_is_the_support_of_the_gradient_in_vgg19(size):
    import torchvision

    with torch.device("meta"):  # only the layer geometry is read: no weights are initialised
        net = torchvision.models.vgg19(weights=None)
    layers, names = linear_twin(net.features)
    assert sorted(names.values()) == sorted(VGG19_RF)  # the real network has exactly these 16 conv layers
    map_size = {name: size // VGG19_RF[name][1] for name in names.values()}
    # one batch element per (layer, position): the first and the last corner, an interior point off the diagonal
    probes = [(name, y, x) for name, m in map_size.items()
              for y, x in {(0, 0), (m - 1, m - 1), (m // 2, m // 3)}]
    x_in = torch.ones(len(probes), 1, size, size, requires_grad=True)
    out, h = {}, x_in
    mkldnn, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False  # 1-channel convs: 5x faster
    try:
        for index, layer in enumerate(layers):
            h = layer(h)
            if index in names:
                out[names[index]] = h
        assert {name: t.shape[-1] for name, t in out.items()} == map_size
        seeds = {name: torch.zeros_like(t) for name, t in out.items()}  # d(sum of the probed positions)/d(map)
        for b, (name, y, x) in enumerate(probes):
            seeds[name][b, 0, y, x] = 1.0
        (grad,) = torch.autograd.grad(list(out.values()), x_in, grad_outputs=[seeds[n] for n in out])
    finally:
        torch.backends.mkldnn.enabled = mkldnn
    for b, (name, y, x) in enumerate(probes):
        support = (grad[b, 0] > 0).numpy()
        rows, cols = np.flatnonzero(support.any(1)), np.flatnonzero(support.any(0))
        top, left, bottom, right = images.rf_box(name, y, x, size)
        assert (top, left, bottom, right) == (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1), (name, y, x)
        assert support.sum() == (bottom - top) * (right - left)  # a full rectangle


def ramp_image(w: int, h: int) -> Image.Image:
    """R a horizontal ramp, G a vertical ramp, B constant: any one-pixel shift changes the pixels."""
    yy, xx = np.mgrid[:h, :w]
    return Image.fromarray(np.stack([xx * 5, yy * 6, np.full_like(xx, 90)], -1).astype(np.uint8))


@pytest.mark.parametrize("w, h, resized, crop", [
    # 48 x 40, resize 36: 40 -> 36, 48 -> int(36 * 48 / 40) = int(43.2) = 43 (torchvision truncates);
    # left = round((43 - 32) / 2) = round(5.5) = 6 (flooring would give 5), top = (36 - 32) / 2 = 2
    (48, 40, (43, 36), (6, 2, 38, 34)),
    # 40 x 55: 55 -> int(36 * 55 / 40) = int(49.5) = 49 (rounding would give 50); top = round(8.5) = 8
    (40, 55, (36, 49), (2, 8, 34, 40)),
])
def test_centre_square_is_the_crop_the_network_is_fed(w, h, resized, crop):
    from featstudy.transforms import IMAGENET_MEAN, IMAGENET_STD, CropSpec, ImageTransform

    img = ramp_image(w, h)
    want = img.resize(resized, Image.Resampling.BILINEAR).crop(crop)
    shown = images._center_square(img, 32, 36)
    assert np.array_equal(np.asarray(shown), np.asarray(want))
    # the network input of crops=center is the same square, normalised
    fed = ImageTransform(CropSpec("center", 36, 32))(img)[0].double()
    pixels = torch.tensor(np.asarray(want), dtype=torch.float64).permute(2, 0, 1) / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(fed, (pixels - mean) / std, atol=1e-5)


# ---------------------------------------------------------------- the ImageNet source rule

NETWORK = {"model": "vgg19", "weights": "random", "weights_source": "random", "weights_seed": 0,
           "weights_sha256": None, "preprocessing": "torchvision", "pooling": "avg",
           "crops": {"name": "ten", "resize": 36, "size": 32, "n_crops": 10}}
NAMES = ["conv1_1:0", "conv1_1:1", "fc7:0"]


def embedding(folder, dataset: str, names=NAMES, done: bool = True, **network):
    write_embedding(folder, features=np.arange(12 * len(names), dtype=float).reshape(12, -1),
                    labels=np.arange(12) % 3, classes=["a", "b", "c"], paths=[f"x/{i}.png" for i in range(12)],
                    feature_names=list(names), meta={"dataset": {"name": dataset, "root": None},
                                                     **NETWORK, **network})
    if not done:
        (folder / "DONE").unlink()
    return folder


DECOYS = {  # imagenet_val embeddings that must not supply the images of the analysed one
    "other_weights": {"weights": "IMAGENET1K_V1", "weights_source": "torchvision"},
    "other_seed": {"weights_seed": 1},  # random weights of another seed: another network
    "other_sha": {"weights_sha256": "ab" * 32},
    "other_pooling": {"pooling": "max"},
    "other_crops": {"crops": {"name": "ten", "resize": 256, "size": 224, "n_crops": 10}},
    "other_preprocessing": {"preprocessing": "caffe"},
    "other_model": {"model": "resnet50"},
    "other_layers": {"names": ["conv1_1:0", "fc7:0", "fc7:1"]},
    "reordered": {"names": ["conv1_1:1", "conv1_1:0", "fc7:0"]},
    "unfinished": {"done": False},
    "not_imagenet": {"dataset": "mit67"},
}


@pytest.mark.parametrize("decoy", sorted(DECOYS))
def test_an_imagenet_embedding_of_another_network_is_no_source(tmp_path, decoy):
    own = load_embedding(embedding(tmp_path / "own", "cub200"))
    kwargs = {"dataset": "imagenet_val", **DECOYS[decoy]}
    embedding(tmp_path / f"a_{decoy}", kwargs.pop("dataset"), **kwargs)
    assert images.find_imagenet_embedding(own) is None


def test_the_imagenet_embedding_of_the_same_network_is_the_source(tmp_path):
    own = load_embedding(embedding(tmp_path / "own", "cub200"))
    for decoy, kwargs in DECOYS.items():  # all sort before the right one, so a lax filter would pick one of them
        kwargs = {"dataset": "imagenet_val", **kwargs}
        embedding(tmp_path / f"a_{decoy}", kwargs.pop("dataset"), **kwargs)
    embedding(tmp_path / "m_imagenet", "imagenet_val")
    found = images.find_imagenet_embedding(own)
    assert found is not None and found.path == tmp_path / "m_imagenet"
    assert images.dataset_name(found.meta) == "imagenet_val"


def test_an_imagenet_embedding_is_its_own_source(tmp_path):
    embedding(tmp_path / "a_imagenet", "imagenet_val")  # another one of the same network, sorted first
    own = load_embedding(embedding(tmp_path / "own", "imagenet_val"))
    assert images.find_imagenet_embedding(own).path == tmp_path / "own"


def test_a_damaged_imagenet_embedding_is_passed_over_with_a_warning(tmp_path, caplog):
    """A same-network ImageNet entry whose features.npy was edited after DONE (its checksum no longer matches) is
    never a source: the next intact one is, and one warning names the damaged folder."""
    own = load_embedding(embedding(tmp_path / "own", "cub200"))
    damaged = embedding(tmp_path / "a_imagenet", "imagenet_val")
    with open(damaged / "features.npy", "r+b") as fh:  # one byte of the last value, size unchanged
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 0x40]))
    embedding(tmp_path / "m_imagenet", "imagenet_val")
    with caplog.at_level("WARNING", logger="featstudy.analysis.images"):
        found = images.find_imagenet_embedding(own)
    assert found is not None and found.path == tmp_path / "m_imagenet"
    [message] = [r.getMessage() for r in caplog.records]
    assert str(damaged) in message and "features.npy" in message
