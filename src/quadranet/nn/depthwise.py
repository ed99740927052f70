"""Fast depthwise quadratic convolution (groups = in = out), QuadraNet's spatial mixer.

Measured on oneDNN (CPU, channels-last), a depthwise conv with a channel multiplier of 3
(the single fused call) is about 3x slower in forward and 8x slower for the input
gradient than three plain depthwise convs, while its weight gradient is about 2.5x
faster than three separate ones. So forward and input gradient run per branch, and the
weight gradient runs as one fused call over the 3C-channel output gradient.

Backward (g = dL/dy, a = Wa * x + ba, b = Wb * x + bb):
    dL/dx = convT(Wa, g * b) + convT(Wb, g * a) + convT(Wc, g)
    dL/d[Wa, Wb, Wc] = corr(x, [g * b, g * a, g])   (one fused weight-gradient call)

Float32 channels-last CPU tensors with stride 1 and 'same' padding run the C++ kernels of
`quadranet.nn.ext` instead (one pass for y = a * b + c, one for all gradients); channels-last
CUDA tensors (float32, bfloat16, float16) run the Triton kernels of
`quadranet.nn.triton_kernels` with the same interface. Any other input, or
`QUADRANET_CPU_KERNELS=0` / `QUADRANET_TRITON=0`, keeps the oneDNN / cuDNN path above.
`QUADRANET_TRITON=1` makes a GPU run fail where Triton does not import.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from quadranet.nn import ext

aten = torch.ops.aten
ConvArgs = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # stride, padding, dilation


AUTOCAST_DEVICES = ("cpu", "cuda")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype convolutions and matmuls run in: autocast's when it is on, else x's."""
    kind = x.device.type
    if kind in AUTOCAST_DEVICES and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for x's device (explicit casts instead); a no-op elsewhere (meta)."""
    kind = x.device.type
    return torch.autocast(kind, enabled=False) if kind in AUTOCAST_DEVICES else nullcontext()


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`t.to(dtype)`, passing None through."""
    return None if t is None else t.to(dtype)


def _kernel_ops(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_args: ConvArgs
) -> object | None:
    """The kernel ops (C++ on CPU, Triton on CUDA) when they apply to this call, else None."""
    stride, padding, dilation = conv_args
    k = weight.shape[-1]
    same = k % 2 == 1 and weight.shape[-2] == k and padding == (k // 2, k // 2)
    if x.dim() != 4 or not same or stride != (1, 1) or dilation != (1, 1):
        return None
    if not x.is_contiguous(memory_format=torch.channels_last):
        return None
    if ext.usable(x, weight, bias):
        ops = ext.kernels()
        if ops is not None:
            return ops
    return triton_ops(x, weight, bias)


TRITON_ENV_VAR = "QUADRANET_TRITON"
TRITON_DEVICES = ("cuda",)  # the tests add "cpu" to run the kernels in Triton's interpreter


def triton_ops(*tensors: torch.Tensor | None) -> object | None:
    """`quadranet.nn.triton_kernels` for eager float tensors on a GPU, when Triton imports;
    None otherwise or with `QUADRANET_TRITON=0`. With `QUADRANET_TRITON=1` a GPU tensor
    raises where Triton does not import, instead of falling back to cuDNN / ATen."""
    x = tensors[0]
    setting = os.environ.get(TRITON_ENV_VAR, "")
    if setting not in ("", "0", "1"):
        raise ValueError(
            f"{TRITON_ENV_VAR}={setting!r}: use 1 (require the Triton kernels on GPU), "
            "0 (never use them) or leave it unset (use them where Triton imports)"
        )
    if x.device.type not in TRITON_DEVICES or setting == "0":
        return None
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return None
    if any(t is not None and t.device != x.device for t in tensors):
        return None
    try:
        from quadranet.nn import triton_kernels
    except ImportError as err:  # no Triton for this platform: cuDNN / ATen path
        if setting == "1":
            raise RuntimeError(
                f"{TRITON_ENV_VAR}=1 but the Triton kernels do not import ({err}): install "
                f"triton for this torch, or unset {TRITON_ENV_VAR} to fall back to cuDNN"
            ) from err
        return None
    return triton_kernels if x.dtype in triton_kernels.DTYPES else None


def branch_convs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_args: ConvArgs,
    branches: Sequence[int] = (0, 1, 2),
) -> list[torch.Tensor]:
    """The depthwise convolutions of the requested branches (0 = a, 1 = b, 2 = c)."""
    ops = _kernel_ops(x, weight, bias, conv_args)
    if ops is not None:
        wanted = sorted(set(branches))
        outs = ops.quadratic_forward(
            x, weight.contiguous(), bias, False, *(i in wanted for i in range(3))
        )
        return [outs[wanted.index(i)] for i in branches]
    c = x.shape[1]
    w = weight.view(c, 3, *weight.shape[1:])
    bs = bias.view(c, 3) if bias is not None else None
    return [
        F.conv2d(x, w[:, i], None if bs is None else bs[:, i], *conv_args, groups=c)
        for i in branches
    ]


def quadratic_product(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_args: ConvArgs,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = a * b + c of the depthwise branches, plus `residual` when given (one kernel pass,
    residual included, where the kernels apply). Under autocast the convs run in its dtype."""
    dtype = compute_dtype(x)
    if dtype != x.dtype:
        with no_autocast(x):
            y = quadratic_product(x.to(dtype), weight.to(dtype), cast(bias, dtype), conv_args)
        return y if residual is None else residual + y
    return product_and_branches(x, weight, bias, conv_args, False, residual)[0]


def _interleave(ga: torch.Tensor, gb: torch.Tensor, gc: torch.Tensor) -> torch.Tensor:
    """Stack three C-channel maps into the fused 3C layout (channel 3k + branch)."""
    if ga.is_contiguous(memory_format=torch.channels_last):
        nhwc = torch.stack([t.permute(0, 2, 3, 1) for t in (ga, gb, gc)], dim=-1)
        return nhwc.flatten(-2).permute(0, 3, 1, 2)
    return torch.stack((ga, gb, gc), dim=2).flatten(1, 2)


def depthwise_quadratic_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    grad: torch.Tensor,
    conv_args: ConvArgs,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (x, fused weight, fused bias) of a * b + c, given a, b and dL/dy."""
    ops = _kernel_ops(x, weight, bias, conv_args)
    if ops is not None and all((t.device, t.dtype) == (x.device, x.dtype) for t in (a, b, grad)):
        want = (needs[0], needs[1], needs[2] and bias is not None)
        outs = iter(ops.quadratic_backward(x, weight.contiguous(), a, b, grad, *want))
        return tuple(next(outs) if w else None for w in want)
    c = x.shape[1]
    stride, padding, dilation = conv_args
    ga, gb = grad * b, grad * a
    grad_x = grad_w = grad_b = None
    if needs[0]:
        w = weight.view(c, 3, *weight.shape[1:])
        grad_x = sum(
            aten.convolution_backward(
                g, x, w[:, i], None, stride, padding, dilation, False, [0, 0], c,
                [True, False, False],
            )[0]
            for i, g in enumerate((ga, gb, grad))
        )  # fmt: skip
    if needs[1] or needs[2]:
        grad_y3 = _interleave(ga, gb, grad)
        _, grad_w, grad_b = aten.convolution_backward(
            grad_y3, x, weight, None if bias is None else [bias.shape[0]],
            stride, padding, dilation, False, [0, 0], c,
            [False, needs[1], needs[2] and bias is not None],
        )  # fmt: skip
    return grad_x, grad_w, grad_b


def product_and_branches(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_args: ConvArgs,
    keep: bool,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(y, a, b) with y = a * b + c (+ `residual`), or (y, None, None) when `keep` is False:
    one kernel pass, residual included, where the kernels apply."""
    ops = _kernel_ops(x, weight, bias, conv_args)
    if ops is None:
        a, b, c = branch_convs(x, weight, bias, conv_args)
        y = torch.addcmul(c, a, b)
        y = y if residual is None else residual + y
        return (y, *((a, b) if keep else (None, None)))
    fuse = residual is not None and (
        (residual.shape, residual.dtype, residual.device) == (x.shape, x.dtype, x.device)
        and residual.is_contiguous(memory_format=torch.channels_last)
    )
    w = weight.contiguous()
    y, *ab = ops.quadratic_forward(x, w, bias, True, keep, keep, False, residual if fuse else None)
    y = y if residual is None or fuse else residual + y
    return (y, *ab) if keep else (y, None, None)


class _DepthwiseQuadraticFn(torch.autograd.Function):
    """a * b + c with per-branch forward and a fused weight gradient.

    `save_branches=False` (memory-efficient) keeps only x and recomputes a, b in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, conv_args, save_branches):  # noqa: D102
        # Under autocast, run in its dtype explicitly so backward can use the same one.
        dtype = compute_dtype(x)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        with no_autocast(x):
            x = x.to(dtype)
            out, a, b = product_and_branches(
                x, weight.to(dtype), cast(bias, dtype), conv_args, save_branches
            )
        ctx.conv_args = conv_args
        ctx.save_branches = save_branches
        ctx.save_for_backward(x, weight, bias, *((a, b) if save_branches else ()))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        x, weight, bias, *ab = ctx.saved_tensors
        w, b_ = weight.to(x.dtype), cast(bias, x.dtype)
        a, b = ab if ctx.save_branches else branch_convs(x, w, b_, ctx.conv_args, (0, 1))
        needs = tuple(ctx.needs_input_grad[:3])
        grads = depthwise_quadratic_backward(x, w, b_, a, b, grad.to(x.dtype), ctx.conv_args, needs)
        return *(cast(g, d) for g, d in zip(grads, ctx.dtypes)), None, None


def depthwise_quadratic_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    memory_efficient: bool = False,
) -> torch.Tensor:
    """Depthwise quadratic conv; `weight` is the fused (3C, 1, kh, kw) tensor."""
    conv_args = (_pair(stride), _pair(padding), _pair(dilation))
    if not torch.is_grad_enabled():
        return quadratic_product(x, weight, bias, conv_args)
    return _DepthwiseQuadraticFn.apply(x, weight, bias, conv_args, not memory_efficient)
