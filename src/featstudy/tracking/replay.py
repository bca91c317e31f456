"""Replaying a job's journal into a store, once (:func:`sync_job`): the work of ``python -m featstudy.sync``.

:func:`sync_job` takes the job folder's lock, then :func:`_target_run` finds the run the journal goes into (the
store's synced run of this journal, the job's own partial run, or a new run, made by :func:`_create_target_run`
under its sweep's parent, :func:`_sweep_parent`) and :func:`_replay` sends what that run has not acknowledged, then
its final tags and status. :func:`end_synced_sweeps` ends the sweep parents left open afterwards.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from featstudy.errors import FeatstudyError
from featstudy.tracking.journal import Journal
from featstudy.tracking.store import _lock_path, normalise_uri, prepare_experiment, sqlite_path
from featstudy.tracking.sweep import SWEEP_FILE, end_sweep
from featstudy.tracking.tracker import log_dataset, log_table

log = logging.getLogger("featstudy.sync")  # the name `python -m featstudy.sync` always printed these under

SYNCED_FILE = "mlflow_synced"
LOCK_FILE = ".sync.lock"


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
    """:func:`sync_job` under the folder's lock: the target store, the checks that nothing is left to log, then
    the target run (:func:`_target_run`), the replay (:func:`_replay`) and the ``mlflow_synced`` marker."""
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
    outcome, run_id = _target_run(client, exp_id, folder, uri, job_uri, start, own)
    if outcome != "already synced":
        _replay(client, run_id, folder, ops, j["acks"].get(run_id, set()))
    from featstudy.store import atomic_write_text

    atomic_write_text(marker, json.dumps({"uri": uri, "run_id": run_id, "outcome": outcome,
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    return outcome, run_id


def _target_run(client: Any, exp_id: str, folder: Path, uri: str, job_uri: str | None, start: Mapping[str, Any],
                own: str | None) -> tuple[str, str]:
    """The run the journal goes into, with the outcome: ``already synced`` for a run of this journal that a sync
    completed (nothing to replay); else the store's run of this journal or the job's own run (``completed`` when it
    is the job's own partial run, ``logged`` for one a sync cut short), else a new one (:func:`_create_target_run`,
    ``logged``)."""
    # the store itself: a run of this journal (the job's partial run, or one synced before the marker was written)
    found = client.search_runs([exp_id], max_results=10, order_by=["attributes.start_time ASC"],
                               filter_string=f"tags.`featstudy.journal_id` = '{start['journal_id']}'")
    synced = [r for r in found if r.data.tags.get("featstudy.synced") == "true"
              and r.data.tags.get("featstudy.sync_complete") == "true"]
    if synced:
        return "already synced", synced[0].info.run_id
    if found:
        run_id = found[0].info.run_id
    elif uri == job_uri and _run_exists(client, own):
        run_id = own
    else:
        run_id = _create_target_run(client, exp_id, folder, uri, start)
    return ("completed" if run_id == own else "logged"), run_id


def _create_target_run(client: Any, exp_id: str, folder: Path, uri: str, start: Mapping[str, Any]) -> str:
    """A new run for the journal: its name, start time and tags, under its sweep's parent (:func:`_sweep_parent`),
    tagged ``featstudy.incomplete=true`` until :func:`_replay` has set its status."""
    tags = dict(start.get("tags") or {})
    tags.pop("mlflow.parentRunId", None)
    parent = _sweep_parent(client, exp_id, uri, start)
    if parent:
        tags["mlflow.parentRunId"] = parent
    tags.update({"featstudy.journal_id": start["journal_id"], "featstudy.synced": "true",
                 "featstudy.incomplete": "true", "featstudy.sync_command": f"python -m featstudy.sync {folder}"})
    return client.create_run(exp_id, tags=tags, run_name=start.get("run_name"),
                             start_time=int(float(start.get("time", time.time())) * 1000)).info.run_id


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
