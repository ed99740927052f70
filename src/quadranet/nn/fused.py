"""Memory-efficient residual branches of a QuadraBlock, with hand-derived backward.

`quadratic_mixer`: gamma * QuadraticDWConv(LN(x)). Plain autograd keeps the LN output,
the fused 3C-channel conv output and the product for backward (about 6 activation-sized
tensors); this op keeps only x and the LayerNorm statistics, and recomputes LN and the
conv in backward (one extra depthwise conv, a few percent of a block's FLOPs). With
`keep_branches` it also keeps the conv's branches a and b and recomputes only LN; with
`residual` it returns x + the branch, the sum formed in the conv's pass.

`channel_mlp`: gamma * fc2(GELU(fc1(LN(x)))) on an NHWC map. Plain autograd keeps x,
the LN output, fc1's output, GELU's output and fc2's output (11 C per pixel); this op
keeps x, the LN statistics and fc1's output (5 C per pixel), recomputing LN and GELU.
The layer-scale gradient comes from the fc2 weight-gradient product, so fc2 is never
recomputed: with M = G^T Z (G the output gradient, Z = GELU(U)),
dW2 = gamma * M and dgamma = rowsum(M * W2) + b2 * colsum(G). On large float32 CPU maps
with few channels both passes run as chunked C++ kernels (`chunked_mlp_kernels`) whose
activation-sized intermediates stay in cache; with `residual` the op returns x + the above.

Both ops redo LN in backward from the saved statistics and run LN's backward with the
residual's gradient added in the same pass (C++ row kernels on contiguous float32 CPU
maps; ATen's LayerNorm ops elsewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from quadranet.nn.depthwise import (
    branch_convs,
    cast,
    compute_dtype,
    depthwise_quadratic_backward,
    no_autocast,
    product_and_branches,
)
from quadranet.nn.ext import contiguous_kernels, kernels, usable

aten = torch.ops.aten

# The chunked channel-MLP kernels (`chunked_mlp_kernels`) pay where fc1's output does not fit
# in the caches and the matrix products are narrow. Measured on a 2-core Zen 3 at
# QuadraNet's stage shapes (`benchmarks/kernels.py` and batches 1-32): inference 1.03-1.27x
# and training (forward + backward) 1.06-1.28x at C <= 128 with >= 16 MiB of hidden
# activation; inference 0.66-1.05x with less; 0.69-1.00x at C >= 256, where the
# whole-tensor products run faster.
CHUNKED_MLP_MAX_DIM = 128
CHUNKED_MLP_MIN_HIDDEN = 1 << 22  # floats of fc1 output (16 MiB)


def chunked_mlp_kernels(
    x: torch.Tensor, hidden: int, *params: torch.Tensor | None
) -> object | None:
    """The C++ ops when the chunked MLP kernels apply to the NHWC map x and pay: contiguous
    float32 CPU tensors outside low-precision autocast, C <= CHUNKED_MLP_MAX_DIM and at least
    CHUNKED_MLP_MIN_HIDDEN values of hidden activation; else None."""
    if not usable(x, *params):  # first: no size tests (guards) while tracing or exporting
        return None
    c = x.shape[-1]
    if (
        c > CHUNKED_MLP_MAX_DIM
        or x.numel() // max(c, 1) * hidden < CHUNKED_MLP_MIN_HIDDEN
        or not x.is_contiguous()
    ):
        return None
    return kernels()


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for reductions: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """NHWC view of an NCHW tensor (free for channels-last tensors)."""
    return x.permute(0, 2, 3, 1)


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _ln_input(x: torch.Tensor, ln_w: torch.Tensor | None) -> torch.Tensor:
    """x in the LayerNorm weight's dtype: CUDA's LayerNorm takes no mixed dtypes (a bf16
    map from autocast with float32 weights); the CPU's computes in float32 all the same."""
    return x if ln_w is None or ln_w.dtype == x.dtype else x.to(ln_w.dtype)


def _ln_from_stats(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ln_w: torch.Tensor | None,
    ln_b: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """LN(x) over the last dim again in backward: one pass from the saved statistics where
    the C++ kernel applies, else recomputed (the same values up to rounding)."""
    ops = contiguous_kernels(x, mean, rstd, ln_w, ln_b)
    if ops is not None:
        return ops.layer_norm_apply(x, mean, rstd, ln_w, ln_b)
    return F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)


def _ln_backward(
    grad_n: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ln_w: torch.Tensor | None,
    ln_b: torch.Tensor | None,
    need_x: bool,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of x, weight and bias of LN over x's last dim, for grad_n of its output,
    plus `residual` (a gradient of x's shape) on x's: one C++ pass where it applies."""
    ops = contiguous_kernels(x, grad_n, mean, rstd, ln_w, residual)
    if ops is not None:
        grad_x, grad_w, grad_b = ops.layer_norm_backward(grad_n, x, mean, rstd, ln_w, residual)
        return grad_x, grad_w if ln_w is not None else None, grad_b if ln_b is not None else None
    mask = [need_x, ln_w is not None, ln_b is not None]
    grad_x, grad_w, grad_b = aten.native_layer_norm_backward(
        grad_n, x, [x.shape[-1]], mean, rstd, ln_w, ln_b, mask
    )
    if residual is not None and grad_x is not None:
        grad_x = grad_x + residual
    return grad_x, grad_w, grad_b


def _branch_scale(gamma: torch.Tensor) -> torch.Tensor:
    """Per fused channel (3C): gamma on branches a and c, 1 on branch b."""
    return torch.stack((gamma, torch.ones_like(gamma), gamma), 1).view(-1)


def fold_layer_scale(
    weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused quadratic conv's weight and bias with the layer scale folded in:
    gamma * (a * b + c) = (gamma a) * b + gamma c (branches a and c of each channel)."""
    scale = _branch_scale(gamma)
    return weight * scale.view(-1, 1, 1, 1), None if bias is None else bias * scale


class _QuadraticMixerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, conv_w, conv_b, gamma, eps, padding, keep_branches, residual):  # noqa: D102
        c = x.shape[1]
        dtype = compute_dtype(x)  # the conv's dtype; LayerNorm statistics stay in x's
        conv_args = ((1, 1), _pair(padding), (1, 1))
        with no_autocast(x):
            n, mean, rstd = aten.native_layer_norm(_ln_input(_nhwc(x), ln_w), [c], ln_w, ln_b, eps)
            w, b = _scaled_conv(conv_w, conv_b, gamma, dtype)
            n = _nchw(n).to(dtype)
            # with `residual`, x joins the kernel's pass (or, in another dtype, is added after)
            out, ya, yb = product_and_branches(
                n, w, b, conv_args, keep_branches, x if residual else None
            )
        ctx.save_for_backward(x, mean, rstd, ln_w, ln_b, conv_w, conv_b, gamma, ya, yb)
        ctx.args = (eps, conv_args, dtype, residual)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        x, mean, rstd, ln_w, ln_b, conv_w, conv_b, gamma, ya, yb = ctx.saved_tensors
        eps, conv_args, dtype, residual = ctx.args
        need = ctx.needs_input_grad
        c = x.shape[1]
        x_nhwc = _ln_input(_nhwc(x), ln_w)
        n = _nchw(_ln_from_stats(x_nhwc, mean, rstd, ln_w, ln_b, eps)).to(dtype)
        # Backward of y = a' * b + c' with the folded weights W' = s W (s = gamma on branches
        # a and c, 1 on b): dL/dn directly, then dW = s dW' and, since a' and c' are linear
        # in gamma, dgamma = <Wa, dWa'> + ba dba' + <Wc, dWc'> + bc dbc' per channel.
        w, b = _scaled_conv(conv_w, conv_b, gamma, dtype)
        if ya is None:
            ya, yb = branch_convs(n, w, b, conv_args, (0, 1))
        need_gamma = gamma is not None and need[5]
        needs = (True, need[3] or need_gamma, (need[4] or need_gamma) and b is not None)
        grad_n, grad_cw, grad_cb = depthwise_quadratic_backward(
            n, w, b, ya, yb, grad.to(dtype), conv_args, needs
        )
        del ya, yb, n
        grad_gamma = None
        if gamma is not None:
            if need_gamma:
                acc = _acc(dtype)
                dot = (conv_w.to(acc) * grad_cw.to(acc)).view(c, 3, -1).sum(-1)
                if b is not None:
                    dot = dot + (conv_b.to(acc) * grad_cb.to(acc)).view(c, 3)
                grad_gamma = (dot[:, 0] + dot[:, 2]).to(gamma.dtype)
            scale = _branch_scale(gamma.to(dtype))
            grad_cw = None if grad_cw is None else grad_cw * scale.view(-1, 1, 1, 1)
            grad_cb = None if grad_cb is None else grad_cb * scale
        res = _nhwc(grad).to(x_nhwc.dtype) if residual and need[0] else None
        grad_x, grad_lw, grad_lb = _ln_backward(
            _nhwc(grad_n).to(x_nhwc.dtype), x_nhwc, mean, rstd, ln_w, ln_b, need[0], res
        )
        grad_x = None if grad_x is None else _nchw(grad_x).to(x.dtype)
        grad_cw = cast(grad_cw, conv_w.dtype) if need[3] else None
        grad_cb = cast(grad_cb, conv_b.dtype) if need[4] else None
        return grad_x, grad_lw, grad_lb, grad_cw, grad_cb, grad_gamma, None, None, None, None


def _scaled_conv(
    weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused conv's weight and bias in `dtype`, with the layer scale folded in."""
    w, b = weight.to(dtype), cast(bias, dtype)
    return (w, b) if gamma is None else fold_layer_scale(w, b, gamma.to(dtype))


def quadratic_mixer(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    eps: float = 1e-6,
    padding: int = 3,
    keep_branches: bool = False,
    residual: bool = False,
) -> torch.Tensor:
    """gamma * QuadraticDWConv(LayerNorm2d(x)), keeping only x and LN statistics for backward.

    `conv_weight` is the fused depthwise weight of `QuadraticConv2d(C, C, k, groups=C)`.
    `keep_branches=True` also keeps the conv's branches a and b (2 C per pixel), so
    backward does not recompute them: faster, for a little more memory.
    `residual=True` returns x + (the above), the sum formed in the conv's own pass.
    """
    return _QuadraticMixerFn.apply(
        x, ln_weight, ln_bias, conv_weight, conv_bias, gamma, eps, padding, keep_branches, residual
    )


class _ChannelMlpFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w1, b1, w2, b2, gamma, eps, residual):  # noqa: D102
        c = x.shape[-1]
        ctx.eps, ctx.residual = eps, residual
        ops = chunked_mlp_kernels(x, w1.shape[0], ln_w, ln_b, w1, b1, w2, b2, gamma)
        ctx.chunked = ops is not None
        w2s, b2s = fold_fc2_scale(w2, b2, gamma)  # layer scale in fc2: no pass over the output
        if ops is not None:  # the chunked kernels, the residual added in their pass
            out, u, mean, rstd = ops.mlp_forward(x, ln_w, ln_b, eps, w1, b1, w2s, b2s, residual)
        else:
            dtype = compute_dtype(x)  # the matmuls' dtype; LayerNorm statistics stay in x's
            with no_autocast(x):
                n, mean, rstd = aten.native_layer_norm(_ln_input(x, ln_w), [c], ln_w, ln_b, eps)
                u = F.linear(n.to(dtype), w1.to(dtype), cast(b1, dtype))
                ops = contiguous_kernels(u)  # the C++ GELU: one read of u, one write of z
                z = ops.gelu(u) if ops is not None else F.gelu(u)
                w2c, b2c = w2s.to(dtype), cast(b2s, dtype)
                if residual and x.dtype == dtype and x.is_contiguous():
                    out = fc2_onto(x, z, w2c, b2c)
                else:
                    out = F.linear(z, w2c, b2c)
                    out = x + out if residual else out
        ctx.save_for_backward(x, mean, rstd, u, ln_w, ln_b, w1, w2, b2, gamma)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        x, mean, rstd, u, ln_w, ln_b, w1, w2, b2, gamma = ctx.saved_tensors
        c, hidden, dtype = x.shape[-1], u.shape[-1], u.dtype
        need = ctx.needs_input_grad
        # dL/dZ = (G gamma) W2 = G (gamma W2): the layer scale folded into the small weight
        w2s = fold_fc2_scale(w2, None, gamma)[0].to(dtype)
        if ctx.chunked:
            grad_x, grad_lw, grad_lb, grad_w1, grad_b1, m, g_sum = kernels().mlp_backward(
                x, mean, rstd, u, grad.contiguous(), ln_w, ln_b, w1, w2s, ctx.residual
            )
            grad_w2, grad_b2, grad_gamma = _fc2_grads(m, g_sum, w2, b2, gamma, need[7])
            return (
                grad_x if need[0] else None,
                grad_lw if ln_w is not None else None,
                grad_lb if ln_b is not None else None,
                grad_w1,
                grad_b1 if need[4] else None,
                grad_w2,
                grad_b2 if b2 is not None and need[6] else None,
                grad_gamma,
                None,
                None,
            )
        g = grad.reshape(-1, c).to(dtype)
        u2 = u.reshape(-1, hidden)
        x_ln = _ln_input(x, ln_w)
        ops = contiguous_kernels(u2)
        if ops is not None:  # one GELU pass: Z = GELU(U), dL/dU = dL/dZ * GELU'(U) in place,
            grad_u = g @ w2s  # and fc1's bias gradient, the column sums of dL/dU
            z, *sums = ops.gelu_and_grad(u2, grad_u, need[4])
            grad_b1 = sums[0] if sums else None
            n = _ln_from_stats(x_ln, mean, rstd, ln_w, ln_b, ctx.eps).reshape(-1, c).to(dtype)
            m, grad_w1, grad_n = _mlp_weight_and_input_grads(ops, g, z, grad_u, n, w1)
            del z
        else:
            z = F.gelu(u2)
            m = _fc2_weight_product(g, z)
            del z
            grad_u = aten.gelu_backward(g @ w2s, u2)
            n = _ln_from_stats(x_ln, mean, rstd, ln_w, ln_b, ctx.eps).reshape(-1, c).to(dtype)
            grad_w1 = grad_u.t() @ n
            grad_b1 = grad_u.sum(0, dtype=_acc(dtype)) if need[4] else None
            grad_n = grad_u @ w1.to(dtype)
        del grad_u, n
        grad_w2, grad_b2, grad_gamma = _fc2_grads(
            m.to(_acc(dtype)), g.sum(0, dtype=_acc(dtype)), w2, b2, gamma, need[7]
        )
        grad_n = grad_n.reshape(x.shape).to(x_ln.dtype)
        res = grad.to(x_ln.dtype) if ctx.residual and need[0] else None
        grad_x, grad_lw, grad_lb = _ln_backward(grad_n, x_ln, mean, rstd, ln_w, ln_b, need[0], res)
        grad_x = None if grad_x is None else grad_x.to(x.dtype)
        return (
            grad_x,
            grad_lw,
            grad_lb,
            grad_w1.to(w1.dtype),
            grad_b1,
            grad_w2.to(w2.dtype),
            grad_b2 if b2 is not None and need[6] else None,
            grad_gamma,
            None,
            None,
        )


def _fc2_weight_operands(
    g: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(A, B, transposed): G^T Z is (A B)^T when `transposed` (few channels), else A B.

    With few channels MKL runs G^T Z as (Z^T G)^T about 20% faster (56x56x64: 117 vs 143
    GFLOP/s); with many, G^T Z directly is as fast and leaves the weight-sized passes after
    it no transposing copy (14x14x256, 7x7x512: 10.3 vs 11.2 and 10.6 vs 13.3 ms for the
    product and those passes).
    """
    return (z.t(), g, True) if g.shape[1] <= CHUNKED_MLP_MAX_DIM else (g.t(), z, False)


def _fc2_weight_product(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """G^T Z, shape (C, hidden): fc2's weight gradient before the layer scale."""
    a, b, transposed = _fc2_weight_operands(g, z)
    m = a @ b
    return m.t() if transposed else m


def _mlp_weight_and_input_grads(
    ops: object,
    g: torch.Tensor,
    z: torch.Tensor,
    grad_u: torch.Tensor,
    n: torch.Tensor,
    w1: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G^T Z (as `_fc2_weight_product`), dL/dW1 = dU^T N and dL/dN = dU W1 (float32).

    The three products are independent and of equal size. With two threads they run as
    two groups side by side, one thread each (`matmul_groups`): G^T Z with the first half
    of dL/dN's rows, dU^T N with the second. Each product then runs single-threaded,
    without the synchronisation of a two-thread product: 1.04x on the three at 14x14x256,
    batch 16, and a whole quadranet36_t training step 1.03x. With another thread count the
    groups would leave threads idle or run in order: plain products.
    """
    if torch.get_num_threads() != 2:
        return _fc2_weight_product(g, z), grad_u.t() @ n, grad_u @ w1
    rows, c = g.shape
    half = rows // 2
    m_a, m_b, transposed = _fc2_weight_operands(g, z)
    m = g.new_empty(m_a.shape[0], m_b.shape[1])
    grad_w1 = g.new_empty(w1.shape)
    grad_n = g.new_empty(rows, c)
    ops.matmul_groups(
        [m, grad_n[:half], grad_w1, grad_n[half:]],
        [m_a, grad_u[:half], grad_u.t(), grad_u[half:]],
        [m_b, w1, n, w1],
        [0, 0, 1, 1],
    )
    return (m.t() if transposed else m), grad_w1, grad_n


def fc2_onto(
    x: torch.Tensor, z: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None
) -> torch.Tensor:
    """x + (z W2^T + b2) over the last dim for a contiguous x, the product accumulated onto
    a copy of x + b2: one pass over the output fewer than F.linear and an add (the
    product's own initialisation of its output is that pass)."""
    out = x + b2 if b2 is not None else x.clone(memory_format=torch.contiguous_format)
    out.view(-1, out.shape[-1]).addmm_(z.reshape(-1, z.shape[-1]), w2.t())
    return out


def fold_fc2_scale(
    w2: torch.Tensor, b2: torch.Tensor | None, gamma: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fc2's weight and bias with the layer scale folded in: gamma * (W2 z + b2) (no pass
    over the output)."""
    if gamma is None:
        return w2, b2
    return w2 * gamma.unsqueeze(1), None if b2 is None else b2 * gamma


def _fc2_grads(
    m: torch.Tensor,
    g_sum: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    gamma: torch.Tensor | None,
    need_gamma: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of fc2's weight and bias and of the layer scale from M = G^T Z and the
    column sums of G: dW2 = gamma M, db2 = gamma colsum(G),
    dgamma = rowsum(M * W2) + b2 colsum(G)."""
    if gamma is None:
        return m.to(w2.dtype).contiguous(), g_sum, None
    grad_gamma = None
    if need_gamma:
        grad_gamma = (m * w2).sum(1) + (b2 * g_sum if b2 is not None else 0)
        grad_gamma = grad_gamma.to(gamma.dtype)
    return (m * gamma.unsqueeze(1)).to(w2.dtype).contiguous(), g_sum * gamma, grad_gamma


def channel_mlp(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    eps: float = 1e-6,
    residual: bool = False,
) -> torch.Tensor:
    """gamma * fc2(GELU(fc1(LN(x)))) over the last dim, keeping x, LN stats and fc1's output;
    with `residual`, x + that."""
    return _ChannelMlpFn.apply(
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, eps, residual
    )
