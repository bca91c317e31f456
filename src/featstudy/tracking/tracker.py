"""One job's MLflow run (:class:`Tracker`): created, logged to (best-effort, journaled first) and ended."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from featstudy.config import flatten
from featstudy.errors import FeatstudyError
from featstudy.tracking.journal import Journal
from featstudy.tracking.store import apply_http_settings, normalise_uri, prepare_experiment, store_failure

log = logging.getLogger("featstudy.tracking")  # the name these messages always had (Hydra's job log shows it)

STATUSES = ("FINISHED", "FAILED", "KILLED")


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
