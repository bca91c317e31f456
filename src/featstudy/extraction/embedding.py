"""Images -> embedding folder: :func:`get_embedding`, cached by key, locked, resumable, DDP-ready.

Flow: :func:`featstudy.extraction.plan.plan` (the groups built, the key) -> ``<paths.cache_dir>/embeddings/<key>/``
with a DONE marker whose checksums hold is a cache hit (no forward pass) -> otherwise take the file lock
``<key>.lock`` (a second process wanting the same key waits, then reuses), and extract
(:func:`featstudy.extraction.extract.extract`: the images not yet in finished shards, merged on rank 0). Under
srun/torchrun the helper ranks do what rank 0 decides (:class:`featstudy.extraction.distributed.Decision`).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from featstudy.errors import DataError
from featstudy.extraction.plan import Plan, plan

log = logging.getLogger("featstudy.extraction")

__all__ = ["CACHE_WRITE_ERRNOS", "EmbeddingHandle", "env_rank", "get_embedding", "writing_cache"]


@dataclass
class EmbeddingHandle:
    """A finished embedding folder. ``hit`` is True when it was already there (no forward pass was run)."""

    path: Path
    key: str
    hit: bool
    meta: dict = field(default_factory=dict)
    weights_tag: str = ""


def env_rank(cfg=None) -> int:
    """Global rank of this process (0 when not distributed), from the cluster environment Lightning itself picks:
    an inherited ``SLURM_PROCID`` of an interactive shell, or Lightning's own multi-node launch (``NODE_RANK``),
    cannot make a helper believe it is rank 0 (:func:`featstudy.extraction.distributed.env_rank`)."""
    from featstudy.extraction.distributed import env_rank as _rank

    return _rank(cfg)


#: errno values meaning "this folder cannot take our files": full disk or quota, read-only, no permission, a file
#: where a folder should be
CACHE_WRITE_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM",
                                                                  "ENOTDIR", "EEXIST", "EFBIG") if hasattr(errno, name))


@contextmanager
def writing_cache(cache: Path) -> Iterator[None]:
    """Turn an ``OSError`` of :data:`CACHE_WRITE_ERRNOS` raised inside into a one-line :class:`DataError` naming the
    cache folder (the CLI exits 2). Whatever was cut short is never taken as done: shards and store files are
    renamed into place only when whole, and the DONE marker is written last."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in CACHE_WRITE_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise DataError(f"paths.cache_dir: cannot write the embedding cache under {cache}: {os.strerror(exc.errno)}"
                        f"{where}; free disk space or make it writable, or set paths.cache_dir to a writable folder "
                        "(finished shards are kept and resumed)") from exc


def _handle(p: Plan, hit: bool) -> EmbeddingHandle:
    import json

    meta = json.loads((p.folder / "meta.json").read_text(encoding="utf-8"))
    return EmbeddingHandle(path=p.folder, key=p.key, hit=hit, meta=meta, weights_tag=meta.get("weights", p.model.weights.tag))


def get_embedding(cfg, dataset=None) -> EmbeddingHandle:
    """The embedding of ``cfg``'s dataset by ``cfg``'s model: from the cache, or extracted now.

    Parameters
    ----------
    cfg : DictConfig
        The composed root config (groups ``model``, ``dataset``, ``crops``, ``pooling``, ``loader``, ``trainer``,
        ``paths``).
    dataset : ImageDataset, optional
        The dataset already built from ``cfg.dataset``; built here when absent.

    Returns
    -------
    EmbeddingHandle
        ``.path`` (``<paths.cache_dir>/embeddings/<key>/``), ``.key``, ``.hit``, ``.meta`` (meta.json) and
        ``.weights_tag`` (``random``, the enum name, or ``file:<sha256>``).

    Raises
    ------
    ConfigError, DataError
        With a one-line message naming the key or file, before any image is read where possible.
    """
    from featstudy.extraction import distributed as dist
    from featstudy.extraction.extract import extract
    from featstudy.store import damage, is_complete, move_aside

    p = plan(cfg, dataset)
    rank, timeout = env_rank(cfg), dist.ddp_timeout_s(cfg)
    # srun/torchrun start every rank themselves: the helpers do what rank 0 decides under the lock (reuse, extract
    # with every rank, or wait while rank 0 extracts alone), never enter DDP on their own (issue 16, item 8)
    decision = dist.Decision(p.folder, p.key) if dist.external_launch() else None
    if rank != 0 and decision is not None:
        action = decision.await_(timeout)["action"]
        if action == "alone":
            dist.await_done(p.folder, timeout)
        if action != "ddp":
            return _handle(p, hit=action == "hit")
    elif is_complete(p.folder) and damage(p.folder) is None:  # checked against DONE's checksums (store.damage)
        log.info("embedding %s: cache hit (%s)", p.key, p.folder)
        if rank == 0:
            shutil.rmtree(p.folder / "shards", ignore_errors=True)  # left if a run died between DONE and cleanup
            if decision is not None:
                decision.publish("hit")
        return _handle(p, hit=True)
    if rank != 0:  # a DDP child: rank 0 holds the lock and merges
        with writing_cache(p.folder.parent.parent):
            extract(cfg, p)
        return _handle(p, hit=False)
    from filelock import FileLock, Timeout

    with writing_cache(p.folder.parent.parent):
        p.folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(p.folder.parent / f"{p.key}.lock"))
        if decision is not None:
            decision.heartbeat(every_s=min(10.0, timeout / 3))  # the helpers see rank 0 alive until it decides
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("embedding %s: another process is extracting it; waiting for its lock", p.key)
            lock.acquire()
        try:
            if is_complete(p.folder):
                problem = damage(p.folder)
                if problem is None:
                    shutil.rmtree(p.folder / "shards", ignore_errors=True)
                    log.info("embedding %s: finished by another process, reusing %s", p.key, p.folder)
                    if decision is not None:
                        decision.publish("hit")
                    return _handle(p, hit=True)
                aside = move_aside(p.folder)  # never deleted: the user may want to look at it
                log.warning("embedding %s: damaged cache entry, %s: %s; moved aside to %s, extracting it again",
                            p.key, problem[0], problem[1], aside)
            extract(cfg, p, decision)
        finally:
            lock.release()
            if decision is not None:
                decision.stop()
    return _handle(p, hit=False)


