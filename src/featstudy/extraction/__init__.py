"""Images -> embedding folder: :func:`get_embedding` (cached by key, resumable, locked, DDP-ready).

Modules: :mod:`~featstudy.extraction.plan` (the config groups built, the key, before any image is read),
:mod:`~featstudy.extraction.embedding` (cache hit, lock, resume), :mod:`~featstudy.extraction.extract` (Lightning's
predict loop, the merge, IEEE fp32), :mod:`~featstudy.extraction.module` (the LightningModule, loader and shard
writer), :mod:`~featstudy.extraction.shards`, :mod:`~featstudy.extraction.key`,
:mod:`~featstudy.extraction.distributed`.

Flow: validate the config (one-line errors) -> build the dataset and its fingerprint -> the key
(:mod:`featstudy.extraction.key`) -> ``<paths.cache_dir>/embeddings/<key>/`` with a DONE marker is a cache hit (no
forward pass) -> otherwise take the file lock ``<key>.lock`` (a second process wanting the same key waits, then
reuses), skip the images already in finished shards, run Lightning's predict loop (one shard per batch per rank),
merge on rank 0 into the store (:mod:`featstudy.store` layout, DONE last) and delete the shards.
"""

from __future__ import annotations

from featstudy.extraction.embedding import CACHE_WRITE_ERRNOS, EmbeddingHandle, env_rank, get_embedding, writing_cache
from featstudy.extraction.plan import Plan, plan, plan_precision

__all__ = ["CACHE_WRITE_ERRNOS", "EmbeddingHandle", "Plan", "env_rank", "get_embedding", "plan", "plan_precision",
           "writing_cache"]
