"""The forward pass of an extraction: Lightning's predict loop over the images not yet in shards (one shard per
batch per rank, :class:`featstudy.extraction.module.ShardWriter`), then the merge into the store on rank 0
(:class:`Merge`), in IEEE fp32 where ``trainer.precision=32-true`` (:func:`ieee_fp32_while`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from featstudy import __version__
from featstudy.errors import ConfigError
from featstudy.extraction.embedding import env_rank
from featstudy.extraction.key import FORMAT_VERSION
from featstudy.extraction.plan import Plan, _get, plan_precision

log = logging.getLogger("featstudy.extraction")

__all__ = ["Merge", "extract", "ieee_fp32_while", "trainer_kwargs"]


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

def trainer_kwargs(cfg) -> dict:
    return {
        "accelerator": _get(cfg, "trainer.accelerator", "auto"),
        "devices": _get(cfg, "trainer.devices", "auto"),
        "num_nodes": int(_get(cfg, "trainer.num_nodes", 1)),
        "strategy": _get(cfg, "trainer.strategy", "auto"),
        "precision": plan_precision(cfg),
    }


@dataclass
class Merge:
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


def extract(cfg, p: Plan, decision=None) -> None:
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
        # the key's fields (interpolation only when not bilinear: metas written before it was a setting still match)
        "crops": {**p.crops.key_fields(), "n_crops": p.crops.n_crops},
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

    merge = Merge(shard_dir, p.folder, p.key, len(ds), n_features, [s[0] for s in ds.samples], ds.targets,
                   ds.classes, names, meta)

    if not todo:
        if env_rank(cfg) == 0:
            if decision is not None:
                decision.publish("alone")  # nothing to extract: the helpers wait for DONE
            merge()
        return
    batch_size = int(_get(cfg, "loader.batch_size", 16))  # checked by featstudy.config.validate
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
            return pl.Trainer(**{**trainer_kwargs(cfg), **override}, logger=False, enable_checkpointing=False,
                              enable_model_summary=False, enable_progress_bar=bar,
                              callbacks=[writer, *([ImagesPerSecondBar()] if bar else []), interrupts],
                              default_root_dir=str(p.folder), inference_mode=True)
        except Exception as exc:  # noqa: BLE001 - Lightning's MisconfigurationException and ValueError
            raise ConfigError(f"trainer: {exc}".replace("\n", " ")) from exc

    trainer = make_trainer()
    dist.check_cluster(trainer)  # SLURM's --ntasks-per-node vs trainer.devices: one line, not predict's traceback
    world = dist.world_size(trainer)
    if world > len(todo) and env_rank(cfg) == 0:
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
    sigint = dist.current_sigint()
    try:
        with ieee_fp32_while(p.precision == "32-true"):
            trainer.predict(module, dataloaders=loader, return_predictions=False)
    except SystemExit:
        # Lightning turns a KeyboardInterrupt (a signal, Ctrl-C) into sys.exit(1) after killing its children:
        # re-raise the interrupt, so that the run ends KILLED (shards kept), not FAILED
        if isinstance(interrupts.exception, KeyboardInterrupt):
            raise interrupts.exception from None
        raise
    finally:
        dist.restore_sigint(sigint)  # Lightning leaves Ctrl-C ignored after an interrupt


@contextmanager
def ieee_fp32_while(exact: bool) -> Iterator[None]:
    """IEEE fp32 on GPUs too when ``exact`` (``trainer.precision=32-true``): cuDNN would otherwise run convolutions
    in TF32 (~1e-3 relative), changing the numbers. Every rank switches TF32 off itself
    (``ExtractionModule.on_predict_start``: a ddp_spawn rank starts with torch's defaults); this puts this process's
    settings back also when predict raises. Mixed precisions leave the flags alone."""
    from featstudy.extraction.module import ieee_fp32, restore_fp32

    saved = ieee_fp32() if exact else None
    try:
        yield
    finally:
        if saved is not None:
            restore_fp32(saved)
