"""The specification of the depthwise quadratic conv, in ATen ops (the reference backend).

With the fused weight W (3C, 1, k, k) (channel 3c + branch holds branch a, b, c of input
channel c), the fused bias and an optional per-channel layer scale gamma:

    a = gamma (Wa * x + ba),  b = Wb * x + bb,  c = gamma (Wc * x + bc)
    y = a * b + c (+ residual)

i.e. y = gamma ((Wa * x + ba)(Wb * x + bb) + Wc * x + bc): gamma folds into branches a
and c. Backward (g = dL/dy, W' = the folded weight):

    dx = convT(W'a, g b) + convT(Wb, g a) + convT(W'c, g)
    dW' = corr(x, [g b, g a, g]),  dW = s dW' (s = gamma on a and c, 1 on b)
    dgamma = <Wa, dW'a> + ba db'a + <Wc, dW'c> + bc db'c   (per channel)

Sums run in at least float32; weights may be float32 with lower-precision maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

aten = torch.ops.aten
Pair = tuple[int, int]


def branch_scale(gamma: torch.Tensor) -> torch.Tensor:
    """Per fused channel (3C): gamma on branches a and c, 1 on branch b."""
    return torch.stack((gamma, torch.ones_like(gamma), gamma), 1).view(-1)


def fold(
    weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused weight and bias with the layer scale folded in (a * b + c times gamma)."""
    if gamma is None:
        return weight, bias
    scale = branch_scale(gamma)
    return weight * scale.view(-1, 1, 1, 1), None if bias is None else bias * scale


def branches(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    which: tuple[int, ...] = (0, 1, 2),
) -> list[torch.Tensor]:
    """The depthwise convolutions of the requested branches (0 = a, 1 = b, 2 = c) in x's dtype."""
    c = x.shape[1]
    w = weight.to(x.dtype).view(c, 3, *weight.shape[1:])
    bs = None if bias is None else bias.to(x.dtype).view(c, 3)
    return [
        F.conv2d(x, w[:, i], None if bs is None else bs[:, i], stride, padding, dilation, c)
        for i in which
    ]


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, a, b): y = a * b + c (+ residual) with gamma folded into a and c."""
    w, b_ = fold(weight, bias, gamma)
    a, b, c = branches(x, w, b_, stride, padding, dilation)
    y = torch.addcmul(c, a, b)
    return (y if residual is None else y + residual), a, b


def _interleave(ga: torch.Tensor, gb: torch.Tensor, gc: torch.Tensor) -> torch.Tensor:
    """Stack three C-channel maps into the fused 3C layout (channel 3k + branch)."""
    return torch.stack((ga, gb, gc), dim=2).flatten(1, 2)


def backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dW', db') of y = a * b + c for the (already folded) weight, given a, b and dL/dy."""
    c = x.shape[1]
    grad = grad.to(x.dtype)
    ga, gb = grad * b, grad * a
    dx = dw = db = None
    w = weight.to(x.dtype)
    if need_dx:
        wb = w.view(c, 3, *w.shape[1:])
        dx = sum(
            aten.convolution_backward(
                g, x, wb[:, i], None, stride, padding, dilation, False, [0, 0], c,
                [True, False, False],
            )[0]
            for i, g in enumerate((ga, gb, grad))
        )  # fmt: skip
    if need_dw or need_db:
        _, dw, db = aten.convolution_backward(
            _interleave(ga, gb, grad), x, w, None if bias is None else [3 * c],
            stride, padding, dilation, False, [0, 0], c, [False, need_dw, need_db],
        )  # fmt: skip
    return dx, dw, db


def unfold_grads(
    dw: torch.Tensor | None,
    db: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the unfolded weight, bias and gamma from those of the folded ones
    (dgamma needs dW' and, with a bias, db'; None where they are missing)."""
    if gamma is None:
        return dw, db, None
    acc = torch.promote_types(weight.dtype, torch.float32)
    c = gamma.shape[0]
    dgamma = None
    if dw is not None and (bias is None or db is not None):
        dot = (weight.to(acc) * dw.to(acc)).view(c, 3, -1).sum(-1)
        if bias is not None:
            dot = dot + (bias.to(acc) * db.to(acc)).view(c, 3)
        dgamma = (dot[:, 0] + dot[:, 2]).to(gamma.dtype)
    scale = branch_scale(gamma.to(acc))
    dw = None if dw is None else (dw.to(acc) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
    db = None if db is None else (db.to(acc) * scale).to(bias.dtype)
    return dw, db, dgamma
