"""MLflow tracking: the only package of featstudy that imports mlflow.

Every result is written to the run's output folder first; this package then uploads it. Uploads are best-effort:
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

The modules, each imported here so that ``featstudy.tracking.<name>`` is every public name (as in the Hydra
callback's ``_target_: featstudy.tracking.SweepCallback``):

:mod:`~featstudy.tracking.store` owns the store: URIs (:func:`sqlite_path`, :func:`normalise_uri`), credentials and
their redaction (:func:`use_credentials`, :func:`strip_credentials`, :func:`redact`), the checks and the creation of
a SQLite store, the setup lock, :func:`prepare_experiment`, :func:`git_sha`, the UI's command and page
(:func:`ui_command`, :func:`ui_url`), MLflow's HTTP client settings (:func:`apply_http_settings`,
:data:`HTTP_SETTINGS`) and the one-line account of a store's failure (:func:`store_failure`).

:mod:`~featstudy.tracking.journal` owns :class:`Journal`, the job folder's ``tracking_journal.jsonl``
(:data:`JOURNAL_FILE`): every operation, appended before it is sent, and its acknowledgements.

:mod:`~featstudy.tracking.tracker` owns :class:`Tracker`, one job's run from creation to terminal status
(:data:`STATUSES`), and the uploads it and the replay share: :func:`log_table`, :func:`log_dataset` and the retry
of a store call.

:mod:`~featstudy.tracking.sweep` owns a multirun's parent run: :class:`SweepCallback`, :func:`parent_run_id_from`
(:data:`PARENT_ID_FILE`), the sweep's identity file (:data:`SWEEP_FILE`), :func:`fresh_joblib_workers`, the jobs
refused before their run existed (:func:`record_preflight_failure`, :func:`preflight_failures`,
:data:`PREFLIGHT_FAILURES`) and the end of the parent (:func:`end_sweep`, :func:`end_open_sweeps`).

:mod:`~featstudy.tracking.queries` owns reading runs back: :func:`find_job_runs` and :func:`download_artifact` (the
report), :func:`find_finished_run` (``tracking.resume``).

:mod:`~featstudy.tracking.replay` owns :func:`sync_job`, the replay of a journal into a store, once (marker
:data:`SYNCED_FILE`), with the end of the sweep parents it leaves open; :mod:`featstudy.sync` is its command line.
"""

from featstudy.tracking.journal import JOURNAL_FILE, Journal
from featstudy.tracking.queries import download_artifact, find_finished_run, find_job_runs
from featstudy.tracking.replay import SYNCED_FILE, sync_job
from featstudy.tracking.store import (CREDENTIAL_ENV, DATABASE_PASSWORD_ENV, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG,
                                      HTTP_SETTINGS, NETWORK_FILESYSTEMS, UI_RUNS_VIEW, apply_http_settings,
                                      check_store, git_sha, normalise_uri, prepare_experiment, redact, sqlite_path,
                                      store_failure, strip_credentials, ui_command, ui_url, use_credentials)
from featstudy.tracking.sweep import (PARENT_ID_FILE, PREFLIGHT_FAILURES, SWEEP_FILE, SweepCallback, end_open_sweeps,
                                      end_sweep, fresh_joblib_workers, parent_run_id_from, preflight_failures,
                                      record_preflight_failure)
from featstudy.tracking.tracker import STATUSES, Tracker, log_dataset, log_table

__all__ = [
    # store
    "CREDENTIAL_ENV", "DATABASE_PASSWORD_ENV", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "HTTP_SETTINGS",
    "NETWORK_FILESYSTEMS", "UI_RUNS_VIEW", "apply_http_settings", "check_store", "git_sha", "normalise_uri",
    "prepare_experiment", "redact", "sqlite_path", "store_failure", "strip_credentials", "ui_command", "ui_url",
    "use_credentials",
    # journal
    "JOURNAL_FILE", "Journal",
    # tracker
    "STATUSES", "Tracker", "log_dataset", "log_table",
    # sweep
    "PARENT_ID_FILE", "PREFLIGHT_FAILURES", "SWEEP_FILE", "SweepCallback", "end_open_sweeps", "end_sweep",
    "fresh_joblib_workers", "parent_run_id_from", "preflight_failures", "record_preflight_failure",
    # queries
    "download_artifact", "find_finished_run", "find_job_runs",
    # replay
    "SYNCED_FILE", "sync_job",
]
