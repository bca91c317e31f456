"""Receptive-field crops for ``model=open_clip`` towers with 4-D maps (issue 13): a tiny ModifiedResNet tower (an
``RN50``-style architecture, registered here, 64 px) rebuilt from an embedding's meta.json, its measured boxes
against the kernel/stride/padding recursion read here from its modules and against a table derived by hand; the
crops of a ``model=open_clip`` run's figures against an independent hooked forward pass of ``model.visual``, peak
and box; a tower around a timm ConvNeXt trunk, its boxes against the recursion; a ViT tower whose blocks keep whole images while its patch embedding is cropped to its patch."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from rf_recursion import cells_and_squares, kso, recursion

open_clip = pytest.importorskip("open_clip")

RN = "featstudy-tiny-RN"
VIT = "featstudy-tiny-ViT"
CX = "featstudy-tiny-ConvNeXt"
TEXT = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
CONFIGS = {
    # ModifiedResNet: 3-conv stem + avg-pool, Bottleneck stages [1, 2, 1, 1] (anti-aliased: a 2x2 avg-pool after
    # the 3x3 conv of a strided block), attention pool; width 8 -> 256 channels at layer4, 2 x 2 at 64 px
    RN: {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 8, "head_width": 8},
         "text_cfg": TEXT},
    # a timm trunk (open_clip's TimmModel wrapper: visual.trunk), no pretrained weights
    CX: {"embed_dim": 32, "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                                         "timm_pool": "avg", "timm_proj": "linear", "image_size": 64},
         "text_cfg": TEXT},
    VIT: {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                          "head_width": 32}, "text_cfg": TEXT},
}
RN_NODES = ["act3", "layer1", "layer1.0.bn3", "layer2.1", "layer3", "layer4", "attnpool"]
OPENAI = (open_clip.constants.OPENAI_DATASET_MEAN, open_clip.constants.OPENAI_DATASET_STD)


@pytest.fixture(autouse=True)
def tiny_architectures(monkeypatch):
    for name, cfg in CONFIGS.items():
        monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, json.loads(json.dumps(cfg)))


def _clip_file(tmp_path, name):
    """A whole tiny CLIP model (seed 7) saved as safetensors, and the model; the ResNet's batch norms get random
    affine parameters and statistics (open_clip zero-initialises each block's bn3, whose map would be constant)."""
    from safetensors.torch import save_file

    torch.manual_seed(7)
    clip = open_clip.create_model(name).eval()
    with torch.no_grad():
        for m in clip.visual.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path, clip


def _rn_paths(visual) -> dict[str, list[tuple[int, int, int]]]:
    """The longest path to each 4-D node of a ModifiedResNet: the stem's three 3x3 convs (``act3``), its 2x2
    avg-pool, then every Bottleneck's 3x3 conv and, in a strided block, the avg-pool after it (the 1x1 convs are per
    position; the shortcut's avg-pool reads a subset of the main path's pixels)."""
    path = [kso(visual.conv1), kso(visual.conv2), kso(visual.conv3)]
    out = {"act3": list(path)}
    path.append(kso(visual.avgpool))
    for i in range(1, 5):
        for j, block in enumerate(getattr(visual, f"layer{i}")):
            path.append(kso(block.conv2))
            if isinstance(block.avgpool, torch.nn.AvgPool2d):
                path.append(kso(block.avgpool))
            out[f"layer{i}.{j}.bn3"] = out[f"layer{i}.{j}"] = list(path)
        out[f"layer{i}"] = list(path)
    return out


# By hand, at 64 px (pixel i spans [i, i + 1); size r, jump j, centre c of position 0; box [c - r/2 + j y, + r)):
#   act3:      conv 3/2/1 -> r 3, j 2, c 0.5; two convs 3/1/1 -> r 11        -> [2y - 5, 2y + 6)
#   layer1:    + avg-pool 2/2/0 -> r 13, j 4, c 1.5; conv 3/1/1 -> r 21      -> [4y - 9, 4y + 12)
#   layer2.1:  + conv -> r 29, avg-pool -> r 33, j 8, c 3.5; conv -> r 49   -> [8y - 21, 8y + 28)
#   layer3:    + conv -> r 65, avg-pool -> r 73, j 16, c 7.5                 -> [16y - 29, 16y + 44)
HAND = {"act3": {0: (0, 6), 3: (1, 12), 29: (53, 64), 31: (57, 64)},
        "layer1": {0: (0, 12), 3: (3, 24), 12: (39, 60), 15: (51, 64)},
        "layer1.0.bn3": {3: (3, 24)},
        "layer2.1": {3: (3, 52), 4: (11, 60), 7: (35, 64)},
        "layer3": {0: (0, 44), 2: (3, 64), 3: (19, 64)},
        "layer4": {0: (0, 64), 1: (0, 64)}}


def _meta(folder, ms, path=None) -> None:
    """The fields of meta.json that describe the model (as extraction writes them), for a 64 px centre crop."""
    meta = {"key_fields": {"model": ms.key_fields()}, "model": ms.name, "nodes": ms.nodes, "weights": ms.weights.tag,
            "weights_source": ms.weights.kind, "weights_sha256": ms.weights.sha256,
            "weights_path": str(path) if path else None, "weights_seed": ms.weights.seed,
            "crops": {"name": "center", "resize": 64, "size": 64, "n_crops": 1}, "pooling": "avg",
            "preprocessing": ms.preprocessing}
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("weights", ["random", "file", "tag"])
def test_resnet_tower_rebuilt_from_meta_has_the_recursions_boxes(weights, tmp_path, monkeypatch):
    from featstudy.analysis import image_io
    from featstudy.models.open_clip_source import OpenClipModel

    path, clip = _clip_file(tmp_path, RN)
    spec = {"random": "random", "file": str(path), "tag": "tiny_tag"}[weights]
    if weights == "tag":  # a pretrained tag whose checkpoint is in a local hub cache (as in test_open_clip)
        from huggingface_hub import constants
        from open_clip.pretrained import _pcfg

        monkeypatch.setitem(open_clip.pretrained._PRETRAINED, RN, {"tiny_tag": _pcfg(hf_hub="featstudy/tiny-rn/")})
        repo = tmp_path / "hub" / "models--featstudy--tiny-rn"
        (repo / "snapshots" / "0123abc").mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abc")
        (repo / "snapshots" / "0123abc" / "open_clip_model.safetensors").write_bytes(path.read_bytes())
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ms = OpenClipModel(name=RN, nodes=RN_NODES, weights=spec, seed=3)
    folder = tmp_path / "emb"
    _meta(folder, ms, None if weights == "random" else ms.weights.path)
    image_io._network.cache_clear()
    try:
        net = image_io._network(str(folder), "cpu")
        assert net is not None
        body = net[0].body
        if weights == "random":  # open_clip's own init under model.seed: the image tower is built first
            torch.manual_seed(3)
            clip = open_clip.create_model(RN).eval()
        want = clip.visual.state_dict()
        got = body.state_dict()
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    finally:
        image_io.release_network()
    fields = image_io.measured_receptive_fields(SimpleNamespace(path=folder))
    paths = _rn_paths(clip.visual)
    assert set(fields) == set(RN_NODES) - {"attnpool"}  # the attention pool's output is flat: whole images
    sides = {"act3": 32, "layer1": 16, "layer1.0.bn3": 16, "layer2.1": 8, "layer3": 4, "layer4": 2}
    for node, (rows, cols) in fields.items():
        assert rows.shape == cols.shape == (sides[node], 2), node
        assert np.array_equal(rows, recursion(paths[node], 64, sides[node])), node
        assert np.array_equal(cols, rows), node
        for y, box in HAND[node].items():
            assert tuple(rows[y]) == box, (node, y)


def test_timm_trunk_tower_rebuilt_from_meta_has_the_recursions_boxes(tmp_path):
    """An open_clip tower around a timm ConvNeXt (``trunk.*`` nodes, NCHW: convnext_atto's MLP is a 1x1 conv): the
    patchify stem, each stage's downsampling conv and every block's depthwise conv, as for timm's own ConvNeXt; the
    projection head is flat."""
    from featstudy.analysis import image_io
    from featstudy.models.open_clip_source import OpenClipModel

    nodes = ["trunk.stages.0.blocks.0.mlp", "trunk.stages.0", "trunk.stages.1", "head"]
    ms = OpenClipModel(name=CX, nodes=nodes, weights="random")
    _meta(tmp_path / "emb", ms)
    image_io._network.cache_clear()
    try:
        assert image_io._network(str(tmp_path / "emb"), "cpu") is not None
    finally:
        image_io.release_network()
    fields = image_io.measured_receptive_fields(SimpleNamespace(path=tmp_path / "emb"))
    trunk = open_clip.create_model(CX).visual.trunk
    path = [kso(trunk.stem[0])]
    want = {}
    for i, stage in enumerate(trunk.stages[:2]):
        path += [kso(m) for m in stage.downsample.modules() if isinstance(m, torch.nn.Conv2d)]
        for j, block in enumerate(stage.blocks):
            path.append(kso(block.conv_dw))
            want.setdefault(f"trunk.stages.{i}.blocks.{j}.mlp", list(path))
        want[f"trunk.stages.{i}"] = list(path)
    assert set(fields) == set(nodes) - {"head"}
    # by hand: stem 4/4/0 -> r 4, j 4, c 2; a 7x7 depthwise conv (pad 3) -> r 28: [4y - 12, 4y + 16)
    assert tuple(fields["trunk.stages.0.blocks.0.mlp"][0][4]) == (4, 32)
    for node, (rows, cols) in fields.items():
        side = {"trunk.stages.1": 8}.get(node, 16)
        assert np.array_equal(rows, recursion(want[node], 64, side)), node
        assert np.array_equal(cols, rows), node


def _thumb(img, box=None):
    if box is not None:
        top, left, bottom, right = box
        img = img.crop((left, top, right, bottom))
    return np.asarray(img.resize((96, 96), Image.Resampling.BILINEAR))


def _run(tmp_path, image_folder, helpers, monkeypatch, name, path, nodes, size, resize, extra=()):
    from featstudy.store import load_embedding

    over = [o for o in helpers.tiny_overrides(tmp_path, image_folder)
            if not o.startswith(("experiment=", "crops.", "tracking.uri="))]
    rc = helpers.run_cli([*over, "model=open_clip", f"model.name={name}", f"model.weights={path}",
                          f"model.nodes=[{','.join(nodes)}]", *extra, "crops=center", f"crops.size={size}",
                          f"crops.resize={resize}", "crops.interpolation=bicubic", "tracking.uri=null",
                          "~analysis.callbacks.figures", "~analysis.callbacks.atlas"], monkeypatch)
    assert rc == 0
    (meta_path,) = [p for p in tmp_path.rglob("meta.json") if p.parent.parent.name == "embeddings"]
    meta = json.loads(meta_path.read_text())
    assert meta["key_fields"]["model"]["source"] == "open_clip" and meta["crops"]["size"] == size
    assert meta["preprocessing"] == {"mean": list(OPENAI[0]), "std": list(OPENAI[1])}
    return load_embedding(meta_path.parent)


def _cells_vs_independent(emb, image_folder, tmp_path, visual, features, size, resize, box_of):
    """Compare the figures' cells of ``features`` (2 images each) with the crops of an independent hooked forward
    pass of ``visual``: ``box_of(node, fmap shape, y, x)`` for a 4-D node, None (the whole crop) otherwise. Returns
    how many cells were real crops."""
    from featstudy.analysis import AnalysisContext, images

    cells = images.ImageSource(AnalysisContext(emb, {"layers": None}, tmp_path / "out", "x")).top_images_many(
        features, 2)
    grabbed = {}
    for node in {f.rsplit(":", 1)[0] for f in features}:  # copied: later in-place ops (out += identity) change them
        visual.get_submodule(node).register_forward_hook(
            lambda m, i, o, n=node: grabbed.__setitem__(n, o.detach().clone()))
    square_of = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                           T.CenterCrop(size)])
    to_input = T.Compose([T.ToTensor(), T.Normalize(*OPENAI)])
    cropped = 0
    for feature, node, channel, cell, square in cells_and_squares(emb, cells, features, image_folder, square_of):
        with torch.no_grad():
            visual(to_input(square).unsqueeze(0))
        if grabbed[node].ndim != 4:
            assert np.array_equal(cell, _thumb(square)), feature
            continue
        fmap = grabbed[node][0, channel].numpy()
        top2 = np.sort(fmap.ravel())[-2:]
        if top2[1] - top2[0] <= 1e-5 * max(1.0, abs(top2[1])):
            continue  # no clear peak: any of the tied positions is right
        y, x = np.unravel_index(int(np.argmax(fmap)), fmap.shape)
        box = box_of(node, fmap.shape, y, x)
        assert np.array_equal(cell, _thumb(square, box)), (feature, box)
        cropped += int(box != (0, 0, size, size))
    return cropped


def test_figures_crop_an_open_clip_resnet_tower_to_receptive_fields(tmp_path, image_folder, helpers, monkeypatch):
    """A ``model=open_clip`` run of the ResNet tower: a 4-D node's cell is the recursion's box around the peak of an
    independent hooked forward pass (``layer1.0.bn3`` too, whose output the block then changes in place); the
    attention pool's (flat) cells are the whole crop."""
    path, clip = _clip_file(tmp_path, RN)
    emb = _run(tmp_path, image_folder, helpers, monkeypatch, RN, path, ["act3", "layer1.0.bn3", "layer2.1",
                                                                        "attnpool"], 64, 72)
    features = ["act3:2", "layer1.0.bn3:5", "layer1.0.bn3:20", "layer2.1:9", "layer2.1:50", "attnpool:4"]
    paths = _rn_paths(clip.visual)

    def box_of(node, shape, y, x):
        rows, cols = recursion(paths[node], 64, shape[0]), recursion(paths[node], 64, shape[1])
        return rows[y, 0], cols[x, 0], rows[y, 1], cols[x, 1]

    assert _cells_vs_independent(emb, image_folder, tmp_path, clip.visual, features, 64, 72, box_of) >= 4


def test_open_clip_vit_blocks_keep_whole_images_its_patch_embedding_is_cropped(tmp_path, image_folder, helpers,
                                                                                monkeypatch):
    """A ViT tower: its blocks and ln_post are tokens (whole crops); ``conv1``, the patch embedding (kernel and stride
    8, no padding), is a 4-D map whose position (y, x) reads exactly its patch, rows [8y, 8y + 8)."""
    path, clip = _clip_file(tmp_path, VIT)
    emb = _run(tmp_path, image_folder, helpers, monkeypatch, VIT, path,
               ["conv1", "transformer.resblocks.1", "ln_post"], 32, 36, ["model.token_pooling=cls"])
    features = ["conv1:3", "conv1:40", "transformer.resblocks.1:7", "ln_post:11"]

    def box_of(node, shape, y, x):
        assert node == "conv1" and shape == (4, 4)
        return 8 * y, 8 * x, 8 * y + 8, 8 * x + 8

    assert _cells_vs_independent(emb, image_folder, tmp_path, clip.visual, features, 32, 36, box_of) >= 2
