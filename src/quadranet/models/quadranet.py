"""QuadraNet: a four-stage pyramid of QuadraBlocks, with its first-order twins and HorNet.

One model class, `QuadraNet`, serves the whole family: the block type is an argument
(QuadraBlock by default; ConvBlock gives the first-order twins, HorBlock gives HorNet).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import NormMlpClassifierHead
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models._features import feature_take_indices
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from quadranet.blocks import LN_EPS, get_block
from quadranet.nn import LayerNorm2d, QuadraticConv2d, QuadraticLinear
from quadranet.nn.recompute import Recompute, run_branch


def _block_kwargs(block_fn: type[nn.Module], **options: Any) -> dict[str, Any]:
    """The options a block accepts; an explicit option the block does not take is an error."""
    params = inspect.signature(block_fn).parameters
    unknown = [k for k, v in options.items() if v is not None and k not in params]
    if unknown:
        raise ValueError(f"{block_fn.__name__} does not take {unknown}; drop them or pick a block")
    return {k: v for k, v in options.items() if v is not None}


class QuadraStage(nn.Module):
    """Optional downsample (LN + 2x2 stride-2 conv), then `depth` blocks."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        depth: int,
        block_fn: type[nn.Module],
        block_kwargs: Mapping[str, Any],
        drop_path_rates: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim, eps=LN_EPS), nn.Conv2d(in_dim, out_dim, 2, stride=2)
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *(block_fn(out_dim, drop_path=drop_path_rates[i], **block_kwargs) for i in range(depth))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing:
            # each block as one branch recomputed in full: only its input is kept, and the
            # recomputation takes the forward's kernel route (see quadranet.nn.recompute)
            for block in self.blocks:
                x = run_branch(block, x, Recompute.FULL)
            return x
        return self.blocks(x)


class QuadraNet(nn.Module):
    """QuadraNet backbone (timm model API).

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 for no classifier (pooled features).
        depths: blocks per stage.
        dims: channels per stage.
        block: 'quadra' (default), 'conv', 'skip', 'hor', 'swin', or a block class.
        kernel_size: spatial kernel of the blocks (None: the block's default, 7).
        mlp_ratio: channel-MLP expansion.
        layer_scale_init: initial layer scale (None: the block's default, 1e-6).
        recompute: what each block branch keeps for backward: "none", "cheap" (the
            QuadraBlock default: norms and activations recomputed) or "full".
        stage_block_kwargs: extra block arguments per stage (e.g. HorNet's orders).
        stem_stride: 4 (the paper's 4x4 patchify stem), 2, or 1 for 28-32 px images.
        global_pool: 'avg', 'max', ... or '' for no pooling.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly over all blocks to this value.
        head_init_scale: scale of the initial classifier weights.
        img_size: nominal input size (int or (H, W)) that timm's data config and
            `pretrained_cfg['input_size']` report; the network takes any size from
            `min_input_size` up, so this changes no layer.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 27, 3),
        dims: Sequence[int] = (64, 128, 256, 512),
        block: str | type[nn.Module] = "quadra",
        kernel_size: int | None = None,
        mlp_ratio: float = 4.0,
        layer_scale_init: float | None = None,
        recompute: str | None = None,
        stage_block_kwargs: Sequence[Mapping[str, Any]] | None = None,
        stem_stride: int = 4,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        head_init_scale: float = 1.0,
        img_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {tuple(depths)} and dims {tuple(dims)} differ in length")
        if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
            raise ValueError(f"dims (channels per stage) must be integers > 0, got {list(dims)}")
        if not all(isinstance(d, int) and d >= 0 for d in depths):
            raise ValueError(f"depths (blocks per stage) must be integers >= 0, got {list(depths)}")
        check_stem_stride(stem_stride)
        if in_chans <= 0:
            raise ValueError(f"in_chans must be positive, got {in_chans}")
        num_stages = len(depths)
        stage_block_kwargs = stage_block_kwargs or [{}] * num_stages
        if len(stage_block_kwargs) != num_stages:
            raise ValueError(f"stage_block_kwargs needs one mapping per stage ({num_stages})")
        block_fn = get_block(block)
        common = dict(
            kernel_size=kernel_size,
            mlp_ratio=mlp_ratio,
            layer_scale_init=layer_scale_init,
            recompute=recompute,
        )
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.stem_stride = stem_stride
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]

        if stem_stride == 1:
            stem_conv = nn.Conv2d(in_chans, dims[0], 3, padding=1)
        else:  # patchify: kernel = stride
            stem_conv = nn.Conv2d(in_chans, dims[0], stem_stride, stride=stem_stride)
        self.stem = nn.Sequential(stem_conv, LayerNorm2d(dims[0], eps=LN_EPS))
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, self.feature_info = [], []
        start = 0
        for i, depth in enumerate(depths):
            kwargs = _block_kwargs(block_fn, **common, **stage_block_kwargs[i])
            stages.append(
                QuadraStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depth,
                    block_fn,
                    kwargs,
                    rates[start : start + depth],
                    downsample=i > 0,
                )
            )
            start += depth
            reduction = stem_stride * 2**i
            self.feature_info.append(
                dict(num_chs=dims[i], reduction=reduction, module=f"stages.{i}")
            )
        self.stages = nn.Sequential(*stages)
        self.head = NormMlpClassifierHead(
            dims[-1],
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=LN_EPS),
        )
        self.apply(self._init_weights)
        if isinstance(self.head.fc, nn.Linear):
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (QuadraticConv2d, QuadraticLinear)):
            module.reset_parameters(module.init)

    @property
    def min_input_size(self) -> int:
        """Smallest input side that leaves at least one pixel after the last stage."""
        return self.stem_stride * 2 ** (len(self.stages) - 1)

    def _name(self) -> str:
        cfg = getattr(self, "pretrained_cfg", None) or {}
        return cfg.get("architecture") or type(self).__name__

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(
                f"expected an NCHW image batch, got a tensor of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"input has {x.shape[1]} channels but {self._name()} was built with "
                f"in_chans={self.in_chans}; create it with in_chans={x.shape[1]}"
            )
        h, w = x.shape[-2:]
        if min(h, w) < self.min_input_size:
            hint = (
                f"; use stem_stride={max(1, self.stem_stride // 4)} for small images"
                if self.stem_stride > 1
                else ""
            )
            raise ValueError(
                f"input is {h}x{w} but {self._name()} needs at least "
                f"{self.min_input_size}x{self.min_input_size} (stem stride {self.stem_stride}, "
                f"{len(self.stages) - 1} downsamples){hint}"
            )

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(
            f"{self._name()} does not support TorchScript (the family's blocks and norms are "
            "written for tracing, and the quadratic conv is a custom operator with a Python "
            "body); use torch.export, torch.compile or `quadranet export` (ONNX) instead"
        )

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm convention)."""
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch for activation checkpointing: each block keeps only its input for
        backward and is recomputed there (the family's `Recompute.FULL` applied to whole
        blocks, coarser than `recompute="full"`, which keeps each branch's input). Gradients
        are unchanged; it applies whenever gradients are on."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(
        self, num_classes: int, global_pool: str | None = None, reset_other: bool = False
    ) -> None:
        """Replace the classifier (0 removes it); `global_pool=''` keeps the unpooled map.

        `reset_other` also drops the head's LayerNorm (timm's convention), leaving pooling
        and the classifier.
        """
        self.num_classes = num_classes
        self.head.reset(
            num_classes, global_pool, reset_other=reset_other, in_features=self.num_features
        )
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs along the forward pass (timm's ConvNeXt convention).

        Args:
            x: input images, NCHW.
            indices: the last n stages if an int, all if None, else these stage indices
                (negative ones count from the end).
            norm: accepted for timm's API; these models normalise only after pooling
                (in the head), so no feature map is normalised.
            stop_early: skip the stages after the last one asked for.
            output_fmt: only 'NCHW'.
            intermediates_only: return just the list of stage outputs.

        Returns:
            The list of stage outputs, or (final feature map, that list).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if not is_fx_symbolic_tracing():
            self._check_input(x)
        x = self.stem(x)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and head) not needed for the given intermediates.

        Args:
            indices: stages to keep outputs of (as in `forward_intermediates`).
            prune_norm: accepted for timm's API; no norm acts on the feature maps here.
            prune_head: drop the head (pooling, LayerNorm and classifier); always done
                when trailing stages go, as the head is sized for the last stage.

        Returns:
            The absolute indices of the kept intermediates.
        """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled feature map of the last stage, (N, dims[-1], H', W')."""
        if not is_fx_symbolic_tracing():  # shapes are symbolic while FX traces
            self._check_input(x)
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, LayerNorm and classify a feature map (or stop before the classifier)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0",
        "classifier": "head.fc",
        **kwargs,
    }


WIDTHS = {"xxs": 16, "xs": 32, "t": 64, "s": 96, "b": 128}
DEPTHS = {"36": (3, 3, 27, 3), "25": (2, 3, 18, 2)}
HORNET_WIDTHS = {"t": 64, "s": 96, "b": 128}
HORNET_DEPTHS = (2, 3, 18, 2)
HORNET_ORDERS = (2, 3, 4, 5)

QUADRANET_MODELS = [f"quadranet{d}_{w}" for d in DEPTHS for w in WIDTHS]
FIRST_ORDER_MODELS = [f"convnet{d}_{w}" for d in DEPTHS for w in WIDTHS]
HORNET_MODELS = [f"hornet_{w}" for w in HORNET_WIDTHS]

default_cfgs = generate_default_cfgs(
    {name: _cfg() for name in QUADRANET_MODELS + FIRST_ORDER_MODELS + HORNET_MODELS}
)


# Checkpoint containers unwrapped by `checkpoint_filter_fn`, in order of preference.
_CONTAINER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile

# The official HorNet (hornet.py: HorNet / Block / gnconv) and QuadraNet (QuadraNet.py:
# QuadraNet / QuadraBlock1_dw / QuadraConv_dw) layouts, mapped onto this project's names.
# QuadraConv's conv1/conv2/conv3 (branches a, b, c) are fused afterwards.
_OFFICIAL_RULES = tuple(
    (re.compile(pattern), target)
    for pattern, target in (
        (r"downsample_layers\.0\.([01])\.(weight|bias)", r"stem.\1.\2"),
        (r"downsample_layers\.(\d+)\.([01])\.(weight|bias)", r"stages.\1.downsample.\2.\3"),
        (r"stages\.(\d+)\.(\d+)\.norm1\.(weight|bias)", r"stages.\1.blocks.\2.norm1.\3"),
        (r"stages\.(\d+)\.(\d+)\.gnconv\.(.+)", r"stages.\1.blocks.\2.mixer.\3"),
        (r"stages\.(\d+)\.(\d+)\.QuadraConv\.(.+)", r"stages.\1.blocks.\2.mixer.\3"),
        (r"stages\.(\d+)\.(\d+)\.gamma1", r"stages.\1.blocks.\2.gamma1"),
        (r"stages\.(\d+)\.(\d+)\.norm2\.(weight|bias)", r"stages.\1.blocks.\2.mlp.norm.\3"),
        (r"stages\.(\d+)\.(\d+)\.pwconv1\.(weight|bias)", r"stages.\1.blocks.\2.mlp.fc1.\3"),
        (r"stages\.(\d+)\.(\d+)\.pwconv2\.(weight|bias)", r"stages.\1.blocks.\2.mlp.fc2.\3"),
        (r"stages\.(\d+)\.(\d+)\.gamma2", r"stages.\1.blocks.\2.mlp.gamma"),
        (r"norm\.(weight|bias)", r"head.norm.\1"),
        (r"head\.(weight|bias)", r"head.fc.\1"),
    )
)
_QUADRATIC_BRANCH = re.compile(r"(.+\.mixer)\.conv([123])\.(weight|bias)")


def _unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict inside a training checkpoint, without wrapper prefixes on its keys."""
    while True:
        inner = next(
            (checkpoint[k] for k in _CONTAINER_KEYS if isinstance(checkpoint.get(k), Mapping)),
            None,
        )
        if inner is None:
            break
        checkpoint = inner
    if not any(k.startswith(_WRAPPER_PREFIXES) for k in checkpoint):
        return checkpoint
    out = {}
    for key, value in checkpoint.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _official_key(key: str) -> str | None:
    """This project's name for a key of the official HorNet/QuadraNet layout (None: no rule)."""
    for pattern, target in _OFFICIAL_RULES:
        match = pattern.fullmatch(key)
        if match is not None:
            return match.expand(target)
    return None


def _strip_trailing_ones(shape: torch.Size) -> tuple[int, ...]:
    dims = list(shape)
    while dims and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def _like(value: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """`value` reshaped to `target`'s shape when they differ only in trailing singleton
    dimensions (a Linear weight against a 1x1 conv weight); otherwise unchanged, so that
    `load_state_dict` reports a real size mismatch."""
    if target is None or value.shape == target.shape:
        return value
    if _strip_trailing_ones(value.shape) == _strip_trailing_ones(target.shape):
        return value.reshape(target.shape)
    return value


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Mapping[str, Any]:
    """Map a checkpoint onto `model`'s parameter names (timm's `pretrained_filter_fn`).

    Unwraps training checkpoints ("model", "state_dict", "model_ema" or "state_dict_ema"
    entries) and "module." prefixes. A state dict in this project's own layout passes
    through unchanged; one in the official HorNet or QuadraNet layout is renamed (and
    QuadraNet's three branch convolutions fused into one quadratic weight).

    Raises:
        ValueError: naming the first key that fits neither layout for this model.
    """
    state_dict = _unwrap_checkpoint(state_dict)
    own = model.state_dict()
    if all(k in own for k in state_dict):
        return state_dict
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") or type(model).__name__
    classifier = cfg.get("classifier") or "head.fc"

    def unmatched(key: str, why: str) -> ValueError:
        return ValueError(
            f"cannot load checkpoint key {key!r} into {name}: {why}; the checkpoint matches "
            "neither this project's layout nor the official HorNet/QuadraNet layout for "
            "this model (is it for a different model or size?)"
        )

    out: dict[str, Any] = {}
    branches: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        if key in own:
            out[key] = value
            continue
        new = _official_key(key)
        if new is None:
            raise unmatched(key, "no parameter has this name")
        branch = _QUADRATIC_BRANCH.fullmatch(new)
        if branch is not None:
            fused = f"{branch[1]}.{branch[3]}"
            branches.setdefault(fused, {})[int(branch[2]) - 1] = (key, value)
            continue
        if new not in own and not new.startswith(classifier + "."):
            raise unmatched(key, f"it maps to {new!r}, which {name} does not have")
        out[new] = _like(value, own.get(new))
    for fused, parts in branches.items():
        key = parts[min(parts)][0]
        if fused not in own:
            raise unmatched(key, f"its branch maps to {fused!r}, which {name} does not have")
        if len(parts) != 3:
            raise unmatched(key, "the quadratic conv needs all of conv1, conv2 and conv3")
        groups = getattr(model.get_submodule(fused.rsplit(".", 1)[0]), "groups", 1)
        # this project's fused layout: per group, the rows of branches a, b, c in turn
        stacked = torch.stack([parts[i][1].unflatten(0, (groups, -1)) for i in range(3)], 1)
        out[fused] = _like(stacked.flatten(0, 2), own[fused])
    return out


_SOURCE_FIELDS = ("state_dict", "file", "url", "hf_hub_id")


def _has_weights_source(variant: str, kwargs: Mapping[str, Any]) -> bool:
    """Whether the pretrained cfg timm will use (after overlays) names a weight source."""
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )
    return any(getattr(cfg, field, None) for field in _SOURCE_FIELDS)


def _input_cfg(variant: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The pretrained_cfg entries that describe this model's input: `input_size` with its
    channels and nominal size, `pool_size`, and `mean`/`std` averaged over the channels when
    their count differs (as timm's data config does for in_chans != 3).

    The nominal size is `img_size` when given; else the family's 224 px for the 4x stem,
    scaled with `stem_stride` (112 px for 2x, 56 px for 1x, the same 7x7 final map); a
    checkpoint's own cfg (`local-dir:` / `hf-hub:` names) keeps its size.
    """
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )
    chans, *size = cfg.input_size
    in_chans = kwargs.get("in_chans") or chans
    stem_stride = check_stem_stride(kwargs.get("stem_stride", 4))  # (it divides below)
    img_size = kwargs.get("img_size")
    if img_size is not None:
        size = [img_size] * 2 if isinstance(img_size, int) else list(img_size)
    elif not isinstance(kwargs.get("pretrained_cfg"), Mapping):
        size = [s * stem_stride // 4 for s in size]
    downsamples = len(kwargs.get("depths", DEPTHS["36"])) - 1
    reduction = stem_stride * 2**downsamples
    out: dict[str, Any] = dict(
        input_size=(in_chans, *size), pool_size=tuple(max(s // reduction, 1) for s in size)
    )
    for key in ("mean", "std"):
        values = tuple(getattr(cfg, key))
        if len(values) != in_chans:
            out[key] = (sum(values) / len(values),) * in_chans
    return out


def check_stem_stride(stride: object) -> int:
    """The stem's stride, which must be 1, 2 or 4 (a ValueError otherwise)."""
    if stride not in (1, 2, 4):
        raise ValueError(f"stem_stride must be 1, 2 or 4, got {stride!r}")
    return stride  # type: ignore[return-value]


def _create(variant: str, pretrained: bool, **kwargs: Any) -> QuadraNet:
    if pretrained and not _has_weights_source(variant, kwargs):
        raise ValueError(
            f"no pretrained weights are published for {variant}; load a checkpoint file "
            "(.pth or .safetensors, this project's or the official HorNet/QuadraNet layout) "
            f"with timm.create_model({variant!r}, pretrained=True, "
            "pretrained_cfg_overlay=dict(file='path/to/weights.pth')), or use "
            "pretrained=False and train it (`quadranet train --model ...`)"
        )
    input_cfg = _input_cfg(variant, kwargs)
    kwargs["pretrained_cfg_overlay"] = {**input_cfg, **(kwargs.get("pretrained_cfg_overlay") or {})}
    kwargs["img_size"] = tuple(input_cfg["input_size"][1:])  # timm's traits: the same size
    return build_model_with_cfg(
        QuadraNet,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


def _family(variant: str, family: str, size: str, block: str, **kwargs: Any) -> QuadraNet:
    c = WIDTHS[size]
    args = dict(depths=DEPTHS[family], dims=(c, 2 * c, 4 * c, 8 * c), block=block)
    return _create(variant, kwargs.pop("pretrained", False), **{**args, **kwargs})


def _hornet(variant: str, size: str, **kwargs: Any) -> QuadraNet:
    c = HORNET_WIDTHS[size]
    args = dict(
        depths=HORNET_DEPTHS,
        dims=(c, 2 * c, 4 * c, 8 * c),
        block="hor",
        stage_block_kwargs=[{"order": n} for n in HORNET_ORDERS],
    )
    return _create(variant, kwargs.pop("pretrained", False), **{**args, **kwargs})


@register_model
def quadranet36_xxs(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """QuadraNet-36 XXS: C=16, depths 3,3,27,3 (1.85M params)."""
    return _family("quadranet36_xxs", "36", "xxs", "quadra", pretrained=pretrained, **kwargs)


@register_model
def quadranet36_xs(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """QuadraNet-36 XS: C=32, depths 3,3,27,3 (6.39M params)."""
    return _family("quadranet36_xs", "36", "xs", "quadra", pretrained=pretrained, **kwargs)


@register_model
def quadranet36_t(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """QuadraNet-36 T: C=64, depths 3,3,27,3 (23.60M params)."""
    return _family("quadranet36_t", "36", "t", "quadra", pretrained=pretrained, **kwargs)


@register_model
def quadranet36_s(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """QuadraNet-36 S: C=96, depths 3,3,27,3 (51.62M params)."""
    return _family("quadranet36_s", "36", "s", "quadra", pretrained=pretrained, **kwargs)


@register_model
def quadranet36_b(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """QuadraNet-36 B: C=128, depths 3,3,27,3 (90.45M params)."""
    return _family("quadranet36_b", "36", "b", "quadra", pretrained=pretrained, **kwargs)


@register_model
def quadranet25_xxs(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """QuadraNet-25 XXS: C=16, depths 2,3,18,2 (1.30M params)."""
    return _family("quadranet25_xxs", "25", "xxs", "quadra", pretrained=pretrained, **kwargs)


@register_model
def quadranet25_xs(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """QuadraNet-25 XS: C=32, depths 2,3,18,2 (4.45M params)."""
    return _family("quadranet25_xs", "25", "xs", "quadra", pretrained=pretrained, **kwargs)


@register_model
def quadranet25_t(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """QuadraNet-25 T: C=64, depths 2,3,18,2 (16.29M params)."""
    return _family("quadranet25_t", "25", "t", "quadra", pretrained=pretrained, **kwargs)


@register_model
def quadranet25_s(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """QuadraNet-25 S: C=96, depths 2,3,18,2 (35.51M params)."""
    return _family("quadranet25_s", "25", "s", "quadra", pretrained=pretrained, **kwargs)


@register_model
def quadranet25_b(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """QuadraNet-25 B: C=128, depths 2,3,18,2 (62.13M params)."""
    return _family("quadranet25_b", "25", "b", "quadra", pretrained=pretrained, **kwargs)


@register_model
def convnet36_xxs(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """First-order twin of quadranet36_xxs (ConvBlock)."""
    return _family("convnet36_xxs", "36", "xxs", "conv", pretrained=pretrained, **kwargs)


@register_model
def convnet36_xs(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """First-order twin of quadranet36_xs (ConvBlock)."""
    return _family("convnet36_xs", "36", "xs", "conv", pretrained=pretrained, **kwargs)


@register_model
def convnet36_t(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """First-order twin of quadranet36_t (ConvBlock)."""
    return _family("convnet36_t", "36", "t", "conv", pretrained=pretrained, **kwargs)


@register_model
def convnet36_s(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """First-order twin of quadranet36_s (ConvBlock)."""
    return _family("convnet36_s", "36", "s", "conv", pretrained=pretrained, **kwargs)


@register_model
def convnet36_b(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """First-order twin of quadranet36_b (ConvBlock)."""
    return _family("convnet36_b", "36", "b", "conv", pretrained=pretrained, **kwargs)


@register_model
def convnet25_xxs(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """First-order twin of quadranet25_xxs (ConvBlock)."""
    return _family("convnet25_xxs", "25", "xxs", "conv", pretrained=pretrained, **kwargs)


@register_model
def convnet25_xs(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """First-order twin of quadranet25_xs (ConvBlock)."""
    return _family("convnet25_xs", "25", "xs", "conv", pretrained=pretrained, **kwargs)


@register_model
def convnet25_t(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """First-order twin of quadranet25_t (ConvBlock)."""
    return _family("convnet25_t", "25", "t", "conv", pretrained=pretrained, **kwargs)


@register_model
def convnet25_s(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """First-order twin of quadranet25_s (ConvBlock)."""
    return _family("convnet25_s", "25", "s", "conv", pretrained=pretrained, **kwargs)


@register_model
def convnet25_b(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """First-order twin of quadranet25_b (ConvBlock)."""
    return _family("convnet25_b", "25", "b", "conv", pretrained=pretrained, **kwargs)


@register_model
def hornet_t(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """HorNet-T 7x7 (gnConv orders 2-5, C=64, depths 2,3,18,2; 22.4M params)."""
    return _hornet("hornet_t", "t", pretrained=pretrained, **kwargs)


@register_model
def hornet_s(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """HorNet-S 7x7 (gnConv orders 2-5, C=96, depths 2,3,18,2)."""
    return _hornet("hornet_s", "s", pretrained=pretrained, **kwargs)


@register_model
def hornet_b(pretrained: bool = False, **kwargs: Any) -> QuadraNet:
    """HorNet-B 7x7 (gnConv orders 2-5, C=128, depths 2,3,18,2)."""
    return _hornet("hornet_b", "b", pretrained=pretrained, **kwargs)
