"""Load on the tracking server: N concurrent runs logging to it, none lost; prints throughput.

    scripts/tracking_server.sh start
    eval "$(scripts/tracking_server.sh env)"   # MLFLOW_TRACKING_USERNAME / _PASSWORD: the server asks for a login
    .venv/bin/python bench/tracking_load.py --uri http://127.0.0.1:5055 --runs 50

Each run logs the params, a d_avg-like curve of metric steps (one ``log_batch``), a table artifact and ends
FINISHED, as a featstudy job does. Afterwards every run is read back and checked: status, metric history
length, params and artifact. Bounded: ``--timeout`` seconds for the whole load (default 300). Only loopback
servers are accepted (this is a load test of a server you run yourself).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import ipaddress
import logging
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient


def _check_loopback(uri: str) -> None:
    host = urlparse(uri).hostname or ""
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        sys.exit(f"--uri {uri}: cannot resolve {host!r} ({exc})")
    if not addrs or not all(ipaddress.ip_address(a).is_loopback for a in addrs):
        sys.exit(f"--uri {uri}: only a loopback server (127.0.0.1, localhost, ::1) may be load-tested")


def _check_login(client: MlflowClient, uri: str) -> None:
    """One request first: a server asking for a login (401/403) is named with the fix, not 50 failures."""
    from mlflow.exceptions import MlflowException

    try:
        client.search_experiments(max_results=1)
    except MlflowException as exc:
        text = str(exc)
        if any(s in text for s in ("401", "403", "Unauthorized", "Permission denied", "credentials")):
            sys.exit(f"--uri {uri}: the server refused the login ({text.splitlines()[0][:200]}); pass the credentials "
                     "in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, e.g. "
                     'eval "$(scripts/tracking_server.sh env)"')
        raise


def one_run(uri: str, experiment_id: str, index: int, steps: int, workdir: Path) -> dict:
    client = MlflowClient(tracking_uri=uri)
    t0 = time.perf_counter()
    run = client.create_run(experiment_id, run_name=f"load-{index:03d}", tags={"bench": "tracking_load"})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    params = [Param(f"analysis.p{i}", str(i * index)) for i in range(20)]
    metrics = [Metric("d_avg_plus", float(s * index % 97), now, s) for s in range(steps)]
    metrics += [Metric("t_plus", 0.1 + index / 1000, now, 0)]
    client.log_batch(run_id, metrics=metrics, params=params)
    table = workdir / f"table4-{index:03d}.csv"
    table.write_text("dataset,t_plus\nload,%f\n" % (0.1 + index / 1000))
    client.log_artifact(run_id, str(table), artifact_path="tables")
    client.set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", default="http://127.0.0.1:5055")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--steps", type=int, default=1001, help="metric steps per run (the d_avg grid has 1,001)")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    _check_loopback(args.uri)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "View run at" line per run

    client = MlflowClient(tracking_uri=args.uri)
    _check_login(client, args.uri)
    experiment_id = client.create_experiment(f"tracking-load-{uuid.uuid4().hex[:8]}")
    failures: list[str] = []
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(max_workers=args.runs) as pool:
            futures = [pool.submit(one_run, args.uri, experiment_id, i, args.steps, Path(tmp)) for i in range(args.runs)]
            done, pending = cf.wait(futures, timeout=args.timeout)
            for f in pending:
                f.cancel()
                failures.append("timed out")
            for f in done:
                try:
                    results.append(f.result())
                except Exception as exc:  # noqa: BLE001 - every failure is counted and printed
                    failures.append(f"{type(exc).__name__}: {exc}")
        wall = time.perf_counter() - t0

    # Read everything back: nothing lost.
    lost = []
    for r in results:
        run = client.get_run(r["run_id"])
        history = client.get_metric_history(r["run_id"], "d_avg_plus")
        artifacts = [a.path for a in client.list_artifacts(r["run_id"], "tables")]
        if run.info.status != "FINISHED" or len(history) != args.steps or len(run.data.params) != 20 or len(artifacts) != 1:
            lost.append(r["run_id"])
    n_ok = len(results) - len(lost)
    metrics_total = n_ok * (args.steps + 1)
    print(f"server {args.uri}: {args.runs} concurrent runs, {args.steps} metric steps each")
    print(f"  finished and verified: {n_ok}/{args.runs}   failed: {len(failures)}   incomplete: {len(lost)}")
    print(f"  wall {wall:.1f} s   throughput {n_ok / wall:.2f} runs/s, {metrics_total / wall:,.0f} metric values/s")
    if results:
        per_run = sorted(r["seconds"] for r in results)
        print(f"  per-run latency: median {per_run[len(per_run) // 2]:.2f} s, max {per_run[-1]:.2f} s")
    for f in failures[:5]:
        print("  failure:", f)
    return 0 if n_ok == args.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
