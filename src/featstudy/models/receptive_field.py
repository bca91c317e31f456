"""Receptive fields of any network's spatial maps, measured: which input rows and columns each map position reads.

For a 4-D node with map (C, H, W) on an S x S input, position (y, x) reads a set of input pixels; its receptive
field box is the smallest rectangle holding them, rows [top(y), bottom(y)) and columns [left(x), right(x)). The rows
are found by running S inputs, input i with row i set to NaN (zeros elsewhere): output row y of the map is NaN in
some channel and column exactly when y reads input row i, so

.. math::

    \\mathrm{top}(y) = \\min\\{i : \\mathrm{NaN\\ reaches\\ row}\\ y\\}, \\qquad
    \\mathrm{bottom}(y) = 1 + \\max\\{i : \\mathrm{NaN\\ reaches\\ row}\\ y\\},

and the columns alike with NaN columns. NaN is structural: it crosses every multiplication (also by a zero weight),
ReLU, max-pooling and norms (attention spreads it over all it attends to), so the box is the architecture's receptive
field (the textbook one for a conv net, clipped to the image), whatever the weights or the image. The result is
exact at the borders (zero padding reads nothing). Fast convolution algorithms (Winograd, FFT) mix a NaN
into outputs that do not read it: the sweep is meant for the CPU, where PyTorch's convolutions are direct (oneDNN's,
or im2col), with NNPACK (Winograd, used for batches of 16 or more without oneDNN) switched off; both paths are
tested against the layer recursion. Not on a GPU: cuDNN picks Winograd and FFT algorithms. Cost: 2 S forward passes
up to the deepest node.

:class:`SpatialMaps` gives the 4-D outputs of a timm (or open_clip) feature model's nodes, NCHW, for
:func:`featstudy.analysis.image_io.peak_positions` and for the sweep.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn


class _Done(Exception):
    """Raised once the last node is read: the rest of the forward pass is not needed."""


class SpatialMaps(nn.Module):
    """(N, 3, S, S) -> ``{node: (N, C, H, W)}`` for the nodes of ``layout`` that are 4-D maps (``NCHW``, or
    ``NHWC`` permuted to NCHW), read with forward hooks on ``body`` (a timm model or an open_clip image tower); the
    forward pass stops after the last one. Each map is copied when read: a later in-place operation (an inplace
    ReLU, a residual ``out += identity`` as in open_clip's ModifiedResNet) would otherwise change it."""

    def __init__(self, body: nn.Module, layout: dict[str, str]):
        super().__init__()
        self.body = body
        self.layout = {n: kind for n, kind in layout.items() if kind in ("NCHW", "NHWC")}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}

        def read(name: str, out: torch.Tensor) -> None:
            got[name] = (out.permute(0, 3, 1, 2) if self.layout[name] == "NHWC" else out).clone()
            if len(got) == len(self.layout):
                raise _Done

        if not self.layout:
            return got
        with contextlib.ExitStack() as stack, contextlib.suppress(_Done):
            for name in self.layout:
                hook = self.body.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: read(n, o))
                stack.callback(hook.remove)
            self.body(x)
        return {n: got[n] for n in self.layout if n in got}


def receptive_boxes(maps: nn.Module, size: int, batch_size: int = 16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{node: (rows, cols)}`` for every map ``maps`` returns on a ``size`` x ``size`` input: ``rows[y] = (top,
    bottom)`` and ``cols[x] = (left, right)``, the receptive field of position (y, x) being input rows
    [top, bottom) and columns [left, right) (module docstring). A position that reads no input row (a constant
    map) gets the whole image.
    """
    device = next((p.device for p in maps.parameters()), torch.device("cpu"))
    reached: dict[str, list[np.ndarray]] = {}  # node -> [rows (S, H) bool, cols (S, W) bool]
    for axis in (0, 1):
        hits: dict[str, list[np.ndarray]] = {}
        for start in range(0, size, batch_size):
            index = list(range(start, min(size, start + batch_size)))
            for node, reach in _reached(maps, size, axis, index, device).items():
                hits.setdefault(node, []).append(reach)
        for node, parts in hits.items():
            reached.setdefault(node, []).append(np.concatenate(parts))  # (S, H) or (S, W): input i reaches y
    return {node: (_intervals(rows, size), _intervals(cols, size)) for node, (rows, cols) in reached.items()}


def _reached(maps: nn.Module, size: int, axis: int, index: list[int], device: torch.device) -> dict[str, np.ndarray]:
    """``{node: (len(index), H or W) bool}``: which map rows (axis 0) or columns (axis 1) the NaN of input row (or
    column) ``index[b]`` reaches."""
    n = len(index)
    x = torch.zeros(n, 3, size, size, device=device)
    if axis == 0:
        x[torch.arange(n), :, index, :] = float("nan")
    else:
        x[torch.arange(n), :, :, index] = float("nan")
    with torch.no_grad(), torch.backends.nnpack.flags(enabled=False):
        out = maps(x)
    return {node: torch.isnan(m.float()).any(dim=1).any(dim=2 if axis == 0 else 1).cpu().numpy()
            for node, m in out.items()}


def _intervals(reach: np.ndarray, size: int) -> np.ndarray:
    """(S, M) bool, input index i reaches map index m -> (M, 2) int [first i, last i + 1); [0, S) when none."""
    out = np.tile(np.array([0, size], dtype=np.int64), (reach.shape[1], 1))
    for m in range(reach.shape[1]):
        hit = np.flatnonzero(reach[:, m])
        if hit.size:
            out[m] = (hit[0], hit[-1] + 1)
    return out


def box(fields: tuple[np.ndarray, np.ndarray], y: int, x: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of position (y, x) from :func:`receptive_boxes`' ``(rows, cols)`` of its node."""
    rows, cols = fields
    return int(rows[y, 0]), int(cols[x, 0]), int(rows[y, 1]), int(cols[x, 1])
