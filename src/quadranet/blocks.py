"""QuadraBlock and the same-skeleton baselines (ConvBlock, SkipBlock, HorBlock, SwinBlock).

Every block is pre-norm with two residual branches on an NCHW map:

    x = x + DropPath(gamma1 * mixer(LN(x)))                      spatial mixing
    x = x + DropPath(gamma2 * fc2(GELU(fc1(LN(x)))))              channel mixing

and the blocks differ only in the spatial mixer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from quadranet.nn import LayerNorm2d, QuadraticConv2d, quadratic_conv2d
from quadranet.nn.depthwise import quadratic_product
from quadranet.nn.ext import contiguous_kernels, usable
from quadranet.nn.fused import (
    channel_mlp,
    chunked_mlp_kernels,
    fc2_onto,
    fold_fc2_scale,
    fold_layer_scale,
    quadratic_mixer,
)

LN_EPS = 1e-6


def check_memory_efficient(value: bool | str) -> bool | str:
    """Validate a QuadraBlock `memory_efficient` level: False (plain autograd), True (the
    least memory) or "balanced" (the spatial branch also keeps the conv's branches a and b,
    2 C per pixel, so backward does not recompute them)."""
    if isinstance(value, bool) or (isinstance(value, str) and value == "balanced"):
        return value
    raise ValueError(
        f"memory_efficient must be False, True (least memory) or 'balanced' (also keeps "
        f"the quadratic conv's branches: faster backward); got {value!r}"
    )


def check_kernel_size(kernel_size: int) -> int:
    """Validate a spatial kernel size: a positive odd integer keeps the map size."""
    if not isinstance(kernel_size, int) or kernel_size <= 0 or kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be a positive odd integer (3, 5, 7, ...) so the spatial branch "
            f"keeps the map size; got {kernel_size!r}"
        )
    return kernel_size


class ChannelMlp(nn.Module):
    """Channel mixing on an NHWC map: gamma * fc2(GELU(fc1(LN(x)))).

    `memory_efficient=True` runs it as one op that keeps only x, the LN statistics and
    fc1's output for backward (see `quadranet.nn.fused.channel_mlp`).
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        layer_scale_init: float | None = 1e-6,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.memory_efficient = bool(memory_efficient)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.gamma = _layer_scale(dim, layer_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.memory_efficient and torch.is_grad_enabled():
            return self._memory_efficient_op(x, residual=False)
        h = self._hidden(x)
        if self.gamma is None:
            return self.fc2(h)
        if torch.is_grad_enabled():
            return self.fc2(h) * self.gamma
        # inference: the layer scale folded into fc2 (no pass over the output)
        weight, bias = fold_fc2_scale(self.fc2.weight, self.fc2.bias, self.gamma)
        return F.linear(h, weight, bias)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(fc1(LN(x))); at inference the C++ GELU runs in place on fc1's output."""
        h = self.fc1(self.norm(x))
        ops = contiguous_kernels(h) if self._exact_gelu() and not torch.is_grad_enabled() else None
        return ops.gelu_(h) if ops is not None else self.act(h)

    def _memory_efficient_op(self, x: torch.Tensor, residual: bool) -> torch.Tensor:
        norm, fc1, fc2 = self.norm, self.fc1, self.fc2
        return channel_mlp(
            x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.gamma,
            norm.eps, residual,
        )  # fmt: skip

    def _exact_gelu(self) -> bool:
        """The activation is the erf GELU that the C++ kernels compute."""
        return isinstance(self.act, nn.GELU) and self.act.approximate == "none"

    def fused_residual(self, x: torch.Tensor) -> torch.Tensor | None:
        """x + self(x) for an NHWC map with the residual inside, or None where that does not
        apply: contiguous float32 CPU maps (channels-last models), the erf GELU and plain
        Linear layers (not adapted ones). Elsewhere (an NCHW model's permuted view, CUDA,
        tracing) the add outside costs the same.

        Training (memory-efficient MLPs only): the `channel_mlp` op with `residual=True`,
        which adds x in fc2's product (or the chunked kernels' pass) and its gradient in
        LayerNorm's backward. Inference: `mlp_inference` where the chunked C++ kernels pay
        (`quadranet.nn.fused.chunked_mlp_kernels`: large maps with few channels), else fc2's
        product accumulated onto x (`fc2_onto`).
        """
        fc1, fc2, norm = self.fc1, self.fc2, self.norm
        if not (self._exact_gelu() and type(fc1) is type(fc2) is nn.Linear):
            return None
        if not (x.is_contiguous() and usable(x, norm.weight, fc1.weight)):
            return None
        if torch.is_grad_enabled():
            return self._memory_efficient_op(x, residual=True) if self.memory_efficient else None
        w2, b2 = fold_fc2_scale(fc2.weight, fc2.bias, self.gamma)
        ops = chunked_mlp_kernels(x, fc1.out_features, norm.weight, fc1.weight)
        if ops is not None:
            return ops.mlp_inference(
                x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, w2, b2, True
            )
        return fc2_onto(x, self._hidden(x), w2, b2)


def _layer_scale(dim: int, init: float | None) -> nn.Parameter | None:
    """Per-channel layer scale initialised to `init`; None or 0 disables it."""
    return nn.Parameter(torch.full((dim,), float(init))) if init else None


class MixerBlock(nn.Module):
    """The shared skeleton: a spatial mixer branch and a channel-MLP branch, both residual.

    Args:
        dim: channels.
        mixer: spatial mixer (NCHW in and out), or None for no spatial branch.
        mlp_ratio: hidden width of the channel MLP relative to `dim`.
        drop_path: stochastic depth rate of both branches.
        layer_scale_init: initial per-channel scale (gamma); None or 0 disables it.
        memory_efficient: run the channel MLP with recomputation (exact gradients).
    """

    def __init__(
        self,
        dim: int,
        mixer: nn.Module | None,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-6,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        if mixer is not None:
            self.norm1 = LayerNorm2d(dim, eps=LN_EPS)
            self.mixer = mixer
            self.gamma1 = _layer_scale(dim, layer_scale_init)
        else:
            self.norm1 = self.mixer = self.gamma1 = None
        self.mlp = ChannelMlp(dim, mlp_ratio, layer_scale_init, memory_efficient)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial-mixing branch, gamma1 * mixer(LN(x)), before drop-path."""
        y = self.mixer(self.norm1(x))
        return y * self.gamma1.view(1, -1, 1, 1) if self.gamma1 is not None else y

    def spatial_residual(self, x: torch.Tensor) -> torch.Tensor:
        """x + DropPath(spatial(x)): the block's first residual step."""
        return x + self.drop_path(self.spatial(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixer is not None:
            x = self.spatial_residual(x)
        x_nhwc = x.permute(0, 2, 3, 1)
        if not self.training or isinstance(self.drop_path, nn.Identity):
            out = self.mlp.fused_residual(x_nhwc)  # one op where that applies, else None
            if out is not None:
                return out.permute(0, 3, 1, 2)
        return x + self.drop_path(self.mlp(x_nhwc).permute(0, 3, 1, 2))


class QuadraBlock(MixerBlock):
    """QuadraNet's block: the spatial mixer is a quadratic depthwise k x k convolution.

    `memory_efficient=True` runs each residual branch as one op that keeps only the
    branch input and LayerNorm statistics (plus fc1's output in the MLP) for backward,
    recomputing the rest with hand-derived gradients (`quadranet.nn.fused`).
    `memory_efficient="balanced"` also keeps the quadratic conv's branches a and b (2 C per
    pixel), so backward recomputes only the LayerNorms and the GELU.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-6,
        memory_efficient: bool | str = False,
    ) -> None:
        check_kernel_size(kernel_size)
        check_memory_efficient(memory_efficient)
        mixer = QuadraticConv2d(dim, dim, kernel_size, groups=dim)
        super().__init__(dim, mixer, mlp_ratio, drop_path, layer_scale_init, memory_efficient)
        self.memory_efficient = memory_efficient

    def _folded_mixer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mixer's weight and bias with gamma1 folded in (inference)."""
        return fold_layer_scale(self.mixer.weight, self.mixer.bias, self.gamma1)

    def spatial_residual(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mixer
        drop_path_off = not self.training or isinstance(self.drop_path, nn.Identity)
        if torch.is_grad_enabled() and self.memory_efficient and drop_path_off:
            return self._mixer_op(x, residual=True)  # the residual added in the conv's pass
        if torch.is_grad_enabled() or self.gamma1 is None or not drop_path_off:
            return super().spatial_residual(x)
        # inference: gamma folded into the weights and the residual added in the conv's pass
        weight, bias = self._folded_mixer()
        conv_args = (m.stride, m.padding, m.dilation)
        return quadratic_product(self.norm1(x), weight, bias, conv_args, residual=x)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and self.gamma1 is not None:
            m = self.mixer
            weight, bias = self._folded_mixer()
            n = self.norm1(x)
            return quadratic_conv2d(n, weight, bias, m.stride, m.padding, m.dilation, m.groups)
        if not (self.memory_efficient and torch.is_grad_enabled()):
            return super().spatial(x)
        return self._mixer_op(x, residual=False)

    def _mixer_op(self, x: torch.Tensor, residual: bool) -> torch.Tensor:
        """The memory-efficient spatial branch as one op (plus x when `residual`)."""
        return quadratic_mixer(
            x,
            self.norm1.weight,
            self.norm1.bias,
            self.mixer.weight,
            self.mixer.bias,
            self.gamma1,
            self.norm1.eps,
            self.mixer.padding[0],
            keep_branches=self.memory_efficient == "balanced",
            residual=residual,
        )


class ConvBlock(MixerBlock):
    """First-order twin of QuadraBlock: the spatial mixer is one depthwise k x k conv."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-6,
    ) -> None:
        check_kernel_size(kernel_size)
        mixer = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        nn.init.trunc_normal_(mixer.weight, std=0.02)
        nn.init.zeros_(mixer.bias)
        super().__init__(dim, mixer, mlp_ratio, drop_path, layer_scale_init)


class SkipBlock(MixerBlock):
    """No spatial mixing at all: only the channel-MLP residual branch."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-6,
    ) -> None:
        super().__init__(dim, None, mlp_ratio, drop_path, layer_scale_init)


class GnConv(nn.Module):
    """HorNet's recursive gated convolution of order n (gnConv), NCHW in and out.

    A 1x1 conv to 2C channels is split into a first part of C / 2^(n-1) channels and a
    stack of widths C / 2^(n-1), ..., C / 2, C that goes through one depthwise conv
    (scaled by `scale`); then p_0 = first * dw_0 and p_{i+1} = pw_i(p_i) * dw_{i+1},
    and a 1x1 conv maps the last product back to C.
    """

    def __init__(self, dim: int, order: int = 3, kernel_size: int = 7, scale: float = 1 / 3):
        super().__init__()
        if order < 1 or dim % 2 ** (order - 1):
            raise ValueError(f"gnConv of order {order} needs dim divisible by {2 ** (order - 1)}")
        check_kernel_size(kernel_size)
        self.order = order
        self.scale = scale
        self.dims = [dim // 2**i for i in range(order)][::-1]
        total = sum(self.dims)
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        self.dwconv = nn.Conv2d(total, total, kernel_size, padding=kernel_size // 2, groups=total)
        self.pws = nn.ModuleList(
            nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1)
        )
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, stack = self.proj_in(x).split((self.dims[0], sum(self.dims)), dim=1)
        gates = (self.dwconv(stack) * self.scale).split(self.dims, dim=1)
        p = first * gates[0]
        for pw, gate in zip(self.pws, gates[1:]):
            p = pw(p) * gate
        return self.proj_out(p)

    def extra_repr(self) -> str:
        return f"order={self.order}, dims={self.dims}, scale={self.scale:.4g}"


class HorBlock(MixerBlock):
    """HorNet's block: the spatial mixer is gnConv of the given order."""

    def __init__(
        self,
        dim: int,
        order: int = 3,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-6,
    ) -> None:
        super().__init__(
            dim, GnConv(dim, order, kernel_size), mlp_ratio, drop_path, layer_scale_init
        )


class SwinBlock(nn.Module):
    """timm's Swin Transformer block (window attention + MLP), wrapped to NCHW in and out.

    Args:
        dim: channels.
        num_heads: attention heads; default dim // 32 (Swin's head width of 32).
        window_size: attention window.
        shift: shift the windows by half a window (Swin alternates shifted blocks).
        input_resolution: nominal map size; other sizes work (masks are made per input).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        window_size: int = 7,
        shift: bool = False,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        input_resolution: int | tuple[int, int] = 56,
    ) -> None:
        super().__init__()
        self.block = SwinTransformerBlock(
            dim,
            input_resolution,
            num_heads=num_heads or max(1, dim // 32),
            window_size=window_size,
            shift_size=window_size // 2 if shift else 0,
            dynamic_mask=True,
            always_partition=True,
            mlp_ratio=mlp_ratio,
            drop_path=drop_path,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


BLOCKS: dict[str, type[nn.Module]] = {
    "quadra": QuadraBlock,
    "conv": ConvBlock,
    "skip": SkipBlock,
    "hor": HorBlock,
    "swin": SwinBlock,
}


def get_block(block: str | type[nn.Module]) -> type[nn.Module]:
    """Resolve a block name ('quadra', 'conv', 'skip', 'hor', 'swin') or pass a class through."""
    if isinstance(block, str):
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; choose one of {sorted(BLOCKS)}")
        return BLOCKS[block]
    return block
