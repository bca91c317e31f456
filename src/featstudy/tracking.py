"""MLflow tracking: the only module of featstudy that imports mlflow.

Every result is written to the run's output folder first; this module then uploads it. Uploads are best-effort:
each call is retried, and when the tracking store stays unreachable the job goes on (its files are on disk) with a
warning instead of dying.

* Single runs: :meth:`Tracker.start` creates (under a file lock) the SQLite DB and the experiment with an explicit
  absolute ``artifact_location``, then one run.
* Multirun: :class:`SweepCallback` (a Hydra callback, ``hydra.callbacks.mlflow_sweep``) creates the DB, the
  experiment and the sweep's parent run once in the launcher process before any job starts, and writes the parent's
  id to ``<sweep dir>/mlflow_parent_run_id``; every job reads it and becomes a child run
  (tag ``mlflow.parentRunId``). This is what keeps parallel launchers (``hydra/launcher=joblib``) from racing on a
  fresh SQLite file. The parent is ended when the sweep ends: FAILED if any child failed, else FINISHED.
* Run status is set explicitly: FINISHED only after every artifact is logged, FAILED on an exception, KILLED on
  SIGTERM/SIGINT (see :mod:`featstudy.app`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from featstudy.config import flatten
from featstudy.errors import ConfigError

log = logging.getLogger(__name__)

PARENT_ID_FILE = "mlflow_parent_run_id"
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smbfs", "smb3", "lustre", "gpfs", "beegfs", "fuse.sshfs"}
STATUSES = ("FINISHED", "FAILED", "KILLED")


# --------------------------------------------------------------------------------------------- store set-up

def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (made absolute), else None."""
    if not uri.startswith("sqlite:"):
        return None
    raw = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri[len("sqlite:"):]
    return Path(raw if raw.startswith("/") else os.path.abspath(raw))


def normalise_uri(uri: str) -> str:
    """Make a relative ``sqlite:///x.db`` absolute, so no later change of directory can fork the DB."""
    path = sqlite_path(uri)
    return f"sqlite:///{path}" if path is not None else uri


def _filesystem_type(path: Path) -> str | None:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")):
            if len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype


def check_store(uri: str) -> None:
    """Fail fast when a SQLite store cannot be written; warn when it sits on a network filesystem."""
    db = sqlite_path(uri)
    if db is None:
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"tracking.uri: cannot create {db.parent} ({exc.strerror}); "
                          "pick a writable folder, e.g. paths.mlruns_dir=/tmp/mlruns") from None
    if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
        raise ConfigError(f"tracking.uri: {db} is not writable; pick a writable folder, e.g. paths.mlruns_dir=/tmp/mlruns")
    fstype = _filesystem_type(db.parent)
    if fstype in NETWORK_FILESYSTEMS:
        log.warning("tracking.uri: %s is on a network filesystem (%s); SQLite locking is unreliable there. "
                    "Use node-local storage or a tracking server (tracking.uri=http://...).", db, fstype)


def _lock_path(uri: str, artifact_location: str | None) -> Path:
    db = sqlite_path(uri)
    if db is not None:
        return db.with_name(db.name + ".lock")
    base = Path(artifact_location) if artifact_location else Path.home() / ".cache" / "featstudy"
    base.mkdir(parents=True, exist_ok=True)
    return base / "mlflow-setup.lock"


def prepare_experiment(uri: str, experiment_name: str, artifact_location: str | None) -> tuple[Any, str]:
    """Create (migrate) the store and get-or-create the experiment under a file lock; return (client, id)."""
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = normalise_uri(uri)
    check_store(uri)
    with FileLock(str(_lock_path(uri, artifact_location)), timeout=600):
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment_name)
        if exp is None:
            location = None
            if artifact_location and urlparse(uri).scheme in ("sqlite", "file", ""):
                folder = Path(artifact_location).absolute()
                folder.mkdir(parents=True, exist_ok=True)
                location = folder.as_uri()
            exp_id = client.create_experiment(experiment_name, artifact_location=location)
        else:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            exp_id = exp.experiment_id
    return client, exp_id


def git_sha(*candidates: Path) -> str | None:
    """The commit of the first candidate folder that is inside a git checkout, else None."""
    for folder in candidates:
        try:
            out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return None


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    return f"mlflow ui --backend-store-uri {normalise_uri(uri)}" if uri.startswith("sqlite:") else f"open {uri}"


# --------------------------------------------------------------------------------------------- one run

def _retry(fn: Callable[[], Any], what: str, attempts: int = 3, delay: float = 1.0) -> Any:
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any store failure is retried, then surfaced
            if i == attempts - 1:
                raise
            log.warning("MLflow %s failed (%s); retrying in %.0f s", what, exc, delay * (i + 1))
            time.sleep(delay * (i + 1))
    return None


class Tracker:
    """One MLflow run, driven through ``MlflowClient`` (never the fluent API, never ``MLFLOW_RUN_ID``)."""

    def __init__(self, client: Any, run_id: str, uri: str, experiment_id: str):
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.experiment_id = experiment_id
        self.broken: Exception | None = None
        self.ended = False

    # -- life cycle
    @classmethod
    def start(cls, cfg: Any, *, run_name: str | None = None, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> "Tracker | NullTracker":
        """Create a run from ``cfg.tracking``; a :class:`NullTracker` when ``tracking.uri`` is null."""
        t = cfg.tracking
        if t.uri is None:
            log.info("tracking.uri=null: MLflow tracking is off; results stay in %s", cfg.paths.output_dir)
            return NullTracker()
        all_tags = {str(k): str(v) for k, v in (t.get("tags") or {}).items()}
        all_tags.update(tags or {})
        name = run_name or t.get("run_name") or str(cfg.task_name)
        return cls.create(str(t.uri), str(t.experiment_name), t.get("artifact_location"), run_name=name,
                          tags=all_tags, parent_run_id=parent_run_id)

    @classmethod
    def create(cls, uri: str, experiment_name: str, artifact_location: str | None, *, run_name: str,
               tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> "Tracker":
        """Get-or-create the experiment (under a file lock), then create one run in it."""
        uri = normalise_uri(uri)
        client, exp_id = prepare_experiment(uri, experiment_name, artifact_location)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = _retry(lambda: client.create_run(exp_id, tags=all_tags, run_name=run_name), "create_run")
        print(f"[featstudy] MLflow run {run.info.run_id} ({run_name}): store {uri}, artifacts {run.info.artifact_uri}",
              flush=True)
        return cls(client, run.info.run_id, uri, exp_id)

    def end(self, status: str) -> None:
        """Set the terminal status (FINISHED, FAILED or KILLED) once."""
        if self.ended:
            return
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        self.ended = True
        try:
            _retry(lambda: self.client.set_terminated(self.run_id, status=status), "set_terminated")
        except Exception as exc:  # noqa: BLE001
            log.error("MLflow: could not mark run %s %s (%s)", self.run_id, status, exc)

    # -- logging (best-effort)
    def _safe(self, what: str, fn: Callable[[], Any]) -> None:
        if self.broken is not None:
            return
        try:
            _retry(fn, what)
        except Exception as exc:  # noqa: BLE001
            self.broken = exc
            log.error("MLflow %s failed for good (%s); results are still on disk, later uploads are skipped",
                      what, exc)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log params in batches of 100, values cut to MLflow's limit (the full config is an artifact)."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        items = []
        for k, v in params.items():
            v = str(v)
            if len(v) > MAX_PARAM_VAL_LENGTH:
                v = v[: MAX_PARAM_VAL_LENGTH - 3] + "..."
            items.append(Param(k, v))
        for i in range(0, len(items), 100):
            chunk = items[i:i + 100]
            self._safe("log_batch(params)", lambda c=chunk: self.client.log_batch(self.run_id, params=c))

    def log_config(self, cfg: Any) -> None:
        self.log_params(flatten(cfg))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items() if v is not None]
        self._safe("log_batch(tags)", lambda: self.client.log_batch(self.run_id, tags=items))

    def log_metrics(self, metrics: Mapping[str, float], *, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, step) for k, v in metrics.items()]
        self._log_metric_items(items)

    def log_series(self, name: str, steps: Iterable[int], values: Iterable[float]) -> None:
        """One metric as a curve: ``values[i]`` at integer ``step=steps[i]`` (explicit keyword steps)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(name, float(v), now, int(s)) for s, v in zip(steps, values)]
        self._log_metric_items(items)

    def _log_metric_items(self, items: list) -> None:
        for i in range(0, len(items), 1000):
            chunk = items[i:i + 1000]
            self._safe("log_batch(metrics)", lambda c=chunk: self.client.log_batch(self.run_id, metrics=c))

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        """A table through MLflow's table API (JSON, shown in the UI's table views)."""
        self._safe("log_table", lambda: self.client.log_table(self.run_id, data=dict(data), artifact_file=artifact_file))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._safe("log_artifacts", lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path))
        else:
            self._safe("log_artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))


class NullTracker:
    """Stands in for :class:`Tracker` when ``tracking.uri=null``: logs nothing."""

    run_id = None
    uri = None
    broken = None

    def end(self, status: str) -> None:  # noqa: D102
        pass

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith(("log_", "set_")):
            return lambda *a, **k: None
        raise AttributeError(name)


# --------------------------------------------------------------------------------------------- multirun

def parent_run_id_from(sweep_dir: str | Path) -> str | None:
    """The sweep parent's run id written by :class:`SweepCallback`, or None."""
    f = Path(sweep_dir) / PARENT_ID_FILE
    return f.read_text().strip() if f.is_file() else None


try:  # Hydra is a dependency, but keep this module importable (e.g. by the report) without its callbacks API
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[misc,assignment]


class SweepCallback(_HydraCallback):
    """Hydra callback: one MLflow parent run per multirun, created before any job starts.

    ``on_multirun_start`` runs in the launcher process: it creates and migrates the store, creates the experiment
    and the parent run (ACTIVE until the sweep ends) and writes its id into the sweep folder, where the jobs (also
    in joblib/loky worker processes) read it. ``on_multirun_end`` ends the parent: FAILED when any child failed or
    was killed, else FINISHED.
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from featstudy import __version__

        t = config.tracking
        if t.uri is None:
            return
        uri = normalise_uri(str(t.uri))
        launcher = str(config.hydra.launcher.get("_target_", ""))
        if sqlite_path(uri) is not None and any(x in launcher for x in ("joblib", "submitit", "ray", "rq")):
            log.warning("A parallel launcher (%s) with a SQLite store: writes are serialised by SQLite's lock and "
                        "may time out with many jobs; for large sweeps use a server (tracking.uri=http://...).",
                        launcher.rsplit(".", 1)[-1])
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        client, exp_id = prepare_experiment(uri, str(t.experiment_name), t.get("artifact_location"))
        overrides = " ".join(config.hydra.overrides.task)
        tags = {"featstudy.sweep_dir": str(sweep_dir), "featstudy.sweep": overrides, "featstudy.version": __version__,
                "featstudy.role": "sweep"}
        run = client.create_run(exp_id, tags=tags, run_name=f"{config.task_name} sweep: {overrides}"[:250])
        from featstudy.store import atomic_write_text

        atomic_write_text(sweep_dir / PARENT_ID_FILE, run.info.run_id + "\n")
        _OPEN_SWEEPS[run.info.run_id] = uri
        log.info("MLflow sweep parent run %s in %s", run.info.run_id, uri)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if config.tracking.uri is None:
            return
        parent = parent_run_id_from(str(config.hydra.sweep.dir))
        if parent is not None:
            end_sweep(normalise_uri(str(config.tracking.uri)), parent)


#: sweep parents started in this process and not ended yet: run id -> store URI
_OPEN_SWEEPS: dict[str, str] = {}


def end_sweep(uri: str, parent: str, interrupted: bool = False, failed: bool = False) -> str:
    """End a sweep's parent run: KILLED when interrupted, FAILED when the sweep raised or a child did not finish,
    else FINISHED (jobs skipped by ``tracking.resume`` have no child run).

    Prints one line per child that did not finish (the sweep's failures table). Returns the status set.
    """
    from mlflow.tracking import MlflowClient

    _OPEN_SWEEPS.pop(parent, None)
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                  max_results=10000)
    bad = [r for r in children if r.info.status != "FINISHED"]
    status = "KILLED" if interrupted else ("FAILED" if bad or failed else "FINISHED")
    client.set_terminated(parent, status=status)
    print(f"[featstudy] sweep {status}: {len(children) - len(bad)}/{len(children)} jobs FINISHED "
          f"(MLflow parent run {parent})", flush=True)
    for r in bad:
        print(f"  {r.info.status:8s} {r.info.run_name}  {r.data.tags.get('featstudy.output_dir', '')}", flush=True)
    return status


def end_open_sweeps(interrupted: bool = False, failed: bool = False) -> None:
    """End every sweep parent this process started whose ``on_multirun_end`` never ran (Hydra skips it when a job
    raised); called by the CLI's ``finally``."""
    for parent, uri in list(_OPEN_SWEEPS.items()):
        try:
            end_sweep(uri, parent, interrupted=interrupted, failed=failed)
        except Exception as exc:  # noqa: BLE001
            log.error("MLflow: could not end sweep parent run %s (%s)", parent, exc)


# --------------------------------------------------------------------------------------------- reading runs back

def find_job_runs(uri: str, experiment_name: str, *, run_ids: Iterable[str] | None = None,
                  datasets: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Runs to compare: the given ids, else the latest FINISHED job run per ``dataset`` tag.

    Returns dicts with ``run_id``, ``dataset``, ``name``, ``tags``, ``metrics``, ``params``.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=normalise_uri(uri))
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        exp = client.get_experiment_by_name(experiment_name)
        if exp is None:
            raise ConfigError(f"--experiment {experiment_name!r}: no such MLflow experiment in {uri}")
        found = client.search_runs([exp.experiment_id],
                                   filter_string="attributes.status = 'FINISHED' and tags.`featstudy.role` = 'job'",
                                   order_by=["attributes.start_time DESC"], max_results=5000)
        latest: dict[str, Any] = {}
        for r in found:
            ds = r.data.tags.get("dataset")
            if ds and ds not in latest:
                latest[ds] = r
        wanted = list(datasets) if datasets else sorted(latest)
        missing = [d for d in wanted if d not in latest]
        if missing:
            raise ConfigError(f"--datasets: no FINISHED run for {missing} in experiment {experiment_name!r}; "
                              f"runs exist for {sorted(latest)}")
        runs = [latest[d] for d in wanted]
    return [{"run_id": r.info.run_id, "dataset": r.data.tags.get("dataset", r.info.run_id[:8]),
             "name": r.info.run_name, "tags": dict(r.data.tags), "metrics": dict(r.data.metrics),
             "params": dict(r.data.params), "experiment_id": r.info.experiment_id} for r in runs]


def find_finished_run(uri: str, experiment_name: str, config_hash: str) -> Any | None:
    """The latest FINISHED job run whose ``featstudy.config_hash`` tag is ``config_hash``, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=normalise_uri(uri))
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"attributes.status = 'FINISHED' and "
                                            f"tags.`featstudy.config_hash` = '{config_hash}'")
    return runs[0] if runs else None


def download_artifact(uri: str, run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """Download one artifact of a run into ``dst``; return the local path."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=normalise_uri(uri))
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, artifact_path, str(dst)))


def run_info(uri: str, run_id: str) -> dict[str, Any]:
    """Status, tags, params, metrics and artifact paths of one run (for tests and the report)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=normalise_uri(uri))
    r = client.get_run(run_id)

    def walk(path: str | None) -> list[str]:
        out = []
        for f in client.list_artifacts(run_id, path):
            out.extend(walk(f.path) if f.is_dir else [f.path])
        return out

    return {"status": r.info.status, "tags": dict(r.data.tags), "params": dict(r.data.params),
            "metrics": dict(r.data.metrics), "artifacts": sorted(walk(None)), "name": r.info.run_name,
            "experiment_id": r.info.experiment_id,
            "history": lambda key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]}


def child_runs(uri: str, parent_run_id: str) -> list[str]:
    """Ids of the runs whose ``mlflow.parentRunId`` is ``parent_run_id``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=normalise_uri(uri))
    exp_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10000)
    return [r.info.run_id for r in runs]
