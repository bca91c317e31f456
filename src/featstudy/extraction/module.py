"""The Lightning predict loop: a dataset wrapper that never drops an image silently, the LightningModule, the
per-batch shard writer (which also merges on rank 0 at the end) and a progress bar showing images/s."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar
from torch.utils.data import Dataset

from featstudy.extraction import shards as _shards

log = logging.getLogger(__name__)


class CropsDataset(Dataset):
    """Item i of ``ids`` -> ``{"id", "image" (K, 3, S, S) or None, "reason"}``; an unreadable image becomes a
    skipped item with the exception as its reason (never substituted, never dropped)."""

    def __init__(self, base, transform, ids: list[int]):
        self.base = base
        self.transform = transform
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        idx = self.ids[i]
        try:
            img, mode = self.base.image_and_mode(idx)
            return {"id": idx, "image": self.transform(img), "mode": mode, "reason": ""}
        except Exception as exc:  # noqa: BLE001 - any decode failure is recorded in skipped.txt
            return {"id": idx, "image": None, "mode": "", "reason": f"{type(exc).__name__}: {exc}"}


def collate(items: list[dict]) -> dict:
    """Stack the readable images; carry every row's image id, and the ids and reasons of the skipped ones."""
    ok = [it for it in items if it["image"] is not None]
    bad = [it for it in items if it["image"] is None]
    images = torch.stack([it["image"] for it in ok]) if ok else torch.zeros(0)
    return {
        "images": images,
        "ids": torch.tensor([it["id"] for it in ok], dtype=torch.int64),
        "modes": [it["mode"] for it in ok],
        "skipped_ids": torch.tensor([it["id"] for it in bad], dtype=torch.int64),
        "skipped_reasons": [it["reason"] for it in bad],
    }


class ExtractionModule(pl.LightningModule):
    """``predict_step``: crops (B, K, 3, S, S) -> pooled features (B, F) in float32, with the batch's image ids."""

    def __init__(self, model: torch.nn.Module, channels_last: bool = False):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.channels_last = channels_last
        self.n_features = None

    def predict_step(self, batch, batch_idx=0, dataloader_idx=0):
        images = batch["images"]
        if images.numel():
            b, k = images.shape[:2]
            x = images.flatten(0, 1)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats = self.model.per_crop(x).float().view(b, k, -1).mean(dim=1)
        else:
            feats = torch.zeros(0, self.n_features or 0)
        return {"ids": batch["ids"], "features": feats, "modes": batch["modes"], "skipped_ids": batch["skipped_ids"],
                "skipped_reasons": batch["skipped_reasons"]}


class ShardWriter(BasePredictionWriter):
    """Writes one shard per batch (``write_interval="batch"``) under ``shard_dir`` with the rank in its name; at the
    end of predict: barrier, merge on global rank 0 (``merge_fn``), barrier."""

    def __init__(self, shard_dir: Path, n_features: int, merge_fn=None):
        super().__init__(write_interval="batch")
        self.shard_dir = Path(shard_dir)
        self.n_features = n_features
        self.merge_fn = merge_fn

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        feats = prediction["features"].detach().to("cpu", torch.float32).numpy()
        if feats.shape[0] == 0:
            feats = np.zeros((0, self.n_features), dtype=np.float32)
        _shards.write_shard(self.shard_dir, trainer.global_rank, prediction["ids"].cpu().numpy(), feats,
                            prediction["skipped_ids"].cpu().numpy(), list(prediction["skipped_reasons"]),
                            modes=list(prediction["modes"]))

    def on_predict_end(self, trainer, pl_module):
        trainer.strategy.barrier("featstudy-shards-written")
        if trainer.is_global_zero and self.merge_fn is not None:
            self.merge_fn()
        trainer.strategy.barrier("featstudy-merged")


class ImagesPerSecondBar(TQDMProgressBar):
    """Lightning's progress bar with an ``img/s`` postfix (images, not batches; crops are not counted)."""

    def __init__(self, total_images: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self._t0 = None
        self._n = 0

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self._t0 is None:
            self._t0 = time.perf_counter()
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._n += int(batch["ids"].numel() + batch["skipped_ids"].numel())
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        dt = time.perf_counter() - self._t0
        if dt > 0 and self.predict_progress_bar is not None:
            self.predict_progress_bar.set_postfix({"img/s": f"{self._n / dt:.1f}"}, refresh=False)
