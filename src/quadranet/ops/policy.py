"""The one place that decides which backend computes a depthwise quadratic conv.

Backends:
- "cpu": the C++ kernels (`quadranet.ops.cpu`), float32 CPU tensors;
- "triton": the Triton kernels (`quadranet.ops.triton_kernels`), float32/bfloat16/float16
  CUDA tensors;
- "reference": three ATen depthwise convolutions (`quadranet.ops.reference`), any input.
Both kernels take channels-last 4-D maps, a square odd kernel, stride 1, dilation 1 and
'same' padding; anything else runs the reference.

The switch: `QUADRANET_KERNELS=auto` (default: kernels where they apply, else the
reference), `off` (the reference everywhere, and no custom op in traced graphs, e.g. for
ONNX), `require` (an error wherever no kernel applies). It is read once per process;
`kernels(mode)` overrides it for the current thread. `explain` reports the choice.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Literal, NamedTuple

import torch

from quadranet.ops import cpu

Mode = Literal["auto", "off", "require"]
MODES = ("auto", "off", "require")
ENV_VAR = "QUADRANET_KERNELS"
Backend = Literal["cpu", "triton", "reference"]
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Choice(NamedTuple):
    """The backend of one call and why."""

    backend: Backend
    reason: str


class KernelError(RuntimeError):
    """QUADRANET_KERNELS=require, but no kernel applies to an input."""


def _env_mode() -> Mode:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(
            f"{ENV_VAR}={value!r}: use auto (kernels where they apply), off (plain PyTorch "
            "everywhere) or require (an error where no kernel applies)"
        )
    return value  # type: ignore[return-value]


_ENV_MODE: Mode | None = None
_local = threading.local()


def mode() -> Mode:
    """The kernel mode in effect on this thread."""
    global _ENV_MODE
    override = getattr(_local, "mode", None)
    if override is not None:
        return override
    if _ENV_MODE is None:
        _ENV_MODE = _env_mode()
    return _ENV_MODE


def forced_backend() -> Backend | None:
    """The backend forced by `kernels(..., backend=...)` on this thread, if any."""
    return getattr(_local, "backend", None)


@contextlib.contextmanager
def kernels(mode: Mode = "auto", backend: Backend | None = None) -> Iterator[None]:
    """Override the kernel mode on this thread inside a block.

    `backend` forces one backend wherever the shapes allow it (tests run the Triton
    kernels on CPU tensors in Triton's interpreter this way). Under `torch.compile` the
    mode in effect while the model is traced is the one compiled in.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    previous = getattr(_local, "mode", None), getattr(_local, "backend", None)
    _local.mode, _local.backend = mode, backend
    try:
        yield
    finally:
        _local.mode, _local.backend = previous


def _shape_reason(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> str | None:
    """Why the kernels cannot take this call, or None when its geometry fits them."""
    k = weight.shape[-1]
    if x.dim() != 4:
        return f"input is {x.dim()}-D, the kernels take 4-D maps"
    if weight.shape[-2] != k or k % 2 == 0:
        return f"kernel {tuple(weight.shape[-2:])} is not square and odd"
    if tuple(stride) != (1, 1) or tuple(dilation) != (1, 1) or tuple(padding) != (k // 2,) * 2:
        return "the kernels take stride 1, dilation 1 and 'same' padding only"
    if not x.is_contiguous(memory_format=torch.channels_last):
        return "input is not channels-last (use model.to(memory_format=torch.channels_last))"
    return None


def _kernel_choice(x: torch.Tensor, backend: Backend | None) -> Choice:
    """The kernel for x's device and dtype, or the reference with the reason."""
    device = x.device.type
    if backend == "triton" or (backend is None and device == "cuda"):
        try:
            from quadranet.ops import triton_kernels  # noqa: F401
        except ImportError as err:
            return Choice("reference", f"Triton does not import ({err})")
        if x.dtype not in TRITON_DTYPES:
            return Choice("reference", f"the Triton kernels take {TRITON_DTYPES}, not {x.dtype}")
        return Choice("triton", "Triton kernels")
    if backend == "cpu" or (backend is None and device == "cpu"):
        if device != "cpu" or x.dtype != torch.float32:
            return Choice("reference", f"the C++ kernels take float32 CPU maps, not {x.dtype}")
        ops, error = cpu.load()
        if ops is None:
            return Choice("reference", error)
        return Choice("cpu", "C++ kernels")
    return Choice("reference", f"no kernel for {device} tensors")


MLP_MAX_CHANNELS = 128  # wider maps: the whole-tensor products beat the chunked kernels
MLP_MIN_HIDDEN = 1 << 22  # values of hidden activation below which it stays in cache anyway


def choose_mlp(x: torch.Tensor, w1: torch.Tensor) -> Choice:
    """The backend of the channel MLP op on x (..., C) with fc1's weight `w1` (hidden, C)."""
    if mode() == "off":
        return Choice("reference", f"kernels off ({ENV_VAR}=off)")
    if forced_backend() not in (None, "cpu"):
        return Choice("reference", f"backend {forced_backend()} forced")
    fp32 = x.dtype == w1.dtype == torch.float32
    if x.device.type != "cpu" or not fp32 or not x.is_contiguous():
        return Choice("reference", "the chunked MLP takes contiguous float32 CPU maps and weights")
    c, hidden = x.shape[-1], w1.shape[0]
    if c > MLP_MAX_CHANNELS or x.numel() // max(c, 1) * hidden < MLP_MIN_HIDDEN:
        return Choice("reference", "whole-tensor products are faster at this shape")
    ops, error = cpu.load()
    return Choice("reference", error) if ops is None else Choice("cpu", "C++ chunked MLP")


def choose(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] | None = None,
    dilation: tuple[int, int] = (1, 1),
) -> Choice:
    """The backend that computes a depthwise quadratic conv of x with `weight`, and why."""
    current = mode()
    if current == "off":
        return Choice("reference", f"kernels off ({ENV_VAR}=off)")
    if padding is None:
        padding = (weight.shape[-1] // 2,) * 2
    reason = _shape_reason(x, weight, stride, padding, dilation)
    choice = Choice("reference", reason) if reason else _kernel_choice(x, forced_backend())
    if current == "require" and choice.backend == "reference":
        raise KernelError(
            f"{ENV_VAR}=require but no kernel applies: {choice.reason}; fix the input or "
            f"set {ENV_VAR}=auto to fall back to PyTorch's convolutions"
        )
    return choice
