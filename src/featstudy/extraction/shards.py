"""Shards: one ``.npz`` per batch per rank under ``<embedding>/shards/``, and their merge into the store.

A shard holds ``ids`` (the dataset indices of its rows, carried in the batch itself), ``features`` (rows in the
order of ``ids``), and the ``skipped_ids``/``skipped_reasons`` of the batch's unreadable images. It is written to a
temp file and renamed, so a shard on disk is always whole: after a kill at any moment, the finished shards say which
images are done, and a rerun extracts only the others. Its name is ``shard-<smallest id>-r<rank>.npz``, unique
because an id is done at most once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featstudy import store
from featstudy.store import atomic_file

log = logging.getLogger(__name__)


def write_shard(folder: Path, rank: int, ids: np.ndarray, features: np.ndarray,
                skipped_ids: np.ndarray, skipped_reasons: list[str], modes: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    all_ids = np.concatenate([ids, skipped_ids])
    path = folder / f"shard-{int(all_ids.min()):09d}-r{rank}.npz"
    with atomic_file(path, prefix=".shard-", suffix=".npz.tmp") as fh:
        np.savez(fh, ids=ids.astype(np.int64), features=features.astype(np.float32, copy=False),
                 skipped_ids=skipped_ids.astype(np.int64), skipped_reasons=np.asarray(skipped_reasons, dtype=str),
                 modes=np.asarray(modes if modes is not None else ["?"] * len(ids), dtype=str))
    return path


@dataclass
class ShardIndex:
    """What finished shards already hold."""

    done: set[int] = field(default_factory=set)
    files: list[Path] = field(default_factory=list)


def scan(folder: Path) -> ShardIndex:
    """Ids already done (rows or skipped) in the finished shards of ``folder``; unreadable shards are removed."""
    index = ShardIndex()
    if not folder.is_dir():
        return index
    for tmp in folder.glob(".shard-*.tmp"):  # a write cut short by a kill
        tmp.unlink(missing_ok=True)
    for path in sorted(folder.glob("shard-*.npz")):
        try:
            with np.load(path) as z:
                ids = z["ids"].tolist() + z["skipped_ids"].tolist()
        except Exception as exc:  # noqa: BLE001 - a damaged shard is redone, loudly
            log.warning("shard %s unreadable (%s); its images will be extracted again", path, exc)
            path.unlink(missing_ok=True)
            continue
        index.done.update(ids)
        index.files.append(path)
    return index


def merge(shard_dir: Path, out: Path, *, n_images: int, n_features: int, paths: list[str], labels: list[int],
          classes: list[str], feature_names: list[str], meta: dict) -> dict:
    """Merge all shards into the store folder ``out``, written through :mod:`featstudy.store` (its layout, DONE last).

    Rows are ordered by image id; every id in ``range(n_images)`` must appear exactly once, as a row or as skipped,
    so the number of rows is ``n_images - n_skipped``. ``features.npy`` is filled through a memory map (memory flat
    at any N, :func:`featstudy.store.fill_features`). The store records the classes left without any row and writes
    DONE, the checksum manifest of every file, last (:func:`featstudy.store.finish`). Returns the meta written.
    """
    from featstudy.errors import DataError

    files = sorted(shard_dir.glob("shard-*.npz"))
    seen = np.zeros(n_images, dtype=np.int8)
    skipped: dict[int, str] = {}
    row_ids = []
    modes: dict[str, int] = {}
    for path in files:
        with np.load(path) as z:
            ids = z["ids"]
            row_ids.append(ids)
            for m in z["modes"].tolist() if "modes" in z.files else []:
                modes[m] = modes.get(m, 0) + 1
            seen[ids] += 1
            for i, r in zip(z["skipped_ids"].tolist(), z["skipped_reasons"].tolist()):
                seen[i] += 1
                skipped[i] = r
    if (seen > 1).any():
        dup = int(np.flatnonzero(seen > 1)[0])
        raise DataError(f"{shard_dir}: image id {dup} ({paths[dup]}) appears in several shards; delete {shard_dir} and rerun")
    if (seen == 0).any():
        miss = int(np.flatnonzero(seen == 0)[0])
        raise DataError(f"{shard_dir}: image id {miss} ({paths[miss]}) is in no shard ({int((seen == 0).sum())} missing); rerun to resume")
    kept = np.sort(np.concatenate(row_ids)) if row_ids else np.zeros(0, dtype=np.int64)
    n_rows = n_images - len(skipped)
    if len(kept) != n_rows:
        raise DataError(f"{shard_dir}: {len(kept)} rows but {n_images} images - {len(skipped)} skipped = {n_rows}")
    row_of = np.full(n_images, -1, dtype=np.int64)
    row_of[kept] = np.arange(n_rows)

    def fill(feats: np.ndarray) -> None:
        for path in files:
            with np.load(path) as z:
                ids = z["ids"]
                if len(ids):
                    feats[row_of[ids]] = z["features"]

    store.begin(out)
    store.fill_features(out, (n_rows, n_features), fill)
    all_labels = np.asarray(labels, dtype=np.int64)
    sizes = np.bincount(all_labels, minlength=len(classes)) if len(all_labels) else np.zeros(len(classes), int)
    meta = {**meta, "n_images": n_rows, "n_skipped": len(skipped), "n_dataset": n_images,
            "image_modes": dict(sorted(modes.items()))}
    return store.finish(out, labels=all_labels[kept], paths=[paths[i] for i in kept.tolist()], classes=classes,
                        feature_names=feature_names, meta=meta,
                        skipped=[(paths[i], skipped[i]) for i in sorted(skipped)], class_sizes=sizes)
