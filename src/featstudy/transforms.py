"""Image decoding, crops and normalisation (paper §3.2): PIL image -> (n_crops, 3, size, size) float32 tensor.

Every image is decoded with PIL and converted with ``.convert("RGB")`` whatever its mode (L, P, RGBA, CMYK, I;16…),
then resized on the PIL image with ``crops.interpolation`` (``bilinear``, as torchvision's weight transforms, or
``bicubic``, as most timm and open_clip models; PIL's resampling, antialiased, as ``torchvision.transforms.Resize``
on a PIL image):

* ``crops=ten`` (the paper's): shorter side -> ``crops.resize``; the four corners and the centre at ``crops.size``
  and their horizontal mirrors (torchvision's ``TenCrop`` order).
* ``crops=center``: shorter side -> ``crops.resize``; the centre crop at ``crops.size``.
* ``crops=none``: the whole image resized to ``crops.size`` x ``crops.size`` (aspect ratio not kept; ``resize``
  unused).

Normalisation follows the weights' source (``model.preprocessing``):

* ``torchvision``: RGB in [0, 1], minus ImageNet mean, divided by ImageNet std.
* ``caffe``: BGR in [0, 255], minus the Caffe VGG mean pixel (B, G, R) = (103.939, 116.779, 123.68).
* a mean/std pair ``{mean: [r, g, b], std: [r, g, b]}``: RGB in [0, 1], minus ``mean``, divided by ``std`` (the
  arithmetic of ``torchvision.transforms.Normalize``); a pair equal to ImageNet's is ``torchvision`` (same numbers,
  same key). ``model=timm`` takes its pair from the model's pretrained configuration (``timm``).

The work is split where it is cheapest to move: the loader (CPU workers) decodes, resizes and cuts **uint8** crops
(:func:`uint8_crops`: six for ``ten``, the mirrors are made later), and :class:`DeviceTransform` runs where the model
runs, mirroring and normalising them by table look-up. A ten-crop image crosses processes and the PCIe bus as
0.9 MB of uint8 instead of 6 MB of float32 at 224 px. :class:`ImageTransform` is the two in a row on the CPU.

The result equals torchvision's ``Resize(interpolation) -> TenCrop -> ToTensor -> Normalize`` bit for bit, on any
device (tested). The crops' numbers default to the model's own (:mod:`featstudy.models.crop_defaults`).
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
#: ``crops.interpolation``: the resize's resampling filter (torchvision's ``InterpolationMode`` values)
INTERPOLATIONS = ("bilinear", "bicubic")
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
    """``crops=ten|center|none`` (``conf/crops/*.yaml``, built by :func:`featstudy.groups.build`): the name, the
    shorter-side resize, the crop size and the resize's interpolation (``bilinear`` or ``bicubic``), validated when
    built (one-line errors naming ``crops.<key>``).

    ``none`` resizes the whole image to ``size`` x ``size``: its ``resize`` is unused and recorded as None."""

    name: str = "ten"
    resize: int | None = 256
    size: int = 224
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        name, size, resize = self.name, self.size, self.resize
        if name not in CROPS:
            raise ConfigError(f"crops.name: {name!r} is not one of {list(CROPS)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"crops.interpolation: {self.interpolation!r} is not one of {list(INTERPOLATIONS)}")
        if not _positive_int(size):
            raise ConfigError(f"crops.size: must be a positive integer, got {size!r}")
        if name == "none":
            object.__setattr__(self, "resize", None)
            return
        if not _positive_int(resize):
            raise ConfigError(f"crops.resize: must be a positive integer for crops={name}, got {resize!r}")
        if size > resize:
            raise ConfigError(f"crops.size: {size} > crops.resize {resize}; a crop cannot be larger than the resized "
                              "image: lower crops.size or raise crops.resize")

    @property
    def n_crops(self) -> int:
        return CROPS[self.name]

    def key_fields(self) -> dict:
        """name, resize, size; and the interpolation only when it is not ``bilinear``, so that the keys of every
        embedding made before the interpolation was a setting (all bilinear) are unchanged."""
        fields = {"name": self.name, "resize": None if self.name == "none" else self.resize, "size": self.size}
        if self.interpolation != "bilinear":
            fields["interpolation"] = self.interpolation
        return fields

    @property
    def interpolation_mode(self) -> TF.InterpolationMode:
        """``crops.interpolation`` as torchvision's ``InterpolationMode`` (its values are these names)."""
        return TF.InterpolationMode(self.interpolation)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def crop_spec(cfg) -> CropSpec:
    """``cfg.crops`` built into a :class:`CropSpec` (:func:`featstudy.groups.build`)."""
    from featstudy.groups import build

    return build(cfg, "crops")


def check_preprocessing(value) -> str | dict:
    """``model.preprocessing`` in its canonical form: ``torchvision``, ``caffe`` or ``{"mean": [3 floats], "std":
    [3 floats]}`` (a mapping, or its JSON text as safetensors metadata holds it). A pair equal to ImageNet's mean and
    std becomes ``torchvision``: the same numbers and the same cache key.

    Raises
    ------
    ConfigError
        An unknown name, a mapping without exactly ``mean`` and ``std``, not three numbers each, a std <= 0.
    """
    if isinstance(value, str) and value.strip().startswith("{"):
        import json

        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"model.preprocessing: {value!r} is not valid JSON ({exc})") from None
    if isinstance(value, str):
        if value not in PREPROCESSING:
            raise ConfigError(f"model.preprocessing: {value!r} is not one of {list(PREPROCESSING)} or a mean/std pair "
                              "{mean: [r, g, b], std: [r, g, b]}" + ("; timm is for model=timm" if value == "timm"
                                                                      else ""))
        return value
    from collections.abc import Mapping

    if not isinstance(value, Mapping):
        raise ConfigError(f"model.preprocessing: {value!r} is not one of {list(PREPROCESSING)} or a mean/std pair")
    pair = {str(k): v for k, v in value.items()}
    if set(pair) != {"mean", "std"}:
        raise ConfigError(f"model.preprocessing: a mean/std pair takes exactly the keys mean and std, got {sorted(pair)}")
    out = {}
    for k in ("mean", "std"):
        try:
            numbers = [float(v) for v in pair[k]]
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) != 3 or not all(np.isfinite(numbers)):
            raise ConfigError(f"model.preprocessing.{k}: three finite numbers (R, G, B), got {pair[k]!r}")
        out[k] = numbers
    if min(out["std"]) <= 0:
        raise ConfigError(f"model.preprocessing.std: must be > 0, got {out['std']}")
    if tuple(out["mean"]) == IMAGENET_MEAN and tuple(out["std"]) == IMAGENET_STD:
        return "torchvision"
    return out


def ship_crops(crops: CropSpec) -> int:
    """How many uint8 crops the loader ships per image: 6 for ``ten`` (the five crops, plus the source of the
    mirrored centre, which is not the centre's mirror when the resized width minus the crop size is odd: torchvision
    rounds the centre's offset half-to-even), 1 otherwise."""
    return 6 if crops.name == "ten" else 1


def resize_rgb(img: Image.Image, crops: CropSpec) -> Image.Image:
    """The PIL resize of every path: shorter side -> ``crops.resize`` (or the whole image -> size x size for
    ``crops=none``) with ``crops.interpolation``, antialiased, after :func:`to_rgb`."""
    if img.mode != "RGB":
        img = to_rgb(img)
    size = [crops.size, crops.size] if crops.name == "none" else crops.resize
    return TF.resize(img, size, interpolation=crops.interpolation_mode, antialias=True)


def uint8_crops(img: Image.Image, crops: CropSpec) -> torch.Tensor:
    """PIL image -> what the loader ships: ``(ship_crops, 3, size, size)`` uint8, cut from the resized image.

    ``ten``: top-left, top-right, bottom-left, bottom-right, centre (torchvision's ``five_crop`` order) and the
    region whose mirror is the tenth crop (``center_crop(hflip(x))`` flipped back); :class:`DeviceTransform` makes
    the ten crops from these six. A sixth of the bytes of today's ten fp32 crops per image: 0.9 MB instead of 6 MB
    at 224.
    """
    img = resize_rgb(img, crops)
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)  # (3, H, W), as to_tensor
    size = [crops.size, crops.size]
    if crops.name == "ten":
        mirrored_centre_source = TF.hflip(TF.center_crop(TF.hflip(x), size))
        return torch.stack([*TF.five_crop(x, size), mirrored_centre_source])
    if crops.name == "center":
        return TF.center_crop(x, size).unsqueeze(0).contiguous()
    return x.unsqueeze(0).contiguous()


def normalize(x: torch.Tensor, preprocessing: str | dict) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] (``to_tensor``'s ``uint8 / 255`` in float32) -> the weights' input space."""
    if isinstance(preprocessing, dict) or preprocessing == "torchvision":
        pair = preprocessing if isinstance(preprocessing, dict) else {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        mean = torch.tensor(pair["mean"]).view(3, 1, 1)
        std = torch.tensor(pair["std"]).view(3, 1, 1)
        return (x - mean) / std
    return x.flip(-3) * 255.0 - torch.tensor(CAFFE_MEAN_BGR).view(3, 1, 1)  # RGB -> BGR, 0-255, minus the mean pixel


class DeviceTransform(torch.nn.Module):
    """Shipped uint8 crops ``(B, ship_crops, 3, S, S)`` -> float32 ``(B, n_crops, 3, S, S)``, run where the model
    runs (inside ``predict_step``): mirrors for ``ten``, then normalisation by table look-up.

    The value of a normalised pixel depends only on its channel and its byte, so the 3 x 256 table is computed once
    on the CPU with exactly the float32 operations of ``to_tensor`` + :func:`normalize` (``v / 255``, then
    ``- mean``, ``/ std``; or ``* 255 - mean``) and the device only gathers from it: the crops are bit-identical to
    the CPU path's on any device (no reciprocal-multiply or fused arithmetic on the GPU can change a bit). Float
    inputs (already normalised crops) pass through unchanged.
    """

    def __init__(self, crops: CropSpec, preprocessing: str | dict = "torchvision"):
        super().__init__()
        self.crops = crops
        self.preprocessing = preprocessing = check_preprocessing(preprocessing)
        self.bgr = preprocessing == "caffe"
        byte = torch.arange(256, dtype=torch.uint8).to(torch.get_default_dtype()).div(255)  # to_tensor's arithmetic
        table = normalize(byte.view(1, 1, 256).expand(3, 1, 256).contiguous(), preprocessing)[:, 0, :]
        self.register_buffer("table", table.to(torch.float32).contiguous().view(-1), persistent=False)
        self.register_buffer("offsets", (torch.arange(3, dtype=torch.int32) * 256).view(3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        if self.crops.name == "ten":  # five_crop(hflip(x)) = mirrors of tr, tl, br, bl and the sixth region
            x = torch.cat([x[:, :5], x[:, [1, 0, 3, 2, 5]].flip(-1)], dim=1)
        if self.bgr:
            x = x.flip(-3)  # output channel c (B, G, R) reads input channel 2 - c, as normalize's flip
        idx = x.to(torch.int32) + self.offsets
        return self.table.index_select(0, idx.flatten()).view(x.shape)


class ImageTransform:
    """PIL RGB image -> float32 tensor (n_crops, 3, size, size), normalised for the weights' source: the loader's
    :func:`uint8_crops` followed by :class:`DeviceTransform`, on the CPU (the same code as an extraction)."""

    def __init__(self, crops: CropSpec, preprocessing: str | dict = "torchvision"):
        self.crops = crops
        self.preprocessing = check_preprocessing(preprocessing)
        self.device_transform = DeviceTransform(crops, preprocessing)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.device_transform(uint8_crops(img, self.crops).unsqueeze(0))[0]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(3, H, W) RGB in [0, 1] -> the weights' input space."""
        return normalize(x, self.preprocessing)

    def __repr__(self) -> str:
        c = self.crops
        return (f"ImageTransform(crops={c.name}, resize={c.resize}, size={c.size}, interpolation={c.interpolation}, "
                f"preprocessing={self.preprocessing})")
