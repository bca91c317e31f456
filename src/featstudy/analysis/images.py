"""Images for figures 2 and 3: most activating images of a feature, cropped to its receptive field.

The rows of an embedding map back to images through ``paths.txt`` (relative to the dataset root recorded in
``meta.json``). As in the paper, the most activating images are taken from the ImageNet validation embedding when
one made by the same network (same feature names, model, weights, crops and pooling) is cached; otherwise from the
analysed dataset.

Receptive fields: for a conv feature, the crop is the receptive field (paper Fig. 2) of the position where the
feature's map peaks in the centre crop, computed from VGG19's layer geometry (:func:`receptive_fields`, owned by
:mod:`featstudy.models.vgg19`) when the network can be rebuilt from the embedding's meta
(:mod:`featstudy.extraction`); fc features see the whole image. For ``model=timm`` and ``model=open_clip`` the
receptive field of every position of a 4-D node is measured on the rebuilt network
(:mod:`featstudy.models.receptive_field`); token and flat features (an open_clip ViT's blocks, a ResNet tower's
attention pool) see the whole image.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from featstudy.store import Embedding, EmbeddingError, is_complete, load_embedding, read_items

log = logging.getLogger(__name__)

THUMB = 96

def receptive_fields() -> dict[str, tuple[int, int, float]]:
    """``layer -> (size, jump, start)`` of VGG19's conv layers: :func:`featstudy.models.vgg19.receptive_fields`,
    which owns the network's geometry (read from torchvision's own modules)."""
    from featstudy.models import vgg19

    return vgg19.receptive_fields()


def rf_box(layer: str, y: int, x: int, image_size: int) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of the receptive field of map position (y, x), clipped to the image."""
    rf = receptive_fields().get(layer)
    if rf is None:
        return None
    size, jump, start = rf
    cy, cx = start + y * jump, start + x * jump
    half = size / 2
    top, left = max(0, int(round(cy - half))), max(0, int(round(cx - half)))
    bottom, right = min(image_size, int(round(cy + half))), min(image_size, int(round(cx + half)))
    return (top, left, bottom, right)


def _dataset_meta(meta: dict) -> dict:
    ds = meta.get("dataset")
    return ds if isinstance(ds, dict) else {"name": ds}


def dataset_name(meta: dict) -> str | None:
    return _dataset_meta(meta).get("name")


def _same_network(a: dict, b: dict) -> bool:
    # weights_seed: two ``random`` embeddings share the tag "random" but are different networks unless seeded alike
    for key in ("model", "nodes", "weights", "weights_seed", "weights_sha256", "preprocessing", "crops", "pooling"):
        if key in a and key in b and a[key] != b[key]:
            return False
    return True


def find_imagenet_embedding(emb: Embedding) -> Embedding | None:
    """A cached ``imagenet_val`` embedding made by the same network as ``emb``, or None."""
    if dataset_name(emb.meta) == "imagenet_val":
        return emb
    root = emb.path.parent
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder == emb.path or not is_complete(folder):
            continue
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if dataset_name(meta) != "imagenet_val" or not _same_network(meta, emb.meta):
            continue
        try:
            if read_items(folder / "feature_names.txt") != emb.feature_names:
                continue
            return load_embedding(folder)
        except (OSError, EmbeddingError) as exc:  # a damaged entry is rebuilt by its own run, never shown here
            log.warning("figures: the ImageNet validation embedding %s is not used: %s", folder,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return None


def _thumb(img: Any, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    from PIL import Image

    if box is not None:
        top, left, bottom, right = box
        img = img.crop((left, top, right, bottom))
    img = img.resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    return np.asarray(img)


def _center_square(img: Any, size: int, resize: int | None = None, interpolation: str = "bilinear") -> Any:
    """Shorter side -> ``resize`` (default ``size``) with ``interpolation`` (the extraction's ``crops.interpolation``),
    then the centre ``size`` x ``size`` crop (as extraction).

    torchvision's own resize and centre crop, as :class:`featstudy.transforms.ImageTransform` uses them: the longer
    side is truncated (``int``), the offset is ``round((w - size) / 2)``, so the square is the pixels the network saw
    (rounding the side or flooring the offset shifts it by a pixel and the receptive-field box with it).
    """
    import torchvision.transforms.functional as TF

    img = TF.resize(img, resize or size, interpolation=TF.InterpolationMode(interpolation), antialias=True)
    return TF.center_crop(img, [size, size])


class ImageSource:
    """Most activating images of a feature, and the images of the analysed dataset, as small RGB arrays."""

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.emb: Embedding = ctx.embedding
        self.source: Embedding = find_imagenet_embedding(self.emb) or self.emb
        self.from_imagenet = dataset_name(self.source.meta) == "imagenet_val"
        self.description = ("activating images from the ImageNet validation embedding" if self.from_imagenet
                            else f"activating images from {ctx.dataset}")
        self._warned = False
        self._locator = None

    def _open(self, emb: Embedding, row: int) -> Any | None:
        from featstudy.analysis import image_io

        img = image_io.open_row(emb, row)
        if img is None and not self._warned:
            self._warned = True
            log.warning("figures 2/3: images of %s cannot be opened (dataset root %s); their cells stay empty",
                        dataset_name(emb.meta), _dataset_meta(emb.meta).get("root"))
        return img

    def _accelerator(self) -> Any:
        """``trainer.accelerator`` of the run's config (``ctx.extra["cfg"]``), or None (auto) without one."""
        cfg = (getattr(self.ctx, "extra", None) or {}).get("cfg")
        trainer = cfg.get("trainer") if hasattr(cfg, "get") else None
        return trainer.get("accelerator") if hasattr(trainer, "get") else None

    def dataset_image(self, row: int) -> np.ndarray | None:
        img = self._open(self.emb, row)
        return None if img is None else _thumb(img)

    def top_rows(self, feature_name: str, n: int) -> list[int]:
        """Rows of the source embedding with the ``n`` largest values of the feature."""
        col = self.source.feature_names.index(feature_name)
        values = np.asarray(self.source.features[:, col])
        return [int(r) for r in np.argsort(-values, kind="stable")[:n]]

    def top_images_many(self, feature_names: list[str], n: int) -> dict[str, list[np.ndarray | None]]:
        """Most activating images of several features, cropped to their receptive fields in one batched pass."""
        from featstudy.analysis import image_io

        resize, size = image_io.centre_crop_geometry(self.source)
        interpolation = image_io.crop_interpolation(self.source)
        rows = {name: self.top_rows(name, n) for name in feature_names}
        unique = sorted({r for rs in rows.values() for r in rs})
        opened = {r: self._open(self.source, r) for r in unique}
        index = {r: i for i, r in enumerate(unique)}
        images = [opened[r] for r in unique]
        measure = image_io.model_source(self.source) in image_io.MEASURED  # 4-D nodes known once the net is built
        requests = []
        for name, rs in rows.items():
            layer, channel = name.rsplit(":", 1)[0], int(name.rsplit(":", 1)[1])
            if measure or layer in receptive_fields():
                requests += [(index[r], layer, channel) for r in rs if opened[r] is not None]
        try:  # the network runs where trainer.accelerator says, and is released once the peaks are found
            peaks = image_io.peak_positions(self.source, images, requests, accelerator=self._accelerator()) \
                if requests else {}
        finally:
            image_io.release_network()
        measured = image_io.measured_receptive_fields(self.source) if measure else {}
        out = {}
        for name, rs in rows.items():
            layer, channel = name.rsplit(":", 1)[0], int(name.rsplit(":", 1)[1])
            cells = []
            for r in rs:
                img = opened[r]
                if img is None:
                    cells.append(None)
                    continue
                square = _center_square(img, size, resize, interpolation)
                pos = (peaks or {}).get((index[r], layer, channel))
                cells.append(_thumb(square, None if pos is None else self._box(layer, pos, size, measured, measure)))
            out[name] = cells
        return out

    @staticmethod
    def _box(layer: str, pos: tuple[int, int], size: int, measured: dict,
             is_measured: bool) -> tuple[int, int, int, int] | None:
        """The receptive field of map position ``pos`` of ``layer`` on the ``size`` px square: measured for a timm or
        open_clip node (``is_measured``; :func:`featstudy.models.receptive_field.box`; None, the whole image, for a
        node not measured), VGG19's geometry otherwise (:func:`rf_box`)."""
        if is_measured:
            from featstudy.models.receptive_field import box

            return box(measured[layer], *pos) if layer in measured else None
        return rf_box(layer, pos[0], pos[1], size)


def activation_source(ctx: Any) -> ImageSource:
    return ImageSource(ctx)
