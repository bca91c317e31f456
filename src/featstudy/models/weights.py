"""Where a model's weights come from: a registry with three sources, never a silent fallback.

``model.weights`` is one of

* a torchvision enum name (``IMAGENET1K_V1``, ``DEFAULT``, or ``VGG19_Weights.IMAGENET1K_V1``): the checkpoint
  torchvision would download, looked up in ``$TORCH_HOME/hub/checkpoints/`` (``torch.hub.get_dir()``). A file already
  there is used offline after checking the hash prefix in its name; an absent file is downloaded with torchvision's
  hash check; absent and no network -> :class:`~featstudy.errors.DataError` naming the file and where to put it.
* a local ``.pth``/``.pt``/``.bin``/``.safetensors`` state_dict: read with ``torch.load(weights_only=True)`` (or safetensors),
  loaded strictly (a missing or unexpected key, or a wrong shape, is an error naming the key); its sha256 is recorded.
* ``random``: the builder's own initialisation under ``torch.manual_seed(model.seed)``; only when asked, and tagged
  ``random`` wherever results appear.

``model=timm`` also takes ``pretrained`` (the default pretrained tag of ``model.name``, or the tag written in it:
``vit_small_patch14_dinov2.lvd142m``) or a tag (``lvd142m``, or ``timm:lvd142m`` as recorded): :func:`resolve_timm`
finds the file timm would download in the local Hugging Face cache (``$HF_HUB_CACHE``, default ``$HF_HOME/hub``),
offline; missing and ``model.download=false`` -> one line naming the file, the repo and where to put it.

The tag (:attr:`WeightsSource.tag`) is ``random``, the enum member name (``IMAGENET1K_V1``), ``file:<sha256>`` or
``timm:<tag>``.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from featstudy.errors import ConfigError, DataError

FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class WeightsSource:
    """A resolved ``model.weights`` value (nothing loaded yet).

    Attributes
    ----------
    kind : {"torchvision", "file", "random", "timm"}
    tag : str
        ``random``, the enum member name, ``file:<sha256>`` or ``timm:<tag>``.
    path : Path or None
        The checkpoint file (torchvision: where it is or will be; file: the given file; timm: in the local cache).
    url : str or None
        torchvision's download URL; timm: the Hugging Face repo id (or the URL of a checkpoint not on the Hub).
    seed : int or None
        The seed of a ``random`` initialisation.
    """

    kind: str
    tag: str
    path: Path | None = None
    url: str | None = None
    seed: int | None = None
    sha256: str | None = None

    def key_fields(self) -> dict:
        """What about the weights changes the numbers (hashed into the embedding key)."""
        if self.kind == "random":
            return {"weights": "random", "seed": self.seed}
        if self.kind == "torchvision":
            # the checkpoint file name carries torchvision's hash prefix, e.g. vgg19-dcbb9e9d.pth
            return {"weights": self.tag, "checkpoint": self.path.name}
        if self.kind == "timm":
            return {"weights": self.tag, "sha256": self.sha256}
        return {"weights": "file", "sha256": self.sha256}


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, hashed in chunks; remembered per (path, size, mtime) within the process, so a job
    that checks its weights before extracting does not read 0.5 GB twice."""
    st = os.stat(path)
    memo_key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    digest = _SHA256_MEMO.get(memo_key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
        digest = _SHA256_MEMO[memo_key] = h.hexdigest()
    return digest


_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


def checkpoint_dir() -> Path:
    """torch.hub's checkpoint folder, ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _looks_like_file(spec: str) -> bool:
    return spec.endswith(FILE_SUFFIXES) or "/" in spec or os.sep in spec


def resolve(model_name: str, spec, seed: int = 0) -> WeightsSource:
    """Turn ``model.weights`` into a :class:`WeightsSource`, checking what can be checked without loading.

    Raises
    ------
    ConfigError
        Unknown enum name (the message lists the valid ones) or an empty value.
    DataError
        A local file that does not exist or cannot be read.
    """
    if spec is None or str(spec).strip() == "":
        raise ConfigError("model.weights: empty; use a torchvision enum name (IMAGENET1K_V1), a .pth/.safetensors path, or random")
    spec = str(spec).strip()
    if spec == "random":
        return WeightsSource(kind="random", tag="random", seed=int(seed))
    if _looks_like_file(spec):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise DataError(f"model.weights: {path}: no such file")
        try:
            digest = sha256_of(path)
        except OSError as exc:
            raise DataError(f"model.weights: {path}: cannot read it ({exc.strerror or exc})") from exc
        return WeightsSource(kind="file", tag=f"file:{digest}", path=path, sha256=digest)
    return _resolve_enum(model_name, spec)


def _resolve_enum(model_name: str, spec: str) -> WeightsSource:
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(model_name)
    except ValueError as exc:
        raise ConfigError(f"model.name: unknown torchvision model {model_name!r}; see torchvision.models.list_models()") from exc
    member = spec.split(".", 1)[1] if spec.startswith(enum.__name__ + ".") else spec
    valid = [m for m in enum.__members__]
    if member not in enum.__members__:
        raise ConfigError(
            f"model.weights: {spec!r} is not a weights name of {model_name}; valid: {valid}, "
            "a .pth/.safetensors path, or random"
        )
    weights = enum[member]
    url = weights.url
    path = checkpoint_dir() / Path(urlparse(url).path).name
    return WeightsSource(kind="torchvision", tag=weights.name, path=path, url=url)


#: checkpoints known to expect Caffe preprocessing (BGR, 0-255, minus the mean pixel), by the sha256 prefix that
#: torch.hub's naming puts in their file names: the VGG weights converted from the original Caffe models
#: (github.com/jcjohnson/pytorch-vgg), used by the paper's generation of work
CAFFE_CHECKPOINTS = {"d01eb7cb": "vgg19-d01eb7cb.pth", "00b39a1b": "vgg16-00b39a1b.pth"}


def preprocessing_of(source: WeightsSource, model_name: str = "vgg19") -> str:
    """What images ``source``'s weights were trained on, as ``model.preprocessing`` names it.

    * ``random`` and a torchvision enum: ``torchvision`` (the builder's own convention, ImageNet mean/std);
    * a file: its safetensors metadata ``preprocessing``; else, by its sha256, a known Caffe conversion
      (:data:`CAFFE_CHECKPOINTS`) -> ``caffe``, or one of torchvision's own checkpoints of ``model_name`` ->
      ``torchvision``.

    Raises
    ------
    ConfigError
        A file that records nothing and is not a known checkpoint: guessing would silently compute other numbers,
        so the user says which (``model.preprocessing=torchvision|caffe``).
    """
    if source.kind != "file":
        return "torchvision"
    if source.path.suffix == ".safetensors":
        recorded = _safetensors_metadata(source.path).get("preprocessing")
        if recorded:
            return str(recorded)
    digest = source.sha256 or sha256_of(source.path)
    for prefix in CAFFE_CHECKPOINTS:
        if digest.startswith(prefix):
            return "caffe"
    if any(digest.startswith(prefix) for prefix in _torchvision_prefixes(model_name)):
        return "torchvision"
    raise ConfigError(f"model.preprocessing: {source.path} does not record how its images were preprocessed; set "
                      "model.preprocessing=torchvision (ImageNet mean/std on 0-1 RGB) or caffe (BGR, 0-255, minus "
                      "the mean pixel), or save it as .safetensors with metadata {'preprocessing': ...}")


def _safetensors_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file's header (nothing else is read)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's file
        raise DataError(f"model.weights: {path}: not a readable safetensors file ({type(exc).__name__}: {exc})") \
            from exc


def _torchvision_prefixes(model_name: str) -> list[str]:
    """The sha256 prefixes in the file names of torchvision's checkpoints of ``model_name`` (none if unknown)."""
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(model_name)
    except ValueError:
        return []
    return [p for p in (_hash_prefix(Path(urlparse(w.url).path)) for w in enum) if p]


def _preprocessing_resolver(weights, model_name="vgg19") -> str:
    """``${weights_preprocessing:${.weights},${.name}}``: the default of ``model.preprocessing``, so that
    ``--cfg job`` shows what runs."""
    return preprocessing_of(resolve(str(model_name), weights, 0), str(model_name))


def _hash_prefix(path: Path) -> str | None:
    # torch.hub's convention: <name>-<first hex digits of sha256>.<ext>
    m = re.search(r"-([a-f0-9]+)\.", path.name)
    return m.group(1) if m else None


def _download(url: str, dst: Path, hash_prefix: str | None) -> None:
    """torch.hub's download with its hash check (temp file, then rename). Separate so tests can stub the network."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=hash_prefix, progress=True)
    finally:
        socket.setdefaulttimeout(old)


def fetch(source: WeightsSource) -> Path:
    """Make sure a torchvision checkpoint is on disk (download once, hash-checked); return its path."""
    assert source.kind == "torchvision"
    path = source.path
    if not path.is_file():
        try:
            _download(source.url, path, _hash_prefix(path))
        except (urllib.error.URLError, OSError, socket.timeout) as exc:
            raise DataError(
                f"model.weights: {source.tag} needs {path}; download failed ({exc}). No network: download "
                f"{source.url} elsewhere and place it there (or set TORCH_HOME), or set model.weights=/path/file.pth"
            ) from exc
        except RuntimeError as exc:  # torch.hub: invalid hash value
            raise DataError(f"model.weights: {source.url}: {exc}; delete any partial file and retry") from exc
    return path


def load_state_dict(source: WeightsSource) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """Read the state_dict of ``source`` (None for ``random``) and the checkpoint's sha256."""
    if source.kind == "random":
        return None, None
    path = fetch(source) if source.kind == "torchvision" else source.path
    digest = source.sha256 or sha256_of(path)
    prefix = _hash_prefix(path) if source.kind == "torchvision" else None
    if prefix and not digest.startswith(prefix):
        raise DataError(f"model.weights: {path}: sha256 {digest[:12]}… does not match the name's {prefix}; delete it and download again")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's file
        raise DataError(f"model.weights: {path}: not a readable state_dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"model.weights: {path}: not a state_dict (a dict of tensors)")
    return state, digest


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path, assign: bool = False) -> None:
    """``load_state_dict(strict=True)`` with one-line errors naming the first offending key."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise DataError(f"model.weights: {path}: missing key {missing[0]!r} ({len(missing)} missing)")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise DataError(f"model.weights: {path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise DataError(
                f"model.weights: {path}: key {k!r} has shape {tuple(state[k].shape)}, the model expects {tuple(v.shape)}"
            )
    if assign:  # keep the model's dtypes (a half-precision file still gives an fp32 model)
        state = {k: v.to(own[k].dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)
