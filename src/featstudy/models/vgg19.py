"""VGG19's layer table: the paper's 9,600-feature embedding (Garcia-Gasulla et al. 2017, §3.1, Tables 1 and 3).

The features are the outputs of the ReLU that follows each of the 16 conv layers conv1_1 … conv5_4, each pooled over
space to one value per filter (5,504 values), then fc7 after its ReLU (4,096 values): 9,600 per image, in this order.

torchvision's VGG uses ``ReLU(inplace=True)``: the tensor a conv module returns is overwritten by the ReLU that
follows it, so a hook or graph node on a conv module silently yields post-ReLU values. The table therefore names
the ReLU nodes themselves (``features.1``, ``features.3``, …, ``classifier.4``), whose outputs are never modified
afterwards (the next op is a conv, a max-pool or a linear layer, none of them in-place).

The spatial geometry of the conv layers (kernel, stride, padding of every conv and max-pool of ``features``) is
read from torchvision's own ``vgg19().features``, built on the meta device (no weights, no memory), never copied
into a table here: :func:`layer_geometry`, and from it :func:`receptive_fields` (the crops of figures 2 and 3).
"""

from __future__ import annotations

from functools import lru_cache

#: torchvision graph node -> (paper layer name, number of channels), in the paper's column order.
LAYER_TABLE: dict[str, tuple[str, int]] = {
    "features.1": ("conv1_1", 64),
    "features.3": ("conv1_2", 64),
    "features.6": ("conv2_1", 128),
    "features.8": ("conv2_2", 128),
    "features.11": ("conv3_1", 256),
    "features.13": ("conv3_2", 256),
    "features.15": ("conv3_3", 256),
    "features.17": ("conv3_4", 256),
    "features.20": ("conv4_1", 512),
    "features.22": ("conv4_2", 512),
    "features.24": ("conv4_3", 512),
    "features.26": ("conv4_4", 512),
    "features.29": ("conv5_1", 512),
    "features.31": ("conv5_2", 512),
    "features.33": ("conv5_3", 512),
    "features.35": ("conv5_4", 512),
    "classifier.4": ("fc7", 4096),
}

#: The paper's layer names in column order.
LAYERS: list[str] = [name for name, _ in LAYER_TABLE.values()]

#: 5,504 conv features + 4,096 fc7 features.
N_FEATURES: int = sum(c for _, c in LAYER_TABLE.values())

#: Pre-ReLU conv nodes, for tests and documentation only: never extract these (in-place ReLU overwrites them).
CONV_NODES: dict[str, str] = {
    f"features.{int(node.split('.')[1]) - 1}": name for node, (name, _) in LAYER_TABLE.items() if name != "fc7"
}


def return_nodes() -> dict[str, str]:
    """The ``return_nodes`` argument of ``create_feature_extractor``: graph node -> paper layer name."""
    return {node: name for node, (name, _) in LAYER_TABLE.items()}


@lru_cache(maxsize=1)
def layer_geometry() -> tuple[tuple[str | None, int, int, int], ...]:
    """``(paper layer name, kernel, stride, padding)`` of every conv and max-pool of VGG19's ``features``, in order
    (a pool's name is None; the ReLUs change no geometry and are left out), read from torchvision's ``vgg19``
    modules built on the meta device. Kernels, strides and paddings are square (one number each)."""
    import torch
    import torchvision
    from torch import nn

    with torch.device("meta"):  # only the modules' settings are read: nothing is allocated or initialised
        features = torchvision.models.vgg19(weights=None).features
    out: list[tuple[str | None, int, int, int]] = []
    for index, m in enumerate(features):
        if isinstance(m, nn.Conv2d):
            name = CONV_NODES[f"features.{index}"]
            k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation
        elif isinstance(m, nn.MaxPool2d):
            name = None
            k, s, p, d = (_pair(v) for v in (m.kernel_size, m.stride, m.padding, m.dilation))
        else:
            continue
        if not (k[0] == k[1] and s[0] == s[1] and p[0] == p[1] and d == (1, 1)) or getattr(m, "ceil_mode", False):
            raise ValueError(f"VGG19 features.{index} = {m}: not a square, undilated, floor-mode layer")
        out.append((name, int(k[0]), int(s[0]), int(p[0])))
    return tuple(out)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def receptive_fields() -> dict[str, tuple[int, int, float]]:
    """``conv layer -> (size, jump, start)``: receptive-field size in input pixels, the stride between neighbouring
    positions of its map, and the centre of position 0 (pixel i spanning [i, i + 1)), for the 16 conv layers in
    order, from :func:`layer_geometry` by the standard recursion r += (k-1)·j, start += ((k-1)/2 - p)·j, j *= s.
    """
    return dict(_receptive_fields())


@lru_cache(maxsize=1)
def _receptive_fields() -> tuple[tuple[str, tuple[int, int, float]], ...]:
    size, jump, start = 1, 1, 0.5
    out = []
    for name, k, s, p in layer_geometry():
        size += (k - 1) * jump
        start += ((k - 1) / 2 - p) * jump
        jump *= s
        if name:
            out.append((name, (size, jump, start)))
    return tuple(out)
