"""One job's surroundings, apart from what it computes (:func:`featstudy.app.run`): Hydra's runtime and the run's
name, the signals that end it as KILLED, the output folder it claims, a full disk in one line, the log handlers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (``kill``, SLURM at the time limit) or SIGUSR1 /
    SIGUSR2 (SLURM's and submitit's warning before the time limit, ``hydra/launcher=slurm``)."""


#: signals that end a job as KILLED (SIGINT already raises KeyboardInterrupt)
KILL_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))


def raise_terminated(signum: int, frame: Any) -> None:
    """The handler of :data:`KILL_SIGNALS` inside :func:`signals_raise_terminated`."""
    raise Terminated(f"received signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_raise_terminated():
    """In the main thread, SIGTERM, SIGUSR1 and SIGUSR2 raise :class:`Terminated` inside the block (so the run is
    marked KILLED); the previous handlers are put back when it ends. Elsewhere nothing changes."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, raise_terminated) for sig in KILL_SIGNALS} if in_main else {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def hydra_runtime() -> Any | None:
    """Hydra's runtime config of the running job (``hydra.mode``, ``hydra.sweep``, ``hydra.job``...); None outside
    a Hydra job (tests, notebooks calling :func:`featstudy.app.run`)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001
        return None


def run_identity(cfg: DictConfig) -> tuple[str | None, str | None]:
    """(run name, sweep parent run id): what differs first (:mod:`featstudy.run_names`). A sweep child is named
    after its swept settings; a single run after its dataset, model, weights and bins, unless ``tracking.run_name``
    says otherwise."""
    from featstudy import run_names
    from featstudy.tracking import parent_run_id_from, redact

    hc = hydra_runtime()
    if hc is not None:
        from hydra.types import RunMode

        if hc.mode == RunMode.MULTIRUN:
            name = run_names.sweep_child_name(cfg, list(hc.overrides.task), run_names.swept_keys(hc.sweep.dir))
            return redact(name), parent_run_id_from(hc.sweep.dir)
    if OmegaConf.select(cfg, "tracking.run_name", default=None):
        return None, None
    return run_names.single_run_name(cfg), None


class _FileOnly(logging.Filter):
    """On console handlers: drops records logged with ``extra={"featstudy_file_only": True}``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "featstudy_file_only", False)


def console_skips_file_only_records() -> None:
    """Install :class:`_FileOnly` on the root logger's console handlers (Hydra's job logging made them)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                and not any(isinstance(f, _FileOnly) for f in handler.filters):
            handler.addFilter(_FileOnly())


#: errno values of a full disk or an exhausted quota
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def disk_error(exc: OSError, output_dir: Path) -> Exception:
    """A full disk under the output folder as a one-line :class:`DataError` naming the folder and the fix; any
    other OSError is returned unchanged."""
    from featstudy.errors import DataError

    if exc.errno not in DISK_FULL:
        return exc
    return DataError(f"paths.output_dir: cannot write {exc.filename or output_dir} ({exc.strerror}); free space on "
                     f"the disk holding {output_dir}, or write elsewhere: paths.log_dir=<folder on another disk>")


class _QuietFileLog:
    """``handleError`` for Hydra's job log file: a full disk is reported once, in one line, instead of a
    "--- Logging error ---" traceback for every record."""

    def __init__(self, handler: logging.Handler):
        self.handler, self.told = handler, False

    def __call__(self, record: logging.LogRecord) -> None:
        if not self.told:
            self.told = True
            exc = sys.exc_info()[1]
            sys.stderr.write(f"[featstudy] cannot write the log file {getattr(self.handler, 'baseFilename', '')} "
                             f"({getattr(exc, 'strerror', None) or exc}); logging goes on to the console only\n")


#: the output folders this process holds (``.featstudy.lock`` path -> lock); one job at a time per process
_CLAIMS: dict[str, Any] = {}


def claim_output_dir(output_dir: Path) -> Any:
    """Create the job's output folder and hold ``.featstudy.lock`` in it for the job's life.

    The run folder's name is already unique (``${unique_dir:}``, created atomically); this guards a folder chosen
    by hand (``hydra.run.dir=...``, ``paths.output_dir=...``): a second job started there while the first runs is
    refused in one line instead of mixing the two journals. The lock dies with its process, so a rerun in the same
    folder later is allowed (its old journal is kept aside). Hydra's log file handlers are made quiet on a full disk.
    """
    from filelock import FileLock, Timeout

    from featstudy.errors import ConfigError

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        path = str(output_dir / ".featstudy.lock")
        stale = _CLAIMS.pop(path, None)
        if stale is not None:  # this process's earlier job there, which ended without releasing it (it raised)
            stale.release(force=True)
        lock = FileLock(path, is_singleton=False)
        lock.acquire(timeout=0)
        _CLAIMS[path] = lock
    except Timeout:
        raise ConfigError(f"paths.output_dir: {output_dir} is in use by another running job; give each job its own "
                          "folder (leave hydra.run.dir and paths.output_dir at their defaults)") from None
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise disk_error(exc, output_dir) from exc
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and not isinstance(handler.handleError, _QuietFileLog):
            handler.handleError = _QuietFileLog(handler)
    return lock
