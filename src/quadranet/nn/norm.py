"""LayerNorm over the channels of an NCHW map, through the fused library kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def layer_norm_2d(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-6
) -> torch.Tensor:
    """LayerNorm over dim 1 of an NCHW tensor (free permutes when x is channels-last)."""
    # the weight's shape where there is one: a constant even when the model is traced
    # (the TorchScript ONNX exporter cannot pass a traced size to layer_norm)
    shape = weight.shape if weight is not None else (x.shape[1],)
    y = F.layer_norm(pixels(x), shape, weight, bias, eps)
    return unpixels(y, x.shape[2], x.shape[3])


def pixels(x: torch.Tensor) -> torch.Tensor:
    """An NCHW map as rows of pixels with the channels last (a view when x is channels-last):
    (N, H, W, C) in eager, (N, H*W, C) under torch.compile.

    Inductor's layout optimisation gives every 4-D tensor of a graph with convolutions
    channels-last strides, which for an NHWC-shaped tensor is a transposed layout: LayerNorm's
    saved statistics and the MLP's saved activations would be copied into it and reduced
    across it. Three dims avoid that; eager keeps the 4-D view, one dispatched op fewer.
    """
    rows = x.permute(0, 2, 3, 1)
    return rows.flatten(1, 2) if torch.compiler.is_compiling() else rows


def unpixels(rows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Rows from `pixels` back to an NCHW map (channels-last strides)."""
    if torch.compiler.is_compiling():
        rows = rows.unflatten(1, (height, width))
    return rows.permute(0, 3, 1, 2)


class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm: normalises each pixel's C values (NCHW in and out)."""

    def __init__(
        self, num_channels: int, eps: float = 1e-6, affine: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(
            num_channels, eps=eps, elementwise_affine=affine, device=device, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_2d(x, self.weight, self.bias, self.eps)
