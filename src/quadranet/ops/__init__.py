"""Kernel boundary: the depthwise quadratic conv and the choice of its backend.

`quadratic_dwconv` is the one entry point the layers call. It runs the custom operator
`torch.ops.quadranet.quadratic_dwconv` (`quadranet.ops.library`), whose backend (C++ on
CPU, Triton on CUDA, or the ATen reference) `quadranet.ops.policy.choose` picks; with
`QUADRANET_KERNELS=off` (or `kernels("off")`) it runs the reference with plain autograd,
so traced graphs hold only standard ATen ops. `explain(model, x)` says which backend each
layer uses and why.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from quadranet.ops import library, mlp, policy, reference
from quadranet.ops.policy import Choice, KernelError, choose, kernels, mode

__all__ = [
    "Choice",
    "Explanation",
    "channel_mlp",
    "KernelError",
    "choose",
    "explain",
    "kernels",
    "library",
    "mlp",
    "mode",
    "quadratic_dwconv",
]

_recording = threading.local()
CACHE_TAG_PREFIX = "quadranet-ops-"


def code_digest(paths: Iterable[Path]) -> str:
    """A digest of the files' names and contents."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def tag_compile_caches() -> str:
    """Add a digest of this package's operator code to torch.compile's cache key tag.

    AOTAutograd's on-disk cache keys a graph by the names of the custom ops in it, not by
    what their Python bodies, autograd formulas or C++ schemas do: after an upgrade of
    these files a graph compiled earlier would run the old code (or fail on a changed
    schema). With the digest in the tag such a graph misses the cache instead. A tag the
    user set is kept. Returns the tag."""
    here = Path(__file__).parent
    files = [p for p in (*here.glob("*.py"), *here.glob("csrc/*")) if p.is_file()]
    mark = CACHE_TAG_PREFIX + code_digest(files)
    config = torch.compiler.config
    if mark not in config.cache_key_tag:
        config.cache_key_tag = f"{config.cache_key_tag},{mark}".lstrip(",")
    return config.cache_key_tag


tag_compile_caches()


def _record(x: torch.Tensor, choice: Callable[[], Choice]) -> None:
    """Note x's shape and the backend choice while `explain` runs."""
    log = getattr(_recording, "log", None)
    if log is not None:
        log.append((f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}", choice()))


def quadratic_dwconv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gamma: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | None = None,
    dilation: int | tuple[int, int] = 1,
    keep_branches: bool = True,
) -> torch.Tensor:
    """gamma * ((Wa * x + ba) * (Wb * x + bb) + Wc * x + bc) (+ residual), depthwise.

    `weight` is the fused (3C, 1, kh, kw) tensor (channel 3c + branch), `bias` the fused
    (3C) bias, `gamma` an optional (C) layer scale; padding None keeps the map size.
    `keep_branches=False` keeps only x for backward and recomputes the branches there.
    Under autocast the op runs in autocast's dtype (weights stay as they are), else in x's.
    """
    stride, dilation = _pair(stride), _pair(dilation)
    if padding is None:
        kh, kw = weight.shape[-2:]
        padding = (dilation[0] * (kh - 1) // 2, dilation[1] * (kw - 1) // 2)
    padding = _pair(padding)
    dtype = _autocast_dtype(x)
    if dtype is not None and dtype != x.dtype:
        x = x.to(dtype)
    _record(x, lambda: choose(x, weight, stride, padding, dilation))
    if mode() == "off":
        return reference.forward(x, weight, bias, gamma, residual, stride, padding, dilation)[0]
    keep = keep_branches and torch.is_grad_enabled()
    y, _, _ = torch.ops.quadranet.quadratic_dwconv(
        x, weight, bias, gamma, residual, stride, padding, dilation, keep
    )
    return y


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """Autocast's dtype for x's device when autocast is on there (None while FX traces)."""
    if not isinstance(x, torch.Tensor) or x.device.type not in ("cpu", "cuda"):
        return None
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def channel_mlp(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    gamma: torch.Tensor | None = None,
    residual: bool = False,
) -> torch.Tensor:
    """gamma * fc2(GELU(fc1(LayerNorm(x)))) (+ x where `residual`) over the last dim of x,
    as one operator (the chunked C++ kernels where they pay); keeps x, fc1's output and LN's
    statistics for backward. Under autocast, LayerNorm runs in x's dtype and the products in
    autocast's (the weights cast per call, as autocast casts them), so fc1's output is kept
    in the low dtype. With `QUADRANET_KERNELS=off`, plain PyTorch ops with autograd."""
    _record(x, lambda: policy.choose_mlp(x, w1))
    if mode() == "off":  # plain ops
        # fc1's width, not x's: a constant even when the model is traced for ONNX
        n = F.layer_norm(x, (w1.shape[1],), ln_weight, ln_bias, eps)
        y = F.linear(F.gelu(F.linear(n, w1, b1)), w2, b2)
        y = y if gamma is None else y * gamma
        return y + x if residual else y
    keep = torch.is_grad_enabled()
    dtype = _autocast_dtype(x)
    if dtype is None:
        args = (x, ln_weight, ln_bias, eps, w1, b1, w2, b2, gamma, keep, residual)
        return torch.ops.quadranet.channel_mlp(*args)[0]
    # autocast: what it would do (LayerNorm in x's dtype, products in its dtype), in the op
    low = [None if t is None else t.to(dtype) for t in (w1, b1, w2, b2, gamma)]
    with torch.autocast(x.device.type, enabled=False):
        args = (x, ln_weight, ln_bias, eps, *low, keep, residual)
        return torch.ops.quadranet.channel_mlp(*args)[0]


@dataclass
class Explanation:
    """Which backend each quadratic conv and channel MLP of a model uses, in call order."""

    rows: list[tuple[str, str, str, str]]  # (module, input, backend, reason)

    def backends(self) -> dict[str, str]:
        """Module name -> backend."""
        return {name: backend for name, _, backend, _ in self.rows}

    def __str__(self) -> str:
        lines = ["| module | input | backend | why |", "|---|---|---|---|"]
        lines += [f"| {m} | {i} | {b} | {r} |" for m, i, b, r in self.rows]
        return "\n".join(lines)


def explain(model: nn.Module, x: torch.Tensor) -> Explanation:
    """Run `model(x)` once without gradients and report the backend of each quadratic conv
    (rows named by block) and channel MLP (rows named `....mlp`)."""
    names = {module: name for name, module in model.named_modules()}
    stack: list[str] = []

    class Log(list):
        def append(self, entry: tuple[str, Choice]) -> None:
            shape, choice = entry
            super().append((stack[-1] if stack else "", shape, choice.backend, choice.reason))

    def enter(module: nn.Module, args: tuple) -> None:
        stack.append(names.get(module) or type(module).__name__)

    def leave(module: nn.Module, args: tuple, out: object) -> None:
        stack.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    log = _recording.log = Log()
    try:
        with torch.no_grad():
            model(x)
    finally:
        _recording.log = None
        for handle in handles:
            handle.remove()
    return Explanation(list(log))
