"""The one measurement helper used by `quadranet info` and every benchmark.

- MACs: conv and linear (and attention matmul) multiply-accumulates, counted by
  `torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2). Element-wise ops (the
  quadratic product, norms, activations) are not counted, as in HorNet/ConvNeXt papers.
- Saved bytes: what autograd keeps for backward, via
  `torch.autograd.graph.saved_tensors_hooks`, each storage counted once; parameters
  are not activations and are left out.
- GEMM shapes: every dense matrix product a forward (and backward) runs, recorded below
  autograd by a dispatch mode (mm, addmm, bmm, baddbmm, and convolutions that are not
  depthwise as their im2col products, and the products inside the channel-MLP operator),
  so the machine's matmul rate can be measured at exactly the shapes a model uses.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import quadranet.ops  # noqa: F401  (registers the quadranet:: ops the recorder looks for)
from quadranet.bench.runner import synchronizer

aten = torch.ops.aten


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _example_input(
    model: nn.Module, img_size: int, in_chans: int | None, batch: int
) -> torch.Tensor:
    param = next(model.parameters())
    chans = in_chans or getattr(model, "in_chans", 3)
    return torch.zeros(batch, chans, img_size, img_size, device=param.device, dtype=param.dtype)


def count_macs(model: nn.Module, img_size: int = 224, in_chans: int | None = None) -> int:
    """Multiply-accumulates of one forward pass of one image (works on the meta device)."""
    x = _example_input(model, img_size, in_chans, 1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def saved_tensor_bytes(
    fn: Callable[[], torch.Tensor], exclude: tuple[torch.Tensor, ...] = ()
) -> int:
    """Bytes autograd saves for backward while `fn()` runs (unique storages, `exclude` left out)."""
    # A storage is keyed by its C++ object, which also works on the meta device
    # (where every data pointer is 0); saved tensors stay alive, so keys are not reused.
    excluded = {t.untyped_storage()._cdata for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in excluded:
            storages[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def activation_bytes_per_image(
    model: nn.Module, img_size: int = 224, in_chans: int | None = None, batch: int = 2
) -> float:
    """Bytes autograd keeps for backward in one training step, per image (params excluded)."""
    x = _example_input(model, img_size, in_chans, batch)
    was_training = model.training
    model.train()
    try:
        total = saved_tensor_bytes(lambda: model(x), exclude=tuple(model.parameters()))
    finally:
        model.train(was_training)
    return total / batch


class GemmShape(NamedTuple):
    """A (batched) product of an (m, k) and a (k, n) matrix, `batch` times."""

    batch: int
    m: int
    k: int
    n: int

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


def _conv_gemms(
    w_shape: torch.Size, out_shape: torch.Size, groups: int, mask: list[bool]
) -> list[GemmShape]:
    """im2col products of a convolution: forward, input gradient, weight gradient (per mask)."""
    cin_g, taps = w_shape[1], math.prod(w_shape[2:])
    cout_g = w_shape[0] // groups
    if cin_g == 1:
        return []  # depthwise: per-channel, not a matrix product
    pixels_out = out_shape[0] * math.prod(out_shape[2:])
    products = (
        GemmShape(groups, pixels_out, cin_g * taps, cout_g),  # forward
        GemmShape(groups, pixels_out, cout_g, cin_g * taps),  # input gradient (then col2im)
        GemmShape(groups, cout_g, pixels_out, cin_g * taps),  # weight gradient
    )
    return [p for p, wanted in zip(products, mask) if wanted]


def _mlp_gemms(x_shape: torch.Size, w1_shape: torch.Size, backward: bool) -> list[GemmShape]:
    """The products inside `quadranet::channel_mlp` (fc1, fc2) or its backward (both
    gradients of both), which a dispatch mode sees as one op."""
    rows, c, hidden = math.prod(x_shape[:-1]), x_shape[-1], w1_shape[0]
    if not backward:
        return [GemmShape(1, rows, c, hidden), GemmShape(1, rows, hidden, c)]
    return [
        GemmShape(1, c, rows, hidden),  # fc2's weight gradient
        GemmShape(1, rows, c, hidden),  # fc2's input gradient
        GemmShape(1, hidden, rows, c),  # fc1's weight gradient
        GemmShape(1, rows, hidden, c),  # fc1's input gradient
    ]


class _GemmRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: Counter[GemmShape] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet in (aten.mm, aten.addmm):
            a, b = args[-2], args[-1]
            self.shapes[GemmShape(1, a.shape[0], a.shape[1], b.shape[1])] += 1
        elif packet in (aten.bmm, aten.baddbmm):
            a, b = args[-2], args[-1]
            self.shapes[GemmShape(a.shape[0], a.shape[1], a.shape[2], b.shape[2])] += 1
        elif packet == aten.convolution and not args[6]:  # not transposed
            for g in _conv_gemms(args[1].shape, out.shape, args[8], [True]):
                self.shapes[g] += 1
        elif packet == aten.convolution_backward and not args[7]:
            grad_out, w, groups, mask = args[0], args[2], args[9], args[10]
            for g in _conv_gemms(w.shape, grad_out.shape, groups, [False, *mask[:2]]):
                self.shapes[g] += 1
        elif packet == torch.ops.quadranet.channel_mlp:
            for g in _mlp_gemms(args[0].shape, args[4].shape, backward=False):
                self.shapes[g] += 1
        elif packet == torch.ops.quadranet.channel_mlp_backward:
            for g in _mlp_gemms(args[1].shape, args[8].shape, backward=True):
                self.shapes[g] += 1
        return out


def record_gemms(fn: Callable[[], object]) -> Counter[GemmShape]:
    """The dense matrix products `fn()` runs, with their counts (works on the meta device)."""
    with _GemmRecorder() as recorder:
        fn()
    return recorder.shapes


def gemm_seconds(
    shapes: Iterable[tuple[tuple[int, int, int, int], int]],
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    device: str | torch.device = "cpu",
) -> float:
    """Seconds this process needs for the given (shape, count) matrix products alone.

    Each shape is timed `repeats` times after one warm-up call; the best time counts.
    On CUDA the clock is read after the device has finished the product.
    """
    device = torch.device(device)
    sync = synchronizer(device)
    total = 0.0
    gen = torch.Generator(device).manual_seed(0)
    for shape, count in shapes:
        shape = GemmShape(*shape)
        a = torch.randn(shape.batch, shape.m, shape.k, generator=gen, device=device).to(dtype)
        b = torch.randn(shape.batch, shape.k, shape.n, generator=gen, device=device).to(dtype)
        out = torch.empty(shape.batch, shape.m, shape.n, dtype=dtype, device=device)
        torch.bmm(a, b, out=out)
        sync()
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            torch.bmm(a, b, out=out)
            sync()
            best = min(best, time.perf_counter() - start)
        total += best * count
    return total
