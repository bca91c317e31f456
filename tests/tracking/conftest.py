"""Fixtures of the tracking tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> str:
    """One embedding cache for the tracking tests: the first job extracts, the others reuse it."""
    return f"paths.cache_dir={tmp_path_factory.mktemp('tracking_cache')}"


@pytest.fixture(autouse=True)
def _restore_mlflow_http_settings(monkeypatch):
    """Jobs export ``tracking.http_*`` as ``MLFLOW_HTTP_REQUEST_*``; undo that after each test."""
    from featstudy.tracking import HTTP_SETTINGS

    for env in HTTP_SETTINGS.values():
        monkeypatch.setenv(env, "")
        monkeypatch.delenv(env)
