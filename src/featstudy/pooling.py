"""Spatial pooling of one layer's activations to one value per channel (paper §3.2).

For a conv activation :math:`a \\in \\mathbb{R}^{C \\times H \\times W}` of one crop,

.. math::

    f^{avg}_c = \\frac{1}{HW} \\sum_{h,w} a_{c,h,w} \\qquad f^{max}_c = \\max_{h,w} a_{c,h,w}

``pooling=avg`` is the paper's. Pooling is applied per crop; the mean over crops is taken afterwards
(:mod:`featstudy.models`). A 2-D activation (fc layers, ``N x C``) is already one value per unit and passes through;
a 3-D one (transformer tokens, ``N x T x D``) is pooled over its tokens.
"""

from __future__ import annotations

import torch

from featstudy.errors import ConfigError

POOLINGS = ("avg", "max")


def check(name: str) -> str:
    """Validate ``pooling.name``."""
    if name not in POOLINGS:
        raise ConfigError(f"pooling.name: {name!r} is not one of {list(POOLINGS)}")
    return name


class Pooling:
    """``pooling=avg|max`` (``conf/pooling/*.yaml``, built by :func:`featstudy.groups.build`): the spatial pooling of
    each conv map, validated when built. Its cache-key field is its name."""

    def __init__(self, name: str = "avg"):
        self.name = check(str(name))

    def key_fields(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Pooling({self.name!r})"


def _spatial_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The dimensions pooled away: (H, W) of (N, C, H, W), T of (N, T, D); none of (N, C)."""
    if x.dim() in (2, 3, 4):
        return {2: (), 3: (1,), 4: (2, 3)}[x.dim()]
    raise ValueError(f"cannot pool an activation of shape {tuple(x.shape)}")


def pool(x: torch.Tensor, name: str) -> torch.Tensor:
    """Pool an activation of shape (N, C, H, W), (N, T, D) or (N, C) to (N, C)."""
    dims = _spatial_dims(x)
    if not dims:
        return x
    if name == "avg":
        return x.mean(dim=dims)
    if name == "max":
        return x.amax(dim=dims)
    raise ConfigError(f"pooling.name: {name!r} is not one of {list(POOLINGS)}")


def pool_float32(x: torch.Tensor, name: str) -> torch.Tensor:
    """:func:`pool` to (N, C) in float32 whatever the activation's dtype: under ``bf16-mixed``/``16-mixed`` the
    spatial mean is accumulated and returned in float32 (``mean(dtype=float32)``, no float32 copy of the map), so the
    features are not rounded to 8 (bf16) or 11 (fp16) significant bits, which would manufacture ties for the KS
    statistics. A float32 activation gives exactly :func:`pool`'s values. The maximum of low-precision values is
    itself one of them: it is cast after the reduction."""
    dims = _spatial_dims(x)
    if not dims:
        return x.float()
    if name == "avg":
        return x.mean(dim=dims, dtype=torch.float32)
    if name == "max":
        return x.amax(dim=dims).float()
    raise ConfigError(f"pooling.name: {name!r} is not one of {list(POOLINGS)}")
