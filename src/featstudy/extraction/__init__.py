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


class _NoTips(logging.Filter):
    """Drops Lightning's advertising ("💡 Tip: ... litlogger"), printed by every job's Trainer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


for _name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoTips())


def _quiet_known_warnings() -> None:
    """Lightning's own use of a deprecated torch API, warned on every job: not the user's to fix."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=UserWarning)

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


def env_rank(cfg=None) -> int:
    """Global rank of this process (0 when not distributed), from the cluster environment Lightning itself picks:
    an inherited ``SLURM_PROCID`` of an interactive shell, or Lightning's own multi-node launch (``NODE_RANK``),
    cannot make a helper believe it is rank 0 (:func:`featstudy.extraction.distributed.env_rank`)."""
    from featstudy.extraction.distributed import env_rank as _rank

    return _rank(cfg)


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


def plan(cfg, dataset=None) -> Plan:
    """Validate ``cfg`` and compute the key without running the network. ``dataset``: the dataset already built
    from ``cfg.dataset`` (the app's pre-flight built it), so that its folder is listed once per run."""
    from featstudy import datasets, models, pooling
    from featstudy.transforms import crop_spec

    for group in ("model", "dataset", "crops", "pooling"):
        if _get(cfg, group) is None:
            raise ConfigError(f"{group}: missing config group")
    crops = crop_spec(cfg.crops)
    pool = pooling.check(str(_get(cfg, "pooling.name", "avg")))
    precision = plan_precision(cfg)
    ms = models.spec(cfg.model)
    ds = datasets.from_config(cfg.dataset) if dataset is None else dataset
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
    from featstudy.store import damage, is_complete, move_aside

    from featstudy.extraction import distributed as dist

    p = plan(cfg, dataset)
    rank, timeout = _env_rank(cfg), dist.ddp_timeout_s(cfg)
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
            _extract(cfg, p)
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
            _extract(cfg, p, decision)
        finally:
            lock.release()
            if decision is not None:
                decision.stop()
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


def _extract(cfg, p: Plan, decision=None) -> None:
    """Extract the images not yet in shards, then merge on rank 0. ``decision`` (rank 0 of an srun/torchrun launch)
    is where rank 0 tells the helper ranks whether they take part (:class:`distributed.Decision`)."""
    import functools

    import pytorch_lightning as pl
    import torch

    from featstudy import models
    from featstudy.extraction import shards as _shards
    from featstudy.extraction.module import CropsDataset, ExtractionModule, ImagesPerSecondBar, ShardWriter, make_loader
    from featstudy.transforms import DeviceTransform, ship_crops, uint8_crops

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
        if _env_rank(cfg) == 0:
            if decision is not None:
                decision.publish("alone")  # nothing to extract: the helpers wait for DONE
            merge()
        return
    batch_size = int(_get(cfg, "loader.batch_size", 16))
    if batch_size < 1:
        raise ConfigError(f"loader.batch_size: must be >= 1, got {batch_size}")
    # the loader ships uint8 crops (crops.size², 1 byte per value); the device mirrors and normalises them
    image_bytes = ship_crops(p.crops) * 3 * p.crops.size * p.crops.size
    loader, workers = make_loader(CropsDataset(ds, functools.partial(uint8_crops, crops=p.crops), todo),
                                  batch_size=batch_size, num_workers=_get(cfg, "loader.num_workers", 0),
                                  image_bytes=image_bytes, accelerator=str(_get(cfg, "trainer.accelerator", "auto")))
    log.info("embedding %s: loader with %d workers, %.1f MB of uint8 crops per batch", p.key, workers,
             batch_size * image_bytes / 2**20)
    channels_last = bool(_get(cfg, "trainer.channels_last", False))
    module = ExtractionModule(model, channels_last=channels_last,
                              transform=DeviceTransform(p.crops, p.model.preprocessing))
    meta["channels_last"] = channels_last
    module.n_features = n_features
    writer = ShardWriter(shard_dir, n_features, merge_fn=merge)
    from featstudy.extraction import distributed as dist

    dist.check_accelerator(cfg)
    interrupts = dist.Interrupts()

    # a progress bar on a terminal; in a log file (SLURM, nohup, submitit) its redraws are noise: the log gets one
    # line per stage instead ("extracting N images", then the embedding's line)
    import sys

    bar = sys.stderr.isatty()
    _quiet_known_warnings()

    def make_trainer(**override):
        try:
            return pl.Trainer(**{**_trainer_kwargs(cfg), **override}, logger=False, enable_checkpointing=False,
                              enable_model_summary=False, enable_progress_bar=bar,
                              callbacks=[writer, *([ImagesPerSecondBar()] if bar else []), interrupts],
                              default_root_dir=str(p.folder), inference_mode=True)
        except Exception as exc:  # noqa: BLE001 - Lightning's MisconfigurationException and ValueError
            raise ConfigError(f"trainer: {exc}".replace("\n", " ")) from exc

    trainer = make_trainer()
    dist.check_cluster(trainer)  # SLURM's --ntasks-per-node vs trainer.devices: one line, not predict's traceback
    world = dist.world_size(trainer)
    if world > len(todo) and _env_rank(cfg) == 0:
        # Lightning's predict sampler gives every rank >= 1 image or fails: fewer images left than ranks (a resume
        # near the end, a tiny dataset) are extracted by rank 0 alone, no DDP (the helpers wait for DONE)
        log.info("embedding %s: %d image(s) left for %d ranks: rank 0 extracts them alone", p.key, len(todo), world)
        if decision is not None:
            decision.publish("alone")
        trainer = make_trainer(devices=1, num_nodes=1, strategy="auto")
    elif decision is not None:
        decision.publish("ddp", n_done=len(index.done))
    dist.set_timeout(trainer, dist.ddp_timeout_s(cfg))  # a failed rank stops the others after this, not 30 min
    log.info("embedding %s: extracting %d images (%d crops each, forward batch %d) into %s",
             p.key, len(todo), p.crops.n_crops, batch_size * p.crops.n_crops, p.folder)
    from featstudy.extraction.module import ieee_fp32, restore_fp32

    # IEEE fp32 on GPUs too: cuDNN would otherwise run convolutions in TF32 (~1e-3 relative), changing the numbers.
    # Every rank switches TF32 off itself (ExtractionModule.on_predict_start: a ddp_spawn rank starts with torch's
    # defaults); this puts this process's settings back also when predict raises.
    saved = ieee_fp32() if p.precision == "32-true" else None
    sigint = dist.current_sigint()
    try:
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    except SystemExit:
        # Lightning turns a KeyboardInterrupt (a signal, Ctrl-C) into sys.exit(1) after killing its children:
        # re-raise the interrupt, so that the run ends KILLED (shards kept), not FAILED
        if isinstance(interrupts.exception, KeyboardInterrupt):
            raise interrupts.exception from None
        raise
    finally:
        if saved is not None:
            restore_fp32(saved)
        dist.restore_sigint(sigint)  # Lightning leaves Ctrl-C ignored after an interrupt
