"""``model=open_clip``: a tiny registered architecture (ViT width 64, 2 layers, patch 8, 32 px, tiny text tower)
with random weights saved to a local file and loaded back strictly; features equal to an independent hooked
forward pass of ``model.visual`` under the three token poolings; sequence-first blocks; one-line errors (unknown
node, a pretrained tag missing from the cache); the key; the node lister; one CLI run."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

open_clip = pytest.importorskip("open_clip")

from featstudy import models
from featstudy.errors import ConfigError, DataError
from featstudy.extraction.key import key_of

TINY = "featstudy-tiny-ViT"
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
NODES = ["conv1", "ln_pre", "transformer.resblocks.0", "transformer.resblocks.1.mlp.c_fc", "ln_post"]


@pytest.fixture(autouse=True)
def tiny_architecture(monkeypatch):
    """``featstudy-tiny-ViT`` registered as an open_clip architecture (removed after each test)."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY, json.loads(json.dumps(TINY_CFG)))


@pytest.fixture
def clip_file(tmp_path):
    """A whole tiny CLIP model (image and text towers, seed 7) saved as safetensors, and the model."""
    from safetensors.torch import save_file

    torch.manual_seed(7)
    clip = open_clip.create_model(TINY).eval()
    path = tmp_path / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path, clip


def _spec(nodes, **kw):
    kw.setdefault("preprocessing", None)
    node = {"_target_": "featstudy.models.open_clip_source.OpenClipModel", "name": TINY, "nodes": nodes,
            "weights": "random", "seed": 0, **kw}
    return models.spec(OmegaConf.create(node))


def _independent(visual, nodes, x, pool):
    """(B, K, 3, S, S) -> {node: (B, C)}: hooks on ``visual``'s modules, ``pool(output)`` per crop, mean over crops."""
    modules = dict(visual.named_modules())
    grabbed = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: grabbed.__setitem__(n, o.detach().clone()))
             for n in nodes]
    try:
        with torch.no_grad():
            visual(x.flatten(0, 1))
    finally:
        for h in hooks:
            h.remove()
    b, k = x.shape[:2]
    return {n: pool(grabbed[n]).reshape(b, k, -1).mean(dim=1) for n in nodes}


def _assert_close(model, channels, x, expected):
    with torch.no_grad():
        got = model(x)
    assert got.dtype == torch.float32 and got.shape == (x.shape[0], sum(channels.values()))
    assert list(channels) == list(expected)
    start = 0
    for node, want in expected.items():
        part = got[:, start:start + channels[node]]
        start += channels[node]
        assert part.shape == want.shape, node
        assert (part - want).abs().max().item() <= 1e-5 * (want.abs().max().item() or 1.0), node


@pytest.mark.parametrize("token_pooling", ["cls", "mean", "mean_patch"])
def test_features_equal_independent_hooks_on_model_visual(token_pooling, clip_file):
    path, clip = clip_file
    ms = _spec(NODES, token_pooling=token_pooling, weights=str(path))
    assert ms.weights.tag.startswith("file:")
    model, channels, digest = models.build(ms, "avg", 32)
    assert digest == ms.weights.sha256
    assert channels == {"conv1": 64, "ln_pre": 64, "transformer.resblocks.0": 64,
                        "transformer.resblocks.1.mlp.c_fc": 256, "ln_post": 64}
    assert not hasattr(model.body, "text") and not any("token_embedding" in n for n, _ in model.body.named_modules())

    def pool(o):  # by hand: token 0 = class, 1..16 = the 4 x 4 patches; conv1 is (B, C, 4, 4)
        if o.dim() == 4:
            return o.mean(dim=(2, 3))
        assert o.shape[1] == 1 + 16
        return {"cls": o[:, 0], "mean": o.mean(dim=1), "mean_patch": o[:, 1:].mean(dim=1)}[token_pooling]

    x = torch.randn(2, 3, 3, 32, 32)
    _assert_close(model, channels, x, _independent(clip.visual, NODES, x, pool))
    assert models.feature_names(channels)[-1] == "ln_post:63"


def test_visual_only_file_loads_and_is_strict(clip_file, tmp_path):
    path, clip = clip_file
    tower = {k: v.contiguous() for k, v in clip.visual.state_dict().items()}
    own = tmp_path / "visual.pt"
    torch.save(tower, own)
    a, _, _ = models.build(_spec(["ln_post"], weights=str(own)), "avg", 32)
    b, _, _ = models.build(_spec(["ln_post"], weights=str(path)), "avg", 32)
    x = torch.randn(1, 1, 3, 32, 32)
    assert torch.equal(a(x), b(x))
    torch.save({k: v for k, v in tower.items() if k != "class_embedding"}, tmp_path / "m.pt")
    with pytest.raises(DataError, match=r"^model.weights: .*missing key 'class_embedding'"):
        models.build(_spec(["ln_post"], weights=str(tmp_path / "m.pt")), "avg", 32)
    torch.save({**tower, "extra": torch.zeros(1)}, tmp_path / "u.bin")
    with pytest.raises(DataError, match=r"^model.weights: .*unexpected key 'extra'"):
        models.build(_spec(["ln_post"], weights=str(tmp_path / "u.bin")), "avg", 32)
    seeded, _, digest = models.build(_spec(["ln_post"], seed=3), "avg", 32)
    assert digest is None and not torch.allclose(a(x), seeded(x))


def test_sequence_first_blocks_are_transposed(clip_file):
    """A tower whose transformer runs (T, B, D) (open_clip before 2.24; here batch_first switched off) is pooled as
    the same tokens, read from the other axis."""
    path, clip = clip_file
    ms = _spec(["transformer.resblocks.0", "transformer.resblocks.1.ln_2"], token_pooling="mean_patch",
               weights=str(path))
    model, channels, _ = models.build(ms, "avg", 32)
    assert set(model.layout.values()) == {"tokens"}
    clip.visual.transformer.batch_first = False
    ms2 = _spec(list(ms.nodes), token_pooling="mean_patch", weights=str(path))
    visual, _ = ms2.network()
    visual.transformer.batch_first = False
    ms2.network = lambda: (visual, None)
    seq, channels, _ = models.build(ms2, "avg", 32)
    assert set(seq.layout.values()) == {"tokens_seq_first"} and channels == {n: 64 for n in ms.nodes}
    x = torch.randn(2, 2, 3, 32, 32)
    expected = _independent(clip.visual, list(ms.nodes), x, lambda o: o.transpose(0, 1)[:, 1:].mean(dim=1))
    _assert_close(seq, channels, x, expected)


def test_one_line_errors():
    cases = [
        ({"nodes": ["ln_post", "transformer.resblocks.7"]},
         (r"^model.nodes: 'transformer.resblocks.7' is not a module of featstudy-tiny-ViT.visual; list them with: "
         r"python -m featstudy.models.nodes --source open_clip featstudy-tiny-ViT$")),
        ({"nodes": []}, r"^model.nodes: empty"),
        ({"nodes": None}, r"^model.nodes: required"),
        ({"nodes": ["ln_post", "ln_post"]}, r"^model.nodes: duplicate"),
        ({"token_pooling": "max"}, r"^model.token_pooling: 'max' is not one of"),
        ({"name": "featstudy-tiny-vit"}, r"^model.name: 'featstudy-tiny-vit' is not an open_clip architecture"),
        ({"weights": "laion2b_s34b_b79k"}, r"^model.weights: 'laion2b_s34b_b79k' is not a pretrained tag of"),
        ({"preprocessing": "opencv"}, r"^model.preprocessing"),
    ]
    for over, pattern in cases:
        kw = {"nodes": ["ln_post"], **over}
        with pytest.raises(ConfigError, match=pattern) as err:
            _spec(**kw)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^crops.size=48: featstudy-tiny-ViT.visual refused a 48 px crop.*"
                                          r"crops.size=32$"):
        models.build(_spec(["ln_post"]), "avg", 48)
    with pytest.raises(ConfigError, match=r"^model.nodes: 'transformer.resblocks.0.attn' of .* outputs tuple.*"
                                          r"--source open_clip featstudy-tiny-ViT$"):
        models.build(_spec(["transformer.resblocks.0.attn"]), "avg", 32)


def test_missing_pretrained_tag_is_one_line_naming_the_file(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DataError) as err:
        _spec(["ln_post"], name="ViT-B-32", weights="laion2b_s34b_b79k")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model.weights: ViT-B-32 laion2b_s34b_b79k needs open_clip_model.safetensors or "
                              "open_clip_pytorch_model.bin of the Hugging Face repo laion/CLIP-ViT-B-32-laion2B-"
                              f"s34B-b79K in the hub cache {tmp_path / 'hub'}")
    assert "model.download=true" in message


def test_pretrained_tag_found_in_the_hub_cache(clip_file, tmp_path, monkeypatch):
    """A tag (registered for the tiny architecture) whose checkpoint is in the local hub cache: used offline, its
    mean/std become the preprocessing, the key holds the tag and the file's sha256."""
    from huggingface_hub import constants
    from open_clip.pretrained import _pcfg

    path, clip = clip_file
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY,
                        {"tiny_tag": _pcfg(hf_hub="featstudy/tiny-clip/", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))})
    hub = tmp_path / "hub"
    snapshot = hub / "models--featstudy--tiny-clip" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (hub / "models--featstudy--tiny-clip" / "refs").mkdir()
    (hub / "models--featstudy--tiny-clip" / "refs" / "main").write_text("0123abc")
    (snapshot / "open_clip_model.safetensors").write_bytes(path.read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    ms = _spec(["ln_post"], weights="tiny_tag")
    fields = ms.key_fields()
    assert fields["weights"] == "tiny_tag" and fields["sha256"] == __import__("hashlib").sha256(
        path.read_bytes()).hexdigest()
    assert ms.preprocessing == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    model, _, digest = models.build(ms, "avg", 32)
    x = torch.randn(1, 1, 3, 32, 32)
    assert digest == fields["sha256"]
    expected = _independent(clip.visual, ["ln_post"], x, lambda o: o[:, 0])
    _assert_close(model, {"ln_post": 64}, x, expected)


def test_default_preprocessing_is_the_towers_own():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    ms = _spec(["ln_post"], preprocessing=None)
    assert ms.preprocessing == {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}
    assert ms.key_fields()["preprocessing"] == ms.preprocessing
    # an architecture whose tags all share another pair (SigLIP: Inception's 0.5 / 0.5) takes that pair
    siglip = _spec(["trunk.norm"], name="ViT-B-16-SigLIP", preprocessing=None, token_pooling="mean")
    assert siglip.preprocessing == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert _spec(["ln_post"], preprocessing="torchvision").preprocessing == "torchvision"


def test_key_covers_nodes_token_pooling_weights_and_preprocessing(clip_file):
    path, _ = clip_file
    base = _spec(["ln_post"])
    fields = base.key_fields()
    assert fields["source"] == "open_clip" and fields["name"] == TINY and fields["weights"] == "random"
    keys = {key_of(fields, prefix="o")}
    for variant in ({"token_pooling": "mean"}, {"token_pooling": "mean_patch"}, {"nodes": ["ln_pre"]},
                    {"nodes": ["ln_post", "ln_pre"]}, {"weights": str(path)}, {"seed": 1},
                    {"preprocessing": "caffe"}):
        keys.add(key_of(_spec(**{"nodes": ["ln_post"], **variant}).key_fields(), prefix="o"))
    assert len(keys) == 8


def test_node_lister_for_open_clip(capsys):
    from featstudy.models import nodes

    assert nodes.main(["--source", "open_clip", TINY]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"# {TINY}.visual (open_clip) at 32 px")
    assert "transformer.resblocks.1\t[1, 17, 64]" in lines and "conv1\t[1, 64, 4, 4]" in lines
    assert not any(line.startswith("token_embedding") for line in lines)
    assert nodes.main(["--source", "open_clip", "no-such-arch"]) == 2


def test_cli_run_with_model_open_clip(tmp_path, image_folder, helpers, monkeypatch, clip_file):
    from featstudy.store import load_embedding

    path, _ = clip_file
    overrides = [o for o in helpers.tiny_overrides(tmp_path, image_folder) if not o.startswith("tracking.uri=")]
    rc = helpers.run_cli([*overrides, "model=open_clip", f"model.name={TINY}", f"model.weights={path}",
                          "model.nodes=[transformer.resblocks.1,ln_post]", "model.token_pooling=mean_patch",
                          "tracking.uri=null"], monkeypatch)
    assert rc == 0
    metas = [p for p in tmp_path.rglob("meta.json") if p.parent.parent.name == "embeddings"]
    assert len(metas) == 1
    emb = load_embedding(metas[0].parent)
    assert emb.features.shape == (24, 64 + 64)
    assert emb.feature_names[0] == "transformer.resblocks.1:0" and emb.feature_names[-1] == "ln_post:63"
    meta = json.loads(metas[0].read_text())
    fields = meta["key_fields"]["model"]
    assert fields["source"] == "open_clip" and fields["token_pooling"] == "mean_patch"
    assert meta["weights"].startswith("file:")
    assert meta["preprocessing"]["mean"] == list(open_clip.constants.OPENAI_DATASET_MEAN)
