"""Replaying a job's journal into a store, once (:func:`sync_job`): the work of ``python -m featstudy.sync``."""

from __future__ import annotations

from pathlib import Path

SYNCED_FILE = "mlflow_synced"


def sync_job(folder: str | Path, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """Log a job from its journal, once: :func:`featstudy.sync.sync_job` (kept here for existing callers)."""
    from featstudy.sync import sync_job as _sync_job

    return _sync_job(folder, tracking_uri)
