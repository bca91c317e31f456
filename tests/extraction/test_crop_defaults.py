"""Issue 13: the crops (size, resize, interpolation) default to the model's own evaluation transform (timm's data
configuration, open_clip's preprocessing), command-line values win, torchvision models keep 256 / 224 / bilinear
and their key; bicubic resizes equal torchvision's; a bad interpolation is one line.

Expectations are read from timm's and open_clip's own API (``pretrained_cfg``, ``get_model_config``) or written as
literal numbers, and pixels are compared with torchvision's transforms applied here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms as T
from PIL import Image
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import _create_vision_transformer

from featstudy.errors import ConfigError
from featstudy.groups import build
from featstudy.transforms import CropSpec, ImageTransform

ARCH = "featstudy_crops_vit"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# read by timm's register_model from this module: a tiny ViT whose default tag has a 40 px input, a crop fraction of
# 0.95 and bicubic resizing (resize = floor(40 / 0.95) = 42), and a tag whose interpolation featstudy lacks
default_cfgs = generate_default_cfgs({
    f"{ARCH}.in40": {"input_size": (3, 40, 40), "crop_pct": 0.95, "interpolation": "bicubic", "num_classes": 0},
    f"{ARCH}.lanczos": {"input_size": (3, 40, 40), "crop_pct": 1.0, "interpolation": "lanczos", "num_classes": 0},
})


@register_model
def featstudy_crops_vit(pretrained=False, **kwargs):
    args = {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2, "img_size": 40}
    return _create_vision_transformer(ARCH, pretrained=pretrained, **{**args, **kwargs})


def _crops(helpers, *overrides):
    cfg = helpers.compose(list(overrides))
    return build(cfg.crops, "crops")


def _timm(helpers, *overrides, name=ARCH):
    return _crops(helpers, "model=timm", f"model.name={name}", "model.nodes=[blocks.0]", *overrides)


def _images(sizes=((57, 45), (40, 61), (45, 45))):
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _torchvision_ten(resize, size, interpolation, mean, std):
    """torchvision's own pipeline: Resize(shorter side) -> TenCrop -> ToTensor -> Normalize, per crop."""
    to_tensor = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    return T.Compose([T.Resize(resize, interpolation=interpolation, antialias=True), T.TenCrop(size),
                      T.Lambda(lambda crops: torch.stack([to_tensor(c) for c in crops]))])


def test_timm_crops_default_to_the_data_config_and_equal_torchvision_bicubic_bit_for_bit(helpers):
    cfg = timm.create_model(ARCH, pretrained=False).pretrained_cfg  # timm's own record of the default tag
    size = cfg["input_size"][-1]
    resize = math.floor(size / cfg["crop_pct"])
    assert (size, resize, cfg["interpolation"]) == (40, 42, "bicubic")  # the numbers registered above
    crops = _timm(helpers)
    assert (crops.name, crops.size, crops.resize, crops.interpolation) == ("ten", size, resize, "bicubic")
    assert crops.key_fields() == {"name": "ten", "resize": 42, "size": 40, "interpolation": "bicubic"}
    ours = ImageTransform(crops, "torchvision")
    theirs = _torchvision_ten(resize, size, T.InterpolationMode.BICUBIC, *IMAGENET)
    bilinear = _torchvision_ten(resize, size, T.InterpolationMode.BILINEAR, *IMAGENET)
    for img in _images():
        got, want = ours(img), theirs(img)
        assert got.shape == (10, 3, 40, 40)
        assert torch.equal(got, want)  # bit for bit
        assert not torch.equal(got, bilinear(img))  # the interpolation is really used
    centre = _timm(helpers, "crops=center")
    assert (centre.size, centre.resize, centre.interpolation) == (40, 42, "bicubic")
    whole = _timm(helpers, "crops=none")
    assert (whole.size, whole.resize, whole.interpolation) == (40, None, "bicubic")
    squash = T.Compose([T.Resize([40, 40], interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.ToTensor(),
                        T.Normalize(*IMAGENET)])
    for img in _images():
        assert torch.equal(ImageTransform(whole, "torchvision")(img)[0], squash(img))


def test_real_timm_models_get_their_size_and_crop_fraction(helpers):
    # deit_tiny: 224 px, crop_pct 0.9 -> floor(224 / 0.9) = 248; read from timm, and known
    cfg = timm.create_model("deit_tiny_patch16_224", pretrained=False).pretrained_cfg
    want = (cfg["input_size"][-1], math.floor(cfg["input_size"][-1] / cfg["crop_pct"]), cfg["interpolation"])
    assert want == (224, 248, "bicubic")
    crops = _timm(helpers, name="deit_tiny_patch16_224")
    assert (crops.size, crops.resize, crops.interpolation) == want
    # vit_base_patch16_384: 384 px, crop_pct 1.0 -> 384 / 384 (not built: 86 M parameters)
    crops = _timm(helpers, name="vit_base_patch16_384")
    assert (crops.size, crops.resize, crops.interpolation) == (384, 384, "bicubic")
    # a model built for another size (model.kwargs.img_size) takes that size, with the model's crop fraction
    crops = _timm(helpers, "+model.kwargs={img_size:48}")
    assert (crops.size, crops.resize) == (48, math.floor(48 / 0.95))


def test_command_line_values_win(helpers):
    crops = _timm(helpers, "crops.size=64")  # the resize follows the size with the model's crop fraction
    assert (crops.size, crops.resize, crops.interpolation) == (64, 67, "bicubic")
    crops = _timm(helpers, "crops.resize=100", "crops.size=50", "crops.interpolation=bilinear")
    assert (crops.size, crops.resize, crops.interpolation) == (50, 100, "bilinear")
    assert crops.key_fields() == {"name": "ten", "resize": 100, "size": 50}  # bilinear: no interpolation field
    crops = _timm(helpers, "crops.resize=45")
    assert (crops.size, crops.resize, crops.interpolation) == (40, 45, "bicubic")
    # torchvision models keep 256 whatever the size, as before; bicubic on request
    crops = _crops(helpers, "crops.size=32")
    assert (crops.size, crops.resize, crops.interpolation) == (32, 256, "bilinear")
    crops = _crops(helpers, "crops.interpolation=bicubic")
    assert crops.key_fields() == {"name": "ten", "resize": 256, "size": 224, "interpolation": "bicubic"}


@pytest.mark.parametrize("over", [[], ["model=torchvision", "model.name=resnet18"], ["experiment=paper_cub200"]])
def test_torchvision_models_keep_the_papers_crops_and_keys(helpers, over):
    for group, resize in (("ten", 256), ("center", 256), ("none", None)):
        cfg = helpers.compose([*over, f"crops={group}"])
        assert (cfg.crops.size, cfg.crops.resize, cfg.crops.interpolation) == (224, resize, "bilinear")
        crops = build(cfg.crops, "crops")
        assert crops.key_fields() == {"name": group, "resize": resize, "size": 224}  # as before: same cache keys


def test_a_bad_interpolation_is_one_line_and_exits_2(helpers, tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError) as err:
        CropSpec("ten", 256, 224, "nearest")
    assert str(err.value) == "crops.interpolation: 'nearest' is not one of ['bilinear', 'bicubic']"
    base = ["experiment=demo", f"paths.root_dir={tmp_path}", "tracking.uri=null"]
    for over, words in ((["crops.interpolation=nearest"], ["crops.interpolation", "'nearest'", "bilinear", "bicubic"]),
                        (["model=timm", f"model.name={ARCH}.lanczos", "model.nodes=[blocks.0]"],
                         ["crops.interpolation", "'lanczos'", ARCH])):
        capsys.readouterr()
        assert helpers.run_cli([*base, *over], monkeypatch) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("featstudy: error: crops.interpolation: "), err
        assert all(w in lines[0] for w in words), lines[0]
        assert "Traceback" not in err
    # the user's interpolation replaces the model's, so that model runs
    crops = _timm(helpers, "crops.interpolation=bicubic", name=f"{ARCH}.lanczos")
    assert (crops.size, crops.resize, crops.interpolation) == (40, 40, "bicubic")


def test_open_clip_crops_default_to_the_towers_preprocessing(helpers):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transform import PreprocessCfg

    def side(name):
        size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
        return size[-1] if isinstance(size, (list, tuple)) else size

    cfg = helpers.compose(["model=open_clip", "model.name=ViT-B-32"])
    want = (side("ViT-B-32"), side("ViT-B-32"), PreprocessCfg().interpolation)
    assert want == (224, 224, "bicubic")
    assert (cfg.crops.size, cfg.crops.resize, cfg.crops.interpolation) == want
    # a tag trained with bilinear resizing (open_clip's record of it, the architecture's image size)
    name, tag = next((n, t) for n, t in open_clip.list_pretrained() if n in open_clip.list_models()
                     and open_clip.get_pretrained_cfg(n, t).get("interpolation") == "bilinear"
                     and "preprocess_cfg" not in open_clip.get_model_config(n))
    cfg = helpers.compose(["model=open_clip", f"model.name={name}", f"model.weights={tag}", "crops=center"])
    assert (cfg.crops.size, cfg.crops.resize, cfg.crops.interpolation) == (side(name), side(name), "bilinear")
    cfg = helpers.compose(["model=open_clip", "model.name=ViT-B-32", "crops.size=160"])
    assert (cfg.crops.size, cfg.crops.resize) == (160, 160)


def test_figures_resize_with_the_extractions_interpolation():
    """The receptive-field square of figures 2/3 is the extraction's centre crop, bicubic too: torchvision's resize
    and centre crop, and the bytes the loader ships for crops=center."""
    from types import SimpleNamespace

    from featstudy.analysis import image_io, images
    from featstudy.transforms import uint8_crops

    for img in _images():
        shown = np.asarray(images._center_square(img, 40, 42, "bicubic"))
        want = np.asarray(T.CenterCrop(40)(T.Resize(42, interpolation=T.InterpolationMode.BICUBIC,
                                                     antialias=True)(img)))
        assert np.array_equal(shown, want)
        loader = uint8_crops(img, CropSpec("center", 42, 40, "bicubic"))[0].permute(1, 2, 0).numpy()
        assert np.array_equal(shown, loader)
        assert not np.array_equal(shown, np.asarray(images._center_square(img, 40, 42)))
    assert image_io.crop_interpolation(SimpleNamespace(meta={"crops": {"interpolation": "bicubic"}})) == "bicubic"
    assert image_io.crop_interpolation(SimpleNamespace(meta={"crops": {"size": 224}})) == "bilinear"  # older metas


def test_cli_run_with_a_timm_model_extracts_at_its_own_crops(tmp_path, image_folder, helpers, monkeypatch):
    """An extraction with the model's default crops (ten of 40 px from a bicubic resize to 42) equals the hooked
    forward pass of timm's model on torchvision's ten crops, and meta.json and the key record the crops."""
    from featstudy.store import load_embedding

    # the tiny run without experiment=demo, whose crops (36 / 32, for VGG19) would replace the model's own
    over = [o for o in helpers.tiny_overrides(tmp_path, image_folder)
            if not o.startswith(("experiment=", "crops.", "tracking.uri="))]
    rc = helpers.run_cli([*over, "model=timm", f"model.name={ARCH}", "model.nodes=[norm]", "model.token_pooling=cls",
                          "tracking.uri=null", "~analysis.callbacks.figures", "~analysis.callbacks.atlas"],
                         monkeypatch)
    assert rc == 0
    (meta_path,) = [p for p in tmp_path.rglob("meta.json") if p.parent.parent.name == "embeddings"]
    meta = json.loads(meta_path.read_text())
    assert meta["crops"] == {"name": "ten", "resize": 42, "size": 40, "n_crops": 10, "interpolation": "bicubic"}
    assert meta["key_fields"]["crops"] == {"name": "ten", "resize": 42, "size": 40, "interpolation": "bicubic"}
    emb = load_embedding(meta_path.parent)
    torch.manual_seed(0)  # model.seed=0: timm's own init under that seed
    net = timm.create_model(ARCH, pretrained=False).eval()
    grabbed = {}
    net.norm.register_forward_hook(lambda m, i, o: grabbed.__setitem__("norm", o.detach()))
    pipeline = _torchvision_ten(42, 40, T.InterpolationMode.BICUBIC, *IMAGENET)
    root = image_folder
    for row in (0, len(emb.paths) - 1):
        x = pipeline(Image.open(root / emb.paths[row]).convert("RGB"))
        with torch.no_grad():
            net(x)
        want = grabbed["norm"][:, 0].mean(dim=0)  # class token per crop, mean over the ten crops
        got = torch.tensor(np.array(emb.features[row]))
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_cfg_job_prints_the_crops_that_run(helpers, tmp_path, monkeypatch, capsys):
    argv = ["model=timm", f"model.name={ARCH}", "model.nodes=[blocks.0]", "crops=center", f"paths.root_dir={tmp_path}",
            "--cfg", "job"]
    assert helpers.run_cli(argv, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "crops:\n  _target_: featstudy.transforms.CropSpec\n  name: center\n  resize: 42\n  size: 40\n" \
           "  interpolation: bicubic\n" in out, out
    assert "${crop_default" not in out
