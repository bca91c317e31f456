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


def ieee_fp32() -> tuple:
    """Switch TF32 off for cuDNN convolutions and float32 matmuls in this process; returns what :func:`restore_fp32`
    needs to put the previous settings back. The flags are per process: a ``ddp_spawn`` rank starts with torch's
    defaults (cuDNN TF32 on), so every rank sets them itself where the model runs."""
    b = torch.backends
    try:
        saved = ("legacy", b.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    except RuntimeError:  # torch >= 2.9 refuses the legacy getters once its fp32_precision API has been used
        saved = ("new", b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision)
        b.cudnn.conv.fp32_precision = b.cudnn.rnn.fp32_precision = b.cuda.matmul.fp32_precision = "ieee"
        return saved
    b.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")  # also sets torch.backends.cuda.matmul.allow_tf32 = False
    return saved


def restore_fp32(saved: tuple) -> None:
    """Undo :func:`ieee_fp32`."""
    b = torch.backends
    if saved[0] == "legacy":
        b.cudnn.allow_tf32 = saved[1]
        torch.set_float32_matmul_precision(saved[2])
    else:
        b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision = saved[1:]


class ExtractionModule(pl.LightningModule):
    """``predict_step``: crops (B, K, 3, S, S) -> pooled features (B, F) in float32, with the batch's image ids.

    Each node is pooled in float32 where it is produced (:meth:`featstudy.models.FeatureModel.pooled_layers`), the
    crops are averaged in float32, and a batch with a non-finite feature stops the run with one line naming the
    layer (an fp16 overflow under ``16-mixed``), before its shard is written. Under ``32-true`` TF32 is off in every
    rank for the duration of predict (:func:`ieee_fp32`), so the numbers are IEEE float32 as the cache key says.
    """

    def __init__(self, model: torch.nn.Module, channels_last: bool = False):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.channels_last = channels_last
        self.n_features = None
        self._fp32_saved = None

    def _precision(self) -> str:
        try:
            return str(self.trainer.precision)
        except RuntimeError:  # not attached to a Trainer
            return "32-true"

    def on_predict_start(self) -> None:
        if self._precision() in ("32-true", "32"):
            saved = ieee_fp32()
            if self._fp32_saved is None:  # a predict that raised never restored: keep what was there before it
                self._fp32_saved = saved

    def on_predict_end(self) -> None:
        if self._fp32_saved is not None:
            restore_fp32(self._fp32_saved)
            self._fp32_saved = None

    def _first_image(self, batch) -> str:
        """The first image of ``batch``, by its path in the dataset when the loader's dataset is at hand."""
        first = int(batch["ids"][0])
        try:
            return str(self.trainer.predict_dataloaders.dataset.base.samples[first][0])
        except Exception:  # noqa: BLE001 - any other loader: the image's index is enough to find it
            return f"#{first}"

    def check_finite(self, parts: dict[str, torch.Tensor], batch) -> None:
        """Raise when a pooled layer holds inf or nan (one device sync per batch; the layer is found only then)."""
        if bool(torch.isfinite(torch.cat([p.flatten() for p in parts.values()])).all()):
            return
        from featstudy.errors import ConfigError, DataError

        layer, kind = next((name, "nan" if bool(torch.isnan(p).any()) else "inf")
                           for name, p in parts.items() if not bool(torch.isfinite(p).all()))
        precision = self._precision()
        where = f"layer {layer} overflowed ({kind}) in the batch of images starting with {self._first_image(batch)}"
        if precision.startswith("16"):
            raise ConfigError(f"trainer.precision={precision}: {where}; use bf16-mixed or 32-true")
        raise DataError(f"model.weights: {where} at trainer.precision={precision}; the network's activations "
                        "are not finite: check the weights file (nothing was written for this batch)")

    def predict_step(self, batch, batch_idx=0, dataloader_idx=0):
        images = batch["images"]
        if images.numel():
            b, k = images.shape[:2]
            x = images.flatten(0, 1)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            parts = self.model.pooled_layers(x)  # float32, pooled where each map is produced
            self.check_finite(parts, batch)
            feats = torch.cat(list(parts.values()), dim=1).view(b, k, -1).mean(dim=1)
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
