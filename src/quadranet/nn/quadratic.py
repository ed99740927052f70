"""Quadratic neurons: y = (A x + ba) * (B x + bb) + (C x + bc).

The three linear maps A, B, C are stored as ONE weight of 3x the output size, so one
matmul (or one grouped convolution) computes all three branches in a single pass over x;
the depthwise convolution runs the kernels behind `quadranet.ops`.
Layout of the fused weight: for each group g, the rows are [A_g; B_g; C_g], i.e. the
weight is a view of shape (groups, 3, out // groups, ...). With groups = 1 this is
simply [A; B; C]; for a depthwise conv it interleaves the branches per channel.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.utils.checkpoint import checkpoint

from quadranet.nn.recompute import DEFAULT_RECOMPUTE, Recompute
from quadranet.ops import quadratic_dwconv

InitMode = Literal["default", "adapter"]
INIT_STD = 0.02


def _combine(y3: torch.Tensor, groups: int) -> torch.Tensor:
    """a * b + c over the branches of a fused (N, 3 * out, ...) output, per group."""
    a, b, c = y3.unflatten(1, (groups, 3, -1)).unbind(2)
    return torch.addcmul(c, a, b).flatten(1, 2)


def quadratic_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Quadratic linear map; `weight` is [A; B; C] of shape (3 * out, in)."""
    a, b, c = F.linear(x, weight, bias).chunk(3, dim=-1)
    return torch.addcmul(c, a, b)


def _plain_conv(x, weight, bias, stride, padding, dilation, groups):  # noqa: ANN001, ANN202
    return _combine(F.conv2d(x, weight, bias, stride, padding, dilation, groups), groups)


def quadratic_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    recompute: Recompute | str = DEFAULT_RECOMPUTE,
) -> torch.Tensor:
    """Quadratic convolution with a fused weight of shape (3 * out, in / groups, kh, kw).

    The depthwise case (groups = in = out) runs `quadranet.ops.quadratic_dwconv` (kernels
    where they apply). `recompute="full"` keeps only x (and the weights) for backward and
    recomputes the branches there; "none" and "cheap" keep the branches.
    """
    full = Recompute.parse(recompute) is Recompute.FULL
    if groups == weight.shape[0] // 3 and weight.shape[1] == 1:
        return quadratic_dwconv(x, weight, bias, None, None, stride, padding, dilation, not full)
    if full and torch.is_grad_enabled():
        return checkpoint(
            _plain_conv, x, weight, bias, stride, padding, dilation, groups, use_reentrant=False
        )
    return _plain_conv(x, weight, bias, stride, padding, dilation, groups)


def _init_branches(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    init: InitMode,
    linear_weight: torch.Tensor | None,
    linear_bias: torch.Tensor | None,
) -> None:
    """Initialise a fused (A, B, C) weight in place: trunc-normal 0.02 and zero biases.

    `init="adapter"` sets A = 0 and, when given, C = the first-order weights, so the
    neuron computes exactly the first-order function while A still receives gradient.
    """
    if init not in ("default", "adapter"):
        raise ValueError(f"init must be 'default' or 'adapter', got {init!r}")
    with torch.no_grad():
        w = weight.view(groups, 3, weight.shape[0] // (3 * groups), *weight.shape[1:])
        nn.init.trunc_normal_(weight, std=INIT_STD)
        if bias is not None:
            bias.zero_()
        if init == "adapter":
            w[:, 0].zero_()
        if linear_weight is not None:
            if init != "adapter":
                raise ValueError("linear_weight is only used with init='adapter'")
            w[:, 2].copy_(linear_weight.reshape_as(w[:, 2]))
        if linear_bias is not None:
            if bias is None:
                raise ValueError("linear_bias given but the quadratic layer has bias=False")
            bias.view(groups, 3, -1)[:, 2].copy_(linear_bias.reshape(groups, -1))


class QuadraticLinear(nn.Module):
    """Low-rank quadratic neurons: y = (A x + ba) * (B x + bb) + (C x + bc).

    Args:
        in_features: size of each input sample.
        out_features: number of quadratic neurons.
        bias: learn the three biases ba, bb, bc.
        init: "default" (all branches trunc-normal 0.02) or "adapter" (A = 0).
        linear_weight, linear_bias: first-order weights copied into C (adapter init).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init: InitMode = "default",
        linear_weight: torch.Tensor | None = None,
        linear_bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"in_features and out_features must be positive, got {in_features}, {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(3 * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(3 * out_features)) if bias else None
        self.init = init
        self.reset_parameters(init, linear_weight, linear_bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuadraticLinear:
        """A quadratic layer computing exactly `linear` (C = its weights, A = 0)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            init="adapter",
            linear_weight=linear.weight.detach(),
            linear_bias=None if linear.bias is None else linear.bias.detach(),
        )
        return layer.to(device=linear.weight.device, dtype=linear.weight.dtype)

    def reset_parameters(
        self,
        init: InitMode = "default",
        linear_weight: torch.Tensor | None = None,
        linear_bias: torch.Tensor | None = None,
    ) -> None:
        """Trunc-normal(0.02) weights, zero biases; see the class docstring for `init`."""
        _init_branches(self.weight, self.bias, 1, init, linear_weight, linear_bias)

    def branch_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (A, B, C) of the fused weight, each (out, in)."""
        return tuple(self.weight.view(3, self.out_features, self.in_features).unbind(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quadratic_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, init={self.init}"
        )


class QuadraticConv2d(nn.Module):
    """Quadratic convolution: y = (Wa * x + ba) * (Wb * x + bb) + (Wc * x + bc).

    The three branches run as one convolution with 3x the output channels. The
    depthwise case (groups = in = out) is QuadraNet's spatial mixing.

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups, bias: as nn.Conv2d.
        padding: as nn.Conv2d; None keeps the map size for odd kernels (k // 2).
        recompute: "full" keeps only x for backward and recomputes the branches there;
            "none" and "cheap" (the default) keep them.
        init: "default" or "adapter" (Wa = 0, Wc = `linear_weight` when given).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        recompute: Recompute | str = DEFAULT_RECOMPUTE,
        init: InitMode = "default",
        linear_weight: torch.Tensor | None = None,
        linear_bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        kernel_size = _pair(kernel_size)
        if min(kernel_size) <= 0:
            raise ValueError(f"kernel_size must be positive, got {kernel_size}")
        if padding is None:
            if kernel_size[0] % 2 == 0 or kernel_size[1] % 2 == 0:
                raise ValueError(
                    f"kernel_size {kernel_size} is even, so no padding keeps the map size; "
                    "use an odd kernel size or pass padding explicitly"
                )
            padding = (dilation * (kernel_size[0] - 1) // 2, dilation * (kernel_size[1] - 1) // 2)
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} "
                f"and out_channels={out_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.recompute = Recompute.parse(recompute)
        self.init = init
        self.weight = nn.Parameter(
            torch.empty(3 * out_channels, in_channels // groups, *kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(3 * out_channels)) if bias else None
        self.reset_parameters(init, linear_weight, linear_bias)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, recompute: Recompute | str = DEFAULT_RECOMPUTE
    ) -> QuadraticConv2d:
        """A quadratic conv computing exactly `conv` (Wc = its weights, Wa = 0, Wb random)."""
        if isinstance(conv.padding, str):
            raise ValueError(f"from_conv needs numeric padding, got padding={conv.padding!r}")
        if conv.padding_mode != "zeros":  # the quadratic conv pads with zeros
            raise ValueError(
                f"from_conv takes zero-padded convs, got padding_mode={conv.padding_mode!r}"
            )
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            recompute=recompute,
            init="adapter",
            linear_weight=conv.weight.detach(),
            linear_bias=None if conv.bias is None else conv.bias.detach(),
        )
        return layer.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def reset_parameters(
        self,
        init: InitMode = "default",
        linear_weight: torch.Tensor | None = None,
        linear_bias: torch.Tensor | None = None,
    ) -> None:
        """Trunc-normal(0.02) weights, zero biases; see the class docstring for `init`."""
        _init_branches(self.weight, self.bias, self.groups, init, linear_weight, linear_bias)

    def branch_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (Wa, Wb, Wc) of the fused weight, each (out, in / groups, kh, kw)."""
        w = self.weight.view(
            self.groups, 3, self.out_channels // self.groups, *self.weight.shape[1:]
        )
        return tuple(t.reshape(self.out_channels, *self.weight.shape[1:]) for t in w.unbind(1))

    @property
    def depthwise(self) -> bool:
        """One input channel per group and as many outputs: QuadraNet's spatial mixing."""
        return self.groups == self.in_channels == self.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depthwise:  # decided on the module, so FX tracing sees no tensor test
            keep = self.recompute is not Recompute.FULL
            return quadratic_dwconv(
                x, self.weight, self.bias, None, None, self.stride, self.padding, self.dilation,
                keep,
            )  # fmt: skip
        return quadratic_conv2d(
            x,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.recompute,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.recompute is not DEFAULT_RECOMPUTE:
            s += f", recompute={self.recompute.value}"
        if self.init != "default":
            s += f", init={self.init}"
        return s
