"""`reference`: QuadraNet36-T built the straightforward way, the baseline of the speed benchmarks.

Same architecture and parameter count as `quadranet36_t`, but written as research code
usually writes it: the quadratic depthwise conv is three separate `nn.Conv2d` (a, b, c)
combined as a * b + c under plain autograd, the channels-first LayerNorms (block
norm1, stem, downsamples) are computed element-wise instead of by the library kernel,
the channel MLP is plain modules, and every branch keeps all its intermediates for backward
(no recomputation).
It is a benchmark baseline, not a model of the family, so it is not registered with timm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quadranet.blocks import LN_EPS, ChannelMlp, MixerBlock, check_kernel_size
from quadranet.models.quadranet import DEPTHS, WIDTHS, QuadraNet
from quadranet.nn import LayerNorm2d, QuadraticConv2d

REFERENCE_NAME = "reference"


class ElementwiseLayerNorm2d(nn.Module):
    """Channels-first LayerNorm written out element-wise (as in ConvNeXt's research code)."""

    def __init__(self, num_channels: int, eps: float = LN_EPS, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class UnfusedQuadraticDWConv2d(nn.Module):
    """Depthwise quadratic conv as three separate convs: a(x) * b(x) + c(x), plain autograd."""

    def __init__(self, dim: int, kernel_size: int = 7) -> None:
        super().__init__()
        check_kernel_size(kernel_size)
        self.a, self.b, self.c = (
            nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim) for _ in range(3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * self.b(x) + self.c(x)


class PlainChannelMlp(ChannelMlp):
    """The channel MLP through plain modules in training and inference alike."""

    forward = ChannelMlp.plain_forward


class ReferenceQuadraBlock(MixerBlock):
    """QuadraBlock with the unfused quadratic conv and an element-wise norm1."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-6,
    ) -> None:
        mixer = UnfusedQuadraticDWConv2d(dim, kernel_size)
        super().__init__(dim, mixer, mlp_ratio, drop_path, layer_scale_init)
        self.norm1 = ElementwiseLayerNorm2d(dim)
        self.mlp = PlainChannelMlp(dim, mlp_ratio, layer_scale_init, "none")


def _elementwise_norms(model: QuadraNet) -> None:
    """Element-wise LayerNorms in the stem and the downsamples."""

    def swap(parent: nn.Sequential, index: int) -> None:
        old = parent[index]
        assert isinstance(old, LayerNorm2d), f"expected a LayerNorm2d, found {type(old)}"
        parent[index] = ElementwiseLayerNorm2d(
            old.weight.shape[0], old.eps, device=old.weight.device, dtype=old.weight.dtype
        )

    swap(model.stem, 1)
    for stage in model.stages:
        if isinstance(stage.downsample, nn.Sequential):
            swap(stage.downsample, 0)


def create_reference_model(**kwargs: Any) -> QuadraNet:
    """The straightforward QuadraNet36-T (any QuadraNet argument may be overridden)."""
    width = WIDTHS["t"]
    args: dict[str, Any] = dict(depths=DEPTHS["36"], dims=(width, 2 * width, 4 * width, 8 * width))
    args.update(kwargs)
    model = QuadraNet(block=ReferenceQuadraBlock, **args)
    _elementwise_norms(model)
    return model


def load_quadranet_weights(reference: QuadraNet, quadranet: QuadraNet) -> None:
    """Copy a QuadraNet's weights into a reference model of the same shape.

    Each fused quadratic conv weight (3C channels) is split into the three branch convs.
    """
    state = dict(quadranet.state_dict())
    for name, module in quadranet.named_modules():
        if not isinstance(module, QuadraticConv2d):
            continue
        prefix = f"{name}." if name else ""
        del state[f"{prefix}weight"]
        state.pop(f"{prefix}bias", None)
        biases = (None,) * 3
        if module.bias is not None:
            groups = module.groups
            biases = module.bias.detach().view(groups, 3, -1).unbind(1)
        for branch, weight, bias in zip("abc", module.branch_weights(), biases):
            state[f"{prefix}{branch}.weight"] = weight.detach()
            if bias is not None:
                state[f"{prefix}{branch}.bias"] = bias.reshape(-1)
    reference.load_state_dict(state)
