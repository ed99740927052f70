"""What a residual branch keeps for backward: the one recompute setting of the family.

- `none`: plain autograd, every intermediate is kept;
- `cheap` (the default of QuadraNet, its NAS blocks, adapted models and the quadratic
  layers): the outputs of the products (matrix products, convolutions, the quadratic conv
  and its branches) are kept, and norms, activations and element-wise ops are recomputed
  in backward (PyTorch's selective activation checkpointing);
- `full`: each branch keeps only its input and recomputes everything in backward.

All three give the same gradients. Recomputation runs only in training with gradients on.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable
from functools import partial

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from quadranet.ops import policy  # (also registers torch.ops.quadranet)

aten = torch.ops.aten


class Recompute(str, enum.Enum):
    """What a branch keeps for backward (see the module docstring)."""

    NONE = "none"
    CHEAP = "cheap"
    FULL = "full"

    @classmethod
    def parse(cls, value: str | Recompute) -> Recompute:
        """A setting from its name, with an error that lists the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(r.value) for r in cls)
            raise ValueError(f"recompute must be one of {choices}, got {value!r}") from None


DEFAULT_RECOMPUTE = Recompute.CHEAP
# Let what selective checkpointing keeps pass through saved-tensor hooks (so measurements
# and offloading see it) where this torch has the option.
_HOOKS = (
    {"respect_saved_tensors_hooks": True}
    if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters
    else {}
)


def _kept_ops() -> frozenset:
    """Ops whose outputs `cheap` keeps (everything else is recomputed)."""
    ops = [aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default]
    ops += [aten.convolution.default, torch.ops.quadranet.quadratic_dwconv.default]
    return frozenset(ops)


def _policy(kept: frozenset, ctx: object, func: object, *args: object, **kwargs: object):  # noqa: ANN202
    return CheckpointPolicy.MUST_SAVE if func in kept else CheckpointPolicy.PREFER_RECOMPUTE


def _with_setting(fn: Callable, setting: tuple, x: torch.Tensor) -> torch.Tensor:
    with policy.kernels(*setting):
        return fn(x)


def run_branch(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, recompute: Recompute
) -> torch.Tensor:
    """fn(x), keeping for backward what `recompute` says."""
    if recompute is Recompute.NONE or not torch.is_grad_enabled():
        return fn(x)
    # the recomputation may run on another thread (CUDA's autograd workers): it must take
    # the route the forward took, so it runs under this thread's kernel setting
    fn = partial(_with_setting, fn, (policy.mode(), policy.forced_backend()))
    if recompute is Recompute.FULL:
        return checkpoint(fn, x, use_reentrant=False)
    context = partial(create_selective_checkpoint_contexts, partial(_policy, _kept_ops()))
    return checkpoint(fn, x, use_reentrant=False, context_fn=context, **_HOOKS)
