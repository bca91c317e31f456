"""Config helpers shared by the CLI, the app and the report: resolvers, validation, flattening.

Nothing here knows about MLflow, torch or the statistics; it only reads and checks the composed Hydra config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from featstudy.errors import ConfigError


def _abspath(path: str) -> str:
    """``${abspath:rel}``: an absolute, normalised path (relative to the directory the command runs in)."""
    return str(Path(os.path.expanduser(str(path))).absolute())


def register_resolvers() -> None:
    """Register featstudy's OmegaConf resolvers (idempotent). Called on import of this module."""
    if not OmegaConf.has_resolver("abspath"):
        OmegaConf.register_new_resolver("abspath", _abspath)


register_resolvers()

#: Config groups whose ``name`` must be one of these (the extraction helper owns the files themselves).
ALLOWED_NAMES = {
    "crops": ("ten", "center", "none"),
    "pooling": ("avg", "max"),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is not allowed; {key} must be {allowed}")


def validate(cfg: DictConfig) -> None:
    """Check the keys the app relies on; raise :class:`ConfigError` naming the key and what is allowed."""
    a = cfg.analysis
    _check(a.bins is None or (_is_int(a.bins) and a.bins >= 2), "analysis.bins", a.bins,
           "an integer >= 2, or null for the exact statistic")
    _check(_is_int(a.permutations) and a.permutations >= 1, "analysis.permutations", a.permutations,
           "an integer >= 1")
    _check(_is_int(a.seed) and a.seed >= 0, "analysis.seed", a.seed, "a non-negative integer")
    layers = a.layers
    _check(layers is None or (isinstance(layers, (ListConfig, list)) and len(layers) > 0
                              and all(isinstance(x, str) for x in layers)),
           "analysis.layers", layers, "null (all layers) or a non-empty list of layer names, e.g. [conv5_4,fc7]")
    _check(a.chunk_size is None or (_is_int(a.chunk_size) and a.chunk_size >= 1), "analysis.chunk_size",
           a.chunk_size, "null or a positive integer")
    callbacks = a.get("callbacks")
    _check(callbacks is None or isinstance(callbacks, (DictConfig, Mapping)), "analysis.callbacks", callbacks,
           "a mapping of name -> {_target_: ...} blocks")
    if "loader" in cfg:
        _check(_is_int(cfg.loader.batch_size) and cfg.loader.batch_size >= 1, "loader.batch_size",
               cfg.loader.batch_size, "a positive integer")
        _check(_is_int(cfg.loader.num_workers) and cfg.loader.num_workers >= 0, "loader.num_workers",
               cfg.loader.num_workers, "a non-negative integer")
    for group, names in ALLOWED_NAMES.items():
        if group in cfg and "name" in cfg[group]:
            _check(cfg[group].name in names, f"{group}", cfg[group].name, "one of " + "|".join(names))
    if "crops" in cfg:
        for key in ("resize", "size"):
            if key in cfg.crops and cfg.crops[key] is not None:
                value = cfg.crops[key]
                _check(_is_int(value) and value >= 1, f"crops.{key}", value, "a positive integer")
        size, resize = cfg.crops.get("size"), cfg.crops.get("resize")
        if cfg.crops.get("name") != "none" and _is_int(size) and _is_int(resize) and size > resize:
            raise ConfigError(f"crops.size: {size} > crops.resize {resize}; a crop cannot be larger than the resized "
                              "image: lower crops.size or raise crops.resize")
    uri = cfg.tracking.uri
    _check(uri is None or (isinstance(uri, str) and ("://" in uri)), "tracking.uri", uri,
           "sqlite:///<path>/mlflow.db, http(s)://<server>, or null to disable tracking")


def resolve_paths(cfg: DictConfig) -> DictConfig:
    """Resolve the whole config once (in place) and make ``paths.*`` and ``dataset.root`` absolute.

    Called once at the start of a job, so later code never depends on the working directory and never
    re-resolves interpolations such as ``${now:...}``.
    """
    OmegaConf.resolve(cfg)
    with open_dict(cfg):
        for key, value in list(cfg.paths.items()):
            if isinstance(value, str):
                cfg.paths[key] = _abspath(value)
        if "dataset" in cfg and cfg.dataset.get("root") is not None:
            cfg.dataset.root = _abspath(cfg.dataset.root)
    return cfg


def flatten(cfg: DictConfig | Mapping, prefix: str = "", *, skip: tuple[str, ...] = ("hydra",)) -> dict[str, str]:
    """Flatten a resolved config to dotted keys (``analysis.bins`` -> ``"100"``); lists become their repr."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, Mapping):
            if not node and key:
                out[key] = "{}"
            for k, v in node.items():
                if not key and k in skip:
                    continue
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = "null" if node is None else (str(list(node)) if isinstance(node, (list, tuple)) else str(node))

    walk(container, prefix)
    return out



#: keys that do not change a job's results (left out of :func:`config_hash`)
HASH_EXCLUDE = ("paths.", "tracking.", "loader.num_workers", "task_name")


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved config without locations, tracking settings and worker counts: two jobs with the
    same hash compute the same results (used by ``tracking.resume``)."""
    import hashlib
    import json

    flat = {k: v for k, v in flatten(cfg).items() if not k.startswith(HASH_EXCLUDE)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()
