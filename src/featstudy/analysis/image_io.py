"""Reading the image behind an embedding row, and where a conv feature peaks in it.

Kept apart from the plotting so that the extraction side (:mod:`featstudy.datasets`, :mod:`featstudy.models`,
:mod:`featstudy.transforms`) is touched in one place. Everything needed is in the embedding's ``meta.json``: the
dataset (name, root, split), the model, its weights source and the crops.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from featstudy.store import Embedding

log = logging.getLogger(__name__)


#: the dataset a run already built, by embedding folder (:func:`use_dataset`; one entry, the latest run's)
_GIVEN: dict[str, Any] = {}


def use_dataset(emb_path: str | Path, dataset: Any) -> None:
    """Let the figures open images through ``dataset``, the object the run built from ``cfg.dataset`` to extract
    the embedding at ``emb_path``, instead of building it again from meta.json (a second listing of the folder)."""
    _GIVEN.clear()
    _GIVEN[str(emb_path)] = dataset


def _dataset(emb_path: str) -> Any | None:
    """The dataset object that produced the embedding at ``emb_path``: the run's own (:func:`use_dataset`), else
    rebuilt from its meta.json description (:func:`_rebuilt`)."""
    given = _GIVEN.get(str(emb_path))
    return given if given is not None else _rebuilt(str(emb_path))


@lru_cache(maxsize=4)
def _rebuilt(emb_path: str) -> Any | None:
    """The dataset rebuilt from the embedding's meta.json description (:func:`featstudy.datasets.rebuild`); None
    when it cannot be rebuilt."""
    import json

    meta = json.loads((Path(emb_path) / "meta.json").read_text(encoding="utf-8"))
    description = meta.get("dataset")
    if not isinstance(description, dict) or not description.get("name"):
        return None
    try:
        from featstudy import datasets

        return datasets.rebuild(description)
    except Exception as exc:  # noqa: BLE001 - the data may have moved; figures then show empty cells
        log.warning("figures: cannot open dataset %s at %s (%s)", description["name"], description.get("root"),
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


@lru_cache(maxsize=4)
def _sample_of_path(emb_path: str) -> dict[str, int]:
    """``{relative path: sample index}`` of the rebuilt dataset ({} when it cannot be rebuilt)."""
    ds = _dataset(emb_path)
    return {} if ds is None else {str(path): i for i, (path, _) in enumerate(ds.samples)}


def open_row(emb: Embedding, row: int) -> Any | None:
    """The RGB PIL image of row ``row`` of ``emb``, or None when the data cannot be read.

    Row ``row`` is the image ``paths.txt`` names on line ``row``, looked up by that path in the rebuilt dataset:
    rows and dataset samples fall out of step after the first skipped (unreadable) image, so the row number is
    never taken as a sample index. A path the dataset no longer holds gives None (an empty cell), never another
    image.
    """
    ds = _dataset(str(emb.path))
    if ds is None:
        return None
    sample = _sample_of_path(str(emb.path)).get(emb.paths[row])
    if sample is None:
        log.warning("figures: %s no longer holds %s (row %d of the embedding's paths.txt)", ds, emb.paths[row], row)
        return None
    try:
        return ds.image(sample)
    except Exception:  # noqa: BLE001 - unreadable image: an empty cell
        return None


def network_device(accelerator: Any = None) -> str:
    """Where the figures' network runs: ``cpu`` when ``trainer.accelerator`` is ``cpu`` (or names no CUDA device,
    e.g. ``mps``) or no GPU is visible, else ``cuda``. The embedding's meta records no accelerator: the caller passes
    the run's ``cfg.trainer.accelerator``."""
    import torch

    acc = str(accelerator if accelerator is not None else "auto").lower()
    if acc in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def release_network() -> None:
    """Drop the cached network (a VGG19 holds ~550 MB) and hand its GPU memory back; called once the figures that
    need it are drawn."""
    import sys

    _network.cache_clear()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _source_of(meta: dict) -> str:
    return str(((meta.get("key_fields") or {}).get("model") or {}).get("source", "torchvision"))


def model_source(emb: Embedding) -> str:
    """The embedding's model source (``torchvision``, ``timm``, ``open_clip``) from its key fields."""
    return _source_of(emb.meta)


def _crops_of(meta: dict) -> tuple[int, int, str]:
    """(resize, size, interpolation) of a meta's crops: the size defaults to 224, the resize to the size, the
    interpolation to ``bilinear`` (metas of bilinear crops, and every meta written before it was a setting)."""
    crops = meta.get("crops") or {}
    size = int(crops.get("size", 224))
    return int(crops.get("resize") or size), size, str(crops.get("interpolation", "bilinear"))


#: the sources whose 4-D nodes get measured receptive fields (:class:`featstudy.models.receptive_field.SpatialMaps`)
MEASURED = ("timm", "open_clip")

#: measured receptive fields of timm and open_clip embeddings' spatial maps, by embedding folder (kept after
#: release_network)
_FIELDS: dict[str, dict] = {}


def measured_receptive_fields(emb: Embedding) -> dict[str, Any]:
    """``{node: (rows, cols)}`` of a timm or open_clip embedding's 4-D nodes (:func:`featstudy.models.
    receptive_field.receptive_boxes`), measured when :func:`peak_positions` rebuilt its network; {} before or
    without it (and for a tower without 4-D nodes, e.g. an open_clip ViT read at its blocks)."""
    return _FIELDS.get(str(emb.path), {})


timm_receptive_fields = measured_receptive_fields  # its first name, when only timm maps were measured


def _spec_of(meta: dict, source: str) -> Any:
    """The model spec of the embedding's network, rebuilt from its meta (weights: the seed, the file or the tag)."""
    from featstudy import models

    kind = meta.get("weights_source")
    if kind == "random":
        weights = "random"
    elif kind in ("timm", "open_clip"):  # the tag (timm:<tag>, an open_clip tag), found in the local cache again
        weights = meta.get("weights")
    else:
        weights = meta.get("weights_path") or meta.get("weights")
    if source in MEASURED:
        fields = (meta.get("key_fields") or {}).get("model") or {}
        common = {"name": fields.get("name", meta.get("model")), "nodes": list((meta.get("nodes") or {}).keys()),
                  "token_pooling": fields.get("token_pooling", "cls"), "weights": weights,
                  "seed": meta.get("weights_seed") or 0, "preprocessing": meta.get("preprocessing")}
        if source == "open_clip":  # the image tower alone, from open_clip's architecture config of the recorded name
            from featstudy.models.open_clip_source import OpenClipModel

            return OpenClipModel(**common)
        from featstudy.models.timm_source import TimmModel

        return TimmModel(**common, kwargs=fields.get("kwargs"))
    name = meta.get("model", "vgg19")
    return models.TorchvisionModel(name=name, weights=weights, seed=meta.get("weights_seed") or 0,
                                   preprocessing=meta.get("preprocessing", "torchvision"),
                                   nodes=None if name == "vgg19" else list((meta.get("nodes") or {}).keys()))


@lru_cache(maxsize=2)
def _network(emb_path: str, device: str = "cpu") -> Any | None:
    """(body, transform, size, resize) rebuilt from the embedding's meta on ``device``, or None; ``body`` maps
    crops to ``{layer: map}``. Cached until :func:`release_network`. For ``model=timm`` and ``model=open_clip``
    the body gives the 4-D nodes (:class:`featstudy.models.receptive_field.SpatialMaps`), whose receptive fields
    are measured here once, on the CPU (:func:`measured_receptive_fields`)."""
    import json

    meta = json.loads((Path(emb_path) / "meta.json").read_text(encoding="utf-8"))
    source = _source_of(meta)
    if source not in ("torchvision", *MEASURED):
        log.info("figures: receptive fields are drawn for torchvision, timm and open_clip models; %s is a %s model",
                 meta.get("model"), source)
        return None
    try:
        from featstudy import models
        from featstudy.transforms import CropSpec, ImageTransform

        ms = _spec_of(meta, source)
        resize, size, interpolation = _crops_of(meta)
        model, _, _ = models.build(ms, str(meta.get("pooling", "avg")), size)
        if source in MEASURED:
            from featstudy.models.receptive_field import SpatialMaps, receptive_boxes

            model = SpatialMaps(model.body, model.layout).eval()
            _FIELDS[emb_path] = receptive_boxes(model, size)  # on the CPU, before the move (module docstring)
        else:
            model = model.body
        model = model.to(device)  # only to locate peaks for the figures; the numbers come from the embedding
        transform = ImageTransform(CropSpec("center", resize, size, interpolation), ms.preprocessing)
        return model, transform, size, resize
    except Exception as exc:  # noqa: BLE001 - e.g. pretrained weights not in the local cache
        log.warning("figures: cannot rebuild the network (%s); showing whole images instead of receptive fields",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def centre_crop_geometry(emb: Embedding) -> tuple[int, int]:
    """(resize, size) of the centre crop the receptive fields refer to."""
    return _crops_of(emb.meta)[:2]


def crop_interpolation(emb: Embedding) -> str:
    """The extraction's ``crops.interpolation``, with which the figures resize too: ``bilinear`` when the meta
    names none (metas of bilinear crops, and every meta written before it was a setting)."""
    return _crops_of(emb.meta)[2]


def peak_positions(emb: Embedding, images: list[Any], requests: list[tuple[int, str, int]],
                   batch_size: int = 16, accelerator: Any = None) -> dict[tuple[int, str, int], tuple[int, int]] | None:
    """Where each requested conv map peaks: ``{(image index, layer, channel): (y, x)}`` on the centre crop.

    One batched forward pass per ``batch_size`` images (each image once, whatever the number of features asking
    for it), on :func:`network_device` of ``accelerator`` (``cfg.trainer.accelerator``). None when the network
    cannot be rebuilt; layers without a spatial map are left out. The network stays cached until
    :func:`release_network`.
    """
    import torch

    net = _network(str(emb.path), network_device(accelerator))
    if net is None:
        return None
    body, transform, _, _ = net
    wanted: dict[int, list[tuple[str, int]]] = {}
    for i, layer, channel in requests:
        wanted.setdefault(i, []).append((layer, channel))
    order = sorted(wanted)
    out: dict[tuple[int, str, int], tuple[int, int]] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        x = torch.cat([transform(images[i]) for i in chunk]).to(next(body.parameters()).device)
        with torch.no_grad():
            maps = body(x)
        for b, i in enumerate(chunk):
            for layer, channel in wanted[i]:
                fmap = maps.get(layer)
                if fmap is None or fmap.ndim != 4:
                    continue
                m = fmap[b, channel]
                out[(i, layer, channel)] = divmod(int(torch.argmax(m)), int(m.shape[1]))
    return out
