"""A multirun's parent run: created by :class:`SweepCallback` before any job starts, ended with the sweep."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from featstudy.errors import FeatstudyError
from featstudy.tracking.store import (apply_http_settings, normalise_uri, prepare_experiment, sqlite_path,
                                      store_failure, strip_credentials)
from featstudy.tracking.tracker import _retry

log = logging.getLogger("featstudy.tracking")  # the name these messages always had (Hydra's job log shows it)

PARENT_ID_FILE = "mlflow_parent_run_id"
SWEEP_FILE = "tracking_sweep.json"
#: in a sweep folder: one JSON line per job refused before its MLflow run existed (featstudy.preflight.preflight)
PREFLIGHT_FAILURES = "failed_before_start.jsonl"


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
