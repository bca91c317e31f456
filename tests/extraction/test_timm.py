"""``model=timm``: equality with an independent hooked forward pass (ViT with register tokens, ConvNeXt, Swin),
the NHWC rule, one-line errors, strict weights files, the key, the node lister and one CLI run."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

timm = pytest.importorskip("timm")

from featstudy import models  # noqa: E402
from featstudy.errors import ConfigError, DataError  # noqa: E402
from featstudy.extraction.key import key_of  # noqa: E402

TINY_VIT = {"name": "vit_tiny_patch16_224",
            "kwargs": {"reg_tokens": 4, "class_token": True, "depth": 2, "embed_dim": 48, "num_heads": 3,
                       "img_size": 32, "patch_size": 8}}
# convnext_atto with its MLPs on channels-last tensors (LayerNorm + Linear on (B, H, W, C), as convnext_tiny)
NHWC_CONVNEXT = {"name": "convnext_atto", "kwargs": {"conv_mlp": False}}
TINY_SWIN = {"name": "swin_tiny_patch4_window7_224",
             "kwargs": {"img_size": 32, "window_size": 4, "embed_dim": 24, "depths": [1, 1], "num_heads": [1, 2]}}


def _save(net, path):
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """``weights(arch)``: a random timm model (seed 7) saved to a local file, and the network itself."""
    folder = tmp_path_factory.mktemp("timm")
    made = {}

    def get(arch, suffix=".safetensors"):
        key = (arch["name"], json.dumps(arch["kwargs"], sort_keys=True), suffix)
        if key not in made:
            torch.manual_seed(7)
            net = timm.create_model(arch["name"], pretrained=False, **arch["kwargs"]).eval()
            made[key] = (_save(net, folder / f"{arch['name']}-{len(made)}{suffix}"), net)
        return made[key]

    return get


def _spec(arch, nodes, **kw):
    node = {"_target_": "featstudy.models.timm_source.TimmModel", "name": arch["name"], "kwargs": arch["kwargs"],
            "nodes": nodes, "weights": "random", "seed": 0, **kw}
    return models.spec(OmegaConf.create(node))


def _independent(net, nodes, x, pool):
    """(B, K, 3, S, S) -> (B, F): forward hooks (clone) on the named modules, ``pool(node, output)`` per crop, nodes
    concatenated in order, mean over crops."""
    modules = dict(net.named_modules())
    grabbed = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: grabbed.__setitem__(n, o.detach().clone()))
             for n in nodes]
    try:
        with torch.no_grad():
            net(x.flatten(0, 1))
    finally:
        for h in hooks:
            h.remove()
    per_crop = {n: pool(n, grabbed[n]) for n in nodes}
    b, k = x.shape[:2]
    return {n: v.view(b, k, -1).mean(dim=1) for n, v in per_crop.items()}


def _assert_close(model, channels, x, expected):
    with torch.no_grad():
        got = model(x)
    assert got.dtype == torch.float32
    assert got.shape == (x.shape[0], sum(channels.values()))
    assert list(channels) == list(expected)
    start = 0
    for node, want in expected.items():
        part = got[:, start:start + channels[node]]
        start += channels[node]
        scale = want.abs().max().item() or 1.0
        assert part.shape == want.shape, node
        assert (part - want).abs().max().item() <= 1e-5 * scale, node


@pytest.mark.parametrize("token_pooling", ["cls", "mean", "mean_patch"])
def test_vit_with_register_tokens_equals_independent_hooks(token_pooling, weights):
    path, net = weights(TINY_VIT)
    assert net.num_prefix_tokens == 5  # one class token and four register tokens
    nodes = ["blocks.0", "blocks.1.mlp.fc1", "norm", "fc_norm"]
    ms = _spec(TINY_VIT, nodes, token_pooling=token_pooling, weights=str(path))
    # the default tag (augreg_in21k_ft_in1k) was trained on images normalised with mean = std = 0.5
    assert ms.weights.tag.startswith("file:") and ms.preprocessing == {"mean": [0.5] * 3, "std": [0.5] * 3}
    model, channels, digest = models.build(ms, "avg", 32)
    assert digest == ms.weights.sha256 and channels == {"blocks.0": 48, "blocks.1.mlp.fc1": 192, "norm": 48,
                                                        "fc_norm": 48}

    def pool(node, o):  # written out by hand: tokens 0 = class, 1..4 = registers, 5.. = the 16 patches
        if o.dim() == 2:
            return o
        assert o.shape[1] == 1 + 4 + 16
        return {"cls": o[:, 0], "mean": o.mean(dim=1), "mean_patch": o[:, 5:].mean(dim=1)}[token_pooling]

    x = torch.randn(2, 3, 3, 32, 32)
    _assert_close(model, channels, x, _independent(net, nodes, x, pool))
    assert models.feature_names(channels)[:2] == ["blocks.0:0", "blocks.0:1"]


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_convnext_nchw_and_nhwc_nodes_equal_independent_hooks(pooling, weights):
    path, net = weights(NHWC_CONVNEXT, ".pth")
    nchw = ["stem", "stages.0", "stages.1.blocks.0.conv_dw", "stages.3"]
    nhwc = ["stages.0.blocks.0.norm", "stages.0.blocks.1.mlp.act", "stages.2.blocks.0.mlp"]  # (B, H, W, C)
    nodes = ["stem", "stages.0.blocks.0.norm", "stages.0", "stages.0.blocks.1.mlp.act",
             "stages.1.blocks.0.conv_dw", "stages.2.blocks.0.mlp", "stages.3"]
    ms = _spec(NHWC_CONVNEXT, nodes, weights=str(path), preprocessing="torchvision")
    model, channels, _ = models.build(ms, pooling, 64)
    assert {n: model.layout[n] for n in nchw} == dict.fromkeys(nchw, "NCHW")
    assert {n: model.layout[n] for n in nhwc} == dict.fromkeys(nhwc, "NHWC")
    assert channels == {"stem": 40, "stages.0.blocks.0.norm": 40, "stages.0": 40, "stages.0.blocks.1.mlp.act": 160,
                        "stages.1.blocks.0.conv_dw": 80, "stages.2.blocks.0.mlp": 160, "stages.3": 320}

    def pool(node, o):
        dims = (1, 2) if node in nhwc else (2, 3)
        return o.mean(dim=dims) if pooling == "avg" else o.amax(dim=dims)

    x = torch.randn(2, 2, 3, 64, 64)
    _assert_close(model, channels, x, _independent(net, nodes, x, pool))


def test_swin_stages_are_nhwc_by_feature_info(weights):
    path, net = weights(TINY_SWIN)
    assert net.output_fmt == "NHWC"
    nodes = ["patch_embed.proj", "layers.0", "layers.1", "norm"]
    model, channels, _ = models.build(_spec(TINY_SWIN, nodes, weights=str(path)), "avg", 32)
    assert model.layout == {"patch_embed.proj": "NCHW", "layers.0": "NHWC", "layers.1": "NHWC", "norm": "NHWC"}
    assert channels == {"patch_embed.proj": 24, "layers.0": 24, "layers.1": 48, "norm": 48}
    x = torch.randn(2, 1, 3, 32, 32)
    expected = _independent(net, nodes, x, lambda n, o: o.mean(dim=(2, 3) if n == "patch_embed.proj" else (1, 2)))
    _assert_close(model, channels, x, expected)


def test_ambiguous_channel_axis_is_refused_not_guessed():
    # at 32 px a 4 x 4 attention map of 1 head: (B*windows, heads, N, N), no parameters, no same-shape neighbour
    with pytest.raises(ConfigError, match=r"^model.nodes: cannot tell the channel axis of 'layers.0.blocks.0.attn"
                                          r".softmax'.*python -m featstudy.models.nodes") as err:
        models.build(_spec(TINY_SWIN, ["layers.0.blocks.0.attn.softmax"]), "avg", 32)
    assert "\n" not in str(err.value)


def test_one_line_errors_name_the_key():
    cases = [
        (dict(name="vit_tiny_patch16_22"), r"^model.name: 'vit_tiny_patch16_22' is not a timm model.*vit_tiny_patch16_224"),
        (dict(nodes=["blocks.0", "blocks.9"]), r"^model.nodes: 'blocks.9' is not a module of vit_tiny_patch16_224; "
                                               r"list them with: python -m featstudy.models.nodes vit_tiny_patch16_224 "
                                               r"'reg_tokens=4'"),
        (dict(nodes=[]), r"^model.nodes: empty"),
        (dict(nodes=None), r"^model.nodes: required"),
        (dict(nodes=["norm", "norm"]), r"^model.nodes: duplicate"),
        (dict(token_pooling="max"), r"^model.token_pooling: 'max' is not one of"),
        (dict(weights="IMAGENET1K_V1"), r"^model.weights: 'IMAGENET1K_V1'.*random or a local"),
        (dict(preprocessing="opencv"), r"^model.preprocessing"),
        (dict(kwargs={"no_such_kwarg": 1}), r"^model.kwargs: timm.create_model\('vit_tiny_patch16_224'.*no_such_kwarg"),
    ]
    for over, pattern in cases:
        arch = {**TINY_VIT, **{k: v for k, v in over.items() if k in ("name", "kwargs")}}
        kw = {k: v for k, v in over.items() if k not in ("name", "kwargs")}
        kw.setdefault("nodes", ["norm"])
        with pytest.raises(ConfigError, match=pattern) as err:
            _spec(arch, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"^model.weights: .*nowhere.safetensors: no such file"):
        _spec(TINY_VIT, ["norm"], weights="/nowhere.safetensors")


def test_cls_pooling_without_class_token_and_a_refused_crop_size_are_one_line():
    arch = {"name": TINY_VIT["name"], "kwargs": {**TINY_VIT["kwargs"], "class_token": False, "global_pool": "avg"}}
    with pytest.raises(ConfigError, match=r"^model.token_pooling: cls, but .* has no class token"):
        models.build(_spec(arch, ["blocks.0"]), "avg", 32)
    with pytest.raises(ConfigError, match=r"^crops.size=48: vit_tiny_patch16_224 refused a 48 px crop.*img_size"):
        models.build(_spec(TINY_VIT, ["blocks.0"]), "avg", 48)


def test_weights_file_is_loaded_strictly(weights, tmp_path):
    path, net = weights(TINY_VIT)
    state = net.state_dict()
    missing = {k: v for k, v in state.items() if k != "reg_token"}
    with pytest.raises(DataError, match=r"^model.weights: .*missing key 'reg_token'"):
        models.build(_spec(TINY_VIT, ["norm"], weights=str(_save_dict(missing, tmp_path / "m.pth"))), "avg", 32)
    extra = {**state, "head.extra": torch.zeros(3)}
    with pytest.raises(DataError, match=r"^model.weights: .*unexpected key 'head.extra'"):
        models.build(_spec(TINY_VIT, ["norm"], weights=str(_save_dict(extra, tmp_path / "u.pth"))), "avg", 32)
    wrong = {**state, "cls_token": torch.zeros(1, 1, 8)}
    with pytest.raises(DataError, match=r"^model.weights: .*key 'cls_token' has shape"):
        models.build(_spec(TINY_VIT, ["norm"], weights=str(_save_dict(wrong, tmp_path / "w.pth"))), "avg", 32)
    # the file's numbers are used: random weights of another seed give other features
    x = torch.randn(1, 1, 3, 32, 32)
    loaded, _, _ = models.build(_spec(TINY_VIT, ["norm"], weights=str(path)), "avg", 32)
    seeded, _, digest = models.build(_spec(TINY_VIT, ["norm"], seed=3), "avg", 32)
    assert digest is None and not torch.allclose(loaded(x), seeded(x))


def _save_dict(state, path):
    torch.save(state, path)
    return path


def test_key_covers_source_nodes_token_pooling_and_weights(weights):
    path, _ = weights(TINY_VIT)
    base = _spec(TINY_VIT, ["norm"])
    fields = base.key_fields()
    assert fields["source"] == "timm" and fields["name"] == "vit_tiny_patch16_224" and fields["weights"] == "random"
    keys = {key_of(base.key_fields(), prefix="t")}
    for variant in (dict(token_pooling="mean"), dict(token_pooling="mean_patch"), dict(nodes=["blocks.1"]),
                    dict(weights=str(path)), dict(seed=1), dict(preprocessing="caffe")):
        kw = {"nodes": ["norm"], **variant}
        keys.add(key_of(_spec(TINY_VIT, **kw).key_fields(), prefix="t"))
    keys.add(key_of(_spec({**TINY_VIT, "kwargs": {**TINY_VIT["kwargs"], "depth": 3}}, ["norm"]).key_fields(), prefix="t"))
    assert len(keys) == 8
    assert _spec(TINY_VIT, ["norm"], weights=str(path)).key_fields()["sha256"] == \
        __import__("hashlib").sha256(path.read_bytes()).hexdigest()


def test_node_lister_prints_modules_with_shapes(capsys):
    from featstudy.models import nodes

    assert nodes.main(["convnext_atto", "--size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "stages.0\t[1, 40, 16, 16]" in lines and "stages.3\t[1, 320, 2, 2]" in lines
    assert nodes.main(["vit_tiny_patch16_224", "img_size=32", "patch_size=8", "depth=1"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0\t[1, 17, 192]" in out and "blocks.1" not in out
    assert nodes.main(["no_such_model"]) == 2


def test_meta_crop_check_leaves_timm_models_alone():
    from featstudy.models.crop_size import check_crop_size

    cfg = OmegaConf.create({"crops": {"size": 8},
                            "model": {"_target_": "featstudy.models.timm_source.TimmModel", "name": "resnet18",
                                      "nodes": ["layer1"]}})
    assert check_crop_size(cfg) is None


def test_cli_run_with_model_timm(tmp_path, image_folder, helpers, monkeypatch):
    from featstudy.store import load_embedding

    overrides = [o for o in helpers.tiny_overrides(tmp_path, image_folder) if not o.startswith("tracking.uri=")]
    rc = helpers.run_cli([*overrides, "model=timm", "model.name=convnext_atto", "model.nodes=[stages.0,stages.3]",
                          "tracking.uri=null"], monkeypatch)
    assert rc == 0
    metas = [p for p in tmp_path.rglob("meta.json") if p.parent.parent.name == "embeddings"]
    assert len(metas) == 1
    emb = load_embedding(metas[0].parent)
    assert emb.features.shape == (24, 40 + 320)
    assert emb.feature_names[0] == "stages.0:0" and emb.feature_names[-1] == "stages.3:319"
    meta = json.loads(metas[0].read_text())
    assert meta["key_fields"]["model"]["source"] == "timm" and meta["weights"] == "random"


def test_safetensors_metadata_sets_preprocessing_and_conf_composes(weights, tmp_path, helpers):
    from safetensors.torch import save_file

    _, net = weights(TINY_VIT)
    path = tmp_path / "caffe.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata={"preprocessing": "caffe"})
    assert _spec(TINY_VIT, ["norm"], weights=str(path)).preprocessing == "caffe"
    assert _spec(TINY_VIT, ["norm"], weights=str(path), preprocessing="torchvision").preprocessing == "torchvision"
    cfg = helpers.compose(["model=timm", "model.name=vit_tiny_patch16_224", "+model.kwargs={img_size:32,depth:1}",
                           "model.nodes=[blocks.0]", "model.token_pooling=mean"])
    ms = models.spec(cfg.model)
    assert (ms.name, ms.kwargs, ms.token_pooling, ms.weights.tag) == ("vit_tiny_patch16_224",
                                                                     {"img_size": 32, "depth": 1}, "mean", "random")


# --- issue 13: timm pretrained tags from the local Hugging Face cache; preprocessing from the pretrained cfg -------

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import _create_vision_transformer

CLIP_MEAN = (0.4815, 0.4578, 0.4082)
CLIP_STD = (0.2686, 0.2613, 0.2758)
TINY_CLIP = "featstudy_tiny_clip_vit"
CLIP_REPO = "featstudy-test/tiny-clip-vit"
IN1K_REPO = "featstudy-test/tiny-vit-in1k"

# read by timm's register_model from this module: two pretrained tags of a tiny registered ViT, the first the default
default_cfgs = generate_default_cfgs({
    f"{TINY_CLIP}.fake_clip": {"hf_hub_id": CLIP_REPO, "mean": CLIP_MEAN, "std": CLIP_STD, "num_classes": 0,
                               "input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic"},
    f"{TINY_CLIP}.fake_in1k": {"hf_hub_id": IN1K_REPO, "num_classes": 10, "input_size": (3, 32, 32)},
})


@register_model
def featstudy_tiny_clip_vit(pretrained=False, **kwargs):
    args = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 32}
    return _create_vision_transformer(TINY_CLIP, pretrained=pretrained, **{**args, **kwargs})


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face home, offline: ``$HF_HOME/hub`` is the cache featstudy looks in."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _put_in_hf_cache(home, repo, state, filename="model.safetensors", commit="0123456789abcdef" * 2 + "01234567"):
    """huggingface_hub's cache layout: models--<org>--<name>/{refs/main, snapshots/<commit>/<file>}."""
    from safetensors.torch import save_file

    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / filename))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snapshot / filename


def _tiny_clip(tag="fake_clip", seed=3):
    torch.manual_seed(seed)
    return timm.create_model(f"{TINY_CLIP}.{tag}", pretrained=False).eval()


def test_pretrained_tag_is_read_from_the_local_hf_cache(hf_home):
    import hashlib

    net = _tiny_clip()
    path = _put_in_hf_cache(hf_home, CLIP_REPO, net.state_dict())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    arch = {"name": TINY_CLIP, "kwargs": {}}
    for name, weights in ((TINY_CLIP, "pretrained"), (TINY_CLIP, "fake_clip"), (TINY_CLIP, "timm:fake_clip"),
                          (f"{TINY_CLIP}.fake_clip", "pretrained")):
        ms = _spec({**arch, "name": name}, ["norm"], weights=weights)
        assert ms.weights.tag == "timm:fake_clip" and ms.weights.path == path and ms.weights.url == CLIP_REPO
        assert {k: ms.key_fields()[k] for k in ("weights", "sha256")} == {"weights": "timm:fake_clip", "sha256": digest}
    model, channels, got = models.build(ms, "avg", 32)
    assert got == digest
    from safetensors.torch import load_file

    stored = load_file(str(path))
    body = model.body.state_dict()
    assert set(body) == set(stored) and all(torch.equal(body[k], stored[k]) for k in stored)
    x = torch.randn(2, 2, 3, 32, 32)
    _assert_close(model, channels, x, _independent(net, ["norm"], x, lambda n, o: o[:, 0]))
    # another tag is another key; random weights of the same model are yet another
    keys = {key_of(ms.key_fields(), prefix="t"), key_of(_spec(arch, ["norm"]).key_fields(), prefix="t")}
    assert len(keys) == 2


def test_pretrained_tag_missing_from_the_cache_is_one_line_and_never_downloaded(hf_home, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append(a) or 1 / 0)
    arch = {"name": TINY_CLIP, "kwargs": {}}
    with pytest.raises(DataError) as err:
        _spec(arch, ["norm"], weights="fake_in1k")
    msg = str(err.value)
    assert "\n" not in msg and not calls
    assert msg.startswith(f"model.weights: timm:fake_in1k ({TINY_CLIP}.fake_in1k) needs model.safetensors of the "
                          f"Hugging Face repo {IN1K_REPO} in the local cache, not found at "
                          f"{hf_home / 'hub' / 'models--featstudy-test--tiny-vit-in1k'}/snapshots/<commit>/")
    assert "model.download=true" in msg and "HF_HOME" in msg
    with pytest.raises(ConfigError, match=r"^model.weights: 'nosuchtag' is not a pretrained tag of "
                                          r"featstudy_tiny_clip_vit \(tags: \['fake_clip', 'fake_in1k'\]\)"):
        _spec(arch, ["norm"], weights="nosuchtag")
    with pytest.raises(ConfigError, match=r"^model.weights: 'fake_in1k' contradicts the tag 'fake_clip'"):
        _spec({**arch, "name": f"{TINY_CLIP}.fake_clip"}, ["norm"], weights="fake_in1k")


def test_download_true_fetches_into_the_hf_cache(hf_home, monkeypatch):
    import huggingface_hub

    net = _tiny_clip("fake_in1k", seed=5)
    calls = []

    def fake_download(repo, filename, revision=None, cache_dir=None):
        calls.append((repo, filename, cache_dir))
        return str(_put_in_hf_cache(hf_home, repo, net.state_dict(), filename))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    ms = _spec({"name": TINY_CLIP, "kwargs": {}}, ["head"], weights="fake_in1k", download=True)
    assert calls == [(IN1K_REPO, "model.safetensors", str(hf_home / "hub"))]
    assert ms.weights.tag == "timm:fake_in1k" and ms.preprocessing == "torchvision"  # ImageNet's mean/std
    model, channels, _ = models.build(ms, "avg", 32)
    assert channels == {"head": 10}
    x = torch.randn(1, 1, 3, 32, 32)
    _assert_close(model, channels, x, _independent(net, ["head"], x, lambda n, o: o))
    # now cached: found offline without another download
    assert _spec({"name": TINY_CLIP, "kwargs": {}}, ["head"], weights="fake_in1k").weights == ms.weights
    assert len(calls) == 1


def test_preprocessing_from_the_pretrained_cfg_equals_torchvision_normalize(tmp_path):
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    from featstudy.transforms import CropSpec, ImageTransform

    arch = {"name": TINY_CLIP, "kwargs": {}}
    ms = _spec(arch, ["norm", "blocks.0"])
    assert ms.preprocessing == {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    assert _spec(arch, ["norm"], preprocessing="timm").preprocessing == ms.preprocessing
    data = ms.data_config()
    assert (data["input_size"], data["crop_pct"], data["interpolation"]) == ((3, 32, 32), 1.0, "bicubic")
    model, channels, _ = models.build(ms, "avg", 32)
    crops = CropSpec("center", 36, 32)
    ours = ImageTransform(crops, ms.preprocessing)
    theirs = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(32),
                        T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    x = torch.stack([ours(img) for img in images])
    want = torch.stack([theirs(img) for img in images]).unsqueeze(1)
    assert torch.equal(x, want)  # bit for bit
    torch.manual_seed(0)
    net = timm.create_model(TINY_CLIP, pretrained=False).eval()
    _assert_close(model, channels, x, _independent(net, ["norm", "blocks.0"], want, lambda n, o: o[:, 0]))
    # the numbers enter the key: ImageNet's (torchvision) and CLIP's give different keys
    imagenet = _spec(arch, ["norm", "blocks.0"], preprocessing="torchvision")
    assert key_of(ms.key_fields(), prefix="t") != key_of(imagenet.key_fields(), prefix="t")
    assert ms.key_fields()["preprocessing"] == {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    # a tag trained on ImageNet's mean/std is ``torchvision``: the same numbers and key as before the pair existed
    assert _spec({**arch, "name": f"{TINY_CLIP}.fake_in1k"}, ["norm"]).preprocessing == "torchvision"


def test_preprocessing_mean_std_pairs_and_errors():
    arch = {"name": TINY_CLIP, "kwargs": {}}
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert _spec(arch, ["norm"], preprocessing=imagenet).preprocessing == "torchvision"
    half = {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert _spec(arch, ["norm"], preprocessing=half).preprocessing == half
    assert _spec(arch, ["norm"], preprocessing="caffe").preprocessing == "caffe"
    for bad, pattern in (({"mean": [0.5] * 3}, r"^model.preprocessing: a mean/std pair takes exactly the keys"),
                         ({"mean": [0.5] * 2, "std": [0.5] * 3}, r"^model.preprocessing.mean: three finite"),
                         ({"mean": [0.5] * 3, "std": [0.5, 0, 0.5]}, r"^model.preprocessing.std: must be > 0"),
                         ("opencv", r"^model.preprocessing: 'opencv' is not one of")):
        with pytest.raises(ConfigError, match=pattern) as err:
            _spec(arch, ["norm"], preprocessing=bad)
        assert "\n" not in str(err.value)


def test_conf_resolves_the_timm_preprocessing(helpers):
    cfg = helpers.compose(["model=timm", f"model.name={TINY_CLIP}", "model.nodes=[norm]"])
    pair = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    # JSON text: OmegaConf.resolve (run before every job) cannot replace an interpolation string with a dict
    assert cfg.model.preprocessing == json.dumps(pair)
    assert "preprocessing: '{\"mean\": [0.4815, 0.4578, 0.4082], \"std\": [0.2686, 0.2613, 0.2758]}'" in \
        OmegaConf.to_yaml(cfg.model, resolve=True)
    OmegaConf.resolve(cfg.model)
    assert models.spec(cfg.model).preprocessing == pair
    cfg = helpers.compose(["model=timm", f"model.name={TINY_CLIP}", "model.nodes=[norm]",
                           "model.preprocessing={mean:[0.5,0.5,0.5],std:[0.25,0.25,0.25]}"])
    assert models.spec(cfg.model).preprocessing == {"mean": [0.5] * 3, "std": [0.25] * 3}
    cfg = helpers.compose(["model=timm", "model.name=convnext_atto", "model.nodes=[stages.0]"])
    assert cfg.model.preprocessing == "torchvision"  # ImageNet's: timm models' keys as before


def test_cli_run_records_the_mean_std_and_the_pretrained_tag(tmp_path, image_folder, helpers, monkeypatch):
    from featstudy.store import load_embedding

    home = tmp_path / "hf"
    for var, value in (("HF_HOME", home), ("HF_HUB_CACHE", home / "hub"), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(var, str(value))
    path = _put_in_hf_cache(home, CLIP_REPO, _tiny_clip().state_dict())
    overrides = [o for o in helpers.tiny_overrides(tmp_path, image_folder) if not o.startswith("tracking.uri=")]
    rc = helpers.run_cli([*overrides, "model=timm", f"model.name={TINY_CLIP}", "model.nodes=[norm]",
                          "model.weights=pretrained", "tracking.uri=null"], monkeypatch)
    assert rc == 0
    metas = [p for p in tmp_path.rglob("meta.json") if p.parent.parent.name == "embeddings"]
    assert len(metas) == 1 and load_embedding(metas[0].parent).features.shape == (24, 48)
    meta = json.loads(metas[0].read_text())
    pair = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    assert meta["preprocessing"] == pair and meta["key_fields"]["model"]["preprocessing"] == pair
    assert meta["weights"] == "timm:fake_clip" and meta["weights_source"] == "timm"
    assert meta["weights_path"] == str(path)
    assert meta["key_fields"]["model"]["sha256"] == meta["weights_sha256"]


@pytest.mark.slow
def test_a_sweep_over_two_timm_models_extracts_each_once(tmp_path, helpers, monkeypatch):
    """Issue 13: `python -m featstudy -m model=timm model.name=a,b analysis.bins=10,null`: four jobs, two
    embeddings; each model's first job extracts (embedding_cache=miss), its second reuses it (hit), whichever the
    analysis. Counted from the runs' tags in the real MLflow store and from the cache folder."""
    from mlflow.tracking import MlflowClient

    images = helpers.make_image_folder(tmp_path / "images", per_class=3)
    argv = ["-m", *helpers.tiny_overrides(tmp_path, images), "model=timm",
            "model.name=vit_tiny_patch16_224,deit_tiny_patch16_224", "model.nodes=[blocks.1,norm]",
            "model.kwargs={img_size:32,depth:2}", "model.weights=random", "crops=center",
            "analysis.bins=10,null", "~analysis.callbacks.figures", "~analysis.callbacks.atlas",
            "hydra.sweep.dir=" + str(tmp_path / "multirun")]
    assert helpers.run_cli(argv, monkeypatch) == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = [r for r in client.search_runs(["1"]) if r.data.tags.get("featstudy.role") == "job"]
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    by_model: dict[str, list[str]] = {}
    for r in runs:
        by_model.setdefault(r.data.params["model.name"], []).append(r.data.tags["embedding_cache"])
    assert {m: sorted(tags) for m, tags in by_model.items()} == {
        "vit_tiny_patch16_224": ["hit", "miss"], "deit_tiny_patch16_224": ["hit", "miss"]}
    keys = {r.data.tags["embedding_key"] for r in runs}
    from pathlib import Path

    cache = Path(runs[0].data.params["paths.cache_dir"]) / "embeddings"
    assert len(keys) == 2 and sorted(p.name for p in cache.iterdir() if p.is_dir()) == sorted(keys)
