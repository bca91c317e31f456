"""Config helpers shared by the CLI, the app and the report: resolvers, validation, flattening.

Nothing here knows about MLflow or the statistics; it reads and checks the composed Hydra config, before any work
starts. One check imports torch (lazily): :func:`featstudy.models.crop_size.check_crop_size` runs the model's
architecture on the meta device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from featstudy.errors import ConfigError


def _abspath(path: str) -> str:
    """``${abspath:rel}``: an absolute, normalised path (relative to the directory the command runs in)."""
    return str(Path(os.path.expanduser(str(path))).absolute())


#: the file that marks featstudy's project root (the pattern of lightning-hydra-template's ``.project-root``)
ROOT_MARKER = ".project-root"


def project_root() -> tuple[Path, str]:
    """(root, where it came from). ``$FEATSTUDY_ROOT`` when set (relative to the working directory); else the
    nearest folder at or above the working directory that holds :data:`ROOT_MARKER`; else the working directory.
    Every location (data, cache, outputs, mlruns) hangs from it, so a command run from a subfolder of the project
    uses the same store and cache as one run from its top."""
    env = os.environ.get("FEATSTUDY_ROOT")
    if env:
        return Path(os.path.expanduser(env)).absolute(), "FEATSTUDY_ROOT"
    cwd = Path.cwd().absolute()
    for folder in (cwd, *cwd.parents):
        if (folder / ROOT_MARKER).is_file():
            return folder, f"{ROOT_MARKER} found" + ("" if folder == cwd else f" above {cwd}")
    return cwd, f"the working directory: no {ROOT_MARKER} at or above it, set FEATSTUDY_ROOT to choose"


def name_max(path: str | os.PathLike) -> int:
    """The longest file name (bytes) the filesystem holding ``path`` (or its nearest existing parent) accepts."""
    p = Path(path).absolute()
    while p != p.parent:
        try:
            if p.exists():
                break
        except OSError:  # ENAMETOOLONG itself: look further up
            pass
        p = p.parent
    try:
        return int(os.pathconf(p, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def check_name_lengths(path: str | os.PathLike, key: str, *, task_name: Any = None) -> None:
    """Refuse a folder whose path has a component longer than the filesystem allows (ENAMETOOLONG), before any
    work starts; the component equal to ``task_name`` is reported as ``task_name``, any other one as ``key``."""
    limit = name_max(path)
    for part in Path(path).parts:
        size = len(os.fsencode(part))
        if size > limit:
            culprit = "task_name" if task_name is not None and part == str(task_name) else key
            raise ConfigError(f"{culprit}: the folder name {part[:24]}... is {size} bytes long, more than the {limit} "
                              f"a file name may have there (os.pathconf PC_NAME_MAX); use a shorter {culprit}")


#: the run folder's name: the start time to the second, readable and sorted, then what makes it unique
RUN_STAMP = "%Y-%m-%d_%H-%M-%S"
#: the folders :func:`_unique_dir` created in this process, oldest first (named in a full-disk message)
CREATED_DIRS: list[str] = []


def _unique_dir(parent: str, key: str = "paths.log_dir", task_name: Any = None) -> str:
    """``${unique_dir:<parent>,<key>,<task_name>}``: a new folder ``<parent>/<YYYY-mm-dd_HH-MM-SS>_<µs>-<pid>``,
    created here with ``os.mkdir``.

    Why: Hydra's ``${now:...}`` has one-second resolution, so two jobs started in the same second shared one folder
    (and one journal). The name adds microseconds and the process id, and the atomic ``mkdir`` is the guarantee:
    of two processes that pick the same name only one creates it, the other picks a fresh name. ``key`` names the
    setting to change in error messages (a full disk); a component equal to ``task_name`` is reported as
    ``task_name`` when too long. Registered with ``use_cache=True`` (like Hydra's ``now``), so every resolution of
    ``hydra.run.dir`` in one job, and every job of one sweep (Hydra copies the cache), gets the same folder.
    """
    import datetime

    rank = _launch_rank()
    if rank != 0:  # a helper rank of srun/torchrun: global rank 0 alone makes the run folder (issue 16, item 8)
        import tempfile

        return tempfile.mkdtemp(prefix=f"featstudy-rank{rank}-")
    base = Path(_abspath(parent))
    check_name_lengths(base / "0000-00-00_00-00-00_000000-4194304", key, task_name=task_name)
    try:
        base.mkdir(parents=True, exist_ok=True)
        while True:
            now = datetime.datetime.now()
            folder = base / f"{now.strftime(RUN_STAMP)}_{now.microsecond:06d}-{os.getpid()}"
            try:
                folder.mkdir()
                CREATED_DIRS.append(str(folder))
                return str(folder)
            except FileExistsError:  # another process took this name in this microsecond: take the next one
                continue
    except OSError as exc:
        from featstudy.errors import DataError

        raise DataError(f"{key}: cannot create a run folder under {base} ({exc.strerror}); free space there or "
                        f"write elsewhere, e.g. {key}=<folder on another disk>") from None


#: variables by which a launcher (Lightning, srun, torchrun, jsrun, mpirun) tells a process its rank
RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "RANK", "JSM_NAMESPACE_RANK",
                  "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def _launch_rank() -> int:
    """This process's global rank as Lightning will compute it (0 outside any launcher; Lightning is imported only
    when a launcher variable is set)."""
    if not any(var in os.environ for var in RANK_VARIABLES):
        return 0
    from featstudy.extraction.distributed import env_rank

    return env_rank()


#: the launching command's CUDA_VISIBLE_DEVICES, handed to the jobs of ``hydra/launcher=local``
LAUNCHER_GPUS = "FEATSTUDY_LAUNCHER_CUDA_VISIBLE_DEVICES"


def restore_launcher_gpus() -> None:
    """In a job of submitit's local executor: the GPUs the launching command saw (:func:`_visible_gpu_count`)."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "local" and LAUNCHER_GPUS in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ[LAUNCHER_GPUS]


def _visible_gpu_count() -> int:
    """``${visible_gpu_count:}``: the CUDA devices this process sees (``hydra/launcher=local`` gives them to its
    jobs); 0 without CUDA. submitit's local executor exports ``CUDA_VISIBLE_DEVICES=0..n-1`` to every job: this
    command's own ``CUDA_VISIBLE_DEVICES`` (e.g. ``2,3``) is passed on in :data:`LAUNCHER_GPUS`, which the job puts
    back before touching CUDA (:func:`restore_launcher_gpus`)."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "local" and LAUNCHER_GPUS in os.environ:
        # inside a job (its Hydra config resolved again): what the launching command saw, without asking CUDA
        # under submitit's CUDA_VISIBLE_DEVICES, and without overwriting the launcher's value with submitit's
        return len([d for d in os.environ[LAUNCHER_GPUS].split(",") if d.strip()])
    import torch

    if "CUDA_VISIBLE_DEVICES" in os.environ:
        os.environ[LAUNCHER_GPUS] = os.environ["CUDA_VISIBLE_DEVICES"]

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def register_resolvers() -> None:
    """Register featstudy's OmegaConf resolvers (idempotent). Called on import of this module, so both
    ``python -m featstudy`` and ``hydra.compose`` (tests, notebooks) have them before Hydra composes."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(project_root()[0]))
    if not OmegaConf.has_resolver("abspath"):
        OmegaConf.register_new_resolver("abspath", _abspath)
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", _unique_dir, use_cache=True)
    if not OmegaConf.has_resolver("visible_gpu_count"):
        OmegaConf.register_new_resolver("visible_gpu_count", _visible_gpu_count, use_cache=True)
    if not OmegaConf.has_resolver("weights_preprocessing"):
        OmegaConf.register_new_resolver("weights_preprocessing", _weights_preprocessing)
    if not OmegaConf.has_resolver("timm_preprocessing"):
        OmegaConf.register_new_resolver("timm_preprocessing", _timm_preprocessing)
    if not OmegaConf.has_resolver("crop_default"):
        OmegaConf.register_new_resolver("crop_default", _crop_default)


def _weights_preprocessing(weights: Any, model_name: Any = "vgg19") -> str:
    """``${weights_preprocessing:${.weights},${.name}}``: ``model.preprocessing``'s default, what the weights were
    trained on (:func:`featstudy.models.weights.preprocessing_of`), so ``--cfg job`` prints what runs."""
    from featstudy.models.weights import _preprocessing_resolver

    return _preprocessing_resolver(weights, model_name)


def _timm_preprocessing(model_name: Any, weights: Any = "random") -> Any:
    """``${timm_preprocessing:${.name},${.weights}}``: ``model.preprocessing``'s default for model=timm, the mean/std
    of the model's pretrained configuration (``torchvision`` when ImageNet's, else ``{mean: [...], std: [...]}``)
    or a safetensors file's recorded preprocessing (:func:`featstudy.models.timm_weights.timm_preprocessing_of`)."""
    from featstudy.models.timm_weights import _timm_preprocessing_resolver

    return _timm_preprocessing_resolver(model_name, weights)


def _crop_default(what: Any, *, _parent_: Any, _root_: Any) -> Any:
    """``${crop_default:size|resize|interpolation}`` in ``conf/crops/*.yaml``: the crops' default from the root's
    ``model`` (224 / 256 / bilinear for torchvision models; a timm or open_clip model's own evaluation geometry), as
    :mod:`featstudy.models.crop_defaults` defines it, so ``--cfg job`` prints what runs."""
    from featstudy.models.crop_defaults import _resolver

    return _resolver(what, _parent_=_parent_, _root_=_root_)


register_resolvers()

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is not allowed; {key} must be {allowed}")


def validate(cfg: DictConfig) -> None:
    """Check the keys the app relies on; raise :class:`ConfigError` naming the key and what is allowed."""
    a = cfg.analysis
    _check(a.bins is None or (_is_int(a.bins) and a.bins >= 2), "analysis.bins", a.bins,
           "an integer >= 2, or null for the exact statistic")
    _check(_is_int(a.permutations) and a.permutations >= 1, "analysis.permutations", a.permutations,
           "an integer >= 1")
    _check(_is_int(a.seed) and a.seed >= 0, "analysis.seed", a.seed, "a non-negative integer")
    layers = a.layers
    _check(layers is None or (isinstance(layers, (ListConfig, list)) and len(layers) > 0
                              and all(isinstance(x, str) for x in layers)),
           "analysis.layers", layers, "null (all layers) or a non-empty list of layer names, e.g. [conv5_4,fc7]")
    _check(a.chunk_size is None or (_is_int(a.chunk_size) and a.chunk_size >= 1), "analysis.chunk_size",
           a.chunk_size, "null or a positive integer")
    from featstudy.analysis.bootstrap import check_bootstrap

    check_bootstrap(a.get("bootstrap", 0), a.get("bootstrap_level", 0.95))
    callbacks = a.get("callbacks")
    _check(callbacks is None or isinstance(callbacks, (DictConfig, Mapping)), "analysis.callbacks", callbacks,
           "a mapping of name -> {_target_: ...} blocks")
    if "loader" in cfg:
        _check(_is_int(cfg.loader.batch_size) and cfg.loader.batch_size >= 1, "loader.batch_size",
               cfg.loader.batch_size, "a positive integer")
        w = cfg.loader.num_workers
        _check((_is_int(w) and w >= 0) or (isinstance(w, str) and w.strip().lower() == "auto"),
               "loader.num_workers", w, "a non-negative integer or auto")
    from featstudy.groups import build

    for group in ("crops", "pooling"):  # cheap objects that check their own fields: built once here, before any work
        if group in cfg:
            build(cfg[group], group)
    uri = cfg.tracking.uri
    _check(uri is None or (isinstance(uri, str) and ("://" in uri)), "tracking.uri", uri,
           "sqlite:///<path>/mlflow.db, http(s)://<server>, or null to disable tracking")
    _check_tracking_numbers(cfg.tracking)
    _check_bins_bound(a.bins)
    if "task_name" in cfg and cfg.get("task_name") is not None and "paths" in cfg:
        try:
            log_dir = cfg.paths.get("log_dir")
        except Exception:  # noqa: BLE001 - an unresolvable location is reported where it is used
            log_dir = None
        if isinstance(log_dir, str):
            check_name_lengths(Path(log_dir) / str(cfg.task_name), "task_name", task_name=cfg.task_name)
    from featstudy.models.crop_size import check_crop_size

    check_crop_size(cfg)


#: ``tracking.*`` numbers: key -> (integer only, smallest value allowed, None allowed)
TRACKING_NUMBERS = {
    "retries": (True, 1, False),
    "retry_delay": (False, 0, False),
    "http_max_retries": (True, 0, True),
    "http_backoff_factor": (False, 0, True),
    "http_backoff_jitter": (False, 0, True),
    "http_timeout": (False, 1, True),
}


def _check_tracking_numbers(t: Any) -> None:
    """``tracking.retries=abc`` and friends: refused here, not as a traceback when the run starts."""
    for key, (integer, low, nullable) in TRACKING_NUMBERS.items():
        if key not in t:
            continue
        value = t.get(key)
        if value is None and nullable:
            continue
        number = _is_int(value) or (not integer and isinstance(value, float) and value == value)
        what = ("an integer" if integer else "a number") + f" >= {low}" + (", or null for MLflow's default"
                                                                            if nullable else "")
        _check(number and value >= low, f"tracking.{key}", value, what)


#: the binned KS kernels hold each image's bin in an int32 (featstudy.stats._kernels: ``bins`` arrays)
MAX_BINS = 2**31 - 1
#: bytes the sorting kernel allocates per bin in each worker thread (histogram, bin starts, edges)
BYTES_PER_BIN = 24


def _check_bins_bound(bins: Any) -> None:
    """Refuse ``analysis.bins`` the kernels cannot hold, before the extraction (it failed in numba after it)."""
    if not _is_int(bins):
        return
    if bins > MAX_BINS:
        raise ConfigError(f"analysis.bins={bins} is too large: the binned KS stores each image's bin as an int32, "
                          f"so analysis.bins must be <= {MAX_BINS} (analysis.bins=null computes the exact statistic)")
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return
    threads = int(os.environ.get("NUMBA_NUM_THREADS") or os.cpu_count() or 1)
    need = BYTES_PER_BIN * bins * threads
    if need > memory:
        raise ConfigError(f"analysis.bins={bins} is too large: the binned KS needs {BYTES_PER_BIN} bytes per bin "
                          f"in each of {threads} threads ({need / 2**30:.1f} GiB) and this machine has "
                          f"{memory / 2**30:.1f} GiB; lower analysis.bins (or use null, the exact statistic)")


def resolve_paths(cfg: DictConfig) -> DictConfig:
    """Resolve the whole config once (in place) and make ``paths.*`` and ``dataset.root`` absolute.

    Called once at the start of a job, so later code never depends on the working directory and never
    re-resolves interpolations such as ``${now:...}``.
    """
    OmegaConf.resolve(cfg)
    with open_dict(cfg):
        for key, value in list(cfg.paths.items()):
            if isinstance(value, str):
                cfg.paths[key] = _abspath(value)
        if "dataset" in cfg and cfg.dataset.get("root") is not None:
            cfg.dataset.root = _abspath(cfg.dataset.root)
    return cfg


def flatten(cfg: DictConfig | Mapping, prefix: str = "", *, skip: tuple[str, ...] = ("hydra",)) -> dict[str, str]:
    """Flatten a resolved config to dotted keys (``analysis.bins`` -> ``"100"``); lists become their repr."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, Mapping):
            if not node and key:
                out[key] = "{}"
            for k, v in node.items():
                if not key and k in skip:
                    continue
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = "null" if node is None else (str(list(node)) if isinstance(node, (list, tuple)) else str(node))

    walk(container, prefix)
    return out



#: keys that do not change a job's results (left out of :func:`config_hash`)
HASH_EXCLUDE = ("paths.", "tracking.", "loader.num_workers", "task_name")


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved config without locations, tracking settings and worker counts: two jobs with the
    same hash compute the same results (used by ``tracking.resume``)."""
    import hashlib
    import json

    flat = {k: v for k, v in flatten(cfg).items() if not k.startswith(HASH_EXCLUDE)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()
