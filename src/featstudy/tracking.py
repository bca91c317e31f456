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
* Outages: every operation of a job is first appended to ``<output dir>/tracking_journal.jsonl`` (:class:`Journal`),
  then sent; an ``ack`` line records each operation that reached the store. When the store is unreachable (at the
  start or mid-run) the job goes on offline and :func:`sync_job` (``python -m featstudy.sync``) replays the journal
  later: it completes the job's own partial run when the store has it, else logs the whole run, once. A job's run
  is tagged ``featstudy.incomplete=true`` from its creation until its end status reached the store, so a run left
  behind by an outage is findable even when the store never heard of the job again.
* Credentials: a ``user:password@`` in an http(s) ``tracking.uri`` is moved into ``MLFLOW_TRACKING_USERNAME`` /
  ``MLFLOW_TRACKING_PASSWORD`` (:func:`use_credentials`, :func:`strip_credentials`) and written nowhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from featstudy.config import flatten
from featstudy.errors import ConfigError, FeatstudyError

log = logging.getLogger(__name__)

PARENT_ID_FILE = "mlflow_parent_run_id"
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smbfs", "smb3", "lustre", "gpfs", "beegfs", "fuse.sshfs"}
STATUSES = ("FINISHED", "FAILED", "KILLED")
JOURNAL_FILE = "tracking_journal.jsonl"
SYNCED_FILE = "mlflow_synced"
SWEEP_FILE = "tracking_sweep.json"
#: in a sweep folder: one JSON line per job refused before its MLflow run existed (featstudy.app._preflight)
PREFLIGHT_FAILURES = "failed_before_start.jsonl"
#: conf/tracking keys -> MLflow's own HTTP client settings (its defaults retry for minutes)
HTTP_SETTINGS = {"http_max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "http_backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "http_backoff_jitter": "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
                 "http_timeout": "MLFLOW_HTTP_REQUEST_TIMEOUT"}


# --------------------------------------------------------------------------------------------- store set-up

def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (made absolute), else None."""
    if not uri.startswith("sqlite:"):
        return None
    raw = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri[len("sqlite:"):]
    return Path(raw if raw.startswith("/") else os.path.abspath(raw))


def normalise_uri(uri: str) -> str:
    """Make a relative ``sqlite:///x.db`` absolute, so no later change of directory can fork the DB; move the
    ``user:password@`` of an http(s) URI into MLflow's environment variables (:func:`use_credentials`)."""
    uri = use_credentials(uri)
    path = sqlite_path(uri)
    return f"sqlite:///{path}" if path is not None else uri


#: MLflow reads HTTP basic-auth credentials from these at every request
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
#: where a database URI's password goes: the variable its client library reads (libpq, libmysqlclient)
DATABASE_PASSWORD_ENV = {"postgresql": "PGPASSWORD", "postgres": "PGPASSWORD", "mysql": "MYSQL_PWD"}
_USERINFO = re.compile(r"(?i)\b(https?://)[^/@\s'\"\[\],]+@")
_DB_PASSWORD = re.compile(r"(?i)\b((?!https?://)[a-z][a-z0-9+.\-]*://[^/@:\s'\"\[\],]*):[^/@\s'\"\[\],]*@")


def redact(text: str) -> str:
    """``text`` with the ``user:password@`` of every http(s) URL in it removed, and the ``:password`` of every other
    URL (``postgresql://user:password@host/db`` -> ``postgresql://user@host/db``): overrides, log lines, files."""
    return _USERINFO.sub(r"\1", _DB_PASSWORD.sub(r"\1@", text))


def use_credentials(uri: str) -> str:
    """The URI without its secret, which goes into this process's environment (and the jobs it launches), so it is
    never written where the URI is (params, config files, journal, logs):

    * http(s): ``user:password@`` (URL-decoded) -> ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, which
      MLflow sends as HTTP basic auth;
    * ``postgresql[+driver]``/``mysql[+driver]``: the password -> ``PGPASSWORD`` / ``MYSQL_PWD``, read by the
      database's client library; the user stays in the URI;
    * any other URI holding a password: refused (:class:`ConfigError`), as it could only be written in clear.
    """
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, has_password, password = userinfo.partition(":")
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if user:
            os.environ[CREDENTIAL_ENV[0]] = unquote(user)
        if has_password:
            os.environ[CREDENTIAL_ENV[1]] = unquote(password)
        return urlunsplit(parts._replace(netloc=hostport))
    if not has_password:
        return uri
    env = DATABASE_PASSWORD_ENV.get(scheme.split("+", 1)[0])
    if env is None:
        from featstudy.errors import ConfigError

        raise ConfigError(f"tracking.uri: a password inside a {parts.scheme}:// URI would be written in clear into the "
                          "run's params and config files; use a tracking server and MLFLOW_TRACKING_USERNAME / "
                          "MLFLOW_TRACKING_PASSWORD, or the database client's own password variable or file")
    os.environ[env] = unquote(password)
    return urlunsplit(parts._replace(netloc=f"{user}@{hostport}"))


def strip_credentials(cfg: Any) -> None:
    """Move the credentials of ``cfg.tracking.uri`` into the environment (:func:`use_credentials`) and remove them
    from the config, from Hydra's record of the overrides and from the files Hydra already wrote.

    Called by :class:`SweepCallback` before Hydra saves anything (``on_run_start``, ``on_multirun_start``: the
    sweep's jobs are then launched with the clean override) and by the job itself (:func:`featstudy.app.task_wrapper`)
    for a URI that came from a config file, where Hydra's ``.hydra/*.yaml`` are rewritten."""
    from omegaconf import open_dict, read_write

    t = cfg.get("tracking") if hasattr(cfg, "get") else None
    uri = t.get("uri") if t is not None else None
    if isinstance(uri, str) and redact(uri) != uri:
        clean = use_credentials(uri)
        with read_write(cfg), open_dict(cfg):
            cfg.tracking.uri = clean
    if "hydra" in cfg:
        with read_write(cfg), read_write(cfg.hydra), open_dict(cfg.hydra):
            task = cfg.hydra.overrides.get("task")
            if task is not None and any(redact(str(o)) != str(o) for o in task):
                cfg.hydra.overrides.task = [redact(str(o)) for o in task]
            dirname = cfg.hydra.job.get("override_dirname")
            if isinstance(dirname, str) and redact(dirname) != dirname:
                cfg.hydra.job.override_dirname = redact(dirname)
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get() if HydraConfig.initialized() else None
        saved = Path(hc.runtime.output_dir) / hc.output_subdir if hc is not None and hc.output_subdir else None
    except Exception:  # noqa: BLE001 - no Hydra run: nothing was saved
        saved = None
    for f in sorted(saved.glob("*.yaml")) if saved is not None and saved.is_dir() else ():
        text = f.read_text(encoding="utf-8")
        if redact(text) != text:
            from featstudy.store import atomic_write_text

            atomic_write_text(f, redact(text))


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


def _sqlite_store_problem(db: Path) -> str | None:
    """Why the SQLite file ``db`` is not a store MLflow can open (a creation cut short, e.g. by a full disk, leaves
    tables without ``alembic_version``, a ``_alembic_tmp_*`` table, or a revision missing tables, on which MLflow
    re-runs its migrations and fails forever: "table scorers already exists"); None when it is absent, empty or
    complete. Read-only and cheap: the table names and the schema revision."""
    import sqlite3

    if not db.is_file() or db.stat().st_size == 0:
        return None
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            row = con.execute("SELECT version_num FROM alembic_version").fetchone() \
                if "alembic_version" in tables else None
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        return f"not an SQLite database ({exc})"
    if not tables:
        return None
    interrupted = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if interrupted:
        return f"a schema migration was cut short: table {interrupted[0]} is left over"
    if row is None:
        return "it has tables but no schema revision (alembic_version)"
    try:
        from mlflow.store.db.utils import Base

        missing = sorted(set(Base.metadata.tables) - tables)
    except Exception:  # noqa: BLE001 - MLflow's internals moved: leave the check to MLflow
        return None
    if missing:
        return (f"schema revision {row[0]} lacks tables {missing[:3]}; if an older MLflow made it, back it up and "
                f"run `mlflow db upgrade sqlite:///{db}` instead")
    return None


def _is_disk_full(exc: BaseException) -> bool:
    import errno

    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(exc) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _create_sqlite_store(db: Path) -> None:
    """Create and migrate a new SQLite store in a temporary file next to ``db``, then rename it into place: a
    creation cut short (full disk, kill) never leaves a half-created store at ``db``. Called under the setup lock."""
    from mlflow.tracking import MlflowClient

    from featstudy.errors import DataError

    for stale in db.parent.glob(f".{db.name}.creating-*"):  # a creation killed earlier (we hold the lock now)
        stale.unlink(missing_ok=True)
    tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
    leftovers = [tmp] + [tmp.with_name(tmp.name + suffix) for suffix in ("-journal", "-wal", "-shm")]
    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp}")
        client.search_experiments(max_results=1)  # opening the store creates and migrates every table
        try:
            client._tracking_client.store.engine.dispose()
        except AttributeError:
            pass
        os.replace(tmp, db)
    except BaseException as exc:
        for f in leftovers:
            f.unlink(missing_ok=True)
        if isinstance(exc, Exception) and _is_disk_full(exc):
            raise DataError(f"tracking.uri: no space left on the disk holding {db.parent} to create the MLflow "
                            f"store {db.name} (nothing was left behind); free space there or put the store on "
                            "another disk: paths.mlruns_dir=<folder>") from None
        raise


def _lock_path(uri: str, artifact_location: str | None) -> Path:
    db = sqlite_path(uri)
    if db is not None:
        return db.with_name(db.name + ".lock")
    base = Path(artifact_location) if artifact_location else Path.home() / ".cache" / "featstudy"
    base.mkdir(parents=True, exist_ok=True)
    return base / "mlflow-setup.lock"


#: MLflow 3's UI opens an experiment on the page this tag names; without it, an experiment with no traces opens on
#: the GenAI overview ("No data available"), a tab away from the runs. ``custom_model_development`` opens on Runs.
#: A value the user set is kept.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def prepare_experiment(uri: str, experiment_name: str, artifact_location: str | None) -> tuple[Any, str]:
    """Create (migrate) the store and get-or-create the experiment under a file lock; return (client, id).

    A SQLite store is checked first (:func:`_sqlite_store_problem`: a half-created one is named with its fix) and a
    new one is created aside and renamed into place (:func:`_create_sqlite_store`)."""
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    from featstudy.errors import DataError

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = normalise_uri(uri)
    check_store(uri)
    db = sqlite_path(uri)
    with FileLock(str(_lock_path(uri, artifact_location)), timeout=600):
        if db is not None:
            problem = _sqlite_store_problem(db)
            if problem is not None:
                raise DataError(f"tracking.uri: {db} is a half-created MLflow store ({problem}); move it aside "
                                f"(mv {db} {db}.broken) or delete it, and rerun")
            if not db.exists() or db.stat().st_size == 0:
                _create_sqlite_store(db)
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment_name)
        if exp is None:
            location = None
            if artifact_location and urlparse(uri).scheme in ("sqlite", "file", ""):
                folder = Path(artifact_location).absolute()
                folder.mkdir(parents=True, exist_ok=True)
                location = folder.as_uri()
            exp_id = client.create_experiment(experiment_name, artifact_location=location,
                                              tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            exp_id = exp.experiment_id
            if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # an experiment from an older featstudy: runs first too
                client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
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


#: MLflow 3.17's UI opens an experiment in its GenAI view (traces) unless the URL or the browser's saved choice
#: says otherwise; the experiment's ``mlflow.experimentKind`` tag is not enough (checked in a browser). This
#: query opens the "Model training" view, on the runs table.
UI_RUNS_VIEW = "?workflowType=machine_learning"


def ui_url(base: str, experiment_id: str) -> str:
    """The UI page of an experiment's runs table: ``<base>/#/experiments/<id>?workflowType=machine_learning``."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}{UI_RUNS_VIEW}"


def ui_command(uri: str, experiment_id: str | None = None) -> str:
    """The command that opens the MLflow UI on this store, runnable as printed: ``mlflow`` when the shell's PATH
    finds this environment's, else its absolute path (e.g. ``<repo>/.venv/bin/mlflow`` when the venv is not
    activated)."""
    if not uri.startswith("sqlite:"):
        return f"open {ui_url(uri, experiment_id) if experiment_id else uri}"
    import shutil
    import sys

    ours = Path(sys.executable).with_name("mlflow")
    on_path = shutil.which("mlflow")
    exe = "mlflow"
    if ours.is_file() and (on_path is None or Path(on_path).resolve() != ours.resolve()):
        exe = str(ours)
    command = f"{exe} ui --backend-store-uri {normalise_uri(uri)}"
    return command + (f"   then open {ui_url('http://127.0.0.1:5000', experiment_id)}" if experiment_id else "")


# --------------------------------------------------------------------------------------------- one run

def store_failure(exc: BaseException) -> str:
    """The first line of a tracking store's error, and the fix when the server refused the login (HTTP 401/403: a
    server started with MLflow's basic-auth, e.g. ``make tracking-server``), which is no outage."""
    first = redact(str(exc).splitlines()[0][:300]) if str(exc) else type(exc).__name__
    if re.search(r"\b(401|403)\b|Unauthorized|not authenticated|Permission denied", str(exc), re.IGNORECASE):
        first += ("; the server refused the login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (for "
                  "make tracking-server: eval \"$(scripts/tracking_server.sh env)\")")
    return first


def apply_http_settings(t: Any) -> None:
    """Export ``tracking.http_*`` as MLflow's ``MLFLOW_HTTP_REQUEST_*`` variables (read by MLflow at each call), so
    an unreachable server costs seconds, not minutes. Unset keys leave MLflow's defaults. ``http_max_retries`` also
    bounds MLflow's retries when it opens a database URI directly."""
    for key, env in HTTP_SETTINGS.items():
        value = t.get(key) if hasattr(t, "get") else None
        if value is not None:
            os.environ[env] = str(int(value) if env != "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER" else float(value))
    retries = t.get("http_max_retries") if hasattr(t, "get") else None
    if retries is not None:
        # a database URI (postgresql://...) is opened by MLflow's create_sqlalchemy_engine_with_retry: 10 tries,
        # 0.1 * (2^n - 1) s apart, about 100 s against a dead server; the same budget as the HTTP client instead
        from mlflow.store.db import utils as db_utils

        db_utils.MAX_RETRY_COUNT = int(retries) + 1


def log_table(client: Any, run_id: str, data: Mapping[str, list], artifact_file: str) -> None:
    """Write ``data`` (column -> values) as ``artifact_file`` of the run, replacing what is there.

    The file has the format ``MlflowClient.log_table`` writes (pandas' ``orient="split"`` JSON without index,
    ``{"columns": [...], "data": [[...], ...]}``; floats at full precision, NaN as null) and the run gets the same
    ``mlflow.loggedArtifacts`` entry, so the UI shows it as a table. Unlike ``log_table``, which appends to an
    existing file, it overwrites: an upload replayed after a lost ack (a process killed between the upload and its
    journal line) cannot double the rows.
    """
    import math
    import posixpath
    import tempfile

    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    def plain(v: Any) -> Any:
        v = v.item() if hasattr(v, "item") else v  # numpy scalars
        return None if isinstance(v, float) and not math.isfinite(v) else v

    columns = [str(k) for k in data]
    values = [list(v) for v in data.values()]
    rows = [[plain(col[i]) for col in values] for i in range(len(values[0]) if values else 0)]
    norm = posixpath.normpath(artifact_file)
    folder = posixpath.dirname(norm) or None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / posixpath.basename(norm)
        local.write_text(json.dumps({"columns": columns, "data": rows}, default=str), encoding="utf-8")
        client.log_artifact(run_id, str(local), folder)
    logged = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in logged:
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))


def log_dataset(client: Any, run_id: str, *, name: str, digest: str, source: str, profile: Mapping[str, Any],
                context: str) -> None:
    """Log ``name`` (content ``digest``, read from ``source``) as the run's input dataset with the context tag
    ``mlflow.data.context`` (the split): what the UI's Dataset column shows. Idempotent: MLflow keeps one input per
    (name, digest, context), so a replay by sync does not add a second."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = Dataset(name=name, digest=digest, source_type="local" if source.startswith("/") else "featstudy",
                 source=json.dumps({"uri": source}), profile=json.dumps(dict(profile), sort_keys=True))
    client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])


def _retry(fn: Callable[[], Any], what: str, attempts: int = 3, delay: float = 1.0) -> Any:
    attempts = max(1, int(attempts))
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any store failure is retried, then surfaced
            if i == attempts - 1:
                raise
            log.warning("MLflow %s failed (%s); retrying in %.0f s", what, exc, delay * (i + 1))
            time.sleep(delay * (i + 1))
    return None


class Journal:
    """The local record of one job's tracking: ``<output dir>/tracking_journal.jsonl``, the single source for replay.

    Line 1 (``op: start``) holds the run's identity: journal id, store URI, experiment, artifact location, run name,
    tags, sweep parent id and sweep folder. Every later operation (``params``, ``tags``, ``metrics`` with value,
    timestamp and step, ``artifact`` as a path relative to the output folder, ``table``, ``end`` with the status) is
    one line with a sequence number, appended and fsynced *before* it is sent; ``{"ack": seq, "run": id}`` is appended
    once it reached run ``id`` (``{"run_created": id}`` when the run was created). Appends of one line are atomic
    enough: a torn last line (the process killed mid-write) is ignored when read.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / JOURNAL_FILE
        self.seq = 0

    def write(self, entry: Mapping[str, Any]) -> None:
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def record(self, op: str, **payload: Any) -> int:
        self.seq += 1
        self.write({"seq": self.seq, "op": op, **payload})
        return self.seq

    def ack(self, seq: int, run_id: str) -> None:
        self.write({"ack": seq, "run": run_id})

    @classmethod
    def start(cls, folder: str | Path, **identity: Any) -> "Journal":
        import uuid

        j = cls(folder)
        j.folder.mkdir(parents=True, exist_ok=True)
        if j.path.exists():  # a job rerun in the same folder: keep the old journal aside, start a new one
            j.path.rename(j.path.with_name(f"{JOURNAL_FILE}.{int(time.time() * 1000)}"))
        j.journal_id = uuid.uuid4().hex
        j.write({"op": "start", "journal_id": j.journal_id, "time": time.time(), **identity})
        return j

    @staticmethod
    def read(folder: str | Path) -> dict[str, Any]:
        """``start`` (identity), ``ops`` (in order), ``acks`` (run id -> acked seqs), ``run_id`` (the job's run)."""
        path = Path(folder) / JOURNAL_FILE
        start, ops, acks, run_id = None, [], {}, None
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            if e.get("op") == "start":
                start = e
            elif "ack" in e:
                acks.setdefault(e["run"], set()).add(e["ack"])
            elif "run_created" in e:
                run_id = e["run_created"]
            elif "seq" in e:
                ops.append(e)
        if start is None:
            raise FeatstudyError(f"{path}: no start record; not a featstudy tracking journal")
        return {"start": start, "ops": ops, "acks": acks, "run_id": run_id}


class Tracker:
    """One MLflow run, driven through ``MlflowClient`` (never the fluent API, never ``MLFLOW_RUN_ID``)."""

    def __init__(self, client: Any, run_id: str | None, uri: str, experiment_id: str | None,
                 journal: Journal | None = None, retries: int = 3, retry_delay: float = 1.0):
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.experiment_id = experiment_id
        self.journal = journal
        self.retries = retries
        self.retry_delay = retry_delay
        self.broken: Exception | None = None
        self.off = False  # tracking.uri=null: journal only
        self.ended = False

    # -- life cycle
    @classmethod
    def start(cls, cfg: Any, *, run_name: str | None = None, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None, sweep_dir: str | Path | None = None) -> "Tracker":
        """Create a run from ``cfg.tracking``; with ``tracking.uri=null`` a journal-only tracker (:meth:`offline`)."""
        t = cfg.tracking
        all_tags = {str(k): str(v) for k, v in (t.get("tags") or {}).items()}
        all_tags.update(tags or {})
        name = run_name or t.get("run_name") or str(cfg.task_name)
        if t.uri is None:
            return cls.offline(cfg.paths.output_dir, str(t.experiment_name), t.get("artifact_location"),
                               run_name=name, tags=all_tags, sweep_dir=sweep_dir)
        apply_http_settings(t)
        return cls.create(str(t.uri), str(t.experiment_name), t.get("artifact_location"), run_name=name,
                          tags=all_tags, parent_run_id=parent_run_id, journal_dir=cfg.paths.output_dir,
                          sweep_dir=sweep_dir, retries=int(t.get("retries", 3)),
                          retry_delay=float(t.get("retry_delay", 1.0)))

    @classmethod
    def offline(cls, journal_dir: str | Path, experiment_name: str, artifact_location: str | None, *,
                run_name: str, tags: Mapping[str, str] | None = None,
                sweep_dir: str | Path | None = None) -> "Tracker":
        """Tracking off (``tracking.uri=null``): nothing is sent, but the job keeps its journal, so
        ``python -m featstudy.sync <folder> --tracking-uri URI`` can log it into a store later."""
        journal = Journal.start(journal_dir, uri=None, experiment_name=experiment_name,
                                artifact_location=artifact_location, run_name=run_name, tags=dict(tags or {}),
                                parent_run_id=None, sweep_dir=str(sweep_dir) if sweep_dir else None)
        log.info("tracking.uri=null: MLflow tracking is off; results and their journal stay in %s", journal.folder)
        tracker = cls(None, None, None, None, journal)
        tracker.off = True
        return tracker

    @classmethod
    def create(cls, uri: str, experiment_name: str, artifact_location: str | None, *, run_name: str,
               tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
               journal_dir: str | Path | None = None, sweep_dir: str | Path | None = None, retries: int = 3,
               retry_delay: float = 1.0) -> "Tracker":
        """Get-or-create the experiment (under a file lock), then create one run in it.

        With ``journal_dir`` every operation is journaled there first (:class:`Journal`) and a store that cannot be
        reached does not stop the job: the tracker goes on offline (``broken``) and ``python -m featstudy.sync``
        logs the run later. Without it (e.g. the report) a failing store raises.
        """
        uri = normalise_uri(uri)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        journal = None
        if journal_dir is not None:
            journal = Journal.start(journal_dir, uri=uri, experiment_name=experiment_name,
                                    artifact_location=artifact_location, run_name=run_name, tags=all_tags,
                                    parent_run_id=parent_run_id, sweep_dir=str(sweep_dir) if sweep_dir else None)
            all_tags["featstudy.journal_id"] = journal.journal_id
            # true until the end status reached the store: a run left behind by an outage is findable
            # (tags.`featstudy.incomplete` = 'true') even when the store never heard of the job again
            all_tags["featstudy.incomplete"] = "true"
            all_tags["featstudy.sync_command"] = f"python -m featstudy.sync {journal.folder}"
        try:
            client, exp_id = prepare_experiment(uri, experiment_name, artifact_location)
            run = _retry(lambda: client.create_run(exp_id, tags=all_tags, run_name=run_name), "create_run",
                         retries, retry_delay)
        except FeatstudyError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store is unreachable: go on offline when journaling
            if journal is None:
                raise
            log.error("MLflow store %s unreachable (%s); the job goes on offline, every result stays in %s. "
                      "Log it later: python -m featstudy.sync %s", uri, store_failure(exc), journal.folder,
                      journal.folder)
            tracker = cls(None, None, uri, None, journal, retries, retry_delay)
            tracker.broken = exc
            return tracker
        if journal is not None:
            journal.write({"run_created": run.info.run_id, "experiment_id": exp_id})
        print(f"[featstudy] MLflow run {run.info.run_id} ({run_name}): store {uri}, artifacts {run.info.artifact_uri}",
              flush=True)
        return cls(client, run.info.run_id, uri, exp_id, journal, retries, retry_delay)

    def end(self, status: str) -> None:
        """Set the terminal status (FINISHED, FAILED or KILLED) once."""
        if self.ended:
            return
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        self.ended = True
        seq = self.journal.record("end", status=status, time=time.time()) if self.journal else None
        if self.off:
            print(f"[featstudy] tracking.uri=null: nothing was sent to MLflow. To log this job later: "
                  f"python -m featstudy.sync {self.journal.folder} --tracking-uri URI", file=sys.stderr, flush=True)
            return
        if self.broken is not None:
            # Uploads are incomplete: the run is left as it is (RUNNING with featstudy.incomplete=true, set when it
            # was created, or absent) for `featstudy.sync` to complete.
            if self.journal is not None:
                print(f"[featstudy] MLflow uploads incomplete ({store_failure(self.broken)}); "
                      f"log them later: python -m featstudy.sync {self.journal.folder}", file=sys.stderr, flush=True)
            return
        try:
            _retry(lambda: self.client.set_terminated(self.run_id, status=status), "set_terminated",
                   self.retries, self.retry_delay)
            if self.journal is not None:  # the status is in: the run is complete (ended before the tag: never
                # RUNNING with incomplete=false; a failure here leaves the end unacked, for sync to finish)
                _retry(lambda: self.client.set_tag(self.run_id, "featstudy.incomplete", "false"), "set_tag",
                       self.retries, self.retry_delay)
            if seq is not None:
                self.journal.ack(seq, self.run_id)
        except Exception as exc:  # noqa: BLE001
            log.error("MLflow: could not mark run %s %s (%s)", self.run_id, status, exc)

    # -- logging (best-effort)
    def _record(self, op: str, **payload: Any) -> int | None:
        return self.journal.record(op, **payload) if self.journal is not None else None

    def _safe(self, what: str, fn: Callable[[], Any], seq: int | None = None) -> None:
        if self.broken is not None or self.off:
            return
        try:
            _retry(fn, what, self.retries, self.retry_delay)
        except Exception as exc:  # noqa: BLE001
            self.broken = exc
            log.error("MLflow %s failed for good (%s); results are still on disk, later uploads are skipped%s",
                      what, exc, f"; log them later: python -m featstudy.sync {self.journal.folder}"
                      if self.journal else "")
            return
        if seq is not None:
            self.journal.ack(seq, self.run_id)

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
            seq = self._record("params", params={p.key: p.value for p in chunk})
            self._safe("log_batch(params)", lambda c=chunk: self.client.log_batch(self.run_id, params=c), seq)

    def log_config(self, cfg: Any) -> None:
        self.log_params(flatten(cfg))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items() if v is not None]
        seq = self._record("tags", tags={t.key: t.value for t in items})
        self._safe("log_batch(tags)", lambda: self.client.log_batch(self.run_id, tags=items), seq)

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
            seq = self._record("metrics", metrics=[[m.key, m.value, m.timestamp, m.step] for m in chunk])
            self._safe("log_batch(metrics)", lambda c=chunk: self.client.log_batch(self.run_id, metrics=c), seq)

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        """A table in MLflow's table format (JSON, shown in the UI's table views), see :func:`log_table`."""
        seq = self._record("table", data={k: list(v) for k, v in data.items()}, artifact_file=artifact_file)
        self._safe("log_table", lambda: log_table(self.client, self.run_id, data, artifact_file), seq)

    def log_dataset(self, name: str, digest: str, source: str, profile: Mapping[str, Any], context: str) -> None:
        """The run's input dataset, as MLflow's dataset input (the runs table's Dataset column), see
        :func:`log_dataset`."""
        payload = {"name": name, "digest": digest, "source": source, "profile": dict(profile), "context": context}
        seq = self._record("dataset", **payload)
        self._safe("log_inputs", lambda: log_dataset(self.client, self.run_id, **payload), seq)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        rel = str(path.absolute())
        if self.journal is not None:
            try:
                rel = str(path.absolute().relative_to(self.journal.folder.absolute()))
            except ValueError:
                pass
        seq = self._record("artifact", path=rel, artifact_path=artifact_path, is_dir=path.is_dir())
        if path.is_dir():
            self._safe("log_artifacts", lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path), seq)
        else:
            self._safe("log_artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path), seq)


# --------------------------------------------------------------------------------------------- multirun

def parent_run_id_from(sweep_dir: str | Path) -> str | None:
    """The sweep parent's run id written by :class:`SweepCallback`, or None."""
    f = Path(sweep_dir) / PARENT_ID_FILE
    return f.read_text().strip() if f.is_file() else None


try:  # Hydra is a dependency, but keep this module importable (e.g. by the report) without its callbacks API
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[misc,assignment]


def fresh_joblib_workers() -> None:
    """Shut down joblib's reusable loky workers left by an earlier sweep in this process (a notebook, a test
    session): they were started with that time's environment, so a sweep's jobs would miss what was set since
    (``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``, the credentials moved out of ``tracking.uri``,
    ``CUDA_VISIBLE_DEVICES``) and be refused by the server or see other GPUs. The launcher then starts new ones."""
    module = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(module, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True)


class SweepCallback(_HydraCallback):
    """Hydra callback: one MLflow parent run per multirun, created before any job starts.

    ``on_multirun_start`` runs in the launcher process: it creates and migrates the store, creates the experiment
    and the parent run (ACTIVE until the sweep ends) and writes its id into the sweep folder, where the jobs (also
    in joblib/loky worker processes) read it. ``on_multirun_end`` ends the parent: FAILED when any child failed or
    was killed, else FINISHED.

    Both ``on_run_start`` and ``on_multirun_start`` first move the credentials of ``tracking.uri`` out of the config
    and of Hydra's overrides (:func:`strip_credentials`), before Hydra writes ``.hydra/*.yaml`` or
    ``multirun.yaml`` or launches the sweep's jobs.
    """

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        strip_credentials(config)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from featstudy import __version__

        strip_credentials(config)
        t = config.tracking
        uri = normalise_uri(str(t.uri)) if t.uri is not None else None
        launcher = str(config.hydra.launcher.get("_target_", ""))
        if "joblib" in launcher:
            fresh_joblib_workers()
        parallel = any(x in launcher for x in ("joblib", "submitit", "ray", "rq"))
        if uri is not None and sqlite_path(uri) is not None and parallel:
            log.warning("A parallel launcher (%s) with a SQLite store: writes are serialised by SQLite's lock and "
                        "may time out with many jobs; for large sweeps use a server (tracking.uri=http://...).",
                        launcher.rsplit(".", 1)[-1])
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = " ".join(config.hydra.overrides.task)
        tags = {"featstudy.sweep_dir": str(sweep_dir), "featstudy.sweep": overrides, "featstudy.version": __version__,
                "featstudy.role": "sweep"}
        name = f"{config.task_name} sweep: {overrides}"[:250]
        from featstudy.store import atomic_write_text

        # the sweep's identity, for `featstudy.sync` to create the parent when the store is unreachable now
        atomic_write_text(sweep_dir / SWEEP_FILE, json.dumps({"uri": uri, "experiment_name": str(t.experiment_name),
                                                              "run_name": name, "tags": tags}, indent=1))
        if uri is None:  # tracking off: the jobs keep journals; `featstudy.sync --tracking-uri` makes this parent
            return
        apply_http_settings(t)
        try:
            client, exp_id = prepare_experiment(uri, str(t.experiment_name), t.get("artifact_location"))
            run = _retry(lambda: client.create_run(exp_id, tags=tags, run_name=name), "create_run(sweep)",
                         int(t.get("retries", 3)), float(t.get("retry_delay", 1.0)))
        except FeatstudyError:
            raise
        except Exception as exc:  # noqa: BLE001 - the jobs run offline; sync creates the parent later
            log.error("MLflow store %s unreachable (%s); the sweep runs offline. Log it later: "
                      "python -m featstudy.sync %s", uri, store_failure(exc), sweep_dir)
            return
        atomic_write_text(sweep_dir / PARENT_ID_FILE, run.info.run_id + "\n")
        _OPEN_SWEEPS[run.info.run_id] = uri
        log.info("MLflow sweep parent run %s in %s", run.info.run_id, uri)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if config.tracking.uri is None:
            return
        parent = parent_run_id_from(str(config.hydra.sweep.dir))
        if parent is not None:
            try:
                end_sweep(normalise_uri(str(config.tracking.uri)), parent)
            except Exception as exc:  # noqa: BLE001 - the store went away during the sweep
                log.error("MLflow: could not end sweep parent run %s (%s); python -m featstudy.sync %s ends it",
                          parent, str(exc).splitlines()[0][:300], config.hydra.sweep.dir)


#: sweep parents started in this process and not ended yet: run id -> store URI
_OPEN_SWEEPS: dict[str, str] = {}


def record_preflight_failure(sweep_dir: str | Path, name: str, output_dir: str, error: str) -> None:
    """Append a job refused before its run existed to the sweep folder's :data:`PREFLIGHT_FAILURES` (one line,
    under a lock: joblib jobs append at once)."""
    from filelock import FileLock

    path = Path(sweep_dir) / PREFLIGHT_FAILURES
    try:
        with FileLock(str(path) + ".lock", timeout=60), open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"name": name, "output_dir": output_dir, "error": error}) + "\n")
    except OSError as exc:
        log.error("could not record the refused job in %s (%s)", path, exc.strerror or exc)


def preflight_failures(sweep_dir: str | Path | None) -> list[dict]:
    """The jobs of a sweep refused before their run existed (:func:`record_preflight_failure`)."""
    if not sweep_dir:
        return []
    path = Path(sweep_dir) / PREFLIGHT_FAILURES
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def end_sweep(uri: str, parent: str, interrupted: bool = False, failed: bool = False) -> str:
    """End a sweep's parent run: KILLED when interrupted, FAILED when the sweep raised or a child did not finish,
    else FINISHED (jobs skipped by ``tracking.resume`` have no child run).

    Prints one line per child that did not finish (the sweep's failures table). Returns the status set.
    """
    from mlflow.tracking import MlflowClient

    _OPEN_SWEEPS.pop(parent, None)
    client = MlflowClient(tracking_uri=uri)
    parent_run = client.get_run(parent)
    exp_id = parent_run.info.experiment_id
    children = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                  max_results=10000)
    refused = preflight_failures(parent_run.data.tags.get("featstudy.sweep_dir"))
    bad = [r for r in children if r.info.status != "FINISHED"]
    status = "KILLED" if interrupted else ("FAILED" if bad or refused or failed else "FINISHED")
    client.set_terminated(parent, status=status)
    total = len(children) + len(refused)
    print(f"[featstudy] sweep {status}: {len(children) - len(bad)}/{total} jobs FINISHED "
          f"(MLflow parent run {parent})", flush=True)
    for r in bad:
        print(f"  {r.info.status:8s} {r.info.run_name}  {r.data.tags.get('featstudy.output_dir', '')}", flush=True)
    for job in refused:  # refused before their run existed: no MLflow run, listed here
        print(f"  {'REFUSED':8s} {job.get('name')}  {job.get('output_dir', '')}: {job.get('error', '')}", flush=True)
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
                  datasets: Iterable[str] | None = None, tags: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Runs to compare: the given ids, else the latest FINISHED job run per ``dataset`` tag among those whose tags
    hold every ``tags`` item.

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
        where = "attributes.status = 'FINISHED' and tags.`featstudy.role` = 'job'"
        for key, value in (tags or {}).items():
            where += " and tags.`{}` = '{}'".format(key.replace("`", ""), str(value).replace("'", "\\'"))
        found = client.search_runs([exp.experiment_id], filter_string=where,
                                   order_by=["attributes.start_time DESC"], max_results=5000)
        latest: dict[str, Any] = {}
        for r in found:
            ds = r.data.tags.get("dataset")
            if ds and ds not in latest:
                latest[ds] = r
        wanted = list(datasets) if datasets else sorted(latest)
        missing = [d for d in wanted if d not in latest]
        if missing:
            having = f" with tags {dict(tags)}" if tags else ""
            raise ConfigError(f"--datasets: no FINISHED run{having} for {missing} in experiment "
                              f"{experiment_name!r}; runs exist for {sorted(latest)}")
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


# --------------------------------------------------------------------------------------------- sync (replay)

def sync_job(folder: str | Path, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """Log a job from its journal, once: :func:`featstudy.sync.sync_job` (kept here for existing callers)."""
    from featstudy.sync import sync_job as _sync_job

    return _sync_job(folder, tracking_uri)
