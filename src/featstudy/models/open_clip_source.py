"""``model=open_clip``: the image tower (``model.visual``) of an open_clip model, read at named modules.

Only the image tower is built (``open_clip.model._build_vision_tower`` from the architecture's config), never the
text tower. Nodes, hooks, pooling by shape (NCHW/NHWC maps, tokens by ``token_pooling``) and the layout rule are
those of ``model=timm`` (:mod:`featstudy.models.timm_source`), imported from there.

Token layout. open_clip >= 2.24 runs its transformer batch-first, ``(B, T, D)`` (``transformer.batch_first`` is
True; open_clip 3 always); older releases ran the blocks sequence-first, ``(T, B, D)``. The layout is read from the
model: when ``visual.transformer.batch_first`` is False or absent, the outputs of ``transformer.resblocks.*`` are
sequence-first and are transposed before pooling; a probe of two crops checks that the batch axis is where the
model says (a mismatch is refused in one line). A ViT's class token is token 0 and it has one prefix token, so
``mean_patch`` averages tokens 1..T-1.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path

import torch
from torch import nn

from featstudy.errors import ConfigError, DataError
from featstudy.models import weights as _weights
from featstudy.models.timm_source import NODE_HINT as _TIMM_HINT
from featstudy.models.timm_source import (
    TOKEN_POOLINGS,
    TimmFeatureModel,
    _Done,
    layouts,
    output_shapes,
    pool_node,
)

NODE_HINT = "list them with: python -m featstudy.models.nodes --source open_clip {name}"
SEQ_FIRST = "tokens_seq_first"


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise ConfigError(f"model: model=open_clip needs the open_clip package ({exc}); "
                          "pip install 'open_clip_torch>=3.0,<4'") from None
    return open_clip


def model_config(name: str) -> dict:
    """open_clip's architecture config of ``name`` (a copy), or a one-line error with close names."""
    oc = _open_clip()
    cfg = oc.get_model_config(name) if name in oc.list_models() else None
    if not cfg:
        close = difflib.get_close_matches(name, oc.list_models(), n=4, cutoff=0.6)
        raise ConfigError(f"model.name: {name!r} is not an open_clip architecture; list them with python -c "
                          "\"import open_clip; print(open_clip.list_models())\"" + (f"; close: {close}" if close else ""))
    return cfg


def build_visual(name: str, device: str | torch.device | None = None) -> nn.Module:
    """The image tower of ``name`` alone, with open_clip's own initialisation (on ``device``, e.g. meta)."""
    from open_clip.model import _build_vision_tower

    cfg = model_config(name)
    with torch.device(device or "cpu"):
        return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], bool(cfg.get("quick_gelu", False)))


def image_size(name: str) -> int:
    size = model_config(name)["vision_cfg"].get("image_size", 224)
    return int(size[-1] if isinstance(size, (list, tuple)) else size)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def tag_checkpoint(name: str, tag: str, download: bool) -> tuple[Path, dict]:
    """The local checkpoint of pretrained tag ``tag`` of ``name`` and the tag's config (mean, std, quick_gelu ...).

    Looked up offline: the Hugging Face hub cache (``HF_HUB_CACHE``) for tags on the hub, ``~/.cache/clip`` for
    tags with a URL. Absent: downloaded by open_clip when ``download``, else one line naming the file and where
    to put it."""
    oc = _open_clip()
    cfg = oc.get_pretrained_cfg(name, tag)
    if not cfg:
        raise ConfigError(f"model.weights: {tag!r} is not a pretrained tag of {name} (its tags: "
                          f"{oc.list_pretrained_tags_by_model(name)}); or a local .safetensors/.pt/.bin file, or random")
    if bool(cfg.get("quick_gelu", False)) != bool(model_config(name).get("quick_gelu", False)):
        raise ConfigError(f"model.name: the tag {tag} was trained with quick_gelu={cfg.get('quick_gelu', False)}, "
                          f"{name} has the other activation; use model.name={name}-quickgelu or the plain name")
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

        repo, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        names = [*_get_safe_alternatives(filename), filename]
        for candidate in names:
            found = try_to_load_from_cache(repo, candidate, cache_dir=_hub_cache())
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found), cfg
        where = (f"{' or '.join(names)} of the Hugging Face repo {repo} in the hub cache {_hub_cache()} "
                 f"(huggingface-cli download {repo} {names[0]})")
    else:
        url = cfg.get("url", "")
        path = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if path.is_file():
            return path, cfg
        where = f"{path} (from {url})"
    if not download:
        raise DataError(f"model.weights: {name} {tag} needs {where}; not found offline: put it there, set "
                        "model.download=true, or set model.weights=/path/to/file")
    try:
        return Path(oc.pretrained.download_pretrained(cfg)), cfg
    except Exception as exc:  # noqa: BLE001 - network, hub and file errors
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"model.weights: {name} {tag}: download failed ({why}); put {where} by hand") from None


def architecture_pair(name: str) -> dict | None:
    """The mean/std of ``name`` without a tag: its config's ``preprocess_cfg``, else the pair all its pretrained
    tags share (SigLIP: 0.5/0.5), else None (open_clip's default, ``OPENAI_DATASET_MEAN/STD``)."""
    oc = _open_clip()
    own = model_config(name).get("preprocess_cfg") or {}
    pairs = {(tuple(own["mean"]), tuple(own["std"]))} if "mean" in own and "std" in own else {
        (tuple(c["mean"]), tuple(c["std"])) for c in (oc.get_pretrained_cfg(name, t)
                                                      for t in oc.list_pretrained_tags_by_model(name)) if "mean" in c}
    if len(pairs) != 1:
        return None
    mean, std = pairs.pop()
    return {"mean": list(mean), "std": list(std)}


def visual_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's part of a checkpoint: the ``visual.*`` keys of a whole CLIP model (prefix removed; the
    text tower's keys are dropped), or the whole dict when it has none (a file of the tower alone)."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    tower = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return tower or state


class OpenClipModel:
    """``model=open_clip`` (``conf/model/open_clip.yaml``, built by :func:`featstudy.groups.build`): an open_clip
    architecture, the image-tower modules read, the token pooling, the weights and the tower's preprocessing.

    Attributes
    ----------
    name : str
        An open_clip architecture (``open_clip.list_models()``: ``ViT-B-32``, ``RN50`` ...).
    nodes : dict
        Module name of ``model.visual`` -> layer name (the same: features are ``<node>:<channel>``).
    token_pooling : str
        ``cls``, ``mean`` or ``mean_patch``.
    weights : WeightsSource
        ``random`` (seed), ``file:<sha256>`` (a local state dict) or a pretrained tag (kind ``open_clip``, with the
        checkpoint's sha256).
    preprocessing : str or dict
        The tower's own mean/std pair (the tag's, else open_clip's ``OPENAI_DATASET_MEAN/STD``) unless set.
    image_size : int
        The tower's input size (``crops.size`` must match it for a ViT with learned position embeddings).
    """

    source = "open_clip"

    def __init__(self, name: str = "ViT-B-32", nodes: list[str] | None = None, token_pooling: str = "cls",
                 weights: str = "random", seed: int = 0, preprocessing=None, download: bool = False):
        name = str(name)
        model_config(name)
        if not nodes:
            raise ConfigError(f"model.nodes: {'empty list' if nodes is not None else 'required'} for model=open_clip; "
                              + NODE_HINT.format(name=name))
        nodes = [str(n) for n in nodes]
        if len(set(nodes)) != len(nodes):
            raise ConfigError(f"model.nodes: duplicate node names in {nodes}")
        if str(token_pooling) not in TOKEN_POOLINGS:
            raise ConfigError(f"model.token_pooling: {token_pooling!r} is not one of {list(TOKEN_POOLINGS)}")
        self.name, self.token_pooling, self.image_size = name, str(token_pooling), image_size(name)
        self.nodes = {n: n for n in nodes}
        self.channels: dict[str, int] = {}
        spec = "" if weights is None else str(weights).strip()
        own = None
        if spec == "random" or _weights._looks_like_file(spec):
            self.weights = _weights.resolve(name, spec, int(seed or 0))
        elif spec:
            path, tag_cfg = tag_checkpoint(name, spec, bool(download))
            digest = _weights.sha256_of(path)
            self.weights = _weights.WeightsSource(kind="open_clip", tag=spec, path=path, sha256=digest)
            own = {"mean": list(tag_cfg["mean"]), "std": list(tag_cfg["std"])} if "mean" in tag_cfg else None
        else:
            raise ConfigError("model.weights: empty; use random, a local .safetensors/.pt/.bin file or a pretrained "
                              "tag of " + name)
        self.preprocessing = self._preprocessing(preprocessing, own or architecture_pair(name))
        modules = {n for n, _ in build_visual(name, "meta").named_modules() if n}
        unknown = [n for n in nodes if n not in modules]
        if unknown:
            raise ConfigError(f"model.nodes: {unknown[0]!r} is not a module of {name}.visual; "
                              + NODE_HINT.format(name=name))

    @staticmethod
    def _preprocessing(value, own: dict | None):
        """``model.preprocessing`` checked; None or ``open_clip`` is the tower's own mean/std pair (never ImageNet's
        in silence)."""
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        from featstudy.transforms import check_preprocessing

        if value is None or value == "open_clip":
            return check_preprocessing(own or {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)})
        return check_preprocessing(value)

    def key_fields(self) -> dict:
        """What about the model changes the numbers (hashed into the embedding key)."""
        weights = self.weights.key_fields()
        if self.weights.kind == "open_clip":
            weights = {"weights": self.weights.tag, "sha256": self.weights.sha256}
        return {"source": self.source, "name": self.name, "nodes": self.nodes, "token_pooling": self.token_pooling,
                "preprocessing": self.preprocessing, "image_size": self.image_size, **weights}

    def network(self) -> tuple[nn.Module, str | None]:
        """The image tower in eval mode with its weights, and the checkpoint's sha256 (None for random)."""
        src = self.weights
        if src.kind == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(src.seed or 0)
                return build_visual(self.name).eval(), None
        state, digest = _weights.load_state_dict(src)  # a local file or a tag's checkpoint, both read as files
        state = visual_state(state)
        visual = build_visual(self.name, "meta")
        _weights.load_strict(visual, state, src.path, assign=True)
        if any(t.is_meta for t in visual.buffers()):  # a non-persistent buffer (a fixed position table)
            visual = build_visual(self.name)
            _weights.load_strict(visual, state, src.path)
        return visual.eval(), digest

    def build(self, pooling: str, crop_size: int) -> tuple[OpenClipFeatureModel, dict[str, int], str | None]:
        """(feature model, channels per node in order, weights sha256), as :func:`featstudy.models.build`."""
        visual, digest = self.network()
        try:
            shapes = output_shapes(visual, torch.zeros(2, 3, crop_size, crop_size))
        except Exception as exc:  # noqa: BLE001 - position embeddings of another size
            why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"crops.size={crop_size}: {self.name}.visual refused a {crop_size} px crop ({why}); "
                              f"its image size is {self.image_size}: set crops.size={self.image_size}") from None
        nodes = list(self.nodes)
        try:
            layout = layouts(visual, shapes, nodes, self.name)
        except ConfigError as exc:  # timm's node hint -> this source's
            timm_hint = _TIMM_HINT.format(name=self.name)
            raise ConfigError(str(exc).replace(timm_hint, NODE_HINT.format(name=self.name))) from None
        seq_first = sequence_first(visual)
        for n in nodes:
            if layout[n] == "tokens" and n.startswith("transformer.resblocks."):
                batch_axis = 1 if seq_first else 0
                if shapes[n][batch_axis] != 2:
                    raise ConfigError(f"model.nodes: {n!r} outputs {shapes[n]} for 2 crops; the batch axis is not "
                                      f"axis {batch_axis} as transformer.batch_first={not seq_first} says")
                layout[n] = SEQ_FIRST if seq_first else "tokens"
        prefix = prefix_tokens(visual)
        tokens = [n for n in nodes if layout[n] in ("tokens", SEQ_FIRST)]
        if self.token_pooling == "cls" and tokens and prefix == 0:
            raise ConfigError(f"model.token_pooling: cls, but {self.name}.visual has no class token; use mean")
        n_tokens = {n: shapes[n][0 if layout[n] == SEQ_FIRST else 1] for n in tokens}
        short = [n for n in tokens if n_tokens[n] <= prefix]
        if self.token_pooling == "mean_patch" and short:
            raise ConfigError(f"model.token_pooling: mean_patch, but {short[0]} has no patch tokens "
                              f"({n_tokens[short[0]]} tokens, {prefix} prefix tokens)")
        channels = {n: (shapes[n][1] if layout[n] in ("NCHW", "flat") else shapes[n][-1]) for n in nodes}
        model = OpenClipFeatureModel(visual, nodes, layout, pooling, self.token_pooling, prefix).eval()
        return model, channels, digest

    def __repr__(self) -> str:
        return f"OpenClipModel({self.name!r}, weights={self.weights.tag!r}, token_pooling={self.token_pooling!r})"


def sequence_first(visual: nn.Module) -> bool:
    """Whether the tower's transformer blocks see (T, B, D): ``transformer.batch_first`` False, or absent (open_clip
    before 2.24). A tower without an open_clip transformer (ResNet, a timm trunk) is batch-first."""
    transformer = getattr(visual, "transformer", None)
    return transformer is not None and not getattr(transformer, "batch_first", False)


def prefix_tokens(visual: nn.Module) -> int:
    """Tokens before the patches: 1 for an open_clip ViT (its class token), the trunk's own for a timm tower."""
    if getattr(visual, "class_embedding", None) is not None:
        return 1
    return int(getattr(getattr(visual, "trunk", None), "num_prefix_tokens", 0) or 0)


class OpenClipFeatureModel(TimmFeatureModel):
    """:class:`~featstudy.models.timm_source.TimmFeatureModel` over ``model.visual``; sequence-first token nodes
    (:func:`sequence_first`) are transposed to (B, T, D) before :func:`pool_node`."""

    def pooled_layers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if SEQ_FIRST not in self.layout.values():
            return super().pooled_layers(x)
        pooled: dict[str, torch.Tensor] = {}

        def read(name: str, out: torch.Tensor) -> None:
            kind = self.layout[name]
            out, kind = (out.transpose(0, 1), "tokens") if kind == SEQ_FIRST else (out, kind)
            pooled[name] = pool_node(out, kind, self.pooling, self.token_pooling, self.prefix)
            if len(pooled) == len(self.layers):
                raise _Done

        with contextlib.ExitStack() as hooks, contextlib.suppress(_Done):  # hooks removed after each call
            for n in self.layers:
                hook = self.body.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: read(n, o))
                hooks.callback(hook.remove)
            self.body(x)
        return {n: pooled[n] for n in self.layers}
