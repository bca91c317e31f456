"""What an extraction will be, decided before any forward pass: :func:`plan` builds the config groups
(:func:`featstudy.groups.build`: ``model``, ``crops``, ``pooling``, ``dataset``, each validating itself), gathers
their cache-key fields and names the folder ``<paths.cache_dir>/embeddings/<key>/`` (:mod:`featstudy.extraction.key`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featstudy.errors import ConfigError
from featstudy.extraction.key import key_of

__all__ = ["Plan", "plan", "plan_precision"]


@dataclass
class Plan:
    """Everything decided before any forward pass: the config groups built (each validated itself, and each names
    its cache-key fields: ``key_fields``), the dataset, the key and the folder."""

    model: object
    crops: object
    pooling: str
    precision: str
    dataset: object
    key: str
    key_fields: dict
    folder: Path


def _get(cfg, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return default
        try:
            node = node.get(part) if hasattr(node, "get") else getattr(node, part)
        except Exception:  # noqa: BLE001 - missing keys read as default
            return default
    return default if node is None else node


def plan(cfg, dataset=None) -> Plan:
    """Validate ``cfg`` and compute the key without running the network. ``dataset``: the dataset already built
    from ``cfg.dataset`` (the app's pre-flight built it), so that its folder is listed once per run."""
    from featstudy.groups import build

    crops = build(_get(cfg, "crops"), "crops")
    pool = build(_get(cfg, "pooling"), "pooling")
    precision = plan_precision(cfg)
    ms = build(_get(cfg, "model"), "model")
    ds = build(_get(cfg, "dataset"), "dataset") if dataset is None else dataset
    if len(ds) == 0:
        raise ConfigError(f"dataset: {ds.describe()} holds no images")
    # content hashes of every image; the stat memo under the cache makes a repeat cost a stat per file
    memo_dir = Path(str(_get(cfg, "paths.cache_dir", ".cache/featstudy"))).expanduser().resolve() / "fingerprints"
    fields = {"model": ms.key_fields(), "crops": crops.key_fields(), "pooling": pool.key_fields(),
              "precision": precision, "dataset": ds.key_fields(memo_dir=memo_dir)}
    key = key_of(fields, prefix=f"{ms.name}-{ds.name}-{ds.split}")
    cache = Path(str(_get(cfg, "paths.cache_dir", ".cache/featstudy"))).expanduser()
    folder = cache.resolve() / "embeddings" / key
    return Plan(model=ms, crops=crops, pooling=pool.name, precision=precision, dataset=ds, key=key, key_fields=fields,
                folder=folder)


def plan_precision(cfg) -> str:
    """``trainer.precision`` in Lightning's current spelling (``32`` -> ``32-true``, ``bf16`` -> ``bf16-mixed``)."""
    precision = str(_get(cfg, "trainer.precision", "32-true"))
    return {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}.get(precision, precision)


