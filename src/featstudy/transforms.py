"""Image decoding, crops and normalisation (paper §3.2): PIL image -> (n_crops, 3, size, size) float32 tensor.

Every image is decoded with PIL and converted with ``.convert("RGB")`` whatever its mode (L, P, RGBA, CMYK, I;16…),
then resized on the PIL image (bilinear with antialiasing, as torchvision's weight transforms do):

* ``crops=ten`` (the paper's): shorter side -> ``crops.resize``; the four corners and the centre at ``crops.size``
  and their horizontal mirrors (torchvision's ``TenCrop`` order).
* ``crops=center``: shorter side -> ``crops.resize``; the centre crop at ``crops.size``.
* ``crops=none``: the whole image resized to ``crops.size`` x ``crops.size`` (aspect ratio not kept; ``resize``
  unused).

Normalisation follows the weights' source (``model.preprocessing``):

* ``torchvision``: RGB in [0, 1], minus ImageNet mean, divided by ImageNet std.
* ``caffe``: BGR in [0, 255], minus the Caffe VGG mean pixel (B, G, R) = (103.939, 116.779, 123.68).

The result equals torchvision's ``Resize -> TenCrop -> ToTensor -> Normalize`` (tested to 1e-5 relative); the crops
are cut from one tensor instead of ten PIL images, which is the same arithmetic and faster.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from featstudy.errors import ConfigError

CROPS = {"ten": 10, "center": 1, "none": 1}
PREPROCESSING = ("torchvision", "caffe")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class DecompressionBombError(OSError):
    """An image with more pixels than ``dataset.max_pixels`` (PIL's ``Image.MAX_IMAGE_PIXELS`` by default): skipped
    and listed in ``skipped.txt``, never decoded."""


def load_rgb(path, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file fully (a truncated file raises here, not later) and convert it to RGB."""
    return load_rgb_and_mode(path, max_pixels)[0]


def load_rgb_and_mode(path, max_pixels: int | None = None) -> tuple[Image.Image, str]:
    """:func:`load_rgb` and the file's original PIL mode (``L``, ``CMYK``, ``P``...), counted in meta.json.

    The format is found from the file's content, not its name (a GIF named ``.jpg`` is read as the GIF it is, mode
    ``P``). An image of more than ``max_pixels`` pixels (``None``: PIL's ``Image.MAX_IMAGE_PIXELS``, 89,478,485) raises
    :class:`DecompressionBombError` after reading only its header: PIL's ``DecompressionBombWarning`` (above the
    limit) and ``DecompressionBombError`` (above twice the limit) both become that error, never a silent decode.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    saved = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = limit  # PIL's own header check at open() uses this module global
            img = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DecompressionBombError(f"{exc} (dataset.max_pixels={limit}; raise it to read this image)") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    with img:
        w, h = img.size
        if limit is not None and w * h > limit:  # formats whose plugin skips PIL's check
            raise DecompressionBombError(f"image of {w}x{h} = {w * h} pixels exceeds dataset.max_pixels={limit}; "
                                         "raise it to read this image")
        img.load()
        return to_rgb(img), img.mode


def to_rgb(img: Image.Image) -> Image.Image:
    """``.convert("RGB")`` for every mode; 16/32-bit integer and float modes are first scaled to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 65535.0 * 255.0
        elif img.mode == "I":
            arr = arr / max(float(arr.max()), 1.0) * 255.0 if arr.max() > 255 else arr
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


@dataclass(frozen=True)
class CropSpec:
    """``crops.*``: the name, the shorter-side resize and the crop size."""

    name: str = "ten"
    resize: int | None = 256
    size: int = 224

    @property
    def n_crops(self) -> int:
        return CROPS[self.name]

    def key_fields(self) -> dict:
        return {"name": self.name, "resize": None if self.name == "none" else self.resize, "size": self.size}


def crop_spec(cfg) -> CropSpec:
    """Validate ``crops`` (a mapping with name, resize, size) early, with one-line errors."""
    name = str(cfg.get("name", "ten"))
    if name not in CROPS:
        raise ConfigError(f"crops.name: {name!r} is not one of {list(CROPS)}")
    size = cfg.get("size")
    resize = cfg.get("resize")
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"crops.size: must be a positive integer, got {size!r}")
    if name != "none":
        if not isinstance(resize, int) or resize < 1:
            raise ConfigError(f"crops.resize: must be a positive integer for crops={name}, got {resize!r}")
        if size > resize:
            raise ConfigError(f"crops.size: {size} > crops.resize {resize}; a crop cannot be larger than the resized image")
    return CropSpec(name=name, resize=resize if name != "none" else None, size=size)


def check_preprocessing(name: str) -> str:
    if name not in PREPROCESSING:
        raise ConfigError(f"model.preprocessing: {name!r} is not one of {list(PREPROCESSING)}")
    return name


class ImageTransform:
    """PIL RGB image -> float32 tensor (n_crops, 3, size, size), normalised for the weights' source."""

    def __init__(self, crops: CropSpec, preprocessing: str = "torchvision"):
        self.crops = crops
        self.preprocessing = check_preprocessing(preprocessing)
        if preprocessing == "torchvision":
            self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        else:
            self.mean = torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
            self.std = None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        c = self.crops
        if img.mode != "RGB":
            img = to_rgb(img)
        if c.name == "none":
            img = TF.resize(img, [c.size, c.size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        else:
            img = TF.resize(img, c.resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        x = self.normalize(TF.to_tensor(img))  # 3 x H x W; elementwise, so normalising before cropping is exact
        if c.name == "ten":
            size = [c.size, c.size]
            return torch.stack([*TF.five_crop(x, size), *TF.five_crop(TF.hflip(x), size)])
        if c.name == "center":
            return TF.center_crop(x, [c.size, c.size]).unsqueeze(0).contiguous()
        return x.unsqueeze(0)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(3, H, W) RGB in [0, 1] -> the weights' input space."""
        if self.std is not None:
            return (x - self.mean[0]) / self.std[0]
        return x.flip(0) * 255.0 - self.mean[0]  # RGB -> BGR, 0-255, minus the mean pixel

    def __repr__(self) -> str:
        c = self.crops
        return f"ImageTransform(crops={c.name}, resize={c.resize}, size={c.size}, preprocessing={self.preprocessing})"
