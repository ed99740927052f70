"""`quadranet models` and `quadranet info NAME`: what each model is and what it costs."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from quadranet.bench.measure import activation_bytes_per_image, count_macs, count_params
from quadranet.blocks import QuadraBlock
from quadranet.commands import at_least
from quadranet.models import create_model, list_models
from quadranet.nn import QuadraticConv2d


def model_kind(model: nn.Module) -> str:
    """'quadratic' when the model holds quadratic neurons, else 'first-order'."""
    quadratic = any(isinstance(m, (QuadraticConv2d, QuadraBlock)) for m in model.modules())
    return "quadratic" if quadratic else "first-order"


def build_on_meta(name: str, **kwargs: Any) -> nn.Module:
    """Build a model on the meta device: shapes and counts without allocating weights."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


def stage_shapes(model: nn.Module, img_size: int, in_chans: int) -> list[tuple[str, tuple]]:
    """(module name, output shape) of each stage for one image, run on the meta device."""
    stages = getattr(model, "stages", None)
    if stages is None:
        return []
    shapes: list[tuple[str, tuple]] = []
    hooks = [
        stage.register_forward_hook(
            lambda _m, _i, out, i=i: shapes.append((f"stages.{i}", tuple(out.shape)))
        )
        for i, stage in enumerate(stages)
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_chans, img_size, img_size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def models_table(img_size: int = 224) -> list[dict[str, Any]]:
    """One row per registered model: name, params, GMACs at `img_size`, kind."""
    rows = []
    for name in list_models():
        model = build_on_meta(name)
        rows.append(
            dict(
                name=name,
                params_m=count_params(model) / 1e6,
                gmacs=count_macs(model, img_size) / 1e9,
                kind=model_kind(model),
            )
        )
    return rows


def _cmd_models(args: argparse.Namespace) -> int:
    rows = models_table(args.img_size)
    print(f"| model | params (M) | GMACs @{args.img_size} | neurons |")
    print("|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['name']} | {r['params_m']:.2f} | {r['gmacs']:.2f} | {r['kind']} |")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    kwargs: dict[str, Any] = dict(num_classes=args.num_classes, in_chans=args.in_chans)
    if args.stem_stride is not None:
        kwargs["stem_stride"] = args.stem_stride
    try:
        model = build_on_meta(args.name, **kwargs)
    except TypeError as err:  # e.g. --stem-stride for a model that has no such setting
        raise ValueError(f"cannot build {args.name} with {kwargs}: {err}") from None
    print(f"model           {args.name} ({model_kind(model)})")
    print(f"params          {count_params(model):,}")
    macs = count_macs(model, args.img_size, args.in_chans)
    print(f"MACs            {macs / 1e9:.3f} G at {args.img_size}x{args.img_size} (conv + linear)")
    for name, shape in stage_shapes(model, args.img_size, args.in_chans):
        print(f"{name:<15} {' x '.join(map(str, shape[1:]))}")
    saved = activation_bytes_per_image(model, args.img_size, args.in_chans)
    print(f"saved for bwd   {saved / 2**20:.1f} MiB per image (autograd, one training step)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `models` and `info`."""
    p = sub.add_parser("models", help="list the registered models with params and MACs")
    p.add_argument(
        "--img-size", type=at_least(1), default=224, help="input size for MACs (default 224)"
    )
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("info", help="params, MACs, stage shapes and saved bytes of one model")
    p.add_argument("name", help="model name (any timm model works too)")
    p.add_argument("--img-size", type=at_least(1), default=224, help="input size (default 224)")
    p.add_argument("--in-chans", type=at_least(1), default=3, help="input channels (default 3)")
    p.add_argument("--num-classes", type=at_least(0), default=1000, help="classes (default 1000)")
    p.add_argument(
        "--stem-stride", type=int, choices=(1, 2, 4), help="QuadraNet stem stride (default 4)"
    )
    p.set_defaults(func=_cmd_info)
