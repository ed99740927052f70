"""Patchify convolution (kernel = stride, no padding) as one matrix product.

The 4x4 stride-4 stem and the 2x2 stride-2 downsamples of QuadraNet (and of HorNet and
ConvNeXt) are convolutions whose windows do not overlap. On a channels-last map, each
output pixel's window is k x k input pixels of C channels, so the convolution is
`x_patches (M, k*k*C) @ W (k*k*C, O)` after one copy of x into patch order. On CPU this runs
forward and backward 1.1-1.4x faster than oneDNN's strided convolution here (batch 16,
QuadraNet-T's four shapes; `tests/test_patch.py` checks it against `F.conv2d`). Any other
input (NCHW, CUDA, tracing) keeps the convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _as_matmul(x: torch.Tensor) -> bool:
    """True where the matrix-product form applies and pays: eager channels-last CPU maps."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return False
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.is_floating_point()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def patch_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride=k)` for a k x k weight, as one matrix product.

    x is (N, C, H, W), ideally channels-last; rows and columns past the last whole window
    are dropped, as the convolution does. Returns a channels-last (N, O, H // k, W // k).
    """
    out_chans, c, k, kw = weight.shape
    if kw != k or x.shape[1] != c:
        raise ValueError(f"expected a square (O, {x.shape[1]}, k, k) weight, got {weight.shape}")
    n, _, h, w = x.shape
    oh, ow = h // k, w // k
    nhwc = x.permute(0, 2, 3, 1)[:, : oh * k, : ow * k]
    patches = nhwc.reshape(n, oh, k, ow, k, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, k * k * c)
    y = F.linear(patches, weight.permute(0, 2, 3, 1).reshape(out_chans, -1), bias)
    return y.view(n, oh, ow, out_chans).permute(0, 3, 1, 2)


class PatchConv2d(nn.Conv2d):
    """k x k convolution with stride k (a patchify stem or downsample), same parameters as
    `nn.Conv2d(in_chans, out_chans, k, stride=k)`; runs as one matrix product on
    channels-last CPU maps."""

    def __init__(self, in_chans: int, out_chans: int, patch: int, bias: bool = True) -> None:
        super().__init__(in_chans, out_chans, patch, stride=patch, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _as_matmul(x):
            return super().forward(x)
        return patch_conv2d(x, self.weight, self.bias)
