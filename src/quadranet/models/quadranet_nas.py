"""QuadraNet-NAS: the QuadraNet skeleton with one searched block choice per position.

An architecture is a JSON file (or dict) naming the block at every position of every stage:

    {
      "format": "quadranet-nas-arch/1",
      "space": "quadra",                      # or "mbconv" (the ProxylessNAS baseline space)
      "stem_stride": 1,
      "dims": [16, 32, 64, 128],
      "stages": [["quadra_k7_e4", "identity"], ["quadra_k3_e2"], ...],
      "meta": {...}                           # free-form: target, predicted latency, ...
    }

A block is `quadra_k{K}_e{E}` (QuadraBlock, kernel K, MLP ratio E), `mbconv_k{K}_e{E}`
(MBConv, kernel K, expansion E) or `identity` (the position is skipped). Stem, downsamples
and head are the QuadraNet ones, so a QuadraNet and an MBConv network differ only in blocks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from quadranet.blocks import MAX_KERNEL_SIZE, QuadraBlock, check_kernel_size
from quadranet.models.quadranet import QuadraNet, _cfg, _has_weights_source
from quadranet.nn.recompute import DEFAULT_RECOMPUTE

ARCH_FORMAT = "quadranet-nas-arch/1"
SPACES = ("quadra", "mbconv")
IDENTITY = "identity"
_BLOCK_RE = re.compile(r"^(quadra|mbconv)_k(\d+)_e(\d+)$")


class MBConvBlock(nn.Module):
    """ProxylessNAS's inverted residual: 1x1 expand, k x k depthwise, 1x1 project (BN, ReLU6)."""

    def __init__(
        self, dim: int, kernel_size: int = 3, expand_ratio: int = 6, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        check_kernel_size(kernel_size)
        hidden = dim * expand_ratio
        self.kernel_size, self.expand_ratio = kernel_size, expand_ratio
        self.expand = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)
        )
        self.dw = nn.Sequential(
            nn.Conv2d(
                hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False
            ),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, dim, 1, bias=False), nn.BatchNorm2d(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.project(self.dw(self.expand(x))))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, expand_ratio={self.expand_ratio}"


@dataclass(frozen=True)
class BlockChoice:
    """One candidate block: its kind ('quadra' or 'mbconv'), kernel size and expansion."""

    kind: str
    kernel_size: int
    expansion: int

    @property
    def name(self) -> str:
        return f"{self.kind}_k{self.kernel_size}_e{self.expansion}"


def parse_block(name: str, where: str = "block") -> BlockChoice | None:
    """`quadra_k7_e4` -> BlockChoice; `identity` -> None; anything else is an error."""
    if name == IDENTITY:
        return None
    match = _BLOCK_RE.match(name) if isinstance(name, str) else None
    if not match:
        raise ValueError(
            f"{where}: unknown block {name!r}; use 'identity', 'quadra_k<K>_e<E>' or "
            "'mbconv_k<K>_e<E>' (e.g. quadra_k7_e4)"
        )
    kind, k, e = match.group(1), int(match.group(2)), int(match.group(3))
    if k % 2 == 0 or e < 1:
        raise ValueError(f"{where}: block {name!r} needs an odd kernel and an expansion >= 1")
    if k > MAX_KERNEL_SIZE:
        raise ValueError(
            f"{where}: block {name!r} has kernel size {k}, larger than the {MAX_KERNEL_SIZE} a "
            "block takes; use an odd kernel size such as 3, 5 or 7"
        )
    return BlockChoice(kind, k, e)


def make_block(
    name: str,
    dim: int,
    drop_path: float = 0.0,
    recompute: str = DEFAULT_RECOMPUTE,
    layer_scale_init: float | None = 1e-6,
) -> nn.Module | None:
    """The module a block name stands for at width `dim` (None for identity).

    `layer_scale_init` is QuadraBlock's initial residual scale (MBConv has BatchNorm instead).
    """
    choice = parse_block(name)
    if choice is None:
        return None
    if choice.kind == "quadra":
        return QuadraBlock(
            dim,
            kernel_size=choice.kernel_size,
            mlp_ratio=float(choice.expansion),
            drop_path=drop_path,
            layer_scale_init=layer_scale_init,
            recompute=recompute,
        )
    return MBConvBlock(dim, choice.kernel_size, choice.expansion, drop_path)


@dataclass
class Arch:
    """A searched architecture: the block name at every position of every stage."""

    space: str
    dims: tuple[int, ...]
    stages: tuple[tuple[str, ...], ...]
    stem_stride: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dims = tuple(self.dims)
        self.stages = tuple(tuple(s) for s in self.stages)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field that is wrong."""
        if self.space not in SPACES:
            raise ValueError(f"arch.space must be one of {list(SPACES)}, got {self.space!r}")
        if not self.dims or not all(isinstance(d, int) and d > 0 for d in self.dims):
            raise ValueError(f"arch.dims must be positive integers, got {list(self.dims)}")
        if len(self.stages) != len(self.dims):
            raise ValueError(
                f"arch.stages has {len(self.stages)} stages but arch.dims has {len(self.dims)} "
                "widths; give one list of blocks per width"
            )
        if self.stem_stride not in (1, 2, 4):
            raise ValueError(f"arch.stem_stride must be 1, 2 or 4, got {self.stem_stride!r}")
        for i, stage in enumerate(self.stages):
            for j, name in enumerate(stage):
                choice = parse_block(name, where=f"arch.stages[{i}][{j}]")
                if choice is not None and choice.kind != self.space:
                    raise ValueError(
                        f"arch.stages[{i}][{j}]: block {name!r} is not in space {self.space!r}"
                    )
        if not isinstance(self.meta, dict):
            raise ValueError(f"arch.meta must be a mapping, got {type(self.meta).__name__}")

    @property
    def depths(self) -> tuple[int, ...]:
        """Blocks per stage that are not identity."""
        return tuple(sum(name != IDENTITY for name in s) for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "format": ARCH_FORMAT,
            "space": self.space,
            "stem_stride": self.stem_stride,
            "dims": list(self.dims),
            "stages": [list(s) for s in self.stages],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "arch") -> Arch:
        """Parse the JSON form; errors name the source and the bad field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: an architecture must be a JSON object")
        fmt = data.get("format", ARCH_FORMAT)
        if fmt != ARCH_FORMAT:
            raise ValueError(f"{source}: arch.format is {fmt!r}; this version reads {ARCH_FORMAT}")
        missing = [k for k in ("space", "dims", "stages") if k not in data]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing} (see quadranet_nas docs)")
        unknown = sorted(set(data) - {"format", "space", "dims", "stages", "stem_stride", "meta"})
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown} in the architecture")
        stages = data["stages"]
        if not isinstance(stages, Sequence) or any(
            isinstance(s, str) or not isinstance(s, Sequence) for s in stages
        ):
            raise ValueError(f"{source}: arch.stages must be a list of lists of block names")
        dims = data["dims"]
        if not isinstance(dims, Sequence) or isinstance(dims, str):
            raise ValueError(f"{source}: arch.dims must be a list of widths, got {dims!r}")
        try:
            return cls(
                space=data["space"],
                dims=tuple(dims),
                stages=tuple(tuple(s) for s in stages),
                stem_stride=data.get("stem_stride", 1),
                meta=dict(data.get("meta") or {}),
            )
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def save(self, path: str | Path) -> Path:
        """Write the JSON file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def load_arch(arch: Arch | Mapping[str, Any] | str | Path) -> Arch:
    """An Arch from an Arch, a dict, or the path of a JSON file."""
    if isinstance(arch, Arch):
        return arch
    if isinstance(arch, Mapping):
        return Arch.from_dict(arch)
    if isinstance(arch, (str, Path)):
        path = Path(arch)
        if not path.is_file():
            raise FileNotFoundError(f"architecture file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        return Arch.from_dict(data, source=str(path))
    raise ValueError(f"arch must be a dict, a JSON file path or an Arch, got {type(arch).__name__}")


class QuadraNetNAS(QuadraNet):
    """A QuadraNet whose stages hold the blocks an `Arch` names (identity positions dropped).

    Args:
        arch: the architecture (Arch, dict or JSON path).
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate, head_init_scale:
            as in QuadraNet.
        recompute: what QuadraBlocks keep for backward (`quadranet.nn.recompute`).
        layer_scale_init: QuadraBlocks' initial residual scale (the paper's 1e-6).
    """

    def __init__(
        self,
        arch: Arch | Mapping[str, Any] | str | Path,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        head_init_scale: float = 1.0,
        recompute: str = DEFAULT_RECOMPUTE,
        layer_scale_init: float | None = 1e-6,
    ) -> None:
        arch = load_arch(arch)
        super().__init__(
            in_chans=in_chans,
            num_classes=num_classes,
            depths=(0,) * len(arch.dims),
            dims=arch.dims,
            stem_stride=arch.stem_stride,
            global_pool=global_pool,
            drop_rate=drop_rate,
            head_init_scale=head_init_scale,
        )
        self.arch = arch
        total = sum(arch.depths)
        rates = iter(drop_path_rate * i / max(total - 1, 1) for i in range(total))
        for stage, names, dim in zip(self.stages, arch.stages, arch.dims):
            blocks = [
                make_block(name, dim, next(rates), recompute, layer_scale_init)
                for name in names
                if name != IDENTITY
            ]
            stage.blocks = nn.Sequential(*blocks)
            stage.blocks.apply(self._init_weights)


default_cfgs = generate_default_cfgs({"quadranet_nas": _cfg()})


@register_model
def quadranet_nas(pretrained: bool = False, **kwargs: Any) -> QuadraNetNAS:
    """A searched QuadraNet (or MBConv) network; pass `arch=` (dict, JSON path or Arch).
    `pretrained=True` needs weights named the timm way (a `local-dir:` folder written by
    `quadranet.save_for_hf`, or `pretrained_cfg_overlay=dict(file=...)`)."""
    if pretrained and not _has_weights_source("quadranet_nas", kwargs):
        raise ValueError(
            "quadranet_nas has no published weights; give a file with "
            "pretrained_cfg_overlay=dict(file=...), or use pretrained=False"
        )
    if "arch" not in kwargs:
        raise ValueError(
            "quadranet_nas needs arch=<JSON path or dict> (written by `quadranet search`)"
        )
    kwargs["arch"] = arch = load_arch(kwargs["arch"])
    return build_model_with_cfg(
        QuadraNetNAS,
        "quadranet_nas",
        pretrained,
        feature_cfg=dict(out_indices=tuple(range(len(arch.dims))), flatten_sequential=True),
        **kwargs,
    )
