"""List a timm model's module names (the values ``model.nodes`` takes with ``model=timm``), one per line, with each
module's output shape for one crop, computed on PyTorch's meta device (no weights, no memory)::

    python -m featstudy.models.nodes convnext_atto
    python -m featstudy.models.nodes vit_small_patch14_dinov2 --size 224 img_size=224
    python -m featstudy.models.nodes --source open_clip ViT-B-32

``--source open_clip`` lists the modules of an open_clip architecture's image tower (``model.visual``), the values
``model.nodes`` takes with ``model=open_clip``; its default size is the tower's image size.

``--size`` is the crop size (default: the model's own input size); ``key=value`` arguments are passed to
``timm.create_model`` as ``model.kwargs`` would be (values read as YAML: ``img_size=224``, ``reg_tokens=4``).
A module without a shape is not run by the forward pass (or the meta pass failed: then names only).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    import torch
    import yaml

    from featstudy.models.timm_source import _timm

    ap = argparse.ArgumentParser(prog="python -m featstudy.models.nodes", description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a timm model name (an open_clip architecture with --source open_clip)")
    ap.add_argument("kwargs", nargs="*", help="key=value arguments of timm.create_model")
    ap.add_argument("--size", type=int, default=None, help="crop size (default: the model's input size)")
    ap.add_argument("--source", choices=("timm", "open_clip"), default="timm", help="model=timm (default) or open_clip")
    args = ap.parse_args(argv)
    if args.source == "open_clip":
        return _open_clip_nodes(args.name, args.size)
    timm = _timm()
    if not timm.is_model(args.name):
        print(f"{args.name!r} is not a timm model; e.g. {timm.list_models('*' + args.name.split('_')[0] + '*')[:8]}",
              file=sys.stderr)
        return 2
    kwargs = {}
    for item in args.kwargs:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"{item!r}: expected key=value")
        kwargs[key] = yaml.safe_load(value)
    with torch.device("meta"):
        net = timm.create_model(args.name, pretrained=False, **kwargs).eval()
    own = kwargs.get("img_size")
    own = own if isinstance(own, int) else (own[-1] if isinstance(own, (list, tuple)) and own else None)
    size = args.size or int(own or net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    shapes = _shapes(net, size)
    _print(args.name, net, size, shapes)
    return 0


def _shapes(net, size: int) -> dict:
    """Each module's output shape for one ``size`` crop on the meta device (empty when the pass fails)."""
    import torch

    from featstudy.models.timm_source import output_shapes

    try:
        shapes = output_shapes(net, torch.zeros(1, 3, size, size, device="meta"))
    except Exception as exc:  # noqa: BLE001 - names only
        print(f"# no shapes at {size} px: {(str(exc).splitlines() or [type(exc).__name__])[0][:160]}", file=sys.stderr)
        shapes = {}
    return shapes


def _print(title: str, net, size: int, shapes: dict) -> None:
    print(f"# {title} at {size} px: module, output shape (batch 1)")
    for name, _ in net.named_modules():
        if name:
            shape = shapes.get(name)
            print(name if shape is None else f"{name}\t{list(shape) if isinstance(shape, tuple) else shape}")


def _open_clip_nodes(name: str, size: int | None) -> int:
    """``--source open_clip``: the modules of ``name``'s image tower with their output shapes (meta device)."""
    from featstudy.errors import ConfigError
    from featstudy.models import open_clip_source as oc

    try:
        net = oc.build_visual(name, "meta").eval()
        size = size or oc.image_size(name)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    shapes = _shapes(net, size)
    _print(f"{name}.visual (open_clip)", net, size, shapes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
