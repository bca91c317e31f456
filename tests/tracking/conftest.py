"""Fixtures of the tracking tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> str:
    """One embedding cache for the tracking tests: the first job extracts, the others reuse it."""
    return f"paths.cache_dir={tmp_path_factory.mktemp('tracking_cache')}"
