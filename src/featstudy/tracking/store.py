"""Where a job's runs go: the store's URI and its credentials, the SQLite store and the experiment in it.

Relative ``sqlite:///`` URIs are made absolute (:func:`normalise_uri`); a ``user:password@`` in a URI is moved into
the environment (:func:`use_credentials`, :func:`strip_credentials`) and removed from every text it could be written
in (:func:`redact`). A SQLite store is checked (writable, not on a network filesystem, not half-created) and created
aside then renamed into place, under a file lock (:func:`_lock_path`) shared by every process that prepares the same
store; :func:`prepare_experiment` then gets or creates the experiment. Also: the code's commit (:func:`git_sha`),
the command and page of MLflow's UI (:func:`ui_command`, :func:`ui_url`), MLflow's HTTP client settings
(:func:`apply_http_settings`) and the one line that tells a store's failure (:func:`store_failure`).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from featstudy.errors import ConfigError

log = logging.getLogger("featstudy.tracking")  # the name these messages always had (Hydra's job log shows it)

NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smbfs", "smb3", "lustre", "gpfs", "beegfs", "fuse.sshfs"}
#: conf/tracking keys -> MLflow's own HTTP client settings (its defaults retry for minutes)
HTTP_SETTINGS = {"http_max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "http_backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "http_backoff_jitter": "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
                 "http_timeout": "MLFLOW_HTTP_REQUEST_TIMEOUT"}


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
