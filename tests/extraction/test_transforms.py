"""Decoding every PIL mode, the crops, and the two normalisations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from omegaconf import OmegaConf
from PIL import Image

from featstudy.errors import ConfigError
from featstudy.transforms import CAFFE_MEAN_BGR, CropSpec, ImageTransform, crop_spec, load_rgb


def test_every_awkward_mode_decodes_to_rgb_and_ten_crops(awkward):
    t = ImageTransform(CropSpec("ten", 40, 32))
    files = sorted(p for p in awkward.rglob("*") if p.is_file() and p.name != "truncated.jpg")
    modes = {Image.open(p).mode for p in files}
    assert {"RGB", "L", "CMYK", "P", "RGBA", "I;16"} <= modes
    for p in files:
        img = load_rgb(p)
        assert img.mode == "RGB"
        x = t(img)
        assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 65535, dtype=np.uint16)
    arr[:4] = 0
    Image.fromarray(arr).save(tmp_path / "a.png")
    got = np.asarray(load_rgb(tmp_path / "a.png"))
    assert got[0, 0].tolist() == [0, 0, 0] and got[-1, -1].tolist() == [255, 255, 255]


def test_truncated_file_raises(awkward):
    with pytest.raises(OSError):
        load_rgb(awkward / "dog" / "truncated.jpg")


def test_ten_crop_equals_torchvision_pipeline(awkward):
    img = load_rgb(awkward / "cat" / "rgb1.png")
    ref = T.Compose([T.Resize(40), T.TenCrop(32), T.Lambda(lambda cs: torch.stack([T.ToTensor()(c) for c in cs])),
                     T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(img)
    torch.testing.assert_close(ImageTransform(CropSpec("ten", 40, 32))(img), ref, rtol=1e-6, atol=1e-6)
    centre = T.Compose([T.Resize(40), T.CenterCrop(32), T.ToTensor(),
                        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(img)
    torch.testing.assert_close(ImageTransform(CropSpec("center", 40, 32))(img)[0], centre, rtol=1e-6, atol=1e-6)
    whole = ImageTransform(CropSpec("none", None, 32))(img)
    assert whole.shape == (1, 3, 32, 32)


def test_caffe_is_bgr_0_255_mean_subtracted():
    img = Image.new("RGB", (40, 40), (10, 20, 30))
    x = ImageTransform(CropSpec("center", 40, 32), "caffe")(img)[0]
    expected = torch.tensor([30 - CAFFE_MEAN_BGR[0], 20 - CAFFE_MEAN_BGR[1], 10 - CAFFE_MEAN_BGR[2]])
    torch.testing.assert_close(x[:, 5, 5], expected)


def test_crop_config_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"crops.size: 64 > crops.resize 40"):
        crop_spec(OmegaConf.create({"_target_": "featstudy.transforms.CropSpec", "name": "ten", "resize": 40, "size": 64}))
    with pytest.raises(ConfigError, match=r"crops.name: 'five'"):
        crop_spec(OmegaConf.create({"_target_": "featstudy.transforms.CropSpec", "name": "five", "resize": 40, "size": 32}))
    assert crop_spec(OmegaConf.create({"_target_": "featstudy.transforms.CropSpec", "name": "none", "resize": None, "size": 32})).key_fields()["resize"] is None


@pytest.mark.parametrize("width", [53, 54])
def test_ten_crops_from_six_shipped_uint8_crops_equal_torchvision_to_the_bit(width):
    """The loader ships six uint8 crops and the device makes the ten: with the resized width minus the crop size
    odd (53 - 32), torchvision's mirrored centre is not the centre's mirror; both widths give TenCrop's tensors
    exactly."""
    from featstudy.transforms import DeviceTransform, ship_crops, uint8_crops

    rng = np.random.default_rng(width)
    img = Image.fromarray(rng.integers(0, 256, (40, width, 3), dtype=np.uint8))
    shipped = uint8_crops(img, CropSpec("ten", 40, 32))
    assert shipped.dtype == torch.uint8 and shipped.shape == (ship_crops(CropSpec("ten", 40, 32)), 3, 32, 32)
    ref = T.Compose([T.Resize(40), T.TenCrop(32), T.Lambda(lambda cs: torch.stack([T.ToTensor()(c) for c in cs])),
                     T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(img)
    assert torch.equal(DeviceTransform(CropSpec("ten", 40, 32))(shipped.unsqueeze(0))[0], ref)
    assert torch.equal(ImageTransform(CropSpec("ten", 40, 32))(img), ref)
