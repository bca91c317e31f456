"""Helper process for the resume, lock, kill and DDP tests: ``python run_extraction.py cfg.yaml`` runs get_embedding
and prints one JSON line on global rank 0: key, hit, n_resumed, ``t_start`` / ``t_end`` (``time.time()`` around
get_embedding) and ``log`` (the messages of the ``featstudy.extraction`` logger, e.g. that it waited for another
process's lock). Not a test module.

``FEATSTUDY_TEST_DIE_AT=<when>:<file name prefix>:<n>`` (tests only) ends the process with ``os._exit(137)`` - no
cleanup, no flush, as ``kill -9`` - just before (``when=before``) or just after (``after``) the n-th rename onto a
file whose name starts with the prefix: every moment at which the on-disk state of the cache changes.

``FEATSTUDY_TEST_SHARD_DELAY=<seconds>`` (tests only) sleeps that long before each shard is renamed into place: a
slower extraction, so that a second process surely finds the lock taken.
"""

import json
import logging
import os
import sys
import time

from omegaconf import OmegaConf

from featstudy.extraction import get_embedding


def _wrap_replace(spec: str | None, delay: float) -> None:
    when, prefix, n = spec.split(":") if spec else (None, None, "0")
    real_replace, seen = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        name = os.path.basename(os.fspath(dst))
        if delay and name.startswith("shard-"):
            time.sleep(delay)
        hit = prefix is not None and name.startswith(prefix)
        if hit:
            seen[0] += 1
        if hit and seen[0] == int(n) and when == "before":
            os._exit(137)
        real_replace(src, dst, *args, **kwargs)
        if hit and seen[0] == int(n) and when == "after":
            os._exit(137)

    os.replace = replace


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


if __name__ == "__main__":
    die_at, delay = os.environ.get("FEATSTUDY_TEST_DIE_AT"), float(os.environ.get("FEATSTUDY_TEST_SHARD_DELAY", 0))
    if die_at or delay:
        _wrap_replace(die_at, delay)
    keep = _Keep()
    logger = logging.getLogger("featstudy.extraction")
    logger.setLevel(logging.INFO)
    logger.addHandler(keep)
    t_start = time.time()
    handle = get_embedding(OmegaConf.load(sys.argv[1]))
    t_end = time.time()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(json.dumps({"key": handle.key, "hit": handle.hit, "n_resumed": handle.meta.get("n_resumed"),
                          "t_start": t_start, "t_end": t_end, "log": keep.messages}), flush=True)
