"""``python -m featstudy.sync <output folder> [...] [--tracking-uri URI]``: log jobs that could not reach MLflow.

Every job journals what it logs in ``<output folder>/tracking_journal.jsonl`` (:class:`featstudy.tracking.Journal`)
and which operations reached the store. This command replays the journal of each folder given (a job's output
folder, or a multirun sweep folder: every job in it) into the job's own store, or ``--tracking-uri``:

* every upload had succeeded: skipped, ``already logged``;
* the store has the job's partial run (created before the outage): that run is completed with what is missing
  (no duplicate), its real status set, tagged ``featstudy.synced=true``;
* otherwise the whole run is logged (params, tags, metric steps, artifacts, tables), as a child of the sweep's parent
  run where the job was in a sweep (the original parent, or one created once per sweep folder);
* already synced (marker ``mlflow_synced`` with the run id, checked against the store, or a synced run of this
  journal found in the store): nothing is logged twice.

Exit status: 0 when every job is logged, 1 when a store could not be reached (rerun later), 2 for a folder that is
not a featstudy output folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from featstudy.errors import EXIT_USAGE, FeatstudyError


def job_folders(folder: Path) -> list[Path]:
    """The job folders under ``folder``: itself, or its sub-folders holding a journal (a sweep)."""
    from featstudy.tracking import JOURNAL_FILE, is_job_folder

    if is_job_folder(folder):
        return [folder]
    if not folder.is_dir():
        raise FeatstudyError(f"{folder}: no such folder; give a job's output folder or a multirun sweep folder")
    jobs = sorted({p.parent for pattern in (f"*/{JOURNAL_FILE}", f"*/*/{JOURNAL_FILE}") for p in folder.glob(pattern)})
    if not jobs:
        raise FeatstudyError(f"{folder}: not a featstudy output folder (no {JOURNAL_FILE} in it or its sub-folders); "
                             "give a job's output folder or a multirun sweep folder")
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m featstudy.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="job output folders or multirun sweep folders")
    parser.add_argument("--tracking-uri", default=None, help="log into this store instead of each job's own")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        jobs = [job for folder in args.folders for job in job_folders(folder.absolute())]
    except FeatstudyError as exc:
        print(f"featstudy.sync: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE

    from featstudy import tracking

    failed = 0
    sweeps: dict[tuple[str, str], set[str]] = {}
    for job in jobs:
        try:
            outcome, run_id = tracking.sync_job(job, args.tracking_uri)
        except FeatstudyError as exc:
            print(f"featstudy.sync: error: {str(exc).splitlines()[0]}", file=sys.stderr)
            return EXIT_USAGE
        except Exception as exc:  # noqa: BLE001 - the store is still unreachable: say so, go on with the others
            failed += 1
            print(f"[featstudy.sync] {job}: FAILED, store unreachable? ({str(exc).splitlines()[0][:300]})",
                  file=sys.stderr)
            continue
        print(f"[featstudy.sync] {job}: {outcome} (run {run_id})")
        start = tracking.Journal.read(job)["start"]
        if start.get("sweep_dir"):
            uri = tracking.normalise_uri(args.tracking_uri or str(start["uri"]))
            sweeps.setdefault((uri, str(start["experiment_name"])), set()).add(start["sweep_dir"])
    for (uri, experiment), dirs in sweeps.items():
        try:
            tracking.end_synced_sweeps(uri, sorted(dirs), experiment)
        except Exception as exc:  # noqa: BLE001
            failed += 1
            print(f"[featstudy.sync] could not end the sweep parent runs in {uri} ({exc})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
