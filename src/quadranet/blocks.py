"""QuadraBlock and the same-skeleton baselines (ConvBlock, SkipBlock, HorBlock, SwinBlock).

Every block is pre-norm with two residual branches on an NCHW map:

    x = x + DropPath(gamma1 * mixer(LN(x)))                      spatial mixing
    x = x + DropPath(gamma2 * fc2(GELU(fc1(LN(x)))))              channel mixing

and the blocks differ only in the spatial mixer. Each branch keeps for backward what the
block's `recompute` setting says (`quadranet.nn.recompute`). `reparameterize()` gives the
inference form: layer scales folded into the preceding weights, no drop-path, and each
residual add done by the branch's operator where it has one (QuadraBlock's conv, the
channel MLP) instead of a separate pass over the map.
"""

from __future__ import annotations

import copy

import torch
from timm.layers import DropPath
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from quadranet.nn import LayerNorm2d, QuadraticConv2d
from quadranet.nn.norm import pixels, unpixels
from quadranet.nn.recompute import DEFAULT_RECOMPUTE, Recompute, run_branch
from quadranet.ops import channel_mlp, quadratic_dwconv

LN_EPS = 1e-6
# The largest spatial kernel a block takes (large-kernel ConvNets use up to 51); a kernel far
# beyond the feature map adds nothing but weights, and a typo like 99999 would exhaust memory.
MAX_KERNEL_SIZE = 63


def check_kernel_size(kernel_size: int) -> int:
    """Validate a spatial kernel size: a positive odd integer (at most MAX_KERNEL_SIZE) keeps
    the map size."""
    if not isinstance(kernel_size, int) or kernel_size <= 0 or kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be a positive odd integer (3, 5, 7, ...) so the spatial branch "
            f"keeps the map size; got {kernel_size!r}"
        )
    if kernel_size > MAX_KERNEL_SIZE:
        raise ValueError(
            f"kernel_size {kernel_size} is larger than the {MAX_KERNEL_SIZE} a block takes; "
            "use an odd kernel size such as 3, 5 or 7"
        )
    return kernel_size


@torch.no_grad()
def _fold_scale(layer: nn.Module, scale: torch.Tensor) -> bool:
    """Multiply the outputs of a linear/conv layer by `scale` (per output channel) through
    its weights; False (nothing changed) for a layer it does not know or a parametrized one."""
    if getattr(layer, "parametrizations", None):
        return False
    if isinstance(layer, QuadraticConv2d):  # gamma on branches a and c of each group
        s = scale.view(layer.groups, 1, -1)
        scale = torch.cat((s, torch.ones_like(s), s), 1).flatten()
    elif not isinstance(layer, (nn.Linear, nn.Conv2d)):
        return False
    layer.weight.mul_(scale.view(-1, *[1] * (layer.weight.dim() - 1)))
    if layer.bias is not None:
        layer.bias.mul_(scale)
    return True


class ChannelMlp(nn.Module):
    """Channel mixing on an NHWC map: gamma * fc2(GELU(fc1(LN(x)))).

    It runs as one operator (`quadranet.ops.channel_mlp`) that keeps x, fc1's output and
    LN's statistics for backward, except in training with `recompute="none"`, where plain
    modules keep every intermediate.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        layer_scale_init: float | None = 1e-6,
        recompute: Recompute | str = DEFAULT_RECOMPUTE,
    ) -> None:
        super().__init__()
        self.recompute = Recompute.parse(recompute)
        hidden = int(mlp_ratio * dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.gamma = _layer_scale(dim, layer_scale_init)

    def forward(self, x: torch.Tensor, residual: bool = False) -> torch.Tensor:
        """The branch's output, plus x where `residual`."""
        keep_all = self.recompute is Recompute.NONE and torch.is_grad_enabled()
        if keep_all or not self.standard:  # plain modules (adapted layers: always)
            return self.plain_forward(x, residual)
        norm, fc1, fc2 = self.norm, self.fc1, self.fc2
        return channel_mlp(
            x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
            self.gamma, residual,
        )  # fmt: skip

    def plain_forward(self, x: torch.Tensor, residual: bool = False) -> torch.Tensor:
        """The same function through the plain modules (plain autograd)."""
        y = self.fc2(self.act(self.fc1(self.norm(x))))
        y = y if self.gamma is None else y * self.gamma
        return y + x if residual else y

    @property
    def standard(self) -> bool:
        """LayerNorm, Linear, exact GELU, Linear: what `quadranet.ops.channel_mlp` computes."""
        exact = isinstance(self.act, nn.GELU) and self.act.approximate == "none"
        return exact and type(self.fc1) is type(self.fc2) is nn.Linear

    def reparameterize(self) -> None:
        """Fold the layer scale into fc2 (inference)."""
        if self.gamma is not None and _fold_scale(self.fc2, self.gamma):
            self.gamma = None


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
        recompute: what each branch keeps for backward ("none", "cheap" or "full").
    """

    def __init__(
        self,
        dim: int,
        mixer: nn.Module | None,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-6,
        recompute: Recompute | str = Recompute.NONE,
    ) -> None:
        super().__init__()
        if mixer is not None:
            self.norm1 = LayerNorm2d(dim, eps=LN_EPS)
            self.mixer = mixer
            self.gamma1 = _layer_scale(dim, layer_scale_init)
        else:
            self.norm1 = self.mixer = self.gamma1 = None
        self.mlp = ChannelMlp(dim, mlp_ratio, layer_scale_init, recompute)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.recompute = recompute
        self.reparameterized = False  # the inference form (see `reparameterize`)

    @property
    def recompute(self) -> Recompute:
        """What each branch keeps for backward (the channel MLP follows it)."""
        return self._recompute

    @recompute.setter
    def recompute(self, value: Recompute | str) -> None:
        self._recompute = self.mlp.recompute = Recompute.parse(value)

    def spatial(self, x: torch.Tensor, residual: bool = False) -> torch.Tensor:
        """The spatial-mixing branch, gamma1 * mixer(LN(x)), before drop-path (plus x where
        `residual`)."""
        y = self.mixer(self.norm1(x))
        y = y if self.gamma1 is None else y * self.gamma1.view(1, -1, 1, 1)
        return y + x if residual else y

    def channel(self, x: torch.Tensor, residual: bool = False) -> torch.Tensor:
        """The channel-mixing branch on an NCHW map, before drop-path (plus x where
        `residual`)."""
        return unpixels(self.mlp(pixels(x), residual), x.shape[2], x.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparameterized:  # each residual add inside its branch's operator
            x = x if self.mixer is None else self.spatial(x, residual=True)
            return self.channel(x, residual=True)
        recompute = self.recompute if self.training else Recompute.NONE
        if self.mixer is not None:
            x = x + self.drop_path(run_branch(self.spatial, x, recompute))
        return x + self.drop_path(run_branch(self.channel, x, recompute))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """The inference form (timm's name): layer scales folded into the weights before
        them, no drop-path, the residual adds inside the branches' operators."""
        self.reparameterized = True
        self.drop_path = nn.Identity()
        self.mlp.reparameterize()
        if self.gamma1 is not None:
            last = getattr(self.mixer, "proj_out", self.mixer)  # gnConv ends in proj_out
            if _fold_scale(last, self.gamma1):
                self.gamma1 = None

    def extra_repr(self) -> str:
        return f"recompute={self.recompute.value}"


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model in its inference form: in every block the layer scales folded into the
    weights, drop-path removed and the residual adds done inside the branches' operators.

    Like timm's `reparameterize_model` (which calls the same block method): a copy unless
    `inplace`; outputs are unchanged up to rounding, and what `torch.export` or ONNX export
    then sees is what eager runs.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, MixerBlock):
            module.reparameterize()
    return model


class QuadraBlock(MixerBlock):
    """QuadraNet's block: the spatial mixer is a quadratic depthwise k x k convolution.

    The layer scale gamma1 is applied inside the quadratic conv op (folded into its
    branches a and c), so the spatial branch is one LayerNorm and one op.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-6,
        recompute: Recompute | str = DEFAULT_RECOMPUTE,
    ) -> None:
        check_kernel_size(kernel_size)
        mixer = QuadraticConv2d(dim, dim, kernel_size, groups=dim)
        super().__init__(dim, mixer, mlp_ratio, drop_path, layer_scale_init, recompute)

    def spatial(self, x: torch.Tensor, residual: bool = False) -> torch.Tensor:
        m, res = self.mixer, x if residual else None
        return quadratic_dwconv(
            self.norm1(x), m.weight, m.bias, self.gamma1, res, m.stride, m.padding, m.dilation
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
        recompute: Recompute | str = Recompute.NONE,
    ) -> None:
        check_kernel_size(kernel_size)
        mixer = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        nn.init.trunc_normal_(mixer.weight, std=0.02)
        nn.init.zeros_(mixer.bias)
        super().__init__(dim, mixer, mlp_ratio, drop_path, layer_scale_init, recompute)


class SkipBlock(MixerBlock):
    """No spatial mixing at all: only the channel-MLP residual branch."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-6,
        recompute: Recompute | str = Recompute.NONE,
    ) -> None:
        super().__init__(dim, None, mlp_ratio, drop_path, layer_scale_init, recompute)


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
        for i, pw in enumerate(self.pws):  # gates indexed, not iterated: torch.fx traces it
            p = pw(p) * gates[i + 1]
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
        recompute: Recompute | str = Recompute.NONE,
    ) -> None:
        mixer = GnConv(dim, order, kernel_size)
        super().__init__(dim, mixer, mlp_ratio, drop_path, layer_scale_init, recompute)


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
