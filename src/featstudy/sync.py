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
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from featstudy.errors import EXIT_USAGE, FeatstudyError
from featstudy.tracking import (HTTP_SETTINGS, JOURNAL_FILE, SWEEP_FILE, SYNCED_FILE, Journal, apply_http_settings,
                                end_sweep, log_dataset, log_table, normalise_uri, prepare_experiment, redact,
                                sqlite_path, store_failure)
from featstudy.tracking.store import _lock_path

log = logging.getLogger(__name__)

LOCK_FILE = ".sync.lock"


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


# --------------------------------------------------------------------------------------------- replay

def _target_artifact_location(uri: str, start: Mapping[str, Any]) -> str | None:
    if uri == start.get("uri"):
        return start.get("artifact_location")
    db = sqlite_path(uri)
    return str(db.parent / "artifacts") if db is not None else None


def _run_exists(client: Any, run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        return client.get_run(run_id).info.lifecycle_stage != "deleted"
    except Exception as exc:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST: a run of another store
        if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
            return False
        raise


def _sweep_parent(client: Any, exp_id: str, uri: str, start: Mapping[str, Any]) -> str | None:
    """The parent run for a synced sweep child: the original one when the target store has it, else the run tagged
    with the sweep folder (created once, under the store's file lock)."""
    if _run_exists(client, start.get("parent_run_id")):
        return start["parent_run_id"]
    sweep_dir = start.get("sweep_dir")
    if not sweep_dir:
        return None
    from filelock import FileLock

    with FileLock(str(_lock_path(uri, _target_artifact_location(uri, start))), timeout=600):
        found = client.search_runs([exp_id], max_results=1,
                                   filter_string=f"tags.`featstudy.role` = 'sweep' and "
                                                 f"tags.`featstudy.sweep_dir` = '{sweep_dir}'")
        if found:
            return found[0].info.run_id
        info_file = Path(sweep_dir) / SWEEP_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        tags = dict(info.get("tags") or {"featstudy.role": "sweep", "featstudy.sweep_dir": sweep_dir})
        tags["featstudy.synced"] = "true"
        run = client.create_run(exp_id, tags=tags, run_name=info.get("run_name") or f"sweep: {sweep_dir}")
        return run.info.run_id


def sync_job(folder: str | Path, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """Log a job from its journal into ``tracking_uri`` (default: the job's own store), once.

    Returns ``(outcome, run_id)`` with outcome ``already logged`` (every upload had succeeded), ``already synced``
    (the marker ``mlflow_synced`` names a run the store has, or the store has a synced run of this journal),
    ``completed`` (the job's own partial run, found in the store, got what it was missing) or ``logged`` (a new run
    with every param, tag, metric step, artifact and table). A synced run carries ``featstudy.synced=true`` and the
    job's real status (KILLED when the journal has no end: the process died); a sweep child gets its sweep's parent.
    Every replayed operation is acknowledged in the journal for the target run, so an interrupted sync resumes.

    The whole of it runs under ``<folder>/.sync.lock``: two syncs of one folder at once would otherwise both find
    no run and create one each.
    """
    from filelock import FileLock, Timeout

    folder = Path(folder).absolute()
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[featstudy.sync] {folder}: another featstudy.sync is logging it; waiting for it", file=sys.stderr,
              flush=True)
        lock.acquire()
    try:
        return _sync_locked(folder, tracking_uri)
    finally:
        lock.release()


def _sync_locked(folder: Path, tracking_uri: str | None) -> tuple[str, str | None]:
    j = Journal.read(folder)
    start, ops = j["start"], j["ops"]
    job_uri = normalise_uri(str(start["uri"])) if start.get("uri") else None
    if tracking_uri is None and job_uri is None:
        raise FeatstudyError(f"{folder}: this job ran with tracking.uri=null; name the store to log it into with "
                             "--tracking-uri URI")
    uri = normalise_uri(tracking_uri) if tracking_uri else job_uri
    own = j["run_id"]
    own_acked = j["acks"].get(own, set()) if own else set()
    if uri == job_uri and own and all(op["seq"] in own_acked for op in ops) and any(op["op"] == "end" for op in ops):
        return "already logged", own

    client, exp_id = prepare_experiment(uri, str(start["experiment_name"]), _target_artifact_location(uri, start))
    marker = folder / SYNCED_FILE
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("uri") == uri and _run_exists(client, done.get("run_id")):
            return "already synced", done["run_id"]
    # the store itself: a run of this journal (the job's partial run, or one synced before the marker was written)
    found = client.search_runs([exp_id], max_results=10, order_by=["attributes.start_time ASC"],
                               filter_string=f"tags.`featstudy.journal_id` = '{start['journal_id']}'")
    synced = [r for r in found if r.data.tags.get("featstudy.synced") == "true"
              and r.data.tags.get("featstudy.sync_complete") == "true"]
    if synced:
        run_id = synced[0].info.run_id
        outcome = "already synced"
    else:
        if found:
            run_id = found[0].info.run_id
        elif uri == job_uri and _run_exists(client, own):
            run_id = own
        else:
            tags = dict(start.get("tags") or {})
            tags.pop("mlflow.parentRunId", None)
            parent = _sweep_parent(client, exp_id, uri, start)
            if parent:
                tags["mlflow.parentRunId"] = parent
            tags.update({"featstudy.journal_id": start["journal_id"], "featstudy.synced": "true",
                         "featstudy.incomplete": "true", "featstudy.sync_command": f"python -m featstudy.sync {folder}"})
            run_id = client.create_run(exp_id, tags=tags, run_name=start.get("run_name"),
                                       start_time=int(float(start.get("time", time.time())) * 1000)).info.run_id
        outcome = "completed" if run_id == own else "logged"
        _replay(client, run_id, folder, ops, j["acks"].get(run_id, set()))
    from featstudy.store import atomic_write_text

    atomic_write_text(marker, json.dumps({"uri": uri, "run_id": run_id, "outcome": outcome,
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    return outcome, run_id


def _replay(client: Any, run_id: str, folder: Path, ops: list[dict], done: set[int]) -> None:
    """Send the operations not acknowledged for ``run_id``, then the final tags and the status."""
    from mlflow.entities import Metric, Param, RunTag

    journal = Journal(folder)
    status, end_time, missing = None, None, []
    for op in ops:
        if op["op"] == "end":
            status, end_time = op["status"], int(float(op["time"]) * 1000)
            continue
        if op["seq"] in done:
            continue
        kind = op["op"]
        if kind == "params":
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in op["params"].items()])
        elif kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in op["tags"].items()])
        elif kind == "metrics":
            client.log_batch(run_id, metrics=[Metric(k, float(v), int(ts), int(step))
                                              for k, v, ts, step in op["metrics"]])
        elif kind == "dataset":  # MLflow keeps one input per (name, digest, context): a replay adds none
            log_dataset(client, run_id, name=op["name"], digest=op["digest"], source=op["source"],
                        profile=op["profile"], context=op["context"])
        elif kind == "table":  # rewritten whole: a replay after a lost ack cannot double the rows
            log_table(client, run_id, op["data"], op["artifact_file"])
        elif kind == "artifact":
            path = Path(op["path"]) if Path(op["path"]).is_absolute() else folder / op["path"]
            if not path.exists():
                missing.append(op["path"])
                continue
            if path.is_dir():
                client.log_artifacts(run_id, str(path), op.get("artifact_path"))
            else:
                client.log_artifact(run_id, str(path), op.get("artifact_path"))
        journal.ack(op["seq"], run_id)
    tags = {"featstudy.synced": "true", "featstudy.sync_complete": "true",
            "featstudy.synced_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if status is None:
        status = "KILLED"
        tags["featstudy.sync_note"] = "the journal has no end: the job's process died; marked KILLED"
    if missing:
        tags["featstudy.sync_missing"] = ",".join(missing)[:5000]
        log.warning("%s: %d journaled file(s) are gone and were not logged: %s", folder, len(missing), missing)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(run_id, status=status, end_time=end_time)
    client.set_tag(run_id, "featstudy.incomplete", "false")  # after the status: never RUNNING and "complete"


def end_synced_sweeps(uri: str, sweep_dirs: Iterable[str | Path], experiment_name: str) -> None:
    """End the sweep parents that sync created or that were left ACTIVE (status from their children)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=normalise_uri(uri))
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return
    for sweep_dir in sweep_dirs:
        for r in client.search_runs([exp.experiment_id], filter_string=f"tags.`featstudy.role` = 'sweep' and "
                                                                       f"tags.`featstudy.sweep_dir` = '{sweep_dir}'"):
            if r.info.status in ("RUNNING", "SCHEDULED"):
                end_sweep(normalise_uri(uri), r.info.run_id)


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
