"""The experiment: config -> cached embedding -> analysis callbacks -> files -> MLflow.

:func:`run` holds no maths and no file format: it wires :mod:`featstudy.extraction` (the embedding),
:mod:`featstudy.analysis` (the callbacks, which call :mod:`featstudy.stats`) and :mod:`featstudy.tracking`.
It returns ``(metrics, objects)`` so tests can call it without the CLI.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from featstudy import __version__, job
from featstudy.config import config_hash, resolve_paths, validate
from featstudy.errors import FeatstudyError
from featstudy.job import Terminated  # noqa: F401 - featstudy.app.Terminated, as documented
from featstudy.preflight import preflight

log = logging.getLogger(__name__)


def _log_dataset(tracker, cfg: DictConfig, handle) -> None:
    """The dataset as the run's MLflow input (the runs table's Dataset column): its name, the content fingerprint
    of its images (the one in the embedding's key) as digest, its root as source, its split as context."""
    meta = handle.meta or {}
    data = meta.get("dataset", {}) if isinstance(meta.get("dataset"), dict) else {}
    fields = meta.get("key_fields", {})
    fingerprint = str((fields.get("dataset", {}) if isinstance(fields, dict) else {}).get("fingerprint", handle.key))
    split = str(data.get("split", cfg.dataset.get("split", "")))
    tracker.log_dataset(name=f"{cfg.dataset.name}-{split}" if split else str(cfg.dataset.name),
                        digest=fingerprint[:16], source=str(data.get("root") or cfg.dataset.name),
                        profile={"images": int(meta.get("n_images", 0)), "classes": int(data.get("n_classes", 0)),
                                 "skipped": int(meta.get("n_skipped", 0))}, context=split or "all")


def _sweep_job_settings(cfg: DictConfig) -> None:
    """The settings of one job of a sweep (``-m``), applied to ``cfg`` in place; nothing changes outside a sweep.

    * DDP is refused in one line: Lightning's subprocess DDP re-launches the command line, so under ``-m`` every
      rank would rerun the sweep.
    * ``trainer.devices=auto`` (Lightning: every GPU, then DDP) and ``1`` become one device, GPU ``job number %
      visible GPUs`` where several are visible (joblib jobs share the machine's GPUs; a submitit job sees its own),
      logged and recorded in the job's params (:func:`distributed.sweep_devices`).
    * Under ``hydra/launcher=joblib``, ``loader.num_workers=auto`` becomes 0: the jobs already share the machine's
      CPUs, and DataLoader workers inside loky's worker processes are fragile. An explicit number is kept.
    """
    hc = job.hydra_runtime()
    if hc is None or "trainer" not in cfg:
        return
    from hydra.types import RunMode

    if hc.mode != RunMode.MULTIRUN:
        return
    devices, nodes = cfg.trainer.get("devices", "auto"), cfg.trainer.get("num_nodes", 1)
    many = (isinstance(devices, int) and (devices > 1 or devices == -1)) or nodes != 1 \
        or (not isinstance(devices, (int, str)) and len(devices) > 1) or (isinstance(devices, str) and "," in devices)
    if many:
        from featstudy.errors import ConfigError

        raise ConfigError(f"trainer.devices={devices} trainer.num_nodes={nodes}: a sweep (-m) cannot run DDP jobs; "
                          "sweep single-device jobs (trainer.devices=1, one per GPU through the launcher), or run "
                          "the multi-GPU extraction as a separate call without -m")
    import torch
    from omegaconf import open_dict

    from featstudy.extraction.distributed import sweep_devices

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    chosen = sweep_devices(devices, str(cfg.trainer.get("accelerator", "auto")), int(hc.job.num), n_gpus)
    if chosen != devices:
        log.info("sweep job %s: trainer.devices=%s -> %s (%d GPU(s) visible)", hc.job.num, devices, chosen, n_gpus)
        with open_dict(cfg):
            cfg.trainer.devices = chosen
    launcher = str(OmegaConf.select(hc, "launcher._target_", default="") or "")
    workers = OmegaConf.select(cfg, "loader.num_workers", default=None)
    if "joblib" in launcher.lower() and isinstance(workers, str) and workers.strip().lower() == "auto":
        log.info("sweep job %s (joblib): loader.num_workers=auto -> 0 (decoding in the job's own process)", hc.job.num)
        with open_dict(cfg):
            cfg.loader.num_workers = 0


def _prepare_config(cfg: DictConfig) -> None:
    """Check and complete ``cfg`` in place before the job does anything: the launcher's GPUs restored, the config
    validated, the sweep job's settings applied (DDP refused, device and loader workers chosen), the paths
    resolved, the store's credentials moved out of ``tracking.uri``, the accelerator checked. Each mistake is one
    line (exit 2), before any MLflow run."""
    from featstudy.config import restore_launcher_gpus

    # hydra/launcher=local: the GPUs the launching command saw, before anything asks CUDA (the first CUDA call
    # fixes CUDA_VISIBLE_DEVICES for the life of the process; _sweep_job_settings counts the GPUs)
    restore_launcher_gpus()
    validate(cfg)
    _sweep_job_settings(cfg)
    resolve_paths(cfg)
    from featstudy.tracking import strip_credentials

    strip_credentials(cfg)  # user:password@ of tracking.uri -> MLFLOW_TRACKING_*: written nowhere
    from featstudy.extraction.distributed import check_accelerator

    check_accelerator(cfg)  # trainer.accelerator=gpu with no visible CUDA device: one line, not a CPU run


def _helper_rank(cfg: DictConfig) -> tuple[dict, dict] | None:
    """A DDP rank other than 0 (started by Lightning or srun) helps extract and returns ``({}, {"cfg", "embedding",
    "rank"})``: rank 0 alone tracks and analyses. None on rank 0 (the rank comes from Lightning's cluster
    environment: an inherited ``SLURM_PROCID`` is not a rank)."""
    from featstudy.extraction import env_rank

    rank = env_rank(cfg)
    if rank == 0:
        return None
    log.info("global rank %d: extraction only (rank 0 logs the run and runs the analyses)", rank)
    handle = _get_embedding(cfg)
    return {}, {"cfg": cfg, "embedding": handle, "rank": rank}


def _open_output_dir(cfg: DictConfig) -> tuple[Path, Any]:
    """Claim ``paths.output_dir`` (:func:`featstudy.job.claim_output_dir`) and write the resolved ``config.yaml``
    in it; a full disk is one line. Returns the folder and the claim (released when the job ends)."""
    output_dir = Path(cfg.paths.output_dir)
    claim = job.claim_output_dir(output_dir)
    try:
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    except OSError as exc:
        if exc.errno not in job.DISK_FULL:
            raise
        raise job.disk_error(exc, output_dir) from exc
    return output_dir, claim


def _resume_lookup(cfg: DictConfig, digest: str, claim: Any) -> tuple[dict, dict] | None:
    """``tracking.resume=true`` with a store: an identical (same config hash) FINISHED run makes this job a skip,
    said in one line; returns that run's metrics and ``{"cfg", "run_id", "experiment_id", "skipped"}`` with the
    output folder's claim released. None when the job has to run."""
    if not (cfg.tracking.get("resume") and cfg.tracking.uri is not None):
        return None
    from featstudy.tracking import find_finished_run

    done = find_finished_run(str(cfg.tracking.uri), str(cfg.tracking.experiment_name), digest)
    if done is None:
        return None
    print(f"[featstudy] tracking.resume: skipped, identical FINISHED run {done.info.run_id} "
          f"({done.data.tags.get('featstudy.output_dir', '')})", file=sys.stderr)
    claim.release()
    return dict(done.data.metrics), {"cfg": cfg, "run_id": done.info.run_id,
                                     "experiment_id": done.info.experiment_id, "skipped": True}


def _job_tags(cfg: DictConfig, output_dir: Path, digest: str) -> dict[str, str]:
    """The job run's tags: featstudy's version, output folder, role, config hash, ``CUDA_VISIBLE_DEVICES`` and,
    when the code is in a git checkout, its commit (``git_sha``, ``mlflow.source.git.commit``)."""
    from featstudy.tracking import git_sha

    sha = git_sha(Path(__file__).resolve().parent, Path(cfg.paths.root_dir))
    tags = {"featstudy.version": __version__, "version": __version__,
            "featstudy.output_dir": str(output_dir), "featstudy.role": "job", "featstudy.config_hash": digest,
            "featstudy.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "unset")}
    if sha:
        tags.update({"git_sha": sha, "mlflow.source.git.commit": sha})
    return tags


def _sweep_dir() -> str | None:
    """The sweep folder of a ``-m`` job (its journal is listed there); None for a single run."""
    hc = job.hydra_runtime()
    return hc.sweep.dir if hc is not None and str(hc.mode).endswith("MULTIRUN") else None


def _log_failure(exc: Exception, output_dir: Path, sweep_dir: str | None) -> Exception:
    """Log why the job failed (its run is marked FAILED) and return what to raise. A user error is one line, in the
    job's log file, on the console only in a sweep (a single run's CLI prints it once, at the end;
    ``HYDRA_FULL_ERROR=1`` shows the traceback); a full disk becomes its one-line :class:`DataError`; anything
    else is logged with its traceback and raised as it is."""
    if isinstance(exc, FeatstudyError):
        log.error("run failed: %s (MLflow run marked FAILED)", str(exc).splitlines()[0] if str(exc) else exc,
                  extra={"featstudy_file_only": not (sweep_dir or "")})
        return exc
    if isinstance(exc, OSError) and exc.errno in job.DISK_FULL:
        error = job.disk_error(exc, output_dir)
        log.error("run failed: %s (MLflow run marked FAILED)", error)
        return error
    log.exception("run failed: MLflow run marked FAILED")
    return exc


def _record_end(tracker: Any, status: str, t0: float, output_dir: Path, claim: Any) -> None:
    """Whatever happened: ``run_seconds`` (FINISHED only) and the end status sent to the run, the job's own
    ``status.txt`` (``status<TAB>run id or -<TAB>time``) written next to its outputs, the output folder released
    and ``[featstudy] <status>: outputs in <folder>`` printed. A full disk is reported in one line each, never as a
    second traceback."""
    try:
        if status == "FINISHED":
            tracker.log_metrics({"run_seconds": time.perf_counter() - t0})
        tracker.end(status)
    except OSError as exc:  # the journal's disk is full: the run's end is reported, not a second traceback
        log.error("could not record the run's end (%s: %s)", exc.strerror, exc.filename or output_dir)
    # a sweep can be audited without MLflow; written atomically, so a full disk leaves the old file or none, never
    # an empty one
    from featstudy.store import atomic_write_text

    try:
        atomic_write_text(output_dir / "status.txt", f"{status}\t{getattr(tracker, 'run_id', None) or '-'}"
                          f"\t{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    except OSError as exc:
        log.error("could not write %s (%s)", output_dir / "status.txt", exc.strerror or exc)
    claim.release()
    print(f"[featstudy] {status}: outputs in {output_dir}", file=sys.stderr)


def task_wrapper(task: Callable[..., tuple[dict, dict]]) -> Callable[..., tuple[dict, dict]]:
    """Run ``task(cfg, tracker, dataset)`` inside an MLflow run whose end is always recorded (``dataset``: the one
    the pre-flight built from ``cfg.dataset``, so that the run lists its folder once).

    FINISHED once the task returned (so after every artifact is logged), KILLED on SIGINT, SIGTERM, SIGUSR1 or
    SIGUSR2, FAILED on any other exception. The end is recorded whatever happened (:func:`_record_end`).
    """

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> tuple[dict, dict]:
        from featstudy.tracking import Tracker

        _prepare_config(cfg)
        helped = _helper_rank(cfg)
        if helped is not None:
            return helped
        dataset = preflight(cfg)  # mistakes found without extracting: one line, exit 2, no MLflow run
        output_dir, claim = _open_output_dir(cfg)
        digest = config_hash(cfg)
        skipped = _resume_lookup(cfg, digest, claim)
        if skipped is not None:
            return skipped
        run_name, parent = job.run_identity(cfg)
        tags, sweep_dir = _job_tags(cfg, output_dir, digest), _sweep_dir()
        tracker = Tracker.start(cfg, run_name=run_name, parent_run_id=parent, tags=tags, sweep_dir=sweep_dir)
        job.console_skips_file_only_records()
        status, t0 = "FAILED", time.perf_counter()
        try:
            with job.signals_raise_terminated():
                try:
                    metrics, objects = task(cfg, tracker, dataset)
                    status = "FINISHED"
                except KeyboardInterrupt:
                    status = "KILLED"
                    log.error("interrupted: MLflow run marked KILLED")
                    raise
                except Exception as exc:
                    error = _log_failure(exc, output_dir, sweep_dir)
                    if error is exc:
                        raise
                    raise error from exc
            return metrics, objects
        finally:
            _record_end(tracker, status, t0, output_dir, claim)

    return wrapped


def empty_classes(classes: list[str], labels: Any) -> list[str]:
    """The names of ``classes`` that no row of ``labels`` holds (every image of theirs was unreadable), in order."""
    present = {int(label) for label in labels}
    return [name for i, name in enumerate(classes) if i not in present]


def _get_embedding(cfg: DictConfig, dataset: Any = None) -> Any:
    """The cached embedding for ``cfg`` (extracted on a miss) through :func:`featstudy.extraction.get_embedding`;
    ``dataset``: the one the pre-flight built from ``cfg.dataset`` (built there when None)."""
    from featstudy.extraction import get_embedding

    return get_embedding(cfg, dataset)


@task_wrapper
def run(cfg: DictConfig, tracker: Any = None, dataset: Any = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Run one experiment job.

    Steps: the resolved config is logged (params with dotted keys, ``config.yaml`` artifact); the embedding comes
    from the cache or is extracted (tag ``embedding_cache``: ``hit``/``miss``) from ``dataset``, the one the
    pre-flight built (built again when None); each callback of ``cfg.analysis.callbacks`` runs in order on the
    ``analysis.layers`` subset, writes its files under ``paths.output_dir`` and then has its metrics, curves and
    files logged.

    Returns
    -------
    metrics : dict
        Every metric logged.
    objects : dict
        ``cfg``, ``embedding`` (handle), ``context``, ``results`` (callback name -> CallbackResult), ``run_id`` and
        ``experiment_id`` (None with tracking off or the store unreachable when the run was to be created).
    """
    from featstudy.analysis import AnalysisContext, instantiate_callbacks
    from featstudy.store import load_embedding

    output_dir = Path(cfg.paths.output_dir)
    tracker.log_config(cfg)
    tracker.log_artifact(output_dir / "config.yaml")
    callbacks = instantiate_callbacks(cfg.analysis.get("callbacks"))

    handle = _get_embedding(cfg, dataset)
    if dataset is not None:  # the figures open their images through it: the folder is listed once per run
        from featstudy.analysis import image_io

        image_io.use_dataset(handle.path, dataset)
    tracker.set_tags({
        "weights": handle.weights_tag,
        "dataset": cfg.dataset.name,
        "embedding_cache": "hit" if handle.hit else "miss",
        "embedding_key": handle.key,
        "featstudy.embedding_path": str(handle.path),
    })
    _log_dataset(tracker, cfg, handle)
    log.info("embedding %s (%s) at %s", handle.key, "cache hit" if handle.hit else "extracted", handle.path)
    embedding = load_embedding(handle.path)
    shutil.copyfile(Path(handle.path) / "skipped.txt", output_dir / "skipped.txt")
    tracker.log_artifact(output_dir / "skipped.txt")
    empty = empty_classes(embedding.classes, embedding.labels)
    metrics: dict[str, float] = {"n_skipped_images": float(len(embedding.skipped)),
                                 "n_empty_classes": float(len(empty))}
    if empty:  # the context leaves them out of every array, table and figure (and warns, one line)
        tracker.set_tags({"empty_classes": json.dumps(empty)})
    if len(embedding.classes) - len(empty) < 2:
        from featstudy.errors import DataError

        raise DataError(f"dataset.root: {cfg.dataset.get('root') or cfg.dataset.name}: class(es) {empty} have no "
                        f"readable image (all skipped, see {Path(handle.path) / 'skipped.txt'}), which leaves "
                        f"{len(embedding.classes) - len(empty)} class(es); the analysis compares classes, so it needs "
                        "two classes or more: fix or remove those images")
    tracker.log_metrics(metrics)

    ctx = AnalysisContext(embedding, cfg.analysis, output_dir, str(cfg.dataset.name), cfg=cfg, handle=handle,
                          run_id=getattr(tracker, "run_id", None))  # the atlas page links its images by it
    results = {}
    for name, callback in callbacks:
        t0 = time.perf_counter()
        result = callback.run(ctx)
        results[name] = result
        tracker.log_metrics(result.metrics)
        for key, (steps, values) in result.series.items():
            tracker.log_series(key, steps, values)
        for path in result.files:  # a file at its folder's path; a folder (its files) at its own path, one call
            rel = Path(path).resolve().relative_to(output_dir.resolve())
            where = rel if Path(path).is_dir() else rel.parent
            tracker.log_artifact(path, str(where) if str(where) != "." else None)
        for artifact_file, table in result.tables.items():
            tracker.log_table(table, artifact_file)
        metrics.update(result.metrics)
        log.info("analysis %s: %d metrics, %d files, %.1f s", name, len(result.metrics), len(result.files),
                 time.perf_counter() - t0)
    if tracker.broken is not None:
        log.warning("MLflow uploads failed (%s); every result is in %s", tracker.broken, output_dir)
    objects = {"cfg": cfg, "embedding": handle, "context": ctx, "results": results,
               "run_id": getattr(tracker, "run_id", None), "experiment_id": getattr(tracker, "experiment_id", None)}
    return metrics, objects
