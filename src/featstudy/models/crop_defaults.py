"""``crops.size``, ``crops.resize`` and ``crops.interpolation`` by default: the model's own evaluation geometry.

The crop groups (``conf/crops/{ten,center,none}.yaml``) write their numbers as ``${crop_default:size}``,
``${crop_default:resize}`` and ``${crop_default:interpolation}``; this resolver reads ``model._target_``,
``model.name``, ``model.weights`` and ``model.kwargs`` from the composed config and returns:

* ``model=vgg19`` / ``model=torchvision`` (any target other than the two below): 224, 256 and ``bilinear``, the
  paper's numbers, exactly as the groups wrote them before (same values, same cache key);
* ``model=timm``: the data configuration of the weights' pretrained tag (timm's ``resolve_data_config``; for random
  weights and files, of the name's default tag): ``input_size`` (3, S, S) gives the size S (``model.kwargs.img_size``
  wins: a model built for another size takes only that one), ``crop_pct`` p gives the resize
  :math:`R = \\lfloor S / p \\rfloor` (timm's ``scale_size``; p = 1 gives R = S), ``interpolation`` the interpolation;
* ``model=open_clip``: the tower's ``image_size`` S, resize R = S (open_clip's ``shortest`` resize mode: shorter side
  to S, centre crop S, a crop fraction of 1), and the interpolation of the tag's configuration, else of the
  architecture's ``preprocess_cfg``, else open_clip's default (``bicubic``).

The resize follows the size actually used: with ``crops.size=S'`` on the command line, a timm model's resize is
:math:`\\lfloor S' / p \\rfloor` (torchvision models keep 256). Any of the three keys set on the command line replaces
its interpolation, so the user's value always wins. An interpolation other than bilinear or bicubic (timm's
``lanczos``, ``nearest``) is refused in one line that says to set ``crops.interpolation``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from featstudy.errors import ConfigError

#: what every torchvision model gets (paper §3.2: shorter side 256, crops of 224, bilinear with antialiasing)
TORCHVISION_CROPS = {"size": 224, "resize": 256, "interpolation": "bilinear"}
WHATS = ("size", "resize", "interpolation")


def _source(target: str) -> str:
    last = target.rpartition(".")[2]
    return {"TimmModel": "timm", "OpenClipModel": "open_clip"}.get(last, "torchvision")


def _img_size(kwargs: Any) -> int | None:
    """``model.kwargs.img_size`` as one side (an int, or a square [S, S]), else None."""
    size = kwargs.get("img_size") if hasattr(kwargs, "get") else None
    if size is None or isinstance(size, int):
        return size
    side = list(size) if not isinstance(size, str) and hasattr(size, "__iter__") else [size]
    if len(side) != 2 or side[0] != side[1] or not isinstance(side[0], int):
        raise ConfigError(f"model.kwargs.img_size: {size!r} is not one square side; featstudy's crops are square: "
                          "set crops.size (and crops.resize) yourself")
    return side[0]


@lru_cache(maxsize=32)
def model_geometry(source: str, name: str, weights: str, img_size: int | None) -> tuple[int | None, float, str]:
    """(input size S, crop fraction p, interpolation) of a timm or open_clip model's evaluation transform (module
    docstring); ``img_size``: ``model.kwargs.img_size`` of a timm model, which replaces S. S is None for a
    non-square input (timm's ``input_size`` (3, H, W), H != W)."""
    if source == "timm":
        from featstudy.models.timm_weights import timm_data_config, timm_tag

        data = timm_data_config(name, timm_tag(name, weights) if weights else None)
        height, width = (int(v) for v in data["input_size"][-2:])
        size = img_size or (width if height == width else None)  # None: not square, crops.size must be set
        crop_pct, interpolation = float(data["crop_pct"]), str(data["interpolation"])
    elif source == "open_clip":
        size, crop_pct, interpolation = open_clip_geometry(name, weights)
    else:
        raise ValueError(f"model_geometry: {source!r} is not timm or open_clip")
    return size, crop_pct, interpolation


def open_clip_geometry(name: str, weights: str) -> tuple[int, float, str]:
    """(image size, 1.0, interpolation) of an open_clip tower: the tag's ``interpolation`` when ``weights`` is a
    pretrained tag, else the architecture config's ``preprocess_cfg``, else ``bicubic`` (open_clip's default).
    The resize mode (``shortest``, ``squash``, ``longest``) is not mapped: the crop group decides the geometry."""
    from featstudy.models import open_clip_source as ocs
    from featstudy.models.weights import _looks_like_file

    own = dict(ocs.model_config(name).get("preprocess_cfg") or {})
    spec = str(weights or "").strip()
    if spec and spec != "random" and not _looks_like_file(spec):
        import open_clip

        own.update({k: v for k, v in (open_clip.get_pretrained_cfg(name, spec) or {}).items()
                    if k == "interpolation"})
    return ocs.image_size(name), 1.0, str(own.get("interpolation") or "bicubic")


def crop_default(what: str, model: Any, size: Any = None) -> int | str:
    """The default of ``crops.<what>`` (``size``, ``resize`` or ``interpolation``) for the model config ``model``
    (None: no model, torchvision's). ``size``: the crop size actually used, from which the resize follows.

    Raises
    ------
    ConfigError
        An interpolation featstudy does not implement, a non-square input; the model's own errors (unknown name,
        tag) as the model group raises them.
    """
    if what not in WHATS:
        raise ConfigError(f"crop_default: {what!r} is not one of {list(WHATS)}")
    model = model if model is not None and hasattr(model, "get") else {}
    source = _source(str(model.get("_target_") or ""))
    if source == "torchvision":
        return TORCHVISION_CROPS[what]
    weights = model.get("weights")
    img_size = _img_size(model.get("kwargs") or {}) if source == "timm" else None
    s, crop_pct, interpolation = model_geometry(source, str(model.get("name")),
                                                "" if weights is None else str(weights), img_size)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        size = None  # not a size: CropSpec names crops.size
    if s is None and (what == "size" or (what == "resize" and size is None)):
        raise ConfigError(f"crops.size: the input of {model.get('name')} is not square; featstudy's crops are: set "
                          "crops.size (and crops.resize) yourself")
    if what == "size":
        return s
    if what == "interpolation":
        from featstudy.transforms import INTERPOLATIONS

        if interpolation not in INTERPOLATIONS:
            where = "timm's data configuration" if source == "timm" else "open_clip's preprocessing"
            raise ConfigError(f"crops.interpolation: {where} of {model.get('name')} says {interpolation!r}, which "
                              f"featstudy does not implement; set crops.interpolation to one of {list(INTERPOLATIONS)}")
        return interpolation
    return math.floor((s if size is None else size) / crop_pct)


def _resolver(what: str, *, _parent_: Any, _root_: Any) -> int | str:
    """``${crop_default:<what>}`` in a crop group: :func:`crop_default` of the root's ``model`` and the group's own
    ``size`` (for ``resize``)."""
    model = _root_.get("model") if hasattr(_root_, "get") and _root_ is not _parent_ else None
    size = _parent_.get("size") if what == "resize" else None
    return crop_default(str(what), model, size)
