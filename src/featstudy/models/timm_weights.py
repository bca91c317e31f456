"""model=timm weights: pretrained tags looked up in the local Hugging Face cache (offline; downloaded only with
``model.download=true``), and the preprocessing timm's pretrained configuration records (mean/std).

Split from :mod:`featstudy.models.weights` (the sources every model shares: random, a local file, torchvision's
enums), which this module builds on.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from featstudy.errors import ConfigError, DataError
from featstudy.models.weights import (WeightsSource, _looks_like_file, _safetensors_metadata, checkpoint_dir, fetch,
                                      sha256_of)


TIMM_PRETRAINED = "pretrained"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import):
    ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def timm_tag(model_name: str, spec: str) -> str | None:
    """The timm pretrained tag that ``model.weights`` names for ``model_name`` (``pretrained`` -> the tag in the name
    or the architecture's default tag; ``timm:<tag>`` or ``<tag>`` -> that tag), or None when ``spec`` is ``random``
    or a file.

    Raises
    ------
    ConfigError
        A tag ``model_name`` does not have (the message lists its tags), or a tag that contradicts the name's.
    """
    import timm.models as tm

    spec = str(spec).strip()
    if spec == "random" or _looks_like_file(spec):
        return None
    arch, name_tag = tm.split_model_name_tag(model_name)
    tags = [n.split(".", 1)[1] for n in tm.get_arch_pretrained_cfgs(arch)] if arch in tm.list_models() else []
    if spec == TIMM_PRETRAINED:
        cfg = tm.get_pretrained_cfg(model_name)
        tag = name_tag or (cfg.tag if cfg is not None else "")
        if not tag or tag not in tags:
            raise ConfigError(f"model.weights: pretrained, but timm has no pretrained weights for {model_name}; "
                              "model=timm takes random or a local .safetensors/.pth file")
        return tag
    tag = spec.removeprefix("timm:")
    if tag not in tags:
        raise ConfigError(f"model.weights: {spec!r} is not a pretrained tag of {arch} (tags: {tags}); model=timm "
                          "takes random or a local .safetensors/.pth file, pretrained, or a tag")
    if name_tag and name_tag != tag:
        raise ConfigError(f"model.weights: {spec!r} contradicts the tag {name_tag!r} in model.name={model_name}; "
                          "drop one of them")
    return tag


def _timm_candidates(cfg) -> list[str]:
    """The file names timm's hub loader looks for, in its order (safetensors first)."""
    name = getattr(cfg, "hf_hub_filename", None)
    if not name:
        return ["model.safetensors", "pytorch_model.bin"]
    try:
        from timm.models._hub import _get_safe_alternatives

        safe = list(_get_safe_alternatives(name))
    except ImportError:  # pragma: no cover - timm internals
        safe = []
    return [*safe, name]


def resolve_timm(model_name: str, tag: str, download: bool = False) -> WeightsSource:
    """The local checkpoint of timm's ``<arch>.<tag>``: from the Hugging Face cache (its ``hf_hub_id``) or, for
    weights not on the Hub, torch.hub's checkpoint folder (its ``url``). Never downloads unless ``download``.

    Raises
    ------
    DataError
        The file is not in the cache and ``download`` is false, or the download failed: one line naming
        ``model.weights``, the repo id, the file and where to put it.
    """
    import timm.models as tm

    arch, _ = tm.split_model_name_tag(model_name)
    full = f"{arch}.{tag}"
    cfg = tm.get_pretrained_cfg(full)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        repo, _, revision = hub_id.partition("@")
        path = _hf_cached(repo, _timm_candidates(cfg), revision or None)
        if path is None and download:
            path = _hf_download(repo, _timm_candidates(cfg), revision or None)
        if path is None:
            cache = hf_cache_dir()
            folder = cache / f"models--{repo.replace('/', '--')}"
            raise DataError(
                f"model.weights: timm:{tag} ({full}) needs {_timm_candidates(cfg)[0]} of the Hugging Face repo {repo} "
                f"in the local cache, not found at {folder}/snapshots/<commit>/ (with {folder}/refs/"
                f"{revision or 'main'}); set model.download=true, or on a machine with network run `huggingface-cli "
                f"download {repo} {_timm_candidates(cfg)[0]}` and copy {folder} into {cache} (HF_HOME or HF_HUB_CACHE "
                "choose the cache), or set model.weights=/path/file.safetensors")
    elif getattr(cfg, "url", None):
        url = cfg.url
        hub_id = url
        path = checkpoint_dir() / Path(urlparse(url).path).name
        if not path.is_file():
            if not download:
                raise DataError(f"model.weights: timm:{tag} ({full}) needs {path}, not found; set model.download=true, "
                                f"or download {url} elsewhere and place it there (or set TORCH_HOME)")
            fetch(WeightsSource(kind="torchvision", tag=f"timm:{tag}", path=path, url=url))
    else:
        raise ConfigError(f"model.weights: timm:{tag}: {full} names no file (no hf_hub_id or url in its pretrained "
                          "configuration); set model.weights=/path/file.safetensors")
    try:
        digest = sha256_of(path)
    except OSError as exc:
        raise DataError(f"model.weights: {path}: cannot read it ({exc.strerror or exc})") from exc
    return WeightsSource(kind="timm", tag=f"timm:{tag}", path=Path(path), url=hub_id, sha256=digest)


def _hf_cached(repo: str, filenames: list[str], revision: str | None) -> Path | None:
    """The first of ``filenames`` in the local Hugging Face cache of ``repo`` (no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        got = try_to_load_from_cache(repo, name, cache_dir=str(hf_cache_dir()), revision=revision)
        if isinstance(got, str) and os.path.isfile(got):
            return Path(got)
    return None


def _hf_download(repo: str, filenames: list[str], revision: str | None) -> Path | None:
    """Download the first of ``filenames`` that ``repo`` has into the Hugging Face cache (``model.download=true``)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    last = None
    for name in filenames:
        try:
            return Path(hf_hub_download(repo, name, revision=revision, cache_dir=str(hf_cache_dir())))
        except EntryNotFoundError as exc:
            last = exc
        except Exception as exc:  # noqa: BLE001 - no network, offline mode, a gated repo
            why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise DataError(f"model.weights: downloading {name} of {repo} into {hf_cache_dir()} failed ({why}); "
                            "place the file there by hand (HF_HOME), or set model.weights=/path/file.safetensors") \
                from None
    raise DataError(f"model.weights: {repo} has none of {filenames} ({last})")


def timm_data_config(model_name: str, tag: str | None = None) -> dict:
    """timm's data configuration of ``model_name`` (its pretrained configuration, or of ``<arch>.<tag>``):
    ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode`` (timm's
    ``resolve_data_config``; ImageNet's defaults when the model has no pretrained configuration)."""
    import timm.data
    import timm.models as tm

    arch = tm.split_model_name_tag(model_name)[0]
    cfg = tm.get_pretrained_cfg(f"{arch}.{tag}" if tag else model_name)
    # a model without a pretrained configuration: timm's defaults (ImageNet mean/std, 224 px, bicubic, 0.875)
    return dict(timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None
                                              else {"input_size": (3, 224, 224)}))


def timm_preprocessing_of(model_name: str, weights) -> str | dict:
    """``model.preprocessing`` of ``model=timm``: a safetensors file's recorded ``preprocessing``, else the mean/std
    of the pretrained configuration of the weights' tag (or of ``model_name``'s default tag, for random weights and
    files), as :func:`featstudy.transforms.check_preprocessing` writes it (``torchvision`` for ImageNet's)."""
    from featstudy.transforms import check_preprocessing

    spec = "" if weights is None else str(weights).strip()
    if _looks_like_file(spec) and spec.endswith(".safetensors"):
        path = Path(spec).expanduser()
        if path.is_file():
            recorded = _safetensors_metadata(path).get("preprocessing")
            if recorded:
                return check_preprocessing(recorded)
    data = timm_data_config(model_name, timm_tag(model_name, spec) if spec else None)
    return check_preprocessing({"mean": list(data["mean"]), "std": list(data["std"])})


def _timm_preprocessing_resolver(model_name, weights="random") -> str:
    """``${timm_preprocessing:${.name},${.weights}}``: ``model.preprocessing``'s default for model=timm, so that
    ``--cfg job --resolve`` shows what runs: ``torchvision``, ``caffe``, or a mean/std pair as JSON text
    (``{"mean": [...], "std": [...]}``, which :func:`featstudy.transforms.check_preprocessing` reads; a string,
    since ``OmegaConf.resolve`` cannot put a dict where the interpolation string was)."""
    import json

    got = timm_preprocessing_of(str(model_name), weights)
    return got if isinstance(got, str) else json.dumps(got)
