"""MLflow outages: a job whose store is unreachable (from the start or mid-run) finishes with everything in its
output folder, and ``python -m featstudy.sync`` logs it later, once."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from featstudy import sync, tracking

pytestmark = pytest.mark.slow

FAST_FAILURE = ["tracking.retries=1", "tracking.retry_delay=0", "tracking.http_max_retries=0",
                "tracking.http_timeout=3", "tracking.http_backoff_factor=0"]
LIGHT = ["~analysis.callbacks.figures", "~analysis.callbacks.null"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_in(uri: str) -> list:
    c = client_for(uri)
    exp = c.get_experiment_by_name("featstudy")
    return [] if exp is None else c.search_runs([exp.experiment_id], max_results=1000)


def artifacts(uri: str, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client_for(uri).list_artifacts(run_id, path):
        out |= artifacts(uri, run_id, f.path) if f.is_dir else {f.path}
    return out


def journaled(folder: Path) -> dict:
    """What the job logged, from its journal: params, tags, metric histories, artifact paths, status."""
    j = tracking.Journal.read(folder)
    params, tags, metrics, files, status = {}, dict(j["start"]["tags"]), {}, set(), None
    for op in j["ops"]:
        if op["op"] == "params":
            params.update(op["params"])
        elif op["op"] == "tags":
            tags.update(op["tags"])
        elif op["op"] == "metrics":
            for k, v, _, step in op["metrics"]:
                metrics.setdefault(k, []).append((step, v))
        elif op["op"] == "artifact":
            rel = Path(op["path"])
            if op.get("is_dir"):  # a folder (atlas/img) is logged whole: its files land under artifact_path
                local = rel if rel.is_absolute() else Path(folder) / rel
                files |= {str(Path(op["artifact_path"] or "") / f.relative_to(local)) for f in local.rglob("*")
                          if f.is_file()}
            else:
                files.add(str(Path(op["artifact_path"] or "") / rel.name))
        elif op["op"] == "table":
            files.add(op["artifact_file"])
        elif op["op"] == "end":
            status = op["status"]
    return {"params": params, "tags": tags, "metrics": metrics, "artifacts": files, "status": status}


def assert_run_matches(uri: str, run, expected: dict) -> None:
    c = client_for(uri)
    assert run.info.status == expected["status"] == "FINISHED"
    assert run.data.params == expected["params"]
    for k, v in expected["tags"].items():
        if k != "mlflow.parentRunId":
            assert run.data.tags[k] == v, k
    assert run.data.tags["featstudy.synced"] == "true"
    assert set(run.data.metrics) == set(expected["metrics"])
    for key, points in expected["metrics"].items():
        got = sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, key))
        assert got == sorted(points), key
    assert artifacts(uri, run.info.run_id) == expected["artifacts"]


def job_folder(root: Path) -> Path:
    found = [p.parent for p in root.rglob(tracking.JOURNAL_FILE)]
    assert len(found) == 1, found
    return found[0]


def test_unreachable_server_then_sync_logs_the_run_once(tmp_path, image_folder, helpers, cache, monkeypatch, capsys):
    dead = f"http://127.0.0.1:{closed_port()}"
    rc = helpers.run_cli([*helpers.tiny_overrides(tmp_path, image_folder), cache, *LIGHT, *FAST_FAILURE,
                          f"tracking.uri={dead}"], monkeypatch)
    assert rc == 0
    folder = job_folder(tmp_path)
    assert (folder / "status.txt").read_text().startswith("FINISHED")
    assert (folder / "tables" / "table4.csv").is_file()
    expected = journaled(folder)
    assert expected["status"] == "FINISHED" and "t_plus" in expected["metrics"]
    assert {"config.yaml", "skipped.txt", "tables/table4.csv"} <= expected["artifacts"]
    assert not tracking.Journal.read(folder)["acks"]  # nothing reached the server
    assert f"python -m featstudy.sync {folder}" in capsys.readouterr().err

    # the job's own store is still down: sync says so, logs nothing, exit 1
    assert sync.main([str(folder)]) == 1
    assert not (folder / tracking.SYNCED_FILE).exists()

    store = f"sqlite:///{tmp_path}/later/mlflow.db"
    assert sync.main([str(folder), "--tracking-uri", store]) == 0
    assert "logged" in capsys.readouterr().out
    runs = runs_in(store)
    assert len(runs) == 1
    assert_run_matches(store, runs[0], expected)
    assert json.loads((folder / tracking.SYNCED_FILE).read_text())["run_id"] == runs[0].info.run_id
    # the dataset input (the UI's Dataset column) reached the store once: 3 classes x 8 images, split "all"
    (inp,) = runs[0].inputs.dataset_inputs
    assert inp.dataset.name == "imagefolder-all" and {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "all"}
    assert json.loads(inp.dataset.profile) == {"classes": 3, "images": 24, "skipped": 0}

    # twice: nothing twice (the marker), and nothing twice either when only the store knows (marker gone)
    assert sync.main([str(folder), "--tracking-uri", store]) == 0
    assert "already synced" in capsys.readouterr().out
    (folder / tracking.SYNCED_FILE).unlink()
    assert sync.main([str(folder), "--tracking-uri", store]) == 0
    assert "already synced" in capsys.readouterr().out
    again = runs_in(store)
    assert [r.info.run_id for r in again] == [runs[0].info.run_id]
    assert_run_matches(store, again[0], expected)
    # a replay of every operation (acks lost) adds no second dataset input
    from mlflow.tracking import MlflowClient

    (start,) = [e for e in tracking.Journal.read(folder)["ops"] if e["op"] == "dataset"]
    tracking.log_dataset(MlflowClient(store), runs[0].info.run_id, **{k: start[k] for k in
                                                                      ("name", "digest", "source", "profile", "context")})
    assert len(MlflowClient(store).get_run(runs[0].info.run_id).inputs.dataset_inputs) == 1


def test_store_failing_mid_run_is_completed_by_sync(tmp_path, image_folder, helpers, cache, monkeypatch, capsys):
    """The store accepts the run, its config and first tags, then fails: the job finishes offline; sync completes
    that same run (no duplicate) with what is missing, and marks it FINISHED."""
    from mlflow.tracking import MlflowClient

    real_batch = MlflowClient.log_batch
    calls = {"n": 0}

    def flaky_batch(self, run_id, metrics=(), params=(), tags=(), **kw):
        calls["n"] += 1
        if metrics:  # the store goes away when the first metrics come
            raise ConnectionError("store went away")
        return real_batch(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(MlflowClient, "log_batch", flaky_batch)
        rc = helpers.run_cli([*helpers.tiny_overrides(tmp_path, image_folder), cache, *LIGHT, *FAST_FAILURE], mp)
    assert rc == 0
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    folder = job_folder(tmp_path)
    (partial,) = runs_in(uri)
    assert partial.info.status == "RUNNING"
    assert partial.data.tags["featstudy.incomplete"] == "true"
    assert partial.data.tags["featstudy.sync_command"] == f"python -m featstudy.sync {folder}"
    assert "dataset.name" in partial.data.params and not partial.data.metrics
    expected = journaled(folder)

    assert sync.main([str(folder)]) == 0
    assert "completed" in capsys.readouterr().out
    (run,) = runs_in(uri)
    assert run.info.run_id == partial.info.run_id
    assert_run_matches(uri, run, expected)
    assert run.data.tags["featstudy.incomplete"] == "false"

    assert sync.main([str(folder)]) == 0
    assert "already synced" in capsys.readouterr().out
    (again,) = runs_in(uri)
    assert_run_matches(uri, again, expected)


def test_a_job_that_logged_everything_is_skipped(tmp_path, image_folder, helpers, cache, monkeypatch, capsys):
    rc = helpers.run_cli([*helpers.tiny_overrides(tmp_path, image_folder), cache, *LIGHT], monkeypatch)
    assert rc == 0
    folder = job_folder(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert sync.main([str(folder)]) == 0
    assert "already logged" in capsys.readouterr().out
    (run,) = runs_in(uri)
    assert run.info.status == "FINISHED" and "featstudy.synced" not in run.data.tags


def test_offline_sweep_is_synced_under_one_parent(tmp_path, image_folder, helpers, cache, monkeypatch, capsys):
    dead = f"http://127.0.0.1:{closed_port()}"
    rc = helpers.run_cli(["-m", *helpers.tiny_overrides(tmp_path, image_folder), cache, *LIGHT, *FAST_FAILURE,
                          f"tracking.uri={dead}", "analysis.bins=25,50"], monkeypatch)
    assert rc == 0
    (sweep_dir,) = [p.parent for p in tmp_path.rglob(tracking.SWEEP_FILE)]
    store = f"sqlite:///{tmp_path}/later/mlflow.db"
    for _ in range(2):
        assert sync.main([str(sweep_dir), "--tracking-uri", store]) == 0
    runs = runs_in(store)
    parents = [r for r in runs if r.data.tags.get("featstudy.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert sorted(r.data.params["analysis.bins"] for r in children) == ["25", "50"]
    assert all(r.info.status == "FINISHED" and r.data.tags["featstudy.synced"] == "true" for r in children)


def test_untracked_job_keeps_a_journal_and_is_synced_into_a_named_store(tmp_path, image_folder, helpers, cache,
                                                                       monkeypatch, capsys):
    rc = helpers.run_cli([*helpers.tiny_overrides(tmp_path, image_folder), cache, *LIGHT, "tracking.uri=null"],
                         monkeypatch)
    assert rc == 0
    assert not list(tmp_path.rglob("mlflow.db"))  # tracking off: no store was touched
    folder = job_folder(tmp_path)
    expected = journaled(folder)
    assert expected["status"] == "FINISHED" and "t_plus" in expected["metrics"] and expected["params"]
    assert f"python -m featstudy.sync {folder} --tracking-uri" in capsys.readouterr().err

    assert sync.main([str(folder)]) == 2  # no store to log into: the one line says which option names one
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tracking.uri=null" in err and "--tracking-uri" in err

    store = f"sqlite:///{tmp_path}/later/mlflow.db"
    assert sync.main([str(folder), "--tracking-uri", store]) == 0
    (run,) = runs_in(store)
    assert_run_matches(store, run, expected)
    assert sync.main([str(folder), "--tracking-uri", store]) == 0
    assert "already synced" in capsys.readouterr().out and len(runs_in(store)) == 1


def test_untracked_sweep_is_synced_under_one_parent(tmp_path, image_folder, helpers, cache, monkeypatch):
    rc = helpers.run_cli(["-m", *helpers.tiny_overrides(tmp_path, image_folder), cache, *LIGHT, "tracking.uri=null",
                          "analysis.bins=25,50"], monkeypatch)
    assert rc == 0
    (sweep_dir,) = [p.parent for p in tmp_path.rglob(tracking.SWEEP_FILE)]
    store = f"sqlite:///{tmp_path}/later/mlflow.db"
    assert sync.main([str(sweep_dir), "--tracking-uri", store]) == 0
    runs = runs_in(store)
    (parent,) = [r for r in runs if r.data.tags.get("featstudy.role") == "sweep"]
    assert parent.info.status == "FINISHED" and "analysis.bins=25,50" in parent.data.tags["featstudy.sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["analysis.bins"] for r in children) == ["25", "50"] and len(runs) == 3


def test_not_an_output_folder_exits_2_with_one_line(tmp_path, capsys):
    assert sync.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a featstudy output folder" in err and str(tmp_path) in err
