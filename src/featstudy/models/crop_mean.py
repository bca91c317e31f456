"""What every feature model shares: per-crop pooled layers -> one feature vector per image (paper §3.2).

.. math::

    f_j(x) = \\frac{1}{K} \\sum_{k=1}^{K} \\operatorname{pool}\\big(a_{\\ell(j)}(\\mathrm{crop}_k(x))\\big)_{c(j)}
"""

from __future__ import annotations

import torch
from torch import nn


class CropMeanFeatures(nn.Module):
    """Base of :class:`featstudy.models.FeatureModel` (torchvision, fx graph) and
    :class:`featstudy.models.timm_source.TimmFeatureModel` (timm, forward hooks): a subclass provides
    :meth:`pooled_layers`; the concatenation in layer order and the mean over the K crops are here, once."""

    def pooled_layers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """(N, 3, H, W) -> ``{layer: (N, C) float32}`` in layer order, one pooled vector per crop."""
        raise NotImplementedError

    def per_crop(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, F) float32: pooled features of each crop, layers in order."""
        return torch.cat(list(self.pooled_layers(x).values()), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, 3, H, W) crops -> (B, F) float32, the mean over each image's K crops."""
        b, k = x.shape[:2]
        f = self.per_crop(x.flatten(0, 1))
        return f.view(b, k, -1).mean(dim=1)
