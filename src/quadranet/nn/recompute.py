"""What a residual branch keeps for backward: the one recompute setting of the family.

- `none`: plain autograd, every intermediate is kept;
- `cheap` (the default of QuadraNet, its NAS blocks and the quadratic layers): each
  operator keeps what its own backward needs and recomputes the cheap rest: the channel MLP
  op keeps its input, fc1's output and LayerNorm's statistics and recomputes LayerNorm and
  GELU; the quadratic conv keeps its branches a and b;
- `full`: each branch keeps only its input and recomputes everything in backward
  (activation checkpointing).

All three give the same gradients. Recomputation runs only in training with gradients on.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from quadranet.ops import policy  # (also registers torch.ops.quadranet)


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


def _with_setting(fn: Callable, setting: tuple, x: torch.Tensor) -> torch.Tensor:
    with policy.kernels(*setting):
        return fn(x)


def run_branch(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, recompute: Recompute
) -> torch.Tensor:
    """fn(x), keeping only x for backward (recomputing fn there) when `recompute` is full."""
    if recompute is not Recompute.FULL or not torch.is_grad_enabled():
        return fn(x)
    # the recomputation may run on another thread (CUDA's autograd workers): it must take
    # the route the forward took, so it runs under this thread's kernel setting
    fn = partial(_with_setting, fn, (policy.mode(), policy.forced_backend()))
    return checkpoint(fn, x, use_reentrant=False)
