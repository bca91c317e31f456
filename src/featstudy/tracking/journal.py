"""The local record of a job's tracking: ``<output dir>/tracking_journal.jsonl`` (:class:`Journal`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from featstudy.errors import FeatstudyError

JOURNAL_FILE = "tracking_journal.jsonl"


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
