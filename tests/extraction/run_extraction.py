"""Helper process for the resume, lock and DDP tests: ``python run_extraction.py cfg.yaml`` runs get_embedding
and prints one JSON line (key, hit, n_resumed) on global rank 0. Not a test module."""

import json
import os
import sys

from omegaconf import OmegaConf

from featstudy.extraction import get_embedding

if __name__ == "__main__":
    handle = get_embedding(OmegaConf.load(sys.argv[1]))
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(json.dumps({"key": handle.key, "hit": handle.hit, "n_resumed": handle.meta.get("n_resumed")}), flush=True)
