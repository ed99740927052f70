"""`quadranet push`: a model or checkpoint as a folder in timm's hub layout, optionally
uploaded to the Hugging Face Hub."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from quadranet.engine.config import _KeyValueAction

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `quadranet push`."""
    p = sub.add_parser(
        "push",
        help="save a model or checkpoint in timm's hub layout (config.json + model.safetensors)",
        description=(
            "Write a run folder, a weights file or a model name to a folder that "
            "timm.create_model('local-dir:FOLDER', pretrained=True) loads (after import "
            "quadranet); --repo-id also uploads it to the Hugging Face Hub."
        ),
    )
    p.add_argument("source", metavar="MODEL_OR_CHECKPOINT", help="run folder, weights file or name")
    p.add_argument("--to", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights")
    p.add_argument("--num-classes", type=int, help="classes (default: the checkpoint's)")
    p.add_argument("--in-chans", type=int, help="input channels (default: the checkpoint's)")
    p.add_argument("--img-size", type=int, help="input size (default: the checkpoint's)")
    p.add_argument(
        "--model-kwargs", nargs="+", action=_KeyValueAction, metavar="KEY=VALUE", default={},
        help="extra create_model kwargs for a model name",
    )  # fmt: skip
    p.add_argument(
        "--repo-id", metavar="USER/NAME", help="also upload to this Hugging Face Hub repository"
    )
    p.add_argument("--private", action="store_true", help="create the Hub repository private")
    p.set_defaults(func=_cmd_push)


def _cmd_push(args: argparse.Namespace) -> int:
    from quadranet.data import dataset_info
    from quadranet.export import load_model
    from quadranet.hub import CONFIG_NAME, WEIGHTS_NAME, push_to_hub, save_for_hf

    source = Path(args.source).expanduser()
    is_file = source.exists() or source.suffix in WEIGHT_SUFFIXES or "/" in args.source
    loaded = load_model(
        None if is_file else args.source,
        checkpoint=source if is_file else None,
        use_ema=args.ema,
        img_size=args.img_size,
        num_classes=args.num_classes,
        in_chans=args.in_chans,
        model_kwargs=args.model_kwargs,
    )
    if not is_file:
        print(f"note: {loaded.name} has random weights (no checkpoint was given)")
    data_config: dict[str, Any] = {
        "input_size": (loaded.in_chans, loaded.img_size, loaded.img_size)
    }
    if loaded.dataset is not None:
        info = dataset_info(loaded.dataset)
        data_config.update(mean=info.mean, std=info.std)
        if not info.folder:  # evaluated whole: resized to the input size, nothing cropped away
            data_config.update(crop_pct=1.0, interpolation="bilinear")
    folder = save_for_hf(loaded.model, args.to, data_config=data_config)
    print(f"wrote {folder / CONFIG_NAME} and {folder / WEIGHTS_NAME}")
    print(
        f"load: timm.create_model('local-dir:{folder}', pretrained=True)  (after import quadranet)"
    )
    if args.repo_id:
        url = push_to_hub(folder, args.repo_id, private=args.private or None)
        print(
            f"uploaded to {url}; load: timm.create_model('hf-hub:{args.repo_id}', pretrained=True)"
        )
    return 0
