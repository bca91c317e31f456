"""Helper process for the resume, lock, kill and DDP tests: ``python run_extraction.py cfg.yaml`` runs get_embedding
and prints one JSON line (key, hit, n_resumed) on global rank 0. Not a test module.

``FEATSTUDY_TEST_DIE_AT=<when>:<file name prefix>:<n>`` (tests only) ends the process with ``os._exit(137)`` - no
cleanup, no flush, as ``kill -9`` - just before (``when=before``) or just after (``after``) the n-th rename onto a
file whose name starts with the prefix: every moment at which the on-disk state of the cache changes."""

import json
import os
import sys

from omegaconf import OmegaConf

from featstudy.extraction import get_embedding


def _die_at(spec: str) -> None:
    when, prefix, n = spec.split(":")
    real_replace, seen = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        hit = os.path.basename(os.fspath(dst)).startswith(prefix)
        if hit:
            seen[0] += 1
        if hit and seen[0] == int(n) and when == "before":
            os._exit(137)
        real_replace(src, dst, *args, **kwargs)
        if hit and seen[0] == int(n) and when == "after":
            os._exit(137)

    os.replace = replace


if __name__ == "__main__":
    if os.environ.get("FEATSTUDY_TEST_DIE_AT"):
        _die_at(os.environ["FEATSTUDY_TEST_DIE_AT"])
    handle = get_embedding(OmegaConf.load(sys.argv[1]))
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(json.dumps({"key": handle.key, "hit": handle.hit, "n_resumed": handle.meta.get("n_resumed")}), flush=True)
