"""``model=timm``: any timm model read at named modules, each module's output pooled by its shape.

A node is a module name (``blocks.11``, ``stages.2``; list them with ``python -m featstudy.models.nodes <name>``)
and its value is that module's output, read with a forward hook. Per crop, each node's output is pooled by shape
and the nodes are concatenated in order; the crops are then averaged (as :class:`featstudy.models.FeatureModel`):

* 4-D NCHW (B, C, H, W): over space with ``pooling`` (avg | max), in float32;
* 4-D NHWC (B, H, W, C): the same, over axes 1 and 2 (see :func:`layouts` for how NHWC is decided);
* 3-D tokens (B, T, D): by ``model.token_pooling``: ``cls`` = token 0, ``mean`` = all tokens, ``mean_patch`` =
  the tokens after the model's ``num_prefix_tokens`` (class and register tokens);
* 2-D (B, D): kept.

Features are named ``<node>:<channel>``. The forward pass stops once the last node is read (a ViT's head is never
run).
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from featstudy import pooling as _pooling
from featstudy.errors import ConfigError, DataError
from featstudy.models import timm_weights as _timm_weights
from featstudy.models import weights as _weights
from featstudy.models.crop_mean import CropMeanFeatures

TOKEN_POOLINGS = ("cls", "mean", "mean_patch")
NODE_HINT = "list them with: python -m featstudy.models.nodes {name}"


def _hint(name: str, kwargs: dict | None = None) -> str:
    """The node-listing command for ``name`` built with ``kwargs`` (``model.kwargs``)."""
    import json

    extra = "".join(f" '{k}={v if isinstance(v, str) else json.dumps(v)}'" for k, v in (kwargs or {}).items())
    return NODE_HINT.format(name=name) + extra


def _timm():
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise ConfigError(f"model: model=timm needs the timm package ({exc}); pip install 'timm>=1.0,<2'") from None
    return timm


class TimmModel:
    """``model=timm`` (``conf/model/timm.yaml``, built by :func:`featstudy.groups.build`): a validated timm model
    name, the module names read, the token pooling and the weights; nothing loaded yet.

    Attributes
    ----------
    name : str
        A timm model name (``timm.list_models()``).
    nodes : dict
        Module name -> layer name (the same: features are ``<node>:<channel>``).
    token_pooling : str
        ``cls``, ``mean`` or ``mean_patch``: how a 3-D token output (B, T, D) becomes (B, D).
    weights : WeightsSource
        ``random`` (seeded by ``seed``), a local ``.safetensors``/``.pth`` file (``file:<sha256>``), or timm's
        pretrained weights: ``pretrained`` (the tag in ``name`` or its default tag) or a tag (``lvd142m``,
        ``timm:lvd142m``), read from the local Hugging Face cache only (``timm:<tag>``, with the file's sha256);
        downloaded only with ``download=true``.
    preprocessing : str or dict
        ``torchvision``, ``caffe`` or ``{"mean": [...], "std": [...]}``; by default (and for ``timm``) the mean/std
        of the model's pretrained configuration (a pair equal to ImageNet's is ``torchvision``), or a safetensors
        file's recorded ``preprocessing``.
    download : bool
        Whether timm pretrained weights missing from the local cache may be downloaded (into it).
    kwargs : dict
        Keyword arguments of ``timm.create_model`` (``img_size``, ``dynamic_img_size``, ``depth`` ...).
    channels : dict
        Empty: the channels are found by :meth:`build`'s probe.

    Raises
    ------
    ConfigError
        An unknown model name, a missing, empty or duplicated node list, an unknown node, an unknown token pooling,
        weights other than ``random``, a file or a pretrained tag of the model, a bad preprocessing.
    DataError
        A weights file that does not exist; pretrained weights not in the local cache (and ``download`` false).
    """

    source = "timm"

    def __init__(self, name: str, nodes: list[str] | None = None, token_pooling: str = "cls",
                 weights: str = "random", seed: int = 0, preprocessing=None,
                 kwargs: dict | None = None, download: bool = False):
        from featstudy.transforms import check_preprocessing

        timm = _timm()
        name = str(name)
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
            raise ConfigError(f"model.name: {name!r} is not a timm model; list them with python -c \"import timm; "
                              f"print(timm.list_models('*{name.split('_')[0]}*'))\""
                              + (f"; close: {close}" if close else ""))
        if nodes is None:
            raise ConfigError("model.nodes: required for model=timm; " + NODE_HINT.format(name=name))
        nodes = [str(n) for n in nodes]
        if not nodes:
            raise ConfigError("model.nodes: empty list; " + NODE_HINT.format(name=name))
        if len(set(nodes)) != len(nodes):
            raise ConfigError(f"model.nodes: duplicate node names in {nodes}")
        token_pooling = str(token_pooling)
        if token_pooling not in TOKEN_POOLINGS:
            raise ConfigError(f"model.token_pooling: {token_pooling!r} is not one of {list(TOKEN_POOLINGS)}")
        spec = "" if weights is None else str(weights).strip()
        if not spec:
            raise ConfigError("model.weights: empty; model=timm takes random, a local .safetensors/.pth file, "
                              "pretrained, or a pretrained tag of the model")
        self.name = name
        self.kwargs = dict(kwargs or {})
        self.nodes = {n: n for n in nodes}
        self.channels: dict[str, int] = {}
        self.token_pooling = token_pooling
        self.download = bool(download)
        self.tag = _timm_weights.timm_tag(name, spec)  # None for random and files
        if self.tag is not None:
            self.weights = _timm_weights.resolve_timm(name, self.tag, self.download)
        else:
            self.weights = _weights.resolve(name, spec, int(seed or 0))
        if preprocessing is None or preprocessing == "timm":
            recorded = None
            if preprocessing is None and self.weights.kind == "file" and self.weights.path.suffix == ".safetensors":
                recorded = _weights._safetensors_metadata(self.weights.path).get("preprocessing")
            preprocessing = recorded or self.data_config()
            if not recorded:
                preprocessing = {"mean": list(preprocessing["mean"]), "std": list(preprocessing["std"])}
        self.preprocessing = check_preprocessing(preprocessing)
        modules = set(module_names(name, self.kwargs))
        unknown = [n for n in nodes if n not in modules]
        if unknown:
            raise ConfigError(f"model.nodes: {unknown[0]!r} is not a module of {name}; "
                              + _hint(name, self.kwargs))

    @property
    def timm_name(self) -> str:
        """The name given to ``timm.create_model``: ``<arch>.<tag>`` for pretrained weights, else ``name``."""
        if self.tag is None:
            return self.name
        return f"{_timm().models.split_model_name_tag(self.name)[0]}.{self.tag}"

    def data_config(self) -> dict:
        """timm's data configuration of the model (of its weights' tag): ``input_size``, ``interpolation``,
        ``mean``, ``std``, ``crop_pct``, ``crop_mode``. featstudy takes ``mean``/``std`` as the default
        preprocessing, and ``input_size``, ``crop_pct`` and ``interpolation`` as the crops' defaults
        (:mod:`featstudy.models.crop_defaults`)."""
        return _timm_weights.timm_data_config(self.name, self.tag)

    def key_fields(self) -> dict:
        """What about the model changes the numbers (hashed into the embedding key)."""
        return {"source": self.source, "name": self.name, "kwargs": self.kwargs, "nodes": self.nodes,
                "token_pooling": self.token_pooling, "preprocessing": self.preprocessing,
                **self.weights.key_fields()}

    def network(self) -> tuple[nn.Module, str | None]:
        """The timm model in eval mode with its weights, and the weights file's sha256 (None for random)."""
        timm = _timm()
        src = self.weights
        if src.kind == "random":
            torch.manual_seed(src.seed or 0)
            return timm.create_model(self.name, pretrained=False, **self.kwargs).eval(), None
        if src.kind == "timm":  # timm's own loading (its checkpoint filter, head handling), from the cached file only
            try:
                net = timm.create_model(self.timm_name, pretrained=True, **self.kwargs,
                                        pretrained_cfg_overlay={"file": str(src.path), "source": None})
            except (RuntimeError, KeyError, ValueError, OSError) as exc:
                why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                raise DataError(f"model.weights: {src.tag}: timm could not load {src.path} into {self.timm_name} "
                                f"({why})") from None
            return net.eval(), src.sha256
        state, digest = _weights.load_state_dict(src)
        try:
            with torch.device("meta"):  # skip the random init that the loaded weights replace
                net = timm.create_model(self.name, pretrained=False, **self.kwargs)
            _weights.load_strict(net, state, src.path, assign=True)
            on_meta = any(t.is_meta for t in [*net.parameters(), *net.buffers()])
        except (RuntimeError, NotImplementedError, TypeError):  # an init that cannot run on meta
            on_meta = True
        if on_meta:  # non-persistent buffers (swin's relative_position_index, a rope table): build for real
            net = timm.create_model(self.name, pretrained=False, **self.kwargs)
            _weights.load_strict(net, state, src.path)
        return net.eval(), digest

    def build(self, pooling: str, crop_size: int) -> tuple[TimmFeatureModel, dict[str, int], str | None]:
        """(feature model, channels per node in order, weights sha256): the triple of :func:`featstudy.models.build`.
        One probe forward pass of a ``crop_size`` crop finds each node's shape, layout and channels."""
        net, digest = self.network()
        shapes = probe(net, self.name, crop_size)
        layout = layouts(net, shapes, list(self.nodes), self.name)
        prefix = int(getattr(net, "num_prefix_tokens", 0) or 0)
        if self.token_pooling == "cls" and any(layout[n] == "tokens" for n in self.nodes) \
                and getattr(net, "cls_token", None) is None:
            raise ConfigError(f"model.token_pooling: cls, but {self.name} has no class token; use mean or mean_patch")
        if self.token_pooling == "mean_patch":
            short = [n for n in self.nodes if layout[n] == "tokens" and shapes[n][1] <= prefix]
            if short:
                raise ConfigError(f"model.token_pooling: mean_patch, but {short[0]} has no patch tokens "
                                  f"({shapes[short[0]][1]} tokens, {prefix} prefix tokens)")
        channels = {n: (shapes[n][1] if layout[n] in ("NCHW", "flat") else shapes[n][-1]) for n in self.nodes}
        model = TimmFeatureModel(net, list(self.nodes), layout, pooling, self.token_pooling, prefix).eval()
        return model, channels, digest

    def __repr__(self) -> str:
        return (f"TimmModel({self.name!r}, weights={self.weights.tag!r}, token_pooling={self.token_pooling!r}, "
                f"preprocessing={self.preprocessing!r})")


def module_names(name: str, kwargs: dict | None = None) -> list[str]:
    """The module names of timm model ``name`` (built on the meta device: no memory, no init)."""
    try:
        try:
            with torch.device("meta"):
                net = _timm().create_model(name, pretrained=False, **(kwargs or {}))
        except (RuntimeError, NotImplementedError):  # an init that cannot run on meta
            net = _timm().create_model(name, pretrained=False, **(kwargs or {}))
    except Exception as exc:  # noqa: BLE001 - a keyword the model does not take, a bad value
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"model.kwargs: timm.create_model({name!r}, **{kwargs or {}}) failed: {why}") from None
    return [n for n, _ in net.named_modules() if n]


def output_shapes(net: nn.Module, x: torch.Tensor, only: list[str] | None = None) -> dict[str, object]:
    """Run ``net(x)`` with a hook on every module (or on ``only``) and return each one's output shape (a tuple, or
    the type name of a non-tensor output); a module called twice in one pass is recorded as ``"called twice"``."""
    shapes: dict[str, object] = {}

    def hook(name):
        def record(module, args, out):
            shapes[name] = "called twice" if name in shapes else (
                tuple(out.shape) if torch.is_tensor(out) else type(out).__name__)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules() if n and (only is None or n in only)]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def probe(net: nn.Module, name: str, crop_size: int) -> dict[str, object]:
    """Output shapes of every module for one ``crop_size`` crop of zeros (a one-line error if the model refuses it)."""
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    try:
        return output_shapes(net, torch.zeros(1, 3, crop_size, crop_size, device=device))
    except Exception as exc:  # noqa: BLE001 - timm's assertions on the input size, shape errors
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"crops.size={crop_size}: {name} refused a {crop_size} px crop ({why}); a model built for "
                          "one size takes model.kwargs.img_size=<crops.size> (or dynamic_img_size=true)") from None


def _out_size(module: nn.Module) -> int | None:
    """The channels a parameterised leaf module produces (Linear, Conv, norms, a layer scale)."""
    for attr in ("out_features", "out_channels", "num_features", "num_channels"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(tuple(shape)[-1])
    first = next(module.parameters(recurse=False), None)
    return int(first.shape[0]) if first is not None and first.dim() else None


def layouts(net: nn.Module, shapes: dict[str, object], nodes: list[str], name: str) -> dict[str, str]:
    """Each node's layout: ``flat`` (B, D), ``tokens`` (B, T, D), ``NCHW`` or ``NHWC``.

    A 4-D output is NHWC or NCHW by this rule, in order:

    1. a module of the model's ``feature_info`` (timm's own stage list) has the model's ``output_fmt``
       (swin, hiera: NHWC; convnext, resnet: NCHW);
    2. otherwise its channels are those of the last parameterised module inside it (a Linear's ``out_features``,
       a conv's ``out_channels``, a norm's width), or, for a module without parameters (an activation, dropout,
       identity), those of the nearest parameterised module before it whose output has the same shape; the axis
       of that size is the channel axis: axis 1 -> NCHW, axis 3 -> NHWC;
    3. when both axes or neither have that size, the node is refused (one line naming model.nodes): never a guess.
    """
    modules = dict(net.named_modules())
    order = list(modules)
    fmt = str(getattr(net, "output_fmt", "NCHW") or "NCHW").split(".")[-1].upper()
    stages = {str(f.get("module")) for f in (getattr(getattr(net, "feature_info", None), "info", None)
                                             or getattr(net, "feature_info", None) or [])
              if isinstance(f, dict)}
    out: dict[str, str] = {}
    for node in nodes:
        shape = shapes.get(node)
        if shape is None:
            raise ConfigError(f"model.nodes: {node!r} is not run by {name}'s forward pass")
        if shape == "called twice":
            raise ConfigError(f"model.nodes: {node!r} runs more than once in {name}'s forward pass (its output is "
                              "ambiguous); read a module inside it; " + NODE_HINT.format(name=name))
        if not isinstance(shape, tuple):
            raise ConfigError(f"model.nodes: {node!r} of {name} outputs {shape}, not one tensor; read a module "
                              "inside or around it; " + NODE_HINT.format(name=name))
        if len(shape) in (2, 3):
            out[node] = {2: "flat", 3: "tokens"}[len(shape)]
            continue
        if len(shape) != 4:
            raise ConfigError(f"model.nodes: {node!r} of {name} outputs shape {shape}; only 2-D, 3-D and 4-D "
                              "outputs are pooled")
        if node in stages and fmt in ("NCHW", "NHWC"):
            out[node] = fmt
            continue
        leaves = [n for n in order if (n == node or n.startswith(node + ".")) and
                  next(modules[n].parameters(recurse=False), None) is not None]
        if not leaves:  # no parameters: the nearest parameterised module before it with the same output shape
            before = order[:order.index(node)]
            leaves = [n for n in before if shapes.get(n) == shape and
                      next(modules[n].parameters(recurse=False), None) is not None][-1:]
        c = _out_size(modules[leaves[-1]]) if leaves else None
        if c is not None and shape[1] == c and shape[3] != c:
            out[node] = "NCHW"
        elif c is not None and shape[3] == c and shape[1] != c:
            out[node] = "NHWC"
        else:
            raise ConfigError(f"model.nodes: cannot tell the channel axis of {node!r}'s output {shape} "
                              f"(channels {c}); read a parameterised module next to it or change crops.size; "
                              + NODE_HINT.format(name=name))
    return out


def pool_node(x: torch.Tensor, layout: str, pooling: str, token_pooling: str, prefix: int) -> torch.Tensor:
    """One node's output -> (N, C) float32 by its layout (see the module docstring)."""
    if layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    if layout in ("NCHW", "NHWC", "flat"):
        return _pooling.pool_float32(x, pooling)
    if token_pooling == "cls":
        return x[:, 0].float()
    tokens = x if token_pooling == "mean" else x[:, prefix:]
    return tokens.mean(dim=1, dtype=torch.float32)


class _Done(Exception):
    """Raised by the last node's hook: the rest of the forward pass is not needed."""


class TimmFeatureModel(CropMeanFeatures):
    """(B, K, 3, H, W) crops -> (B, F) float32 features: each node read with a forward hook and pooled there
    (:func:`pool_node`), nodes concatenated in order, mean over crops. ``body`` is the timm model itself."""

    def __init__(self, body: nn.Module, layers: list[str], layout: dict[str, str], pooling: str,
                 token_pooling: str, prefix: int):
        super().__init__()
        self.body = body
        self.layers = list(layers)
        self.layout = dict(layout)
        self.pooling = _pooling.check(pooling)
        self.token_pooling = token_pooling
        self.prefix = int(prefix)

    def pooled_layers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) -> ``{node: (N, C) float32}`` in node order, one pooled vector per crop."""
        got: dict[str, torch.Tensor] = {}
        modules = dict(self.body.named_modules())

        def hook(name):
            def read(module, args, out):
                got[name] = pool_node(out, self.layout[name], self.pooling, self.token_pooling, self.prefix)
                if len(got) == len(self.layers):
                    raise _Done
            return read

        # registered per call, not kept: the module stays picklable (ddp_spawn) and hook-free between calls
        handles = [modules[n].register_forward_hook(hook(n)) for n in self.layers]
        try:
            self.body(x)
        except _Done:
            pass
        finally:
            for h in handles:
                h.remove()
        return {name: got[name] for name in self.layers}

