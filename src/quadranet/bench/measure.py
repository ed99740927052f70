"""The one measurement helper used by `quadranet info` and every benchmark.

- MACs: conv and linear (and attention matmul) multiply-accumulates, counted by
  `torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2). Element-wise ops (the
  quadratic product, norms, activations) are not counted, as in HorNet/ConvNeXt papers.
- Saved bytes: what autograd keeps for backward, via
  `torch.autograd.graph.saved_tensors_hooks`, each storage counted once; parameters
  are not activations and are left out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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
