"""Quadratic adaptation: turn a trained first-order network into a quadratic one.

After QuadraNet V2 (arXiv 2405.03192): every depthwise conv of the spatial mixing becomes
a quadratic depthwise conv y = (A x + ba) * (B x + bb) + (C x + bc) with C = the trained
weights, A = 0 and B small random. At step 0 the network computes exactly the old
function (a * b = 0), and A still receives gradient (dL/dA = corr(x, g * b) with b != 0).

Works on our first-order twins (`convnet*`, ConvBlock) and on timm's ConvNeXt
(ConvNeXtBlock.conv_dw); `channel=True` also converts the first layer of each channel
MLP. `adapter_only=True` trains only the new A and B parts: C lives in a frozen buffer
(a parametrization of the fused weight), so no optimizer, weight decay included, moves it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from timm.models.convnext import ConvNeXtBlock
from torch import nn
from torch.nn.utils import parametrize

from quadranet.blocks import ConvBlock, QuadraBlock
from quadranet.data import dataset_info
from quadranet.engine import checkpoint as ckpt
from quadranet.engine.config import TrainConfig
from quadranet.engine.train import (
    EpochCallback,
    Trainer,
    TrainResult,
    build_model,
    load_eval_weights,
    resolve_eval_checkpoint,
    resolve_num_classes,
    seed_everything,
)
from quadranet.models import FIRST_ORDER_MODELS, create_model
from quadranet.nn import QuadraticConv2d, QuadraticLinear
from quadranet.nn.quadratic import INIT_STD
from quadranet.nn.recompute import DEFAULT_RECOMPUTE, Recompute

QUADRATIC_LAYERS = (QuadraticConv2d, QuadraticLinear)
FIRST_ORDER_PREFIX, QUADRATIC_PREFIX = "convnet", "quadranet"
BRANCH_A, BRANCH_B, BRANCH_C = 0, 1, 2
METADATA_KEY = "adapt"


class FrozenLinearTerm(nn.Module):
    """Parametrization of a fused per-group [A; B; C] tensor whose C part is frozen.

    The trainable tensor holds only the A and B parts (shape (2 * out, ...)); C is the
    buffer `linear` (shape (out, ...), like the first-order weight it came from).
    """

    def __init__(self, fused: torch.Tensor, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.register_buffer("linear", _branches(fused, groups)[:, BRANCH_C].flatten(0, 1).clone())

    def forward(self, ab: torch.Tensor) -> torch.Tensor:
        ab = ab.reshape(self.groups, 2, -1, *ab.shape[1:])
        c = self.linear.reshape(self.groups, 1, -1, *self.linear.shape[1:])
        return torch.cat((ab, c), dim=1).flatten(0, 2)

    def right_inverse(self, fused: torch.Tensor) -> torch.Tensor:
        """Assigning a fused tensor stores its C part in the buffer and returns [A; B]."""
        branches = _branches(fused, self.groups)
        with torch.no_grad():
            self.linear.copy_(branches[:, BRANCH_C].flatten(0, 1))
        return branches[:, :BRANCH_C].flatten(0, 2).clone()

    def extra_repr(self) -> str:
        return f"groups={self.groups}, frozen C of shape {tuple(self.linear.shape)}"


def _branches(fused: torch.Tensor, groups: int) -> torch.Tensor:
    """View of a fused tensor as (groups, 3 branches, out / groups, ...)."""
    return fused.reshape(groups, 3, -1, *fused.shape[1:])


def _groups(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1)


def _is_depthwise(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.groups == conv.in_channels == conv.out_channels
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def _is_channel_linear(layer: nn.Module) -> bool:
    """An nn.Linear, or the equivalent 1x1 conv (timm's conv-MLP variant of ConvNeXt)."""
    if type(layer) is nn.Linear:
        return True
    return (
        type(layer) is nn.Conv2d
        and layer.kernel_size == (1, 1)
        and layer.stride == (1, 1)
        and layer.groups == 1
    )


def _targets(model: nn.Module, channel: bool) -> Iterator[tuple[nn.Module, str, str]]:
    """(parent, attribute, kind) of every layer to convert; kind is 'spatial' or 'channel'.

    Layers that are quadratic already are skipped, so `channel=True` can follow a
    spatial-only conversion.
    """
    for name, block in model.named_modules():
        if isinstance(block, ConvBlock):
            spatial, mlp = "mixer", block.mlp
        elif isinstance(block, ConvNeXtBlock):
            spatial, mlp = "conv_dw", block.mlp
        else:
            continue
        conv = getattr(block, spatial)
        if not isinstance(conv, QUADRATIC_LAYERS):
            if not _is_depthwise(conv):
                raise ValueError(
                    f"{name}.{spatial} is {conv!r}, not a zero-padded depthwise nn.Conv2d; "
                    "quadratize converts only plain depthwise convs (use a model built with "
                    "static padding)"
                )
            yield block, spatial, "spatial"
        if channel and not isinstance(mlp.fc1, QUADRATIC_LAYERS):
            if not _is_channel_linear(mlp.fc1):
                raise ValueError(
                    f"{name}.mlp.fc1 is {mlp.fc1!r}; channel=True needs an nn.Linear or a "
                    "1x1 nn.Conv2d there"
                )
            yield mlp, "fc1", "channel"


def _to_quadratic(layer: nn.Module, recompute: Recompute | str) -> nn.Module:
    """The quadratic layer computing exactly `layer` (C = its weights, A = 0, B random)."""
    if isinstance(layer, nn.Linear):
        return QuadraticLinear.from_linear(layer)
    return QuadraticConv2d.from_conv(layer, recompute=recompute)


def _set_b(layer: nn.Module, b_std: float) -> None:
    """Draw the B part of a fresh quadratic layer from trunc-normal(0, b_std)."""
    with torch.no_grad():
        w = layer.weight.view(_groups(layer), 3, -1, *layer.weight.shape[1:])
        nn.init.trunc_normal_(w[:, BRANCH_B], std=b_std)


def freeze_linear_term(layer: nn.Module) -> None:
    """Keep C (weight and bias) of a quadratic layer fixed: only its A and B parts train."""
    for tensor_name in ("weight", "bias"):
        tensor = getattr(layer, tensor_name)
        if tensor is not None:
            parametrize.register_parametrization(
                layer, tensor_name, FrozenLinearTerm(tensor.detach(), _groups(layer))
            )


def quadratize(
    model: nn.Module,
    channel: bool = False,
    adapter_only: bool = False,
    inplace: bool = False,
    b_std: float = INIT_STD,
    recompute: Recompute | str = DEFAULT_RECOMPUTE,
) -> nn.Module:
    """A quadratic network computing exactly what the first-order `model` computes.

    Args:
        model: a `convnet*` model (ConvBlock) or a timm ConvNeXt.
        channel: also convert each channel MLP's first layer (fc1) into quadratic neurons.
        adapter_only: freeze everything but the new A and B parts (C stays exactly as
            trained, whatever the optimizer or weight decay).
        inplace: convert `model` itself instead of a copy.
        b_std: std of the random B part (> 0, or A never receives gradient).
        recompute: what the quadratic convs keep for backward ("full": only their input).
    """
    if not b_std > 0:
        raise ValueError(
            f"b_std must be > 0 (got {b_std}): with B = 0 the gradient of A is zero and "
            "the quadratic term never starts learning"
        )
    if not inplace:
        model = copy.deepcopy(model)
    targets = list(_targets(model, channel))
    if not targets:
        raise ValueError(_nothing_to_convert(model))
    if adapter_only:
        model.requires_grad_(False)
    for parent, attr, _ in targets:
        layer = _to_quadratic(getattr(parent, attr), recompute)
        _set_b(layer, b_std)
        if adapter_only:
            freeze_linear_term(layer)
        setattr(parent, attr, layer)
    return model


def _nothing_to_convert(model: nn.Module) -> str:
    """The error message for a model without a first-order block."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    if any(isinstance(m, QuadraBlock | QuadraticConv2d) for m in model.modules()):
        return f"{name} is already quadratic; quadratize takes a first-order model"
    return (
        f"{name} has no block to convert; quadratize takes our first-order twins "
        f"({', '.join(FIRST_ORDER_MODELS[:2])}, ...) or timm convnext_* models"
    )


def quadratic_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters of the quadratic layers, by name (A and B in adapter mode)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QUADRATIC_LAYERS):
            for pname, p in module.named_parameters(prefix=name):
                if p.requires_grad:
                    out[pname] = p
    return out


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with frozen-C layers fused back into plain [A; B; C] tensors."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        prefix = f"{name}." if name else ""
        for tensor_name, plist in module.parametrizations.items():
            if not isinstance(plist[0], FrozenLinearTerm):
                continue
            stored = f"{prefix}parametrizations.{tensor_name}."
            for key in [k for k in state if k.startswith(stored)]:
                del state[key]
            state[prefix + tensor_name] = getattr(module, tensor_name).detach()
    return state


def quadranet_name(first_order: str) -> str:
    """The registered QuadraNet matching a first-order twin: convnet36_t -> quadranet36_t."""
    if first_order not in FIRST_ORDER_MODELS:
        raise ValueError(
            f"{first_order!r} is not one of our first-order twins ({', '.join(FIRST_ORDER_MODELS)})"
        )
    return QUADRATIC_PREFIX + first_order[len(FIRST_ORDER_PREFIX) :]


def target_model_name(source: str, channel: bool) -> str | None:
    """The registered model an adapted `source` loads into, or None when there is none.

    ConvBlock and QuadraBlock name their parameters alike (norm1, mixer, gamma1, mlp.*),
    so a converted convnet's state dict is a QuadraNet's, key for key; quadratic channel
    MLPs and ConvNeXt have no registered quadratic twin (see `load_adapted`).
    """
    return quadranet_name(source) if source in FIRST_ORDER_MODELS and not channel else None


def adapt_metadata(
    source: str, channel: bool, adapter_only: bool, b_std: float, num_classes: int, in_chans: int
) -> dict[str, Any]:
    """What `load_adapted` needs to rebuild an adapted model, stored in checkpoint metadata."""
    return dict(
        source_model=source,
        target_model=target_model_name(source, channel),
        channel=channel,
        adapter_only=adapter_only,
        b_std=b_std,
        num_classes=num_classes,
        in_chans=in_chans,
    )


def load_adapted(path: str | Path, **kwargs: Any) -> nn.Module:
    """Rebuild an adapted model from a checkpoint written by `quadranet adapt`.

    Builds the first-order source with the saved model kwargs, quadratizes it the same way
    and loads the weights; `kwargs` override the saved model kwargs (e.g. drop_path_rate).
    """
    weights, meta = ckpt.load_weights(path)
    info = meta.get(METADATA_KEY)
    if not info:
        raise ckpt.CheckpointError(
            f"{path} was not written by `quadranet adapt` (no '{METADATA_KEY}' metadata); "
            "load it with create_model(<its model>) + load_state_dict"
        )
    saved = meta.get("config", {}).get("model_kwargs", {})
    args = {"num_classes": info["num_classes"], "in_chans": info["in_chans"], **saved, **kwargs}
    model = quadratize(create_model(info["source_model"], **args), channel=info["channel"])
    model.load_state_dict(weights)
    return model


def check_convertible(model: nn.Module) -> nn.Module:
    """`model` itself, or a ValueError when quadratize finds nothing to convert in it."""
    if not any(isinstance(m, ConvBlock | ConvNeXtBlock) for m in model.modules()):
        raise ValueError(_nothing_to_convert(model))
    return model


# --- fine-tuning with the shared engine --------------------------------------------------------


class AdaptTrainer(Trainer):
    """The shared engine for an adapted model; every weights file it writes is plain.

    Frozen-C layers (adapter mode) are fused back into [A; B; C] tensors in each
    .safetensors file, with `metadata` stored under 'adapt'; last.pt keeps the
    training-time state for --resume.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, metadata: dict[str, Any]) -> None:
        self.adapt_info = metadata
        super().__init__(cfg, model)
        target = metadata["target_model"] or f"quadratized {metadata['source_model']}"
        self.model_name = f"{target} (adapted from {metadata['source_model']})"

    def _save_weights(self, tag: str) -> None:
        super()._save_weights(tag)
        if not self.dist.is_main:
            return
        models = {tag: self.model}
        if self.ema is not None:
            models[f"{tag}_ema"] = self.ema.module
        for name, model in models.items():
            path = self.output_dir / f"{name}.safetensors"
            _, meta = ckpt.load_weights(path)
            meta[METADATA_KEY] = self.adapt_info
            ckpt.save_weights(path, plain_state_dict(model), meta)


def load_first_order(
    cfg: TrainConfig, checkpoint: str | Path, use_ema: bool = False
) -> tuple[nn.Module, int, int]:
    """(model, num_classes, in_chans): `cfg.model` built for `cfg.dataset` with trained weights."""
    path = resolve_eval_checkpoint(checkpoint, use_ema)
    weights, _ = load_eval_weights(path, use_ema)
    info = dataset_info(cfg.dataset, cfg.data_root, **cfg.dataset_kwargs)
    num_classes = resolve_num_classes(cfg, info)
    model = check_convertible(build_model(cfg, num_classes, info.in_chans))
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = " ".join(str(err).splitlines()[:2])
        raise ckpt.CheckpointError(
            f"{path} does not fit {cfg.model} with model_kwargs={cfg.model_kwargs} on "
            f"'{info.name}' ({first}); pass the --model, --model-kwargs and --dataset it was "
            "trained with"
        ) from err
    return model, num_classes, info.in_chans


def fine_tune(
    cfg: TrainConfig,
    checkpoint: str | Path,
    channel: bool = False,
    adapter_only: bool = False,
    b_std: float = INIT_STD,
    use_ema: bool = False,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Load the first-order `cfg.model` from `checkpoint`, quadratize it, train it with `cfg`.

    The run's config names the registered quadratic twin when there is one (convnet36_t ->
    quadranet36_t), so `quadranet eval` and `create_model` + `load_state_dict` take its
    weights files; otherwise `load_adapted` rebuilds the model from them.
    """
    model, num_classes, in_chans = load_first_order(cfg, checkpoint, use_ema)
    seed_everything(cfg.seed)  # B's random init: the same run for the same --seed
    model = quadratize(model, channel=channel, adapter_only=adapter_only, inplace=True, b_std=b_std)
    meta = adapt_metadata(cfg.model, channel, adapter_only, b_std, num_classes, in_chans)
    output = cfg.output
    if output is None and not cfg.resume:
        output = f"runs/{cfg.model}-adapted-{Path(cfg.dataset).name}"
    run_cfg = cfg.replace(model=meta["target_model"] or cfg.model, output=output)
    return AdaptTrainer(run_cfg, model, meta).fit(on_epoch_end)


__all__ = [
    "AdaptTrainer",
    "FrozenLinearTerm",
    "adapt_metadata",
    "check_convertible",
    "fine_tune",
    "freeze_linear_term",
    "load_adapted",
    "load_first_order",
    "plain_state_dict",
    "quadranet_name",
    "quadratic_parameters",
    "quadratize",
    "target_model_name",
]
