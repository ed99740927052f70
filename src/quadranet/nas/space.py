"""Search spaces and the supernet: mixed ops with architecture logits and binary gates.

A space is the QuadraNet macro skeleton (stem, stages of fixed widths, downsamples, head)
with a maximum depth per stage; every position chooses one candidate block, and every
position but a stage's first may also choose `identity` (the stage gets shallower).

The supernet holds every candidate at every position. Before each forward pass the search
sets how each mixed op runs (ProxylessNAS):

- ``"sample"``: one path drawn from softmax(alpha) runs; alpha gets no gradient (weight steps);
- ``"one_path"``: one drawn path runs, scaled by a binary gate g = 1 whose gradient flows to
  alpha through p = softmax(alpha) (straight-through: the value is g, the gradient dp/dalpha);
- ``"two_path"``: two paths drawn without replacement both run, the output is the one the
  binary gates select, and the gradient reaches the two logits through probabilities
  renormalised over the pair: dL/dalpha_i = sum_j dL/dg_j p_j (delta_ij - p_i);
- ``"argmax"``: the most likely path runs (evaluation, derivation).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quadranet.models.quadranet import QuadraNet
from quadranet.models.quadranet_nas import IDENTITY, SPACES, Arch, make_block, parse_block
from quadranet.nn.recompute import DEFAULT_RECOMPUTE

MODES = ("sample", "one_path", "two_path", "argmax")
DEFAULT_KERNELS = (3, 5, 7)
DEFAULT_EXPANSIONS = {"quadra": (2, 4), "mbconv": (3, 6)}


@dataclass(frozen=True)
class SearchSpace:
    """The macro skeleton, the candidate blocks, and the input the network is searched for."""

    kind: str = "quadra"
    dims: tuple[int, ...] = (16, 32, 64, 128)
    max_depths: tuple[int, ...] = (2, 2, 4, 2)
    stem_stride: int = 1
    kernel_sizes: tuple[int, ...] = DEFAULT_KERNELS
    expansions: tuple[int, ...] | None = None
    img_size: int = 28
    in_chans: int = 1
    num_classes: int = 10

    def __post_init__(self) -> None:
        for name in ("dims", "max_depths", "kernel_sizes"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.kind not in SPACES:
            raise ValueError(f"space must be one of {list(SPACES)}, got {self.kind!r}")
        if self.expansions is None:
            object.__setattr__(self, "expansions", DEFAULT_EXPANSIONS[self.kind])
        object.__setattr__(self, "expansions", tuple(int(v) for v in self.expansions))
        if len(self.dims) != len(self.max_depths):
            raise ValueError(
                f"space dims {self.dims} and max_depths {self.max_depths} differ in length"
            )
        if any(d < 1 for d in self.max_depths) or any(d < 1 for d in self.dims):
            raise ValueError(
                f"space dims and max_depths must be >= 1, got {self.dims}, {self.max_depths}"
            )
        if min(self.stage_sizes) < 1:
            raise ValueError(
                f"img_size {self.img_size} leaves no pixels after stage {len(self.dims)} "
                f"(stem stride {self.stem_stride}, {len(self.dims) - 1} downsamples); "
                "use a larger img_size, fewer stages"
                + (" or stem_stride=1" if self.stem_stride > 1 else "")
            )
        for name in self.candidates:
            parse_block(name, where="search space")  # odd kernels, expansions >= 1

    @property
    def candidates(self) -> tuple[str, ...]:
        """Candidate blocks (identity not included)."""
        return tuple(f"{self.kind}_k{k}_e{e}" for k in self.kernel_sizes for e in self.expansions)

    def choices(self, position: int) -> tuple[str, ...]:
        """What a position may hold: the candidates, plus identity unless it opens a stage."""
        return self.candidates if position == 0 else self.candidates + (IDENTITY,)

    def positions(self) -> Iterator[tuple[int, int]]:
        """Every (stage, position) of the space."""
        for stage, depth in enumerate(self.max_depths):
            for pos in range(depth):
                yield stage, pos

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        """Feature map side at every stage."""
        side = self.img_size if self.stem_stride == 1 else self.img_size // self.stem_stride
        sizes = [side]
        for _ in self.dims[1:]:
            sizes.append(sizes[-1] // 2)
        return tuple(sizes)

    def stage_shape(self, stage: int, batch: int = 1) -> tuple[int, int, int, int]:
        """NCHW input shape of a block of `stage`."""
        side = self.stage_sizes[stage]
        return (batch, self.dims[stage], side, side)

    def arch(self, stages: Sequence[Sequence[str]], meta: dict[str, Any] | None = None) -> Arch:
        """An Arch of this space from block names per stage (checked against the space)."""
        arch = Arch(self.kind, self.dims, tuple(map(tuple, stages)), self.stem_stride, meta or {})
        self.check_arch(arch)
        return arch

    def check_arch(self, arch: Arch) -> None:
        """Raise ValueError unless `arch` is a point of this space."""
        for field_name, mine, theirs in (
            ("space", self.kind, arch.space),
            ("dims", self.dims, arch.dims),
            ("stem_stride", self.stem_stride, arch.stem_stride),
        ):
            if mine != theirs:
                raise ValueError(f"arch.{field_name} is {theirs} but the search space has {mine}")
        for stage, (names, depth) in enumerate(zip(arch.stages, self.max_depths)):
            if len(names) != depth:
                raise ValueError(
                    f"arch.stages[{stage}] has {len(names)} positions but the space has {depth}"
                )
            for pos, name in enumerate(names):
                if name not in self.choices(pos):
                    raise ValueError(
                        f"arch.stages[{stage}][{pos}] = {name!r} is not a choice there; "
                        f"choose one of {list(self.choices(pos))}"
                    )

    def random_arch(self, rng: random.Random) -> Arch:
        """A uniformly random point of the space."""
        stages = [
            [rng.choice(self.choices(pos)) for pos in range(depth)] for depth in self.max_depths
        ]
        return self.arch(stages)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (as stored in latency tables)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """Parse the JSON form."""
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown search space field(s) {unknown}")
        return cls(**data)


class MixedOp(nn.Module):
    """All candidates of one position, their architecture logits alpha, and binary gates."""

    def __init__(
        self,
        choices: Sequence[str],
        dim: int,
        recompute: str = DEFAULT_RECOMPUTE,
        layer_scale_init: float | None = 1e-6,
    ) -> None:
        super().__init__()
        self.choices = tuple(choices)
        self.candidates = nn.ModuleList(
            make_block(name, dim, 0.0, recompute, layer_scale_init) or nn.Identity()
            for name in self.choices
        )
        self.alpha = nn.Parameter(torch.zeros(len(self.choices)))
        self.mode = "argmax"
        self.active: tuple[int, ...] = ()
        self.gates: tuple[float, ...] = ()

    @property
    def probs(self) -> torch.Tensor:
        """softmax(alpha)."""
        return F.softmax(self.alpha, dim=0)

    def sample(self, mode: str, generator: torch.Generator | None = None) -> None:
        """Choose the path(s) the next forward runs."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        probs = self.probs.detach().float().cpu()
        if mode == "argmax":
            self.active = (int(probs.argmax()),)
        elif mode == "two_path" and len(self.choices) > 1:
            pair = torch.multinomial(probs, 2, replacement=False, generator=generator)
            renorm = probs[pair] / probs[pair].sum()
            pick = int(torch.multinomial(renorm, 1, generator=generator))
            self.active = tuple(int(i) for i in pair)
            self.gates = tuple(float(j == pick) for j in range(2))
        else:
            self.active = (int(torch.multinomial(probs, 1, generator=generator)),)
            self.gates = (1.0,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode in ("sample", "argmax") or not self.active:
            return self.candidates[self.active[0] if self.active else 0](x)
        idx = list(self.active)
        if self.mode == "two_path" and len(idx) == 2:
            p = F.softmax(self.alpha[idx], dim=0)
        else:
            p = self.probs[idx]
        gates = torch.tensor(self.gates, dtype=p.dtype, device=p.device)
        weights = gates + p - p.detach()  # value: the binary gates; gradient: through p
        out = None
        for j, i in enumerate(idx):
            y = self.candidates[i](x) * weights[j].to(x.dtype)
            out = y if out is None else out + y
        return out

    def extra_repr(self) -> str:
        return f"choices={list(self.choices)}"


class Supernet(QuadraNet):
    """The QuadraNet skeleton with a MixedOp at every position of a search space."""

    def __init__(
        self,
        space: SearchSpace,
        drop_rate: float = 0.0,
        recompute: str = DEFAULT_RECOMPUTE,
        layer_scale_init: float | None = 1e-6,
    ) -> None:
        super().__init__(
            in_chans=space.in_chans,
            num_classes=space.num_classes,
            depths=(0,) * len(space.dims),
            dims=space.dims,
            stem_stride=space.stem_stride,
            drop_rate=drop_rate,
        )
        self.space = space
        for stage, dim, depth in zip(self.stages, space.dims, space.max_depths):
            stage.blocks = nn.Sequential(
                *(
                    MixedOp(space.choices(pos), dim, recompute, layer_scale_init)
                    for pos in range(depth)
                )
            )
            stage.blocks.apply(self._init_weights)

    def mixed_ops(self) -> list[MixedOp]:
        """The mixed ops in (stage, position) order."""
        return [m for m in self.modules() if isinstance(m, MixedOp)]

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture logits."""
        return [m.alpha for m in self.mixed_ops()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the architecture logits."""
        alphas = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in alphas]

    def sample(self, mode: str, generator: torch.Generator | None = None) -> None:
        """Set the path(s) of every mixed op for the next forward."""
        for op in self.mixed_ops():
            op.sample(mode, generator)

    def probabilities(self) -> list[list[float]]:
        """softmax(alpha) of every position."""
        return [op.probs.detach().cpu().tolist() for op in self.mixed_ops()]

    def derive(self, meta: dict[str, Any] | None = None) -> Arch:
        """The most likely architecture (argmax of alpha at every position)."""
        ops = iter(self.mixed_ops())
        stages = []
        for depth in self.space.max_depths:
            stage_ops = [next(ops) for _ in range(depth)]
            stages.append([op.choices[int(op.alpha.argmax())] for op in stage_ops])
        return self.space.arch(stages, meta)
