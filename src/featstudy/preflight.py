"""A job's pre-flight: what can be found wrong without extracting, before the job's MLflow run exists.

Each mistake is one line and exit 2 with no run in MLflow (:func:`featstudy.app.task_wrapper` calls
:func:`preflight` before it creates the run).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from featstudy.errors import FeatstudyError
from featstudy.job import hydra_runtime, run_identity


def preflight(cfg: DictConfig) -> Any:
    """What can be found wrong without extracting, before the job's MLflow run exists: the weights (a missing
    file, an unknown enum), ``analysis.layers``, the dataset (a missing root, fewer than two classes). A failure is
    one line and exit 2 with no run in MLflow; in a sweep it is also recorded in the sweep folder
    (:data:`featstudy.tracking.PREFLIGHT_FAILURES`), so the sweep's end lists the job and marks the parent FAILED.

    Returns the dataset built from ``cfg.dataset`` (:func:`check_classes`), for
    :func:`featstudy.extraction.get_embedding`: a run lists its folder once."""
    from featstudy import models

    try:
        models.spec(cfg.model)
        check_layers(cfg)
        return check_classes(cfg)
    except FeatstudyError as exc:
        hc = hydra_runtime()
        if hc is not None and str(hc.mode).endswith("MULTIRUN"):
            from featstudy.tracking import record_preflight_failure

            record_preflight_failure(hc.sweep.dir, run_identity(cfg)[0] or f"job {hc.job.num}",
                                     str(cfg.paths.output_dir), str(exc).splitlines()[0] if str(exc) else repr(exc))
        raise


def check_classes(cfg: DictConfig) -> Any:
    """Refuse a dataset with fewer than two classes before any image is read (the KS compares a class with the
    others); one line naming ``dataset.root``. Returns the dataset built from ``cfg.dataset``."""
    from featstudy import datasets
    from featstudy.errors import DataError

    ds = datasets.from_config(cfg.dataset)
    labels = set(ds.targets)
    if len(labels) < 2:
        names = [ds.classes[i] for i in sorted(labels)]
        raise DataError(f"dataset.root: {ds.root or cfg.dataset.name}: {len(ds)} images of {len(labels)} class(es) "
                        f"{names}; the analysis compares classes, so it needs two classes or more")
    return ds


def check_layers(cfg: DictConfig) -> None:
    """Refuse ``analysis.layers`` names that the model does not produce, before any extraction (which may take
    hours); one line naming the key, the unknown names and the valid ones."""
    layers = cfg.analysis.get("layers")
    if layers is None:
        return
    from featstudy import models
    from featstudy.errors import ConfigError

    known = list(models.spec(cfg.model).nodes.values())
    unknown = [name for name in layers if name not in known]
    if unknown:
        raise ConfigError(f"analysis.layers: unknown layer(s) {unknown}; {cfg.model.name} with these model.nodes "
                          f"has {known}")
