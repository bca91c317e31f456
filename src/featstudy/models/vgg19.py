"""VGG19's layer table: the paper's 9,600-feature embedding (Garcia-Gasulla et al. 2017, §3.1, Tables 1 and 3).

The features are the outputs of the ReLU that follows each of the 16 conv layers conv1_1 … conv5_4, each pooled over
space to one value per filter (5,504 values), then fc7 after its ReLU (4,096 values): 9,600 per image, in this order.

torchvision's VGG uses ``ReLU(inplace=True)``: the tensor a conv module returns is overwritten by the ReLU that
follows it, so a hook or graph node on a conv module silently yields post-ReLU values. The table therefore names
the ReLU nodes themselves (``features.1``, ``features.3``, …, ``classifier.4``), whose outputs are never modified
afterwards (the next op is a conv, a max-pool or a linear layer, none of them in-place).
"""

from __future__ import annotations

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
