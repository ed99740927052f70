"""`torch.ops.quadranet.channel_mlp`: fc2(GELU(fc1(LN(x)))) over the last dim, one operator.

- `channel_mlp(x, ln_weight, ln_bias, eps, w1, b1, w2, b2, gamma, keep, residual)
  -> (out, u, mean, rstd)`: out = gamma fc2(...) (+ x where `residual`); u = fc1's output
  before GELU and the LayerNorm statistics, kept for backward (empty when `keep` is False,
  at inference);
- `channel_mlp_backward(grad, x, mean, rstd, u, ln_weight, ln_bias, eps, w1, w2, b2, gamma)
  -> (dx, dln_weight, dln_bias, dw1, db1, dw2, db2, dgamma)`: LayerNorm and GELU are
  recomputed; the layer scale gamma is folded into fc2 inside the ops.

Backends (`policy.choose_mlp`): the C++ kernels run the MLP over chunks of rows whose
4C-wide hidden activation stays in cache (float32 CPU maps with few channels and a large
hidden activation, where the whole-tensor products lose to the memory traffic); elsewhere
the ATen reference below. Both ops are `triton_op`s (bodies of torch ops), so torch.compile
traces into the reference and sees the C++ kernels as calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op
from torch.utils.flop_counter import register_flop_formula

from quadranet.ops import policy
from quadranet.ops.library import _empty

aten = torch.ops.aten


def _fold(w2: Tensor, b2: Tensor | None, gamma: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """fc2's weight and bias with the layer scale folded in (no pass over the output)."""
    if gamma is None:
        return w2, b2
    return w2 * gamma[:, None], None if b2 is None else b2 * gamma


def _reference_forward(x, ln_w, ln_b, eps, w1, b1, w2, b2):  # noqa: ANN001, ANN202
    n, mean, rstd = aten.native_layer_norm(x, [x.shape[-1]], ln_w, ln_b, eps)
    u = F.linear(n if n.dtype == w1.dtype else n.to(w1.dtype), w1, b1)
    return F.linear(F.gelu(u), w2, b2), u, mean, rstd


@triton_op("quadranet::channel_mlp", mutates_args=())
def channel_mlp(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    eps: float,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    gamma: Tensor | None,
    keep: bool,
    residual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, u, mean, rstd), x added to out where `residual`; u and the statistics are
    empty unless `keep`."""
    w2, b2 = _fold(w2, b2, gamma)
    if policy.choose_mlp(x, w1).backend == "reference":
        out, u, mean, rstd = _reference_forward(x, ln_weight, ln_bias, eps, w1, b1, w2, b2)
        if residual:
            out.add_(x)  # into the product's fresh output: no further map allocated
        return (out, u, mean, rstd) if keep else (out, _empty(x), _empty(x), _empty(x))
    ops = torch.ops.quadranet_cpu
    if not keep:
        out = ops.mlp_inference(x, ln_weight, ln_bias, eps, w1, b1, w2, b2, residual)
        return out, _empty(x), _empty(x), _empty(x)
    out, u, mean, rstd = ops.mlp_forward(x, ln_weight, ln_bias, eps, w1, b1, w2, b2, residual)
    return out, u, mean, rstd


@triton_op("quadranet::channel_mlp_backward", mutates_args=())
def channel_mlp_backward(
    grad: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    u: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    eps: float,
    w1: Tensor,
    w2: Tensor,
    b2: Tensor | None,
    gamma: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dln_weight, dln_bias, dw1, db1, dw2, db2, dgamma); LN's are empty without its
    affine, dgamma without a layer scale."""
    c = x.shape[-1]
    col = None if gamma is None else gamma[:, None]
    w2s = w2 if col is None else w2 * col
    if policy.choose_mlp(x, w1).backend == "cpu":
        outs = torch.ops.quadranet_cpu.mlp_backward(
            x, mean, rstd, u, grad.contiguous(), ln_weight, ln_bias, w1, w2s
        )
        dx, dlw, dlb, dw1, db1, dw2, db2 = outs
        dlw, dlb, db2 = dlw.clone(), dlb.clone(), db2.clone()  # views of one buffer
    else:
        g = grad.reshape(-1, c)
        u2 = u.reshape(-1, u.shape[-1])
        dw2, db2 = g.t() @ F.gelu(u2), g.sum(0)
        du = aten.gelu_backward(g @ w2s, u2)
        n = aten.native_layer_norm(x, [c], ln_weight, ln_bias, eps)[0].reshape(-1, c)
        dw1, db1 = du.t() @ (n if n.dtype == w1.dtype else n.to(w1.dtype)), du.sum(0)
        mask = [True, ln_weight is not None, ln_bias is not None]
        dn = (du @ w1).reshape(x.shape)
        dx, dlw, dlb = aten.native_layer_norm_backward(
            dn if dn.dtype == x.dtype else dn.to(x.dtype), x, [c], mean, rstd, ln_weight,
            ln_bias, mask,
        )  # fmt: skip
    dlw = dlw if ln_weight is not None else _empty(x)
    dlb = dlb if ln_bias is not None else _empty(x)
    dgamma = _empty(x)
    if gamma is not None:  # dW2' = G^T Z and db2' = colsum(G) are for the folded fc2
        dgamma = (dw2 * w2).sum(1)
        if b2 is not None:
            dgamma = torch.addcmul(dgamma, db2, b2)
        dw2, db2 = dw2 * col, db2 * gamma
    return dx, dlw, dlb, dw1, db1, dw2.contiguous(), db2, dgamma


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, ln_w, ln_b, eps, w1, b1, w2, b2, gamma, _, residual = inputs
    _, u, mean, rstd = output
    ctx.mark_non_differentiable(u, mean, rstd)
    ctx.set_materialize_grads(False)  # no zero gradients made for u and the statistics
    ctx.save_for_backward(x, mean, rstd, u, ln_w, ln_b, w1, b1, w2, b2, gamma)
    ctx.eps, ctx.residual = eps, residual
    ctx.defined = (ln_w is not None, ln_b is not None, b1 is not None, b2 is not None)
    ctx.setting = (policy.mode(), policy.forced_backend())


def _backward(ctx, grad, _gu, _gm, _gr) -> tuple:  # noqa: ANN001
    if grad is None:  # only the non-differentiable outputs were used
        return (None,) * 11
    x, mean, rstd, u, ln_w, ln_b, w1, b1, w2, b2, gamma = ctx.saved_tensors
    if u.numel() == 0 and x.numel() > 0:  # run with keep=False: recompute what backward needs
        n, mean, rstd = aten.native_layer_norm(x, [x.shape[-1]], ln_w, ln_b, ctx.eps)
        u = F.linear(n, w1, b1)
    with policy.kernels(*ctx.setting):
        dx, dlw, dlb, dw1, db1, dw2, db2, dg = torch.ops.quadranet.channel_mlp_backward(
            grad, x, mean, rstd, u, ln_w, ln_b, ctx.eps, w1, w2, b2, gamma
        )
    if ctx.residual:
        dx = dx + grad
    has_lw, has_lb, has_b1, has_b2 = ctx.defined
    return (dx, dlw if has_lw else None, dlb if has_lb else None, None, dw1,
            db1 if has_b1 else None, dw2, db2 if has_b2 else None,
            dg if gamma is not None else None, None, None)  # fmt: skip


channel_mlp.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.quadranet.channel_mlp)
def _forward_flops(x_shape, ln_w, ln_b, eps, w1_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return 2 * 2 * rows * w1_shape[0] * w1_shape[1]  # fc1 and fc2


@register_flop_formula(torch.ops.quadranet.channel_mlp_backward)
def _backward_flops(grad_shape, x_shape, mean, rstd, u, ln_w, ln_b, eps, w1_shape, *args,
                    out_shape=None, **kwargs) -> int:  # noqa: ANN001  # fmt: skip
    return 2 * _forward_flops(x_shape, None, None, eps, w1_shape)  # both gradients of both
