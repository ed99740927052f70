"""Triton kernels of the depthwise quadratic conv (CUDA), with the C++ CPU ops' interface.

`quadratic_forward` and `quadratic_backward` take and return what the CPU ops of
`quadranet.ops.cpu` do, so `quadranet.ops.library` calls either. Launches go through
`torch.library.wrap_triton`, so under `torch.compile` inductor sees the kernels. Inputs are
channels-last (NHWC memory) float32, bfloat16 or float16 maps; the fused weight is
(3C, 1, k, k) with channel 3c + branch, odd k, stride 1, 'same' padding. Weight, bias and
layer scale are read as they are (float32 with any map dtype: no per-call casts or
folding); sums run in float32; outputs keep x's dtype, weight gradients the weight's.

- forward: y = gamma (a b + c) (+ residual), a, b, c the three depthwise branches; a is
  kept with gamma folded in (the specification's a), b as it is;
- backward, weight gradient: each program owns a range of image rows and a block of
  channels and walks its pixels one at a time, adding x's k x k neighbourhood times
  [g b, g a, g] into per-tap register accumulators (a constant-one row gives the bias
  sums); g b and g a are formed on the fly, nothing is reduced across threads inside the
  loop, and each program writes its partial sums once (no atomics: deterministic);
- backward, finish: one small kernel turns the summed partials into dW, db and dgamma
  (dW = s dW', dgamma = <Wa, dW'a> + ba db'a + <Wc, dW'c> + bc db'c, s = gamma on a, c);
- backward, input gradient: dx = sum over taps of g (W'a b + Wb a + W'c) at the mirrored
  offset, again with the products formed on the fly.
Tile shapes are autotuned per map shape and dtype (one fixed tile under the interpreter).

The kernels also run on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`,
set before Triton is imported), which is how the CPU test suite checks them.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# QUADRANET_TRITON_AUTOTUNE=0: always the first tile (no timing on first use, e.g. in tests)
AUTOTUNE = not INTERPRET and os.environ.get("QUADRANET_TRITON_AUTOTUNE", "1") != "0"


def _configs(tiles: list[tuple[dict[str, int], int]]) -> list[triton.Config]:
    """Autotuning candidates, (tile, warps) each; only the first without autotuning (the
    interpreter cannot time)."""
    return [triton.Config(t, num_warps=w) for t, w in (tiles if AUTOTUNE else tiles[:1])]


TILE_CONFIGS = _configs([
    (dict(TH=8, TW=8, BC=32), 4),
    (dict(TH=4, TW=16, BC=32), 4),
    (dict(TH=8, TW=8, BC=64), 8),
    (dict(TH=4, TW=8, BC=64), 4),
])  # fmt: skip
GRAD_CONFIGS = _configs([(dict(BC=32), 4), (dict(BC=16), 2), (dict(BC=64), 8), (dict(BC=32), 2)])
TUNE = dict(cache_results=True)  # timings kept on disk with Triton's cache


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


@triton.autotune(configs=TILE_CONFIGS, key=["H", "W", "C", "K"], **TUNE)
@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, res_ptr, y_ptr, a_ptr, b_ptr,
    H, W, C,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_RES: tl.constexpr,
    WANT_Y: tl.constexpr, WANT_AB: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    n, rows, cols, inside = _tile(tl.program_id(0), tl.cdiv(W, TW), H, W, TH, TW)
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
    if HAS_GAMMA:  # gamma (a b + c) = (gamma a) b + gamma c
        gamma = tl.load(gamma_ptr + chans, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_a *= gamma
        acc_c *= gamma
    offs = _offsets(n, rows, cols, chans, H, W, C)
    mask = inside[:, None] & cmask[None, :]
    if WANT_Y:
        y = acc_a * acc_b + acc_c
        if HAS_RES:
            y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if WANT_AB:
        tl.store(a_ptr + offs, acc_a.to(a_ptr.dtype.element_ty), mask=mask)
        tl.store(b_ptr + offs, acc_b.to(b_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=GRAD_CONFIGS, key=["H", "W", "C", "K", "ROWS"], **TUNE)
@triton.jit
def _weight_grad_kernel(
    x_ptr, a_ptr, b_ptr, g_ptr, part_ptr,
    H, W, C, ROWS, rows_per_program,
    K: tl.constexpr, TAPS: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Partial sums of one range of image rows (over all images: row n * H + h) and one
    channel block: part[program] = (3, TAPS, C) sums of x(p + tap) [g b, g a, g](p), the
    row tap == K * K holding the plain sums of [g b, g a, g] (the bias gradient)."""
    prog = tl.program_id(0)
    chans = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = chans < C
    taps = tl.arange(0, TAPS)
    pad: tl.constexpr = K // 2
    dr = taps // K - pad
    ds = taps % K - pad
    is_tap = taps < K * K
    ones = (taps == K * K)[:, None]
    acc_a = tl.zeros((TAPS, BC), tl.float32)
    acc_b = tl.zeros((TAPS, BC), tl.float32)
    acc_g = tl.zeros((TAPS, BC), tl.float32)
    first = prog * rows_per_program
    last = tl.minimum(first + rows_per_program, ROWS)
    for row in range(first, last):
        n = row // H
        h = row % H
        rr = h + dr
        row_ok = is_tap & (rr >= 0) & (rr < H)
        tap_rows = (tl.cast(n, tl.int64) * H + rr) * W
        pix_row = tl.cast(row, tl.int64) * W
        for w in range(0, W):
            offs = (pix_row + w) * C + chans
            g = tl.load(g_ptr + offs, mask=cmask, other=0.0).to(tl.float32)[None, :]
            a = tl.load(a_ptr + offs, mask=cmask, other=0.0).to(tl.float32)[None, :]
            b = tl.load(b_ptr + offs, mask=cmask, other=0.0).to(tl.float32)[None, :]
            ss = w + ds
            ok = row_ok & (ss >= 0) & (ss < W)
            xoffs = (tap_rows + ss)[:, None] * C + chans[None, :]
            xv = tl.load(x_ptr + xoffs, mask=ok[:, None] & cmask[None, :], other=0.0)
            xv = tl.where(ones, 1.0, xv.to(tl.float32))
            acc_a += xv * (g * b)
            acc_b += xv * (g * a)
            acc_g += xv * g
    out = part_ptr + prog.to(tl.int64) * (3 * TAPS * C) + taps[:, None] * C + chans[None, :]
    mask = cmask[None, :] & (taps < TAPS)[:, None]
    tl.store(out, acc_a, mask=mask)
    tl.store(out + TAPS * C, acc_b, mask=mask)
    tl.store(out + 2 * TAPS * C, acc_g, mask=mask)


@triton.jit
def _finish_kernel(
    sums_ptr, w_ptr, bias_ptr, gamma_ptr, dw_ptr, db_ptr, dg_ptr,
    C,
    K: tl.constexpr, TAPS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
    WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, WANT_DG: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """dW, db and dgamma of one channel block from the summed (3, TAPS, C) partials."""
    chans = tl.program_id(0) * BC + tl.arange(0, BC)
    cmask = chans < C
    taps = tl.arange(0, TAPS)
    mask = (taps < K * K)[:, None] & cmask[None, :]
    offs = taps[:, None] * C + chans[None, :]
    da = tl.load(sums_ptr + offs, mask=mask, other=0.0)
    db = tl.load(sums_ptr + TAPS * C + offs, mask=mask, other=0.0)
    dc = tl.load(sums_ptr + 2 * TAPS * C + offs, mask=mask, other=0.0)
    ones = sums_ptr + K * K * C + chans
    ba = tl.load(ones, mask=cmask, other=0.0)
    bb = tl.load(ones + TAPS * C, mask=cmask, other=0.0)
    bc = tl.load(ones + 2 * TAPS * C, mask=cmask, other=0.0)
    w_offs = (3 * chans[None, :]) * (K * K) + taps[:, None]  # branch a; + K * K per branch
    if HAS_GAMMA:
        if WANT_DG:
            wa = tl.load(w_ptr + w_offs, mask=mask, other=0.0).to(tl.float32)
            wc = tl.load(w_ptr + w_offs + 2 * K * K, mask=mask, other=0.0).to(tl.float32)
            dg = tl.sum(wa * da, 0) + tl.sum(wc * dc, 0)
            if HAS_BIAS:
                dg += tl.load(bias_ptr + 3 * chans, mask=cmask, other=0.0).to(tl.float32) * ba
                dg += tl.load(bias_ptr + 3 * chans + 2, mask=cmask, other=0.0).to(tl.float32) * bc
            tl.store(dg_ptr + chans, dg.to(dg_ptr.dtype.element_ty), mask=cmask)
        gamma = tl.load(gamma_ptr + chans, mask=cmask, other=0.0).to(tl.float32)
        da *= gamma[None, :]
        dc *= gamma[None, :]
        ba *= gamma
        bc *= gamma
    if WANT_DW:
        ty = dw_ptr.dtype.element_ty
        tl.store(dw_ptr + w_offs, da.to(ty), mask=mask)
        tl.store(dw_ptr + w_offs + K * K, db.to(ty), mask=mask)
        tl.store(dw_ptr + w_offs + 2 * K * K, dc.to(ty), mask=mask)
    if WANT_DB:
        ty = db_ptr.dtype.element_ty
        tl.store(db_ptr + 3 * chans, ba.to(ty), mask=cmask)
        tl.store(db_ptr + 3 * chans + 1, bb.to(ty), mask=cmask)
        tl.store(db_ptr + 3 * chans + 2, bc.to(ty), mask=cmask)


@triton.autotune(configs=TILE_CONFIGS, key=["H", "W", "C", "K"], **TUNE)
@triton.jit
def _input_grad_kernel(
    g_ptr, a_ptr, b_ptr, w_ptr, gamma_ptr, dx_ptr,
    H, W, C,
    K: tl.constexpr, HAS_GAMMA: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """dx = sum over taps of g (W'a b + Wb a + W'c) at the mirrored offset, on one tile."""
    n, rows, cols, inside = _tile(tl.program_id(0), tl.cdiv(W, TW), H, W, TH, TW)
    chans = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = chans < C
    acc = tl.zeros((TH * TW, BC), tl.float32)
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + chans, mask=cmask, other=0.0).to(tl.float32)[None, :]
    pad: tl.constexpr = K // 2
    for tap in range(K * K):
        r = rows - (tap // K - pad)
        s = cols - (tap % K - pad)
        ok = (r >= 0) & (r < H) & (s >= 0) & (s < W)
        mask = ok[:, None] & cmask[None, :]
        offs = _offsets(n, r, s, chans, H, W, C)
        wa, wb, wc = _tap_weights(w_ptr, chans, cmask, tap, K)
        if HAS_GAMMA:
            wa *= gamma
            wc *= gamma
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += g * (wa * b + wb * a + wc)
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


def _tile_grid(x: torch.Tensor):  # noqa: ANN202
    """The grid of the tiled kernels for the tile sizes autotuning picks."""
    n, c, h, w = x.shape
    return lambda meta: (
        n * triton.cdiv(h, meta["TH"]) * triton.cdiv(w, meta["TW"]),
        triton.cdiv(c, meta["BC"]),
    )


@functools.cache
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU (a small stand-in under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _row_ranges(x: torch.Tensor) -> tuple[int, int]:
    """(programs, rows per program) of the weight-gradient kernel over the n * h image rows:
    about four programs per multiprocessor for each 32 channels, so the partials stay a
    small fraction of the maps."""
    n, c, h, _ = x.shape
    rows = n * h
    target = max(1, 4 * _processors(x.device) * 32 // max(c, 1))
    per = triton.cdiv(rows, min(rows, target))
    return triton.cdiv(rows, per), per


def quadratic_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    want_y: bool,
    want_ab: bool,
    residual: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """[y], [y, a, b] or [a, b]: y = gamma (a b + c) (+ `residual`), a kept with gamma in."""
    k = _check(x, weight, "quadratic_forward")
    if residual is not None and (
        residual.shape != x.shape or not residual.is_contiguous(memory_format=torch.channels_last)
    ):
        raise ValueError("quadratic_forward: residual must be a channels-last map of x's shape")
    wanted = (want_y, want_ab, want_ab)
    outs = [_like(x) if want else None for want in wanted]
    if x.numel() > 0 and any(wanted):
        dummy = outs[wanted.index(True)]  # never touched where its flag is off
        w = weight.detach()
        with _on(x):
            wrap_triton(_forward_kernel)[_tile_grid(x)](
                x, w, w if bias is None else bias.detach(), w if gamma is None else gamma.detach(),
                dummy if residual is None else residual,
                *(dummy if t is None else t for t in outs),
                x.shape[2], x.shape[3], x.shape[1],
                K=k, HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None,
                HAS_RES=residual is not None, WANT_Y=want_y, WANT_AB=want_ab,
            )  # fmt: skip
    return [t for t in outs if t is not None]


def quadratic_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    grad: torch.Tensor,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    need_dg: bool,
) -> list[torch.Tensor]:
    """The requested ones of [dx, dweight, dbias, dgamma] of y = gamma (a b + c), given the
    kept a (gamma folded in) and b and dL/dy, all channels-last in x's dtype."""
    k = _check(x, weight, "quadratic_backward")
    for name, t in (("a", a), ("b", b), ("grad", grad)):
        if (
            t.shape != x.shape
            or t.dtype != x.dtype
            or not t.is_contiguous(memory_format=torch.channels_last)
        ):
            raise ValueError(f"quadratic_backward: {name} must be a channels-last map like x")
    need_db = need_db and bias is not None
    need_dg = need_dg and gamma is not None
    n, c, h, w_ = x.shape
    w = weight.detach()
    outs: list[torch.Tensor] = []
    with _on(x):
        if need_dx:
            dx = _like(x)
            if x.numel() > 0:
                wrap_triton(_input_grad_kernel)[_tile_grid(x)](
                    grad, a, b, w, w if gamma is None else gamma.detach(), dx, h, w_, c,
                    K=k, HAS_GAMMA=gamma is not None,
                )  # fmt: skip
            else:
                dx.zero_()
            outs.append(dx)
        if need_dw or need_db or need_dg:
            taps = triton.next_power_of_2(k * k + 1)
            if x.numel() > 0:
                programs, per = _row_ranges(x)
                parts = x.new_empty((programs, 3, taps, c), dtype=torch.float32)
                wrap_triton(_weight_grad_kernel)[
                    lambda meta: (programs, triton.cdiv(c, meta["BC"]))
                ](x, a, b, grad, parts, h, w_, c, n * h, per, K=k, TAPS=taps)
                sums = parts.sum(0)
            else:
                sums = x.new_zeros((3, taps, c), dtype=torch.float32)
            dw = torch.empty_like(weight) if need_dw else None
            db = bias.new_empty(bias.shape) if need_db else None
            dg = gamma.new_empty(gamma.shape) if need_dg else None
            grid = (triton.cdiv(c, 32),)
            wrap_triton(_finish_kernel)[grid](
                sums, w, w if bias is None else bias.detach(),
                w if gamma is None else gamma.detach(),
                sums if dw is None else dw, sums if db is None else db, sums if dg is None else dg,
                c, K=k, TAPS=taps, HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None,
                WANT_DW=need_dw, WANT_DB=need_db, WANT_DG=need_dg, BC=32,
            )  # fmt: skip
            outs += [t for t in (dw, db, dg) if t is not None]
    return outs
