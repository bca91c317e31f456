"""Receptive fields of timm's spatial maps, measured (featstudy.models.receptive_field), against the textbook recursion
over the layers' kernels, strides and paddings read here from the modules; and the figures' crops of a timm
embedding against an independent forward pass, peak and box."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms as T
from PIL import Image
from rf_recursion import cells_and_squares, kso, recursion

from featstudy.models.receptive_field import SpatialMaps, receptive_boxes


def _resnet_paths(net) -> dict[str, list[tuple[int, int, int]]]:
    """The longest path of each stage of a timm ResNet: stem conv, max-pool, then every block's two 3x3 convs (the
    shortcut's 1x1 reads a subset)."""
    path, out = [kso(net.conv1), kso(net.maxpool)], {}
    for i in range(1, 5):
        for block in getattr(net, f"layer{i}"):
            path += [kso(block.conv1), kso(block.conv2)]
        out[f"layer{i}"] = list(path)
    return out


def _convnext_paths(net) -> dict[str, list[tuple[int, int, int]]]:
    """ConvNeXt: the patchify stem, each stage's downsampling conv and every block's depthwise conv (norms and the
    1x1 MLP are per position); ``stages.0.blocks.0.mlp`` runs channels-last (NHWC)."""
    path, out = [kso(net.stem[0])], {}
    for i, stage in enumerate(net.stages):
        path += [kso(m) for m in stage.downsample.modules() if isinstance(m, torch.nn.Conv2d)]
        for j, block in enumerate(stage.blocks):
            path.append(kso(block.conv_dw))
            if (i, j) == (0, 0):
                out["stages.0.blocks.0.mlp"] = list(path)
        out[f"stages.{i}"] = list(path)
    return out


@pytest.mark.parametrize("arch, paths, layout", [
    ("resnet18", _resnet_paths, {}),
    ("convnext_atto", _convnext_paths, {"stages.0.blocks.0.mlp": "NHWC"}),
])
@pytest.mark.parametrize("size", [112, 40])
def test_measured_receptive_fields_equal_the_layer_recursion(arch, paths, layout, size):
    kwargs = {"conv_mlp": False} if arch.startswith("convnext") else {}
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, **kwargs).eval()
    want = paths(net)
    maps = SpatialMaps(net, {n: layout.get(n, "NCHW") for n in want})
    got = receptive_boxes(maps, size, batch_size=16)
    assert set(got) == set(want)
    with torch.no_grad():
        shapes = {n: tuple(m.shape[-2:]) for n, m in maps(torch.zeros(1, 3, size, size)).items()}
    interior = 0
    for node, path in want.items():
        rows, cols = got[node]
        h, w = shapes[node]
        assert np.array_equal(rows, recursion(path, size, h)), node
        assert np.array_equal(cols, recursion(path, size, w)), node
        interior += int(((rows[:, 0] > 0) & (rows[:, 1] < size)).sum())
    if size == 112:
        assert interior > 10  # unclipped boxes, not only the whole image


def test_without_onednn_the_sweep_stays_exact():
    """Without oneDNN, PyTorch convolves batches of 16 or more with NNPACK's Winograd, which smears a NaN into
    rows that do not read it (checked here first); the sweep switches NNPACK off and stays exact."""
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False).eval()
    want = _resnet_paths(net)
    maps = SpatialMaps(net, dict.fromkeys(want, "NCHW"))
    x = torch.zeros(16, 3, 64, 64)
    x[:, :, 1, :] = float("nan")  # input row 1 is read by layer1 rows 0..5 only
    with torch.backends.mkldnn.flags(enabled=False):
        with torch.no_grad():
            smeared = torch.isnan(maps(x)["layer1"][0]).any(0).any(1).nonzero().flatten().tolist()
        got = receptive_boxes(maps, 64, batch_size=16)
    assert recursion(want["layer1"], 64, 16)[5, 0] <= 1 < recursion(want["layer1"], 64, 16)[6, 0]
    if torch.backends.nnpack.is_available():
        assert smeared != list(range(6))  # the trap is real in this build
    for node, path in want.items():
        rows, cols = got[node]
        assert np.array_equal(rows, recursion(path, 64, len(rows))), node
        assert np.array_equal(cols, recursion(path, 64, len(cols))), node


def test_spatial_maps_keep_4d_nodes_in_nchw_and_leave_tokens_out():
    torch.manual_seed(0)
    net = timm.create_model("convnext_atto", pretrained=False, conv_mlp=False).eval()
    maps = SpatialMaps(net, {"stages.0": "NCHW", "stages.0.blocks.0.mlp": "NHWC", "head.flatten": "flat"})
    x = torch.randn(2, 3, 32, 32)
    grabbed = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: grabbed.__setitem__(n, o))
             for n in ("stages.0", "stages.0.blocks.0.mlp")]
    with torch.no_grad():
        got = maps(x)
        net(x)
    for h in hooks:
        h.remove()
    assert list(got) == ["stages.0", "stages.0.blocks.0.mlp"]
    assert torch.equal(got["stages.0"], grabbed["stages.0"])
    assert torch.equal(got["stages.0.blocks.0.mlp"], grabbed["stages.0.blocks.0.mlp"].permute(0, 3, 1, 2))


def test_figures_crop_timm_maps_to_their_receptive_fields(tmp_path, image_folder, helpers, monkeypatch):
    """A timm embedding's most activating images: for a 4-D node, the receptive field (by the recursion) of the peak
    of an independent hooked forward pass on torchvision's centre crop; for a flat node, the whole crop."""
    from featstudy.analysis import AnalysisContext, images
    from featstudy.store import load_embedding

    over = [o for o in helpers.tiny_overrides(tmp_path, image_folder)
            if not o.startswith(("experiment=", "crops.", "tracking.uri="))]
    nodes = ["stages.0", "stages.1", "head.flatten"]
    rc = helpers.run_cli([*over, "model=timm", "model.name=convnext_atto", f"model.nodes=[{','.join(nodes)}]",
                          "crops=center", "crops.size=64", "crops.resize=72", "crops.interpolation=bicubic",
                          "tracking.uri=null", "~analysis.callbacks.figures", "~analysis.callbacks.atlas"],
                         monkeypatch)
    assert rc == 0
    (meta_path,) = [p for p in tmp_path.rglob("meta.json") if p.parent.parent.name == "embeddings"]
    assert json.loads(meta_path.read_text())["crops"]["size"] == 64
    emb = load_embedding(meta_path.parent)
    features = ["stages.0:3", "stages.0:17", "stages.1:5", "stages.1:60", "head.flatten:7"]
    cells = images.ImageSource(AnalysisContext(emb, {"layers": None}, tmp_path / "out", "x")).top_images_many(
        features, 2)

    torch.manual_seed(0)  # model.seed=0: timm's own init under that seed, as the extraction built it
    net = timm.create_model("convnext_atto", pretrained=False).eval()
    paths = _convnext_paths(net)
    grabbed = {}
    for n in ("stages.0", "stages.1"):
        net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: grabbed.__setitem__(n, o.detach()))
    square_of = T.Compose([T.Resize(72, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(64)])
    to_input = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def thumb(img, box=None):
        if box is not None:
            top, left, bottom, right = box
            img = img.crop((left, top, right, bottom))
        return np.asarray(img.resize((96, 96), Image.Resampling.BILINEAR))

    cropped = 0
    for feature, node, channel, cell, square in cells_and_squares(emb, cells, features, image_folder, square_of):
        if node == "head.flatten":
            assert np.array_equal(cell, thumb(square)), feature
            continue
        with torch.no_grad():
            net(to_input(square).unsqueeze(0))
        fmap = grabbed[node][0, channel].numpy()
        top2 = np.sort(fmap.ravel())[-2:]
        if top2[1] - top2[0] <= 1e-5 * max(1.0, abs(top2[1])):
            continue  # no clear peak: any of the tied positions is right
        y, x = np.unravel_index(int(np.argmax(fmap)), fmap.shape)
        rows = recursion(paths[node], 64, fmap.shape[0])
        cols = recursion(paths[node], 64, fmap.shape[1])
        box = (rows[y, 0], cols[x, 0], rows[y, 1], cols[x, 1])
        assert np.array_equal(cell, thumb(square, box)), (feature, box)
        cropped += int(box != (0, 0, 64, 64))
    assert cropped >= 4  # real crops, not whole images
