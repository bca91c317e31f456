"""Reading job runs back from a store: for the report (:func:`find_job_runs`, :func:`download_artifact`) and for
``tracking.resume`` (:func:`find_finished_run`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from featstudy.errors import ConfigError
from featstudy.tracking.store import normalise_uri


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
