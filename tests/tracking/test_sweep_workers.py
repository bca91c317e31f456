"""A joblib sweep's jobs see the environment of the moment the sweep starts, not that of an earlier sweep in the
same process (loky keeps its workers between calls): the credentials a user exports before a second sweep reach
its jobs."""

from __future__ import annotations

import os

import pytest


def _read_env(name: str) -> str | None:
    return os.environ.get(name)


@pytest.fixture
def stale_workers(monkeypatch):
    from joblib.externals.loky import get_reusable_executor

    name = "FEATSTUDY_TEST_WORKER_ENV"
    monkeypatch.delenv(name, raising=False)
    executor = get_reusable_executor(max_workers=1)
    assert executor.submit(_read_env, name).result() is None  # a worker started before the variable exists
    monkeypatch.setenv(name, "set-after-the-workers-started")
    yield name
    get_reusable_executor(max_workers=1).shutdown(wait=True)


def test_reused_workers_are_stale_without_the_fix(stale_workers):
    """The premise: loky reuses the worker, which does not see the new variable."""
    from joblib.externals.loky import get_reusable_executor

    assert get_reusable_executor(max_workers=1).submit(_read_env, stale_workers).result() is None


def test_a_sweep_starts_with_workers_that_see_the_current_environment(stale_workers):
    from joblib.externals.loky import get_reusable_executor

    from featstudy.tracking import fresh_joblib_workers

    fresh_joblib_workers()
    result = get_reusable_executor(max_workers=1).submit(_read_env, stale_workers).result()
    assert result == "set-after-the-workers-started"


def test_no_workers_yet_is_fine():
    import sys

    from featstudy.tracking import fresh_joblib_workers

    module = sys.modules.get("joblib.externals.loky.reusable_executor")
    if module is not None and module._executor is not None:
        module._executor.shutdown(wait=True)
    fresh_joblib_workers()  # nothing to shut down: no error
