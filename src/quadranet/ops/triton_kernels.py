"""Triton kernels of the depthwise quadratic conv (CUDA), with the C++ CPU ops' interface.

`quadratic_forward` and `quadratic_backward` take and return what the CPU ops of
`quadranet.ops.cpu` do, so `quadranet.ops.library` calls either. Launches go through
`torch.library.wrap_triton`, so under `torch.compile` inductor sees the kernels. Inputs are
channels-last (NHWC memory) float32, bfloat16 or float16 maps; the fused weight is
(3C, 1, k, k) with channel 3c + branch, odd k, stride 1, 'same' padding. Sums run in
float32; outputs keep x's dtype, weight and bias gradients the weight's.

One pass each:
- forward: y = a * b + c (+ residual), a, b, c the three depthwise branches, each tile
  reading its x neighbourhood once per tap from cache;
- backward, pass 1: ga = g * b, gb = g * a, and every tap's weight-gradient and the bias
  sums of [ga, gb, g] over a band of rows, added into that band's own partial sums (no
  atomics, so the result is deterministic); the bands are summed by torch after;
- backward, pass 2: dx = convT(Wa, ga) + convT(Wb, gb) + convT(Wc, g).

The kernels also run on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`,
set before Triton is imported), which is how the CPU test suite checks them.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

TILE_H = 8  # rows of pixels per program
TILE_W = 8  # columns of pixels per program (pass 1 loops over a band's tiles)
BLOCK_C = 32  # channels per program
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _tile(pid, tiles_w, H, W, TH: tl.constexpr, TW: tl.constexpr):
    """Rows, columns and in-image mask of tile `pid % tiles` and its image `pid // tiles`."""
    tiles_h = (H + TH - 1) // TH
    n = pid // (tiles_h * tiles_w)
    t = pid % (tiles_h * tiles_w)
    p = tl.arange(0, TH * TW)
    rows = (t // tiles_w) * TH + p // TW
    cols = (t % tiles_w) * TW + p % TW
    return n, rows, cols, (rows < H) & (cols < W)


@triton.jit
def _offsets(n, rows, cols, chans, H, W, C):
    """NHWC element offsets (int64) of a [pixels, channels] tile."""
    pix = (n.to(tl.int64) * H + rows) * W + cols
    return pix[:, None] * C + chans[None, :]


@triton.jit
def _tap_weights(w_ptr, chans, cmask, tap, K: tl.constexpr):
    """The three branches' weights of one tap, [1, channels] float32, read from the fused
    (3C, 1, k, k) weight (channel 3c + branch)."""
    row = w_ptr + chans * (3 * K * K) + tap
    wa = tl.load(row, mask=cmask, other=0.0).to(tl.float32)[None, :]
    wb = tl.load(row + K * K, mask=cmask, other=0.0).to(tl.float32)[None, :]
    wc = tl.load(row + 2 * K * K, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return wa, wb, wc


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, a_ptr, b_ptr, c_ptr,
    H, W, C, tiles_w,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    WANT_Y: tl.constexpr, WANT_A: tl.constexpr, WANT_B: tl.constexpr, WANT_C: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    n, rows, cols, inside = _tile(tl.program_id(0), tiles_w, H, W, TH, TW)
    chans = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = chans < C
    acc_a = tl.zeros((TH * TW, BC), tl.float32)
    acc_b = tl.zeros((TH * TW, BC), tl.float32)
    acc_c = tl.zeros((TH * TW, BC), tl.float32)
    pad: tl.constexpr = K // 2
    for tap in range(K * K):
        r = rows + (tap // K - pad)
        s = cols + (tap % K - pad)
        ok = (r >= 0) & (r < H) & (s >= 0) & (s < W)
        mask = ok[:, None] & cmask[None, :]
        xv = tl.load(x_ptr + _offsets(n, r, s, chans, H, W, C), mask=mask, other=0.0)
        xv = xv.to(tl.float32)
        wa, wb, wc = _tap_weights(w_ptr, chans, cmask, tap, K)
        acc_a += xv * wa
        acc_b += xv * wb
        acc_c += xv * wc
    if HAS_BIAS:  # the fused (3C) bias: channel 3c + branch
        acc_a += tl.load(bias_ptr + 3 * chans, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_b += tl.load(bias_ptr + 3 * chans + 1, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_c += tl.load(bias_ptr + 3 * chans + 2, mask=cmask, other=0.0).to(tl.float32)[None, :]
    offs = _offsets(n, rows, cols, chans, H, W, C)
    mask = inside[:, None] & cmask[None, :]
    if WANT_Y:
        y = acc_a * acc_b + acc_c
        if HAS_RES:
            y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if WANT_A:
        tl.store(a_ptr + offs, acc_a.to(a_ptr.dtype.element_ty), mask=mask)
    if WANT_B:
        tl.store(b_ptr + offs, acc_b.to(b_ptr.dtype.element_ty), mask=mask)
    if WANT_C:
        tl.store(c_ptr + offs, acc_c.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_sums_kernel(
    x_ptr, a_ptr, b_ptr, g_ptr, ga_ptr, gb_ptr, dw_ptr, db_ptr,
    H, W, C, tiles_w,
    K: tl.constexpr, STORE_G: tl.constexpr, WANT_SUMS: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Pass 1 over one band of TH rows (all its tiles): ga, gb and the partial sums.

    dw_ptr: the band's (k * k, 3, C) weight-gradient sums; db_ptr: its (3, C) bias sums.
    """
    band = tl.program_id(0)
    chans = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = chans < C
    dw_band = dw_ptr + band.to(tl.int64) * (K * K * 3 * C) + chans
    db_band = db_ptr + band.to(tl.int64) * (3 * C) + chans
    pad: tl.constexpr = K // 2
    sum_a = tl.zeros((BC,), tl.float32)
    sum_b = tl.zeros((BC,), tl.float32)
    sum_g = tl.zeros((BC,), tl.float32)
    for tw in range(tiles_w):
        n, rows, cols, inside = _tile(band * tiles_w + tw, tiles_w, H, W, TH, TW)
        offs = _offsets(n, rows, cols, chans, H, W, C)
        mask = inside[:, None] & cmask[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ga = g * tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gb = g * tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if STORE_G:
            tl.store(ga_ptr + offs, ga.to(ga_ptr.dtype.element_ty), mask=mask)
            tl.store(gb_ptr + offs, gb.to(gb_ptr.dtype.element_ty), mask=mask)
        if WANT_SUMS:
            sum_a += tl.sum(ga, 0)
            sum_b += tl.sum(gb, 0)
            sum_g += tl.sum(g, 0)
            for tap in range(K * K):
                r = rows + (tap // K - pad)
                s = cols + (tap % K - pad)
                ok = (r >= 0) & (r < H) & (s >= 0) & (s < W) & inside
                xm = ok[:, None] & cmask[None, :]
                xv = tl.load(x_ptr + _offsets(n, r, s, chans, H, W, C), mask=xm, other=0.0)
                xv = xv.to(tl.float32)
                row = dw_band + tap * 3 * C
                tl.store(row, tl.load(row, mask=cmask) + tl.sum(xv * ga, 0), mask=cmask)
                tl.store(row + C, tl.load(row + C, mask=cmask) + tl.sum(xv * gb, 0), mask=cmask)
                tl.store(
                    row + 2 * C, tl.load(row + 2 * C, mask=cmask) + tl.sum(xv * g, 0), mask=cmask
                )
    if WANT_SUMS:
        tl.store(db_band, sum_a, mask=cmask)
        tl.store(db_band + C, sum_b, mask=cmask)
        tl.store(db_band + 2 * C, sum_g, mask=cmask)


@triton.jit
def _backward_input_kernel(
    ga_ptr, gb_ptr, g_ptr, w_ptr, dx_ptr,
    H, W, C, tiles_w,
    K: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Pass 2: dx = convT(Wa, ga) + convT(Wb, gb) + convT(Wc, g) on one tile."""
    n, rows, cols, inside = _tile(tl.program_id(0), tiles_w, H, W, TH, TW)
    chans = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = chans < C
    acc = tl.zeros((TH * TW, BC), tl.float32)
    pad: tl.constexpr = K // 2
    for tap in range(K * K):
        r = rows - (tap // K - pad)
        s = cols - (tap % K - pad)
        ok = (r >= 0) & (r < H) & (s >= 0) & (s < W)
        mask = ok[:, None] & cmask[None, :]
        offs = _offsets(n, r, s, chans, H, W, C)
        wa, wb, wc = _tap_weights(w_ptr, chans, cmask, tap, K)
        acc += wa * tl.load(ga_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += wb * tl.load(gb_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += wc * tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    offs = _offsets(n, rows, cols, chans, H, W, C)
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=inside[:, None] & cmask[None, :])


def _check(x: torch.Tensor, weight: torch.Tensor, what: str) -> int:
    """Validate x and the fused weight; returns k."""
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{what}: x must be a channels-last 4-D map, got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{what}: x must be float32, bfloat16 or float16, got {x.dtype}")
    c, k = x.shape[1], weight.shape[-1]
    if weight.shape != (3 * c, 1, k, k) or k % 2 == 0:
        raise ValueError(
            f"{what}: weight must be (3C, 1, k, k) with odd k for C={c}, got {tuple(weight.shape)}"
        )
    return k


def _like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)


def _on(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """x's GPU as the current device while launching (Triton launches on the current one)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _grid(x: torch.Tensor) -> tuple[tuple[int, int], int]:
    n, c, h, w = x.shape
    tiles_w = triton.cdiv(w, TILE_W)
    return (n * triton.cdiv(h, TILE_H) * tiles_w, triton.cdiv(c, BLOCK_C)), tiles_w


def quadratic_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    want_y: bool,
    want_a: bool,
    want_b: bool,
    want_c: bool,
    residual: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The requested ones of [y, a, b, c] (y = a * b + c, plus `residual` when given)."""
    k = _check(x, weight, "quadratic_forward")
    if residual is not None and (
        residual.shape != x.shape or not residual.is_contiguous(memory_format=torch.channels_last)
    ):
        raise ValueError("quadratic_forward: residual must be a channels-last map of x's shape")
    wanted = (want_y, want_a, want_b, want_c)
    outs = [_like(x) if want else None for want in wanted]
    if x.numel() > 0 and any(wanted):
        grid, tiles_w = _grid(x)
        w, b = weight.detach().contiguous(), None if bias is None else bias.detach()
        dummy = outs[wanted.index(True)]  # never touched where its flag is off
        with _on(x):
            wrap_triton(_forward_kernel)[grid](
                x, w, w if b is None else b, dummy if residual is None else residual,
                *(dummy if t is None else t for t in outs),
                x.shape[2], x.shape[3], x.shape[1], tiles_w,
                K=k, HAS_BIAS=b is not None, HAS_RES=residual is not None,
                WANT_Y=want_y, WANT_A=want_a, WANT_B=want_b, WANT_C=want_c,
                TH=TILE_H, TW=TILE_W, BC=BLOCK_C,
            )  # fmt: skip
    return [t for t in outs if t is not None]


def quadratic_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    grad: torch.Tensor,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> list[torch.Tensor]:
    """The requested ones of [dx, dweight, dbias] of y = a * b + c, given a, b and dL/dy."""
    k = _check(x, weight, "quadratic_backward")
    cl = torch.channels_last
    a, b, grad = (t.to(x.dtype).contiguous(memory_format=cl) for t in (a, b, grad))
    n, c, h, w_ = x.shape
    tiles_h = triton.cdiv(h, TILE_H)
    bands = n * tiles_h
    want_sums = need_dw or need_db
    ga = _like(x) if need_dx else None
    gb = _like(x) if need_dx else None
    dw_parts = x.new_zeros((bands, k * k, 3, c), dtype=torch.float32) if want_sums else None
    db_parts = x.new_zeros((bands, 3, c), dtype=torch.float32) if want_sums else None
    outs: list[torch.Tensor] = []
    if x.numel() > 0 and (need_dx or want_sums):
        grid, tiles_w = _grid(x)
        dummy = x  # never touched where its flag is off
        with _on(x):
            wrap_triton(_backward_sums_kernel)[(bands, grid[1])](
                x, a, b, grad,
                dummy if ga is None else ga, dummy if gb is None else gb,
                dummy if dw_parts is None else dw_parts, dummy if db_parts is None else db_parts,
                h, w_, c, tiles_w,
                K=k, STORE_G=need_dx, WANT_SUMS=want_sums, TH=TILE_H, TW=TILE_W, BC=BLOCK_C,
            )  # fmt: skip
            if need_dx:
                dx = _like(x)
                wrap_triton(_backward_input_kernel)[grid](
                    ga, gb, grad, weight.detach().contiguous(), dx, h, w_, c, tiles_w,
                    K=k, TH=TILE_H, TW=TILE_W, BC=BLOCK_C,
                )  # fmt: skip
                outs.append(dx)
    elif need_dx:
        outs.append(torch.zeros_like(x, memory_format=cl))
    if need_dw:  # (bands, k * k, 3, C) -> fused (3C, 1, k, k); no bands sum to zeros
        outs.append(dw_parts.sum(0).permute(2, 1, 0).reshape(weight.shape).to(weight.dtype))
    if need_db:
        outs.append(db_parts.sum(0).t().reshape(-1).to(weight.dtype))
    return outs
