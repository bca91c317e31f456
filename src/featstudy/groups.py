"""Config groups build what they describe: ``conf/<group>/*.yaml`` carries ``_target_``, :func:`build` instantiates it.

=============  ===============================================  ===============================================
group          ``_target_``                                     what it validates, and its cache-key fields
=============  ===============================================  ===============================================
``dataset``    :class:`featstudy.datasets.CUB200` (one class     split, root, download, max_pixels;
               per dataset, torchvision style)                   ``key_fields()``: name, split, content fingerprint
``model``      :class:`featstudy.models.TorchvisionModel`,       name, nodes, weights, preprocessing;
               :class:`featstudy.models.timm_source.TimmModel`   ``key_fields()``: those, with the weights' hash
``crops``      :class:`featstudy.transforms.CropSpec`            name, resize, size (size <= resize)
``pooling``    :class:`featstudy.pooling.Pooling`                name (avg | max)
=============  ===============================================  ===============================================

Each object checks its own fields when it is built and raises a one-line :class:`~featstudy.errors.ConfigError`
naming the key (``crops.size``, ``dataset.split`` ...). :func:`build` is ``hydra.utils.instantiate`` plus what a
user needs from it: Hydra's ``InstantiationException`` is unwrapped (the object's own one-line error reaches the
CLI, exit 2), a key the object does not take is named with the keys it does take, and a ``_target_`` that cannot
be imported is named.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from featstudy.errors import ConfigError, FeatstudyError

#: the groups built with :func:`build` (and the attribute of the root config that holds each)
GROUPS = ("dataset", "model", "crops", "pooling")


def _accepted(target: Any) -> list[str]:
    """The keyword arguments ``target`` takes (its ``__init__`` for a class), for the unknown-key message."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "transform"]


def _target_of(node: Any) -> Any:
    """The class or function ``node._target_`` names (``module.path.Name``), imported without Hydra's logging."""
    import importlib

    module, _, attr = str(node.get("_target_")).rpartition(".")
    if not module:
        raise ImportError("not a dotted name module.Name")
    try:
        return getattr(importlib.import_module(module), attr)
    except AttributeError:
        raise ImportError(f"{module} has no {attr}") from None


def build(node: Any, group: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` for the config group ``group``, with one-line errors.

    Parameters
    ----------
    node : DictConfig or Mapping
        ``cfg.<group>``, which must carry ``_target_``.
    group : str
        The group's name, used in messages (``dataset``, ``model``, ``crops``, ``pooling``).
    kwargs
        Arguments that are not configuration (a dataset's ``transform``).

    Raises
    ------
    ConfigError
        ``<group>: missing``, ``<group>._target_`` missing or not importable, ``<group>.<key>`` not a setting of the
        target; any :class:`~featstudy.errors.FeatstudyError` the object raises itself passes through unchanged.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    if node is None:
        raise ConfigError(f"{group}: missing config group; choose one, e.g. {group}=<name> (conf/{group}/)")
    if not isinstance(node, DictConfig):
        node = OmegaConf.create(dict(node))
    if not node.get("_target_"):
        raise ConfigError(f"{group}._target_: not set; a {group} config names the class it builds "
                          f"(see conf/{group}/*.yaml)")
    try:
        target = _target_of(node)
    except Exception as exc:  # noqa: BLE001 - ImportError and whatever importing the module raised
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{group}._target_: cannot import {node.get('_target_')!r} ({reason}); use one of "
                          f"conf/{group}/*.yaml") from None
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, FeatstudyError):
            raise cause from None
        if isinstance(cause, TypeError):
            bad = re.search(r"unexpected keyword argument '([^']+)'", str(cause))
            if bad:
                raise ConfigError(f"{group}.{bad.group(1)}: not a setting of {node.get('_target_')}; its settings "
                                  f"are {_accepted(target)}") from None
        raise ConfigError(f"{group}: cannot build {node.get('_target_')}: "
                          f"{str(cause or exc).splitlines()[0] if str(cause or exc) else type(exc).__name__}") from None
