"""The smallest crop a model accepts, found before any image is read (:func:`check_crop_size`)."""

from __future__ import annotations

from typing import Any

from featstudy.errors import ConfigError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_crop_size(cfg: Any) -> None:
    """Refuse a ``crops.size`` too small for the model, before any image is read.

    The smallest size is not a table: the model's architecture (no weights) runs once on an empty tensor of that
    size on PyTorch's ``meta`` device, up to the nodes read, which costs milliseconds. VGG19's five 2x2 max-pools
    need 32 px; ResNets accept any size. When that pass fails the smallest size that passes is searched and
    named. Unknown models or nodes are left to :func:`featstudy.models.spec`, which names them.
    """
    if "crops" not in cfg or "model" not in cfg or not _is_int(cfg.crops.get("size")):
        return
    size = int(cfg.crops.size)
    runs = _meta_forward(cfg.model)
    if runs is None or runs(size):
        return
    why = runs.error
    low, high = size, None
    probe = max(size, 1) * 2
    while probe <= 8192:
        if runs(probe):
            high = probe
            break
        low, probe = probe, probe * 2
    if high is None:
        if runs(224):  # a model that takes one size only (e.g. a ViT)
            raise ConfigError(f"crops.size={size} is not accepted by {cfg.model.name} ({why}); it takes "
                              "crops.size=224")
        return  # no size works: not a size problem, the extraction reports it
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if runs(mid) else (mid, high)
    raise ConfigError(f"crops.size={size} is too small for {cfg.model.name} read at these model.nodes: its layers "
                      f"need crops of at least {high} px; set crops.size>={high} (and crops.resize>=crops.size)")


def _meta_forward(cfg_model: Any) -> Any:
    """A function ``size -> bool``: does the model's graph (up to the nodes read) accept a ``size`` x ``size``
    image? None when the model or its nodes are not valid (reported elsewhere), and for a source other than
    torchvision (``model=timm`` checks the size with its own probe when it is built)."""
    target = str(cfg_model.get("_target_") or "featstudy.models.TorchvisionModel")
    if target.rpartition(".")[2] not in ("TorchvisionModel", "ModelSpec"):
        return None
    try:
        import torch
        import torchvision.models as tvm
        from torchvision.models.feature_extraction import create_feature_extractor

        from featstudy.models import vgg19

        name = str(cfg_model.get("name", "vgg19"))
        nodes = cfg_model.get("nodes")
        if nodes is None and name != "vgg19":
            return None
        return_nodes = vgg19.return_nodes() if nodes is None else {str(n): str(n) for n in nodes}
        with torch.device("meta"):
            net = tvm.get_model(name, weights=None)
        body = create_feature_extractor(net.eval(), return_nodes=return_nodes).eval()
    except Exception:  # noqa: BLE001 - an unknown model or node: models.spec names it
        return None

    def runs(size: int) -> bool:
        try:
            with torch.no_grad():
                body(torch.zeros(1, 3, size, size, device="meta"))
            return True
        except Exception as exc:  # noqa: BLE001 - any failure of the shapes: the message is kept for the user
            runs.error = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            return False

    runs.error = ""
    return runs
