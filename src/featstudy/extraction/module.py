"""The Lightning predict loop: a dataset wrapper that never drops an image silently, the DataLoader it is fed
through (uint8 crops stacked into shared memory, workers sized to the machine and to ``/dev/shm``), the
LightningModule (which turns the uint8 crops into normalised float crops on the device), the per-batch shard writer
(a background thread; it also merges on rank 0 at the end) and a progress bar showing images/s."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar
from torch.utils.data import DataLoader, Dataset, default_collate

from featstudy.extraction import shards as _shards

log = logging.getLogger(__name__)


class CropsDataset(Dataset):
    """Item i of ``ids`` -> ``{"id", "image", "mode", "reason"}``; ``image`` is ``transform(PIL image)``: the
    extraction ships :func:`featstudy.transforms.uint8_crops` (``(ship_crops, 3, S, S)`` uint8), older callers the
    float crops of ``ImageTransform``. An unreadable image becomes a skipped item with the exception as its reason
    (``image`` None; never substituted, never dropped)."""

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
    """Stack the readable images; carry every row's image id, and the ids and reasons of the skipped ones.

    The images are stacked by torch's ``default_collate``, which in a loader worker stacks straight into shared
    memory: the batch then reaches the main process without another copy."""
    ok = [it for it in items if it["image"] is not None]
    bad = [it for it in items if it["image"] is None]
    images = default_collate([it["image"] for it in ok]) if ok else torch.zeros(0)
    return {
        "images": images,
        "ids": torch.tensor([it["id"] for it in ok], dtype=torch.int64),
        "modes": [it["mode"] for it in ok],
        "skipped_ids": torch.tensor([it["id"] for it in bad], dtype=torch.int64),
        "skipped_reasons": [it["reason"] for it in bad],
    }


#: batches each loader worker prepares ahead (torch's default ``prefetch_factor``)
PREFETCH = 2
#: where torch's worker processes put their batches (shared memory; Docker's default is 64 MB)
SHM = "/dev/shm"


def cpus_available() -> int:
    """CPUs this process may use: ``SLURM_CPUS_PER_TASK`` when SLURM sets it, else the affinity mask (what
    ``taskset``, cgroups-aware launchers and ``srun`` leave us), never the whole machine's count."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def workers_setting(value) -> int | None:
    """``loader.num_workers`` checked: a non-negative integer, or ``auto`` (returned as None)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        from featstudy.errors import ConfigError

        raise ConfigError(f"loader.num_workers={value!r} is not allowed; loader.num_workers must be a non-negative "
                          "integer or auto")
    return value


def shm_needed(batch_size: int, image_bytes: int, workers: int) -> int:
    """Shared memory the loader's batches take at most: ``PREFETCH`` batches per worker in flight, plus the one the
    main process is using (0 without workers: batches are then made in the main process)."""
    return batch_size * image_bytes * (PREFETCH * workers + 1) if workers else 0


def fit_workers(requested: int | None, batch_size: int, image_bytes: int, shm_free: int | None,
                cpus: int | None = None) -> int:
    """The number of loader workers to run.

    ``requested`` None (``auto``): ``min(8, cpus - 1)``, lowered (with a warning) until the batches fit in
    ``shm_free`` bytes of ``/dev/shm``, down to 0 (no workers: slower, never a crash in a worker). An explicit
    number whose batches do not fit is a one-line :class:`ConfigError` naming the keys, the sizes and the fixes.
    ``shm_free`` None (no ``/dev/shm``) skips the check.
    """
    mb = 1 << 20
    if requested is None:
        n = wanted = max(0, min(8, (cpus or cpus_available()) - 1))
        while n > 0 and shm_free is not None and shm_needed(batch_size, image_bytes, n) > shm_free:
            n -= 1
        if n < wanted:
            log.warning("loader.num_workers=auto: %d workers instead of %d, so that their batches fit in %s "
                        "(%.0f MB free; %.1f MB per batch of loader.batch_size=%d); lower loader.batch_size or "
                        "give the container more (docker run --shm-size=1g) for more workers", n, wanted, SHM,
                        shm_free / mb, batch_size * image_bytes / mb, batch_size)
        return n
    need = shm_needed(batch_size, image_bytes, requested)
    if shm_free is not None and need > shm_free:
        from featstudy.errors import ConfigError

        raise ConfigError(
            f"loader.batch_size={batch_size} with loader.num_workers={requested} needs {need / mb:.0f} MB of shared "
            f"memory ({batch_size * image_bytes / mb:.1f} MB per batch x ({PREFETCH} prefetched x {requested} "
            f"workers + 1)) but {SHM} has {shm_free / mb:.0f} MB free; lower loader.batch_size or "
            "loader.num_workers (or auto), or give the container more (docker run --shm-size=1g)")
    return requested


def shm_free() -> int | None:
    """Free bytes of ``/dev/shm``, or None where there is none."""
    try:
        return shutil.disk_usage(SHM).free
    except OSError:
        return None


def make_loader(dataset: Dataset, *, batch_size: int, num_workers, image_bytes: int, accelerator: str = "auto"):
    """The extraction's DataLoader: in order, ``collate``, workers from :func:`fit_workers` (persistent when there
    are any), memory pinned only where a CUDA device will take the batches. Returns ``(loader, workers)``."""
    workers = fit_workers(workers_setting(num_workers), batch_size, image_bytes, shm_free())
    pin = torch.cuda.is_available() and str(accelerator).lower() in ("auto", "gpu", "cuda")
    extra = {"persistent_workers": True, "prefetch_factor": PREFETCH} if workers else {}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                        pin_memory=pin, **extra)
    return loader, workers


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

    def __init__(self, model: torch.nn.Module, channels_last: bool = False, transform: torch.nn.Module | None = None):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.transform = transform  # uint8 crops -> float crops, on the model's device (transforms.DeviceTransform)
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

    def device_input(self, images: torch.Tensor) -> torch.Tensor:
        """The shipped uint8 crops -> the float crops the model takes, on this device; then the dtype the precision
        plugin gives floating inputs (Lightning converts only floating tensors of a batch, so uint8 crops reach
        ``predict_step`` as they are). Float crops pass through."""
        if images.dtype != torch.uint8:
            return images
        if self.transform is None:
            raise ValueError("ExtractionModule: uint8 crops need a transform (featstudy.transforms.DeviceTransform)")
        x = self.transform(images)
        try:
            return self.trainer.precision_plugin.convert_input(x)
        except RuntimeError:  # not attached to a Trainer
            return x

    def predict_step(self, batch, batch_idx=0, dataloader_idx=0):
        images = batch["images"]
        if images.numel():
            images = self.device_input(images)
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
    end of predict: wait for every shard, barrier, merge on global rank 0 (``merge_fn``), barrier.

    The shards are written by one background thread (the GPU does not wait for each file's fsync on NFS or Lustre),
    at most ``max_pending`` batches behind (``put`` blocks beyond: memory stays bounded); ``max_pending=0`` writes
    in the calling thread. Each shard is still renamed into place only when whole (:func:`shards.write_shard`), so a
    kill at any moment leaves whole shards only, and resume is unchanged. The writer's first exception stops all
    writing and is raised in the main thread at the next batch or at the end of predict - the same exception
    object, so a full disk (``ENOSPC``) still becomes the one-line ``paths.cache_dir`` error. When predict fails
    for another reason the shards already queued are written (they are whole results) before it propagates.
    """

    #: default ``max_pending``
    MAX_PENDING = 4

    def __init__(self, shard_dir: Path, n_features: int, merge_fn=None, max_pending: int | None = None):
        super().__init__(write_interval="batch")
        self.shard_dir = Path(shard_dir)
        self.n_features = n_features
        self.merge_fn = merge_fn
        self.max_pending = self.MAX_PENDING if max_pending is None else int(max_pending)
        self._queue = self._thread = self._error = None

    def __getstate__(self):  # ddp_spawn pickles the callbacks: the thread is started in each rank
        return {**self.__dict__, "_queue": None, "_thread": None, "_error": None}

    def _start(self) -> None:
        if self.max_pending <= 0 or self._thread is not None:
            return
        self._error = None
        self._queue = queue.Queue(maxsize=self.max_pending)
        self._thread = threading.Thread(target=self._run, args=(self._queue,), name="featstudy-shard-writer",
                                        daemon=True)
        self._thread.start()

    def _run(self, q: queue.Queue) -> None:
        failed = False
        while True:
            job = q.get()
            if job is None:
                return
            if failed:  # after a failure the rest is discarded: nothing written past a shard that failed
                continue
            try:
                _shards.write_shard(*job)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                failed, self._error = True, exc

    def _stop(self) -> None:
        """Let the thread write what is queued, then end it."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = self._queue = None

    def _raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self._stop()
            raise err

    def on_predict_start(self, trainer, pl_module):
        self._start()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        feats = prediction["features"].detach().to("cpu", torch.float32).numpy().copy()
        if feats.shape[0] == 0:
            feats = np.zeros((0, self.n_features), dtype=np.float32)
        job = (self.shard_dir, trainer.global_rank, prediction["ids"].cpu().numpy().copy(), feats,
               prediction["skipped_ids"].cpu().numpy().copy(), list(prediction["skipped_reasons"]),
               list(prediction["modes"]))
        if self._thread is None:
            _shards.write_shard(*job)
            return
        self._raise_error()
        self._queue.put(job)

    def on_predict_end(self, trainer, pl_module):
        self._stop()
        self._raise_error()
        trainer.strategy.barrier("featstudy-shards-written")
        if trainer.is_global_zero and self.merge_fn is not None:
            self.merge_fn()
        trainer.strategy.barrier("featstudy-merged")

    def on_exception(self, trainer, pl_module, exception):
        self._stop()
        self._error = None


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
