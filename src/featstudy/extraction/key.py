"""The embedding key: a hash of exactly what changes the numbers.

Hashed (``key_fields``): the extraction format version (:data:`FORMAT_VERSION`, bumped when the code's numerics
change), the model name, its node -> layer table, the weights (enum name + checkpoint file name, file sha256, or
``random`` + seed), the preprocessing, the crops (name, resize, size), the pooling, the numeric precision
(``trainer.precision``), and the dataset's identity: name, split, and a fingerprint of its classes, relative image
paths, labels and content hashes (sha256 of each file's bytes, :mod:`featstudy.datasets.fingerprint`; imagenet_val:
also its class choice). Any edit to an image, even one that keeps its size and mtime, gives another key; the same
files copied elsewhere give the same key. A stat memo under ``<paths.cache_dir>/fingerprints/`` spares re-reading
unchanged files (keyed on inode, size, mtime and ctime, which no user call can set back).

Not hashed: batch size, workers, devices, strategy, number of nodes, the spelling of ``dataset.root`` or the cache
location (the same data under another path is the same embedding), and the featstudy version (recorded in
meta.json). fp32 results on different devices or batch sizes agree to float rounding (~1e-6 relative), which the key
deliberately ignores.
"""

from __future__ import annotations

import hashlib
import json

#: Bump when a code change alters extracted numbers, so old caches stop matching.
FORMAT_VERSION = 1


def key_of(fields: dict, prefix: str) -> str:
    """``<prefix>-<first 16 hex of sha256(canonical JSON of fields)>``."""
    blob = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
    return f"{prefix}-{digest}"
