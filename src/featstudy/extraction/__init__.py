"""Images -> embedding folder: :func:`get_embedding` (cached by key, resumable, locked, DDP-ready).

Flow: validate the config (one-line errors) -> build the dataset and its fingerprint -> the key
(:mod:`featstudy.extraction.key`) -> ``<paths.cache_dir>/embeddings/<key>/`` with a DONE marker is a cache hit (no
forward pass) -> otherwise take the file lock ``<key>.lock`` (a second process wanting the same key waits, then
reuses), skip the images already in finished shards, run Lightning's predict loop (one shard per batch per rank),
merge on rank 0 into the store (:mod:`featstudy.store` layout, DONE last) and delete the shards.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from featstudy import __version__
from featstudy.errors import ConfigError, DataError
from featstudy.extraction.key import FORMAT_VERSION, key_of

log = logging.getLogger(__name__)

__all__ = ["EmbeddingHandle", "env_rank", "get_embedding", "plan"]


@dataclass
class EmbeddingHandle:
    """A finished embedding folder. ``hit`` is True when it was already there (no forward pass was run)."""

    path: Path
    key: str
    hit: bool
    meta: dict = field(default_factory=dict)
    weights_tag: str = ""


@dataclass
class Plan:
    """Everything decided before any forward pass: validated specs, the dataset, the key and the folder."""

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


def env_rank() -> int:
    """Global rank of this process from the launcher's environment (0 when not distributed): ``RANK`` (torchrun,
    Lightning), ``SLURM_PROCID`` (srun), then ``LOCAL_RANK`` (Lightning's subprocess DDP children)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


_env_rank = env_rank


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


def plan(cfg) -> Plan:
    """Validate ``cfg`` and compute the key without running the network."""
    from featstudy import datasets, models, pooling
    from featstudy.transforms import crop_spec

    for group in ("model", "dataset", "crops", "pooling"):
        if _get(cfg, group) is None:
            raise ConfigError(f"{group}: missing config group")
    crops = crop_spec(cfg.crops)
    pool = pooling.check(str(_get(cfg, "pooling.name", "avg")))
    precision = plan_precision(cfg)
    ms = models.spec(cfg.model)
    ds = datasets.from_config(cfg.dataset)
    if len(ds) == 0:
        raise ConfigError(f"dataset: {ds.describe()} holds no images")
    # content hashes of every image; the stat memo under the cache makes a repeat cost a stat per file
    memo_dir = Path(str(_get(cfg, "paths.cache_dir", ".cache/featstudy"))).expanduser().resolve() / "fingerprints"
    data_fields = {"name": ds.name, "split": ds.split, "fingerprint": ds.fingerprint(memo_dir=memo_dir)}
    if ds.name == "imagenet_val":
        data_fields.update(n_classes=ds.n_classes, class_seed=ds.class_seed)
    if ds.max_pixels is not None:  # decides which images are skipped (absent: PIL's default, keys unchanged)
        data_fields["max_pixels"] = ds.max_pixels
    fields = {"model": ms.key_fields(), "crops": crops.key_fields(), "pooling": pool, "precision": precision,
              "dataset": data_fields}
    key = key_of(fields, prefix=f"{ms.name}-{ds.name}-{ds.split}")
    cache = Path(str(_get(cfg, "paths.cache_dir", ".cache/featstudy"))).expanduser()
    folder = cache.resolve() / "embeddings" / key
    return Plan(model=ms, crops=crops, pooling=pool, precision=precision, dataset=ds, key=key, key_fields=fields,
                folder=folder)


def _handle(p: Plan, hit: bool) -> EmbeddingHandle:
    import json

    meta = json.loads((p.folder / "meta.json").read_text(encoding="utf-8"))
    return EmbeddingHandle(path=p.folder, key=p.key, hit=hit, meta=meta, weights_tag=meta.get("weights", p.model.weights.tag))


def get_embedding(cfg) -> EmbeddingHandle:
    """The embedding of ``cfg``'s dataset by ``cfg``'s model: from the cache, or extracted now.

    Parameters
    ----------
    cfg : DictConfig
        The composed root config (groups ``model``, ``dataset``, ``crops``, ``pooling``, ``loader``, ``trainer``,
        ``paths``).

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
    from featstudy.store import damage, is_complete, move_aside

    p = plan(cfg)
    if is_complete(p.folder) and damage(p.folder) is None:  # checked against DONE's checksums (store.damage)
        log.info("embedding %s: cache hit (%s)", p.key, p.folder)
        if _env_rank() == 0:
            shutil.rmtree(p.folder / "shards", ignore_errors=True)  # left if a run died between DONE and cleanup
        return _handle(p, hit=True)
    rank = _env_rank()
    if rank != 0:  # a DDP child: rank 0 holds the lock and merges
        with writing_cache(p.folder.parent.parent):
            _extract(cfg, p)
        return _handle(p, hit=False)
    from filelock import FileLock, Timeout

    with writing_cache(p.folder.parent.parent):
        p.folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(p.folder.parent / f"{p.key}.lock"))
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
                    return _handle(p, hit=True)
                aside = move_aside(p.folder)  # never deleted: the user may want to look at it
                log.warning("embedding %s: damaged cache entry, %s: %s; moved aside to %s, extracting it again",
                            p.key, problem[0], problem[1], aside)
            _extract(cfg, p)
        finally:
            lock.release()
    return _handle(p, hit=False)


def plan_precision(cfg) -> str:
    """``trainer.precision`` in Lightning's current spelling (``32`` -> ``32-true``, ``bf16`` -> ``bf16-mixed``)."""
    precision = str(_get(cfg, "trainer.precision", "32-true"))
    return {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}.get(precision, precision)


def _trainer_kwargs(cfg) -> dict:
    return {
        "accelerator": _get(cfg, "trainer.accelerator", "auto"),
        "devices": _get(cfg, "trainer.devices", "auto"),
        "num_nodes": int(_get(cfg, "trainer.num_nodes", 1)),
        "strategy": _get(cfg, "trainer.strategy", "auto"),
        "precision": plan_precision(cfg),
    }


@dataclass
class _Merge:
    """Shards -> store, then delete the shards (run once, on global rank 0; picklable for ``ddp_spawn``)."""

    shard_dir: Path
    folder: Path
    key: str
    n_images: int
    n_features: int
    paths: list
    labels: list
    classes: list
    feature_names: list
    meta: dict

    def __call__(self) -> None:
        from featstudy.extraction import shards as _shards

        t = time.perf_counter()
        _shards.merge(self.shard_dir, self.folder, n_images=self.n_images, n_features=self.n_features,
                      paths=self.paths, labels=self.labels, classes=self.classes,
                      feature_names=self.feature_names, meta=self.meta)
        shutil.rmtree(self.shard_dir, ignore_errors=True)
        log.info("embedding %s: merged in %.1fs into %s", self.key, time.perf_counter() - t, self.folder)


def _extract(cfg, p: Plan) -> None:
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    from featstudy import models
    from featstudy.extraction import shards as _shards
    from featstudy.extraction.module import CropsDataset, ExtractionModule, ImagesPerSecondBar, ShardWriter, collate
    from featstudy.transforms import ImageTransform

    ds = p.dataset
    shard_dir = p.folder / "shards"
    model, channels, digest = models.build(p.model, p.pooling, p.crops.size)
    names = models.feature_names(channels)
    n_features = len(names)
    meta = {
        "key": p.key,
        "key_fields": p.key_fields,
        "format": FORMAT_VERSION,
        "featstudy_version": __version__,
        "torch_version": torch.__version__,
        "model": p.model.name,
        "nodes": p.model.nodes,
        "weights": p.model.weights.tag,
        "weights_source": p.model.weights.kind,
        "weights_sha256": digest,
        "weights_path": str(p.model.weights.path) if p.model.weights.path else None,
        "weights_seed": p.model.weights.seed,
        "layers": list(channels),
        "n_features": n_features,
        "n_features_per_layer": channels,
        "crops": {"name": p.crops.name, "resize": p.crops.resize, "size": p.crops.size, "n_crops": p.crops.n_crops},
        "pooling": p.pooling,
        "preprocessing": p.model.preprocessing,
        "precision": p.precision,
        "dataset": ds.describe(),
    }

    index = _shards.scan(shard_dir)
    todo = [i for i in range(len(ds)) if i not in index.done]
    meta["n_resumed"] = len(index.done)
    if index.done:
        log.info("embedding %s: resuming, %d of %d images already in %d shards", p.key, len(index.done), len(ds), len(index.files))

    merge = _Merge(shard_dir, p.folder, p.key, len(ds), n_features, [s[0] for s in ds.samples], ds.targets,
                   ds.classes, names, meta)

    if not todo:
        if _env_rank() == 0:
            merge()
        return
    transform = ImageTransform(p.crops, p.model.preprocessing)
    batch_size = int(_get(cfg, "loader.batch_size", 16))
    workers = int(_get(cfg, "loader.num_workers", 0))
    if batch_size < 1:
        raise ConfigError(f"loader.batch_size: must be >= 1, got {batch_size}")
    loader = DataLoader(CropsDataset(ds, transform, todo), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                        persistent_workers=False)
    channels_last = bool(_get(cfg, "trainer.channels_last", False))
    module = ExtractionModule(model, channels_last=channels_last)
    meta["channels_last"] = channels_last
    module.n_features = n_features
    writer = ShardWriter(shard_dir, n_features, merge_fn=merge)
    try:
        trainer = pl.Trainer(**_trainer_kwargs(cfg), logger=False, enable_checkpointing=False,
                             enable_model_summary=False, callbacks=[writer, ImagesPerSecondBar()],
                             default_root_dir=str(p.folder), inference_mode=True)
    except Exception as exc:  # noqa: BLE001 - Lightning's MisconfigurationException and ValueError
        raise ConfigError(f"trainer: {exc}".replace("\n", " ")) from exc
    log.info("embedding %s: extracting %d images (%d crops each, forward batch %d) into %s",
             p.key, len(todo), p.crops.n_crops, batch_size * p.crops.n_crops, p.folder)
    from featstudy.extraction.module import ieee_fp32, restore_fp32

    # IEEE fp32 on GPUs too: cuDNN would otherwise run convolutions in TF32 (~1e-3 relative), changing the numbers.
    # Every rank switches TF32 off itself (ExtractionModule.on_predict_start: a ddp_spawn rank starts with torch's
    # defaults); this puts this process's settings back also when predict raises.
    saved = ieee_fp32() if p.precision == "32-true" else None
    try:
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    finally:
        if saved is not None:
            restore_fp32(saved)
