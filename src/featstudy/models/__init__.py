"""Models as feature extractors: a torchvision classifier, the graph nodes to read, and spatial pooling.

:func:`build` turns ``cfg.model`` into a :class:`FeatureModel`, an ``nn.Module`` mapping a batch of crops
(B, K, 3, H, W) to pooled features (B, F):

.. math::

    f_j(x) = \\frac{1}{K} \\sum_{k=1}^{K} \\operatorname{pool}\\big(a_{\\ell(j)}(\\mathrm{crop}_k(x))\\big)_{c(j)}

i.e. each requested node's activation is pooled over space *per crop* (:mod:`featstudy.pooling`), the layers are
concatenated in table order, and the K crops are averaged (paper §3.2). The nodes are read with
``torchvision.models.feature_extraction.create_feature_extractor``, which prunes the graph after the last requested
node (VGG19's fc8 is never computed).

``model.name=vgg19`` with ``model.nodes`` unset uses the paper's table (:mod:`featstudy.models.vgg19`); any other
torchvision classification model (``model=torchvision model.name=resnet50``) takes ``model.nodes``, a list of graph
node names from ``get_graph_node_names``, named in the features after the node itself.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn

from featstudy import pooling as _pooling
from featstudy.errors import ConfigError
from featstudy.models import vgg19 as _vgg19
from featstudy.models.crop_mean import CropMeanFeatures
from featstudy.models import weights as _weights

NODE_HINT = (
    "list valid nodes with: python -c \"import torchvision; from torchvision.models.feature_extraction import "
    "get_graph_node_names as g; print(g(torchvision.models.get_model('{name}'))[1])\""
)


class TorchvisionModel:
    """``model=vgg19|torchvision`` (``conf/model/*.yaml``, built by :func:`featstudy.groups.build`): a validated
    torchvision classifier, the nodes it is read at and its weights, nothing loaded yet (cheap: runs before any
    data is read).

    Attributes
    ----------
    name : str
        A torchvision classification model (``torchvision.models.list_models``).
    nodes : dict
        Graph node -> layer name (vgg19 without ``nodes``: the paper's table, ``features.1 -> conv1_1`` ... ``fc7``).
    weights : WeightsSource
        Where the weights come from (:func:`featstudy.models.weights.resolve`).
    preprocessing : str or dict
        ``torchvision``, ``caffe`` or a mean/std pair ``{"mean": [...], "std": [...]}``: what the weights were trained on (:func:`weights.preprocessing_of`, the
        default of ``model.preprocessing``), unless set explicitly.
    channels : dict
        Layer -> channels where known without a forward pass (vgg19's table), else empty.

    Raises
    ------
    ConfigError
        An unknown model name, a missing, empty or duplicated node list, a bad preprocessing name; and
        ConfigError/DataError from :func:`featstudy.models.weights.resolve`.
    """

    def __init__(self, name: str = "vgg19", weights: str = "IMAGENET1K_V1", preprocessing: str | None = None,
                 seed: int = 0, nodes: list[str] | None = None):
        from featstudy.transforms import check_preprocessing

        name = str(name)
        models = classification_models()
        if name not in models:
            raise ConfigError(f"model.name: {name!r} is not a torchvision classification model; valid: "
                              f"torchvision.models.list_models(module=torchvision.models), e.g. {models[:6]}")
        if nodes is None:
            if name != "vgg19":
                raise ConfigError(f"model.nodes: required for {name} (only vgg19 has a default table); "
                                  + NODE_HINT.format(name=name))
            table = _vgg19.return_nodes()
            channels = {layer: c for layer, c in _vgg19.LAYER_TABLE.values()}
        else:
            nodes = [str(n) for n in nodes]
            if not nodes:
                raise ConfigError("model.nodes: empty list")
            if len(set(nodes)) != len(nodes):
                raise ConfigError(f"model.nodes: duplicate node names in {nodes}")
            table = {n: n for n in nodes}
            channels = {}
        self.name = name
        self.nodes = table
        self.channels = channels
        self.weights = _weights.resolve(name, weights, int(seed or 0))
        if preprocessing is None:
            preprocessing = _weights.preprocessing_of(self.weights, name)
        self.preprocessing = check_preprocessing(preprocessing)  # a name or a mean/std pair

    def key_fields(self) -> dict:
        """What about the model changes the numbers (hashed into the embedding key)."""
        return {"name": self.name, "nodes": self.nodes, "preprocessing": self.preprocessing,
                **self.weights.key_fields()}

    def __repr__(self) -> str:
        return f"TorchvisionModel({self.name!r}, weights={self.weights.tag!r}, preprocessing={self.preprocessing!r})"


#: the former name of :class:`TorchvisionModel`
ModelSpec = TorchvisionModel


def classification_models() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def spec(cfg_model) -> TorchvisionModel:
    """``cfg.model`` built (:func:`featstudy.groups.build`): validated, nothing loaded."""
    from featstudy.groups import build

    return build(cfg_model, "model")


_INPLACE_FUNCTIONS = {getattr(operator, n) for n in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow",
                                                      "iand", "ior", "ixor", "ilshift", "irshift", "imatmul")}


def _mutates(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether graph node ``user`` overwrites ``node``'s tensor in place (``ReLU(inplace=True)``, ``x.relu_()``,
    ``F.relu(x, inplace=True)``, ``operator.iadd``)."""
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_module":
        return bool(getattr(modules.get(str(user.target)), "inplace", False))
    if user.op == "call_method":
        return str(user.target).endswith("_") and not str(user.target).endswith("__")
    if user.op == "call_function":
        name = getattr(user.target, "__name__", "")
        return (user.target in _INPLACE_FUNCTIONS or bool(user.kwargs.get("inplace"))
                or (name.endswith("_") and not name.endswith("__")))
    return False


def pooled_graph(body: fx.GraphModule, pooling: str) -> fx.GraphModule:
    """A copy of the feature extractor ``body`` (from ``create_feature_extractor``) that returns each node pooled
    (:func:`featstudy.pooling.pool_float32`) instead of its map, sharing ``body``'s modules and parameters.

    Each map is pooled right after the last op that reads it or overwrites it in place, so its last use is the
    pooling and fx's generated code drops it there: at most the maps one op reads and writes are alive at once,
    plus the pooled vectors, where ``body`` keeps every requested map until the end (VGG19: all 16 conv maps,
    59 MB per 224 px crop). Pooling after in-place users (a ``ReLU(inplace=True)`` that follows the node) keeps
    ``body``'s numbers exactly: ``body`` returns the tensor as it stands at the end of the forward pass.
    """
    graph = copy.deepcopy(body.graph)
    modules = dict(body.named_modules())
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    output = next(n for n in nodes if n.op == "output")
    returned = output.args[0]
    pooled = {}
    for name, node in returned.items():
        aliases, last = [node], node
        for alias in aliases:  # grows as in-place users are found
            for user in alias.users:
                if user is output:
                    continue
                if position[user] > position[last]:
                    last = user
                if _mutates(user, alias, modules) and user not in aliases:
                    aliases.append(user)
        with graph.inserting_after(last):
            pooled[name] = graph.call_function(_pooling.pool_float32, (node, pooling))
    output.args = (pooled,)
    graph.lint()
    return fx.GraphModule(body, graph, class_name="PooledFeatures")


class FeatureModel(CropMeanFeatures):
    """(B, K, 3, H, W) crops -> (B, F) float32 features: read the nodes, pool each per crop, concatenate, mean over
    crops.

    ``body`` (the registered module) returns the raw maps (the figures locate peaks in them); the forward pass used
    for features runs :func:`pooled_graph`, which pools each map where it is produced, in float32.
    """

    def __init__(self, body: nn.Module, layers: list[str], pooling: str):
        super().__init__()
        self.body = body
        self.layers = list(layers)
        self.pooling = _pooling.check(pooling)
        # not registered as a submodule: it shares body's modules (moved and cast with them); rebuilt, not pickled
        self.__dict__["pooled"] = pooled_graph(body, self.pooling)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("pooled", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__["pooled"] = pooled_graph(self.body, self.pooling)

    def pooled_layers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) -> ``{layer: (N, C) float32}`` in table order, one pooled vector per crop."""
        out = self.pooled(x)
        return {name: out[name] for name in self.layers}



def build_network(ms: ModelSpec) -> tuple[nn.Module, str | None]:
    """The torchvision network with its weights loaded; returns (network in eval mode, checkpoint sha256 or None)."""
    import torchvision.models as tvm

    src = ms.weights
    if src.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(src.seed)
            net = tvm.get_model(ms.name, weights=None)
        return net.eval(), None
    state, digest = _weights.load_state_dict(src)
    with torch.device("meta"):  # skip the random init that the loaded weights replace
        net = tvm.get_model(ms.name, weights=None)
    _weights.load_strict(net, state, src.path, assign=True)
    if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):  # a non-persistent buffer: build for real
        net = tvm.get_model(ms.name, weights=None)
        _weights.load_strict(net, state, src.path)
    return net.eval(), digest


def build(ms: ModelSpec, pooling: str, crop_size: int) -> tuple[FeatureModel, dict[str, int], str | None]:
    """Build the :class:`FeatureModel`; returns it, the channels per layer (in order) and the weights' sha256.
    Another source (``model=timm``: :class:`featstudy.models.timm_source.TimmModel`) builds itself."""
    from torchvision.models.feature_extraction import create_feature_extractor

    if not isinstance(ms, TorchvisionModel):
        return ms.build(pooling, crop_size)

    net, digest = build_network(ms)
    try:
        body = create_feature_extractor(net, return_nodes=dict(ms.nodes))
    except ValueError as exc:
        unknown = [n for n in ms.nodes if f"'{n}'" in str(exc)] or list(ms.nodes)
        raise ConfigError(f"model.nodes: {unknown[0]!r} is not a graph node of {ms.name}; " + NODE_HINT.format(name=ms.name)) from exc
    layers = list(ms.nodes.values())
    model = FeatureModel(body.eval(), layers, pooling).eval()
    channels = dict(ms.channels)
    if len(channels) != len(layers):
        with torch.no_grad():
            out = model.pooled_layers(torch.zeros(1, 3, crop_size, crop_size))
        channels = {name: int(out[name].shape[1]) for name in layers}
    return model, channels, digest


def feature_names(channels: dict[str, int]) -> list[str]:
    """``layer:channel`` for every column, in column order (e.g. ``conv4_1:221``)."""
    return [f"{layer}:{c}" for layer, n in channels.items() for c in range(n)]
