"""`torch.ops.quadranet`: the depthwise quadratic conv as custom operators.

- `quadratic_dwconv(x, weight, bias, gamma, residual, stride, padding, dilation, keep_branches)
  -> (y, a, b)`: y = a * b + c (+ residual) as in `quadranet.ops.reference`; a and b are
  returned (for backward) when `keep_branches`, else empty.
- `quadratic_dwconv_backward(grad, x, weight, bias, gamma, a, b, stride, padding, dilation,
  output_mask) -> (dx, dweight, dbias, dgamma)`: recomputes a and b when they are empty;
  gradients not asked for by `output_mask` are empty.

Both are `torch.library.triton_op`s: one Python body per op that `policy.choose` routes to
the C++ kernels (CPU), the Triton kernels (CUDA, launched through `wrap_triton`, so
inductor sees them) or the ATen reference. The same body serves as the fake (meta)
implementation. Autograd, FLOP formulas and fake kernels are registered here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.library import triton_op
from torch.utils.flop_counter import register_flop_formula

from quadranet.ops import policy, reference


def _kernel_module(backend: str) -> object:
    """The module with `quadratic_forward` / `quadratic_backward` for a kernel backend."""
    if backend == "triton":
        from quadranet.ops import triton_kernels

        return triton_kernels
    return torch.ops.quadranet_cpu


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


def _pairs(*values: Sequence[int]) -> tuple[tuple[int, int], ...]:
    return tuple((int(v[0]), int(v[1])) for v in values)


@triton_op("quadranet::quadratic_dwconv", mutates_args=())
def quadratic_dwconv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gamma: Tensor | None,
    residual: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    keep_branches: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, a, b) of the depthwise quadratic conv; a, b empty unless `keep_branches`."""
    stride, padding, dilation = _pairs(stride, padding, dilation)
    backend = policy.choose(x, weight, stride, padding, dilation).backend
    if backend == "reference":
        y, a, b = reference.forward(x, weight, bias, gamma, residual, stride, padding, dilation)
        return (y, a, b) if keep_branches else (y, _empty(x), _empty(x))
    fuse = residual is not None and residual.dtype == x.dtype and residual.shape == x.shape
    fuse = fuse and residual.is_contiguous(memory_format=torch.channels_last)
    outs = _kernel_module(backend).quadratic_forward(
        x, weight, bias, gamma, True, keep_branches, residual if fuse else None
    )
    y = outs[0] if residual is None or fuse else outs[0] + residual
    return (y, outs[1], outs[2]) if keep_branches else (y, _empty(x), _empty(x))


@triton_op("quadranet::quadratic_dwconv_backward", mutates_args=())
def quadratic_dwconv_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gamma: Tensor | None,
    a: Tensor,
    b: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dgamma); the ones `output_mask` does not ask for are empty."""
    stride, padding, dilation = _pairs(stride, padding, dilation)
    need_dx, need_dw, need_db, need_dg = (bool(m) for m in output_mask)
    need_dg = need_dg and gamma is not None
    backend = policy.choose(x, weight, stride, padding, dilation).backend
    if backend == "reference":
        w, b_ = reference.fold(weight, bias, gamma)
        if a.numel() == 0 and x.numel() > 0:
            a, b = reference.branches(x, w, b_, stride, padding, dilation, (0, 1))
        want_dw, want_db = need_dw or need_dg, bias is not None and (need_db or need_dg)
        dx, dw, db = reference.backward(
            grad, x, w, b_, a, b, stride, padding, dilation, need_dx, want_dw, want_db
        )
        dw, db, dg = reference.unfold_grads(dw, db, weight, bias, gamma)
    else:  # the kernels take the unfolded weights and return the final gradients
        ops = _kernel_module(backend)
        if a.numel() == 0 and x.numel() > 0:
            a, b = ops.quadratic_forward(x, weight, bias, gamma, False, True, None)
        if grad.dtype != x.dtype:
            grad = grad.to(x.dtype)
        if not grad.is_contiguous(memory_format=torch.channels_last):
            grad = grad.contiguous(memory_format=torch.channels_last)
        need_db = need_db and bias is not None
        wanted = (need_dx, need_dw, need_db, need_dg)
        outs = iter(ops.quadratic_backward(x, weight, bias, gamma, a, b, grad, *wanted))
        dx, dw, db, dg = (next(outs) if want else None for want in wanted)
    return tuple(
        t if t is not None and want else _empty(x)
        for t, want in ((dx, need_dx), (dw, need_dw), (db, need_db), (dg, need_dg))
    )


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, gamma, residual, stride, padding, dilation, _ = inputs
    _, a, b = output
    ctx.mark_non_differentiable(a, b)
    ctx.set_materialize_grads(False)  # no zero gradients made for a and b
    ctx.save_for_backward(x, weight, bias, gamma, a, b)
    ctx.conv_args = (stride, padding, dilation)
    ctx.has_residual = residual is not None
    # backward may run on another thread (CUDA's autograd workers): keep this thread's setting
    ctx.setting = (policy.mode(), policy.forced_backend())


def _backward(ctx, grad_y: Tensor, _grad_a: Tensor, _grad_b: Tensor) -> tuple:  # noqa: ANN001
    if grad_y is None:  # only the non-differentiable outputs were used
        return (None,) * 9
    x, weight, bias, gamma, a, b = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2] and bias is not None, need[3] and gamma is not None]
    with policy.kernels(*ctx.setting):
        grads = torch.ops.quadranet.quadratic_dwconv_backward(
            grad_y, x, weight, bias, gamma, a, b, *ctx.conv_args, mask
        )
    dx, dw, db, dg = (g if m else None for g, m in zip(grads, mask))
    dres = grad_y if ctx.has_residual and need[4] else None
    return dx, dw, db, dg, dres, None, None, None, None


quadratic_dwconv.register_autograd(_backward, setup_context=_setup_context)


def _conv_flops(x_shape: Sequence[int], w_shape: Sequence[int], out: Sequence[int]) -> int:
    """FLOPs of the three depthwise convolutions of one pass (2 per multiply-add)."""
    return 2 * math.prod(out) * math.prod(w_shape[1:]) * 3


@register_flop_formula(torch.ops.quadranet.quadratic_dwconv)
def _forward_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    return _conv_flops(x_shape, w_shape, out_shape[0])


@register_flop_formula(torch.ops.quadranet.quadratic_dwconv_backward)
def _backward_flops(grad_shape, x_shape, w_shape, bias, gamma, a_shape, *args, out_shape=None,
                    **kwargs) -> int:  # noqa: ANN001  # fmt: skip
    dx, dw, db, dg = out_shape
    passes = (math.prod(dx) > 0) + (math.prod(dw) > 0 or math.prod(dg) > 0)
    recompute = 2 / 3 if math.prod(a_shape) == 0 else 0  # branches a and b again
    return int(_conv_flops(x_shape, w_shape, grad_shape) * (passes + recompute))
