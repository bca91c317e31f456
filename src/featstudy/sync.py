"""``python -m featstudy.sync <output folder> [...] [--tracking-uri URI] [--http-*]``: log jobs that could not reach
MLflow.

Every job journals what it logs in ``<output folder>/tracking_journal.jsonl`` (:class:`featstudy.tracking.Journal`)
and which operations reached the store. This command replays the journal of each folder given (a job's output
folder, or a multirun sweep folder: every job in it) into the job's own store, or ``--tracking-uri``:

* every upload had succeeded: skipped, ``already logged``;
* the store has the job's partial run (created before the outage, tagged ``featstudy.incomplete=true``): that run
  is completed with what is missing (no duplicate), its real status set, tagged ``featstudy.synced=true`` and
  ``featstudy.incomplete=false``;
* otherwise the whole run is logged (params, tags, metric steps, artifacts, tables), as a child of the sweep's parent
  run where the job was in a sweep (the original parent, or one created once per sweep folder);
* already synced (marker ``mlflow_synced`` with the run id, checked against the store, or a synced run of this
  journal found in the store): nothing is logged twice.

A job folder is synced under a file lock (``<job folder>/.sync.lock``): a second ``featstudy.sync`` of the same
folder waits, then finds it synced. Tables are rewritten whole, never appended, so a replay after a lost ack cannot
double their rows. MLflow's HTTP client gets the job's ``tracking.http_*`` settings (from its ``config.yaml``),
overridden by ``--http-max-retries``, ``--http-backoff-factor``, ``--http-backoff-jitter``, ``--http-timeout``.
Credentials go in ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``; a ``user:password@`` in
``--tracking-uri`` is moved there and printed or written nowhere.

Exit status: 0 when every job is logged, 1 when a store could not be reached (rerun later), 2 for a folder that is
not a featstudy output folder.

This module is the command line: the replay itself (the target run, the operations sent, the lock, the marker) is
:func:`featstudy.tracking.replay.sync_job`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from featstudy.errors import EXIT_USAGE, FeatstudyError
from featstudy.tracking import (HTTP_SETTINGS, JOURNAL_FILE, Journal, apply_http_settings, normalise_uri, redact,
                                store_failure)
from featstudy.tracking.replay import end_synced_sweeps, sync_job


def is_job_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a job's output folder with a tracking journal."""
    return (Path(folder) / JOURNAL_FILE).is_file()


def job_folders(folder: Path) -> list[Path]:
    """The job folders under ``folder``: itself, or its sub-folders holding a journal (a sweep)."""
    if is_job_folder(folder):
        return [folder]
    if not folder.is_dir():
        raise FeatstudyError(f"{folder}: no such folder; give a job's output folder or a multirun sweep folder")
    jobs = sorted({p.parent for pattern in (f"*/{JOURNAL_FILE}", f"*/*/{JOURNAL_FILE}") for p in folder.glob(pattern)})
    if not jobs:
        raise FeatstudyError(f"{folder}: not a featstudy output folder (no {JOURNAL_FILE} in it or its sub-folders); "
                             "give a job's output folder or a multirun sweep folder")
    return jobs


def http_settings(folder: Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The job's ``tracking.http_*`` (from ``<folder>/config.yaml``), then ``overrides`` (the command line's)."""
    settings: dict[str, Any] = {}
    config = folder / "config.yaml"
    if config.is_file():
        try:
            import yaml

            t = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("tracking") or {}
        except Exception:  # noqa: BLE001 - an unreadable config: MLflow's defaults (or the flags)
            t = {}
        settings = {k: t[k] for k in HTTP_SETTINGS if isinstance(t, Mapping) and t.get(k) is not None}
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return settings


# --------------------------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m featstudy.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="job output folders or multirun sweep folders")
    parser.add_argument("--tracking-uri", default=None,
                        help="log into this store instead of each job's own (credentials: MLFLOW_TRACKING_USERNAME / "
                             "MLFLOW_TRACKING_PASSWORD)")
    parser.add_argument("--http-max-retries", type=int, default=None,
                        help="MLflow HTTP retries per call (default: the job's tracking.http_max_retries)")
    parser.add_argument("--http-backoff-factor", type=int, default=None,
                        help="MLflow HTTP backoff factor (default: the job's tracking.http_backoff_factor)")
    parser.add_argument("--http-backoff-jitter", type=float, default=None,
                        help="MLflow HTTP backoff jitter (default: the job's tracking.http_backoff_jitter)")
    parser.add_argument("--http-timeout", type=int, default=None,
                        help="MLflow HTTP timeout per request, seconds (default: the job's tracking.http_timeout)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        jobs = [job for folder in args.folders for job in job_folders(folder.absolute())]
    except FeatstudyError as exc:
        print(f"featstudy.sync: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    flags = {"http_max_retries": args.http_max_retries, "http_backoff_factor": args.http_backoff_factor,
             "http_backoff_jitter": args.http_backoff_jitter, "http_timeout": args.http_timeout}
    inherited = {env: os.environ.get(env) for env in HTTP_SETTINGS.values()}

    failed = 0
    sweeps: dict[tuple[str, str], set[str]] = {}
    for job in jobs:
        for env, value in inherited.items():  # each job its own settings, not the previous job's
            if value is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = value
        apply_http_settings(http_settings(job, flags))
        try:
            outcome, run_id = sync_job(job, args.tracking_uri)
        except FeatstudyError as exc:
            print(f"featstudy.sync: error: {redact(str(exc).splitlines()[0])}", file=sys.stderr)
            return EXIT_USAGE
        except Exception as exc:  # noqa: BLE001 - the store is still unreachable: say so, go on with the others
            failed += 1
            print(f"[featstudy.sync] {job}: FAILED, store unreachable? ({store_failure(exc)})", file=sys.stderr)
            continue
        print(f"[featstudy.sync] {job}: {outcome} (run {run_id})")
        start = Journal.read(job)["start"]
        if start.get("sweep_dir"):
            uri = normalise_uri(args.tracking_uri or str(start["uri"]))
            sweeps.setdefault((uri, str(start["experiment_name"])), set()).add(start["sweep_dir"])
    for (uri, experiment), dirs in sweeps.items():
        try:
            end_synced_sweeps(uri, sorted(dirs), experiment)
        except Exception as exc:  # noqa: BLE001
            failed += 1
            print(f"[featstudy.sync] could not end the sweep parent runs in {uri} ({redact(str(exc))})",
                  file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
