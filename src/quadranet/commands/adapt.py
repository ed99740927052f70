"""`quadranet adapt`: fine-tune a trained first-order network as a quadratic one."""

from __future__ import annotations

import argparse
from typing import Any

from quadranet.adapt import fine_tune, target_model_name
from quadranet.engine import distributed as D
from quadranet.engine.commands import guard
from quadranet.engine.config import (
    TrainConfig,
    add_config_arguments,
    checkpoint_keys,
    config_from_args,
    load_yaml,
)
from quadranet.engine.report import REPORT_NAME
from quadranet.engine.train import TrainResult, checkpoint_config, resolve_eval_checkpoint
from quadranet.nn.quadratic import INIT_STD

# The first-order checkpoint decides the architecture, even over a --config YAML.
ARCHITECTURE_KEYS = ("model", "model_kwargs")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the adapt subcommand."""
    p = sub.add_parser(
        "adapt",
        help="turn a trained first-order model (convnet*, convnext_*) into a quadratic one "
        "and fine-tune it",
        description="Convert each depthwise conv of the spatial mixing into a quadratic "
        "depthwise conv that computes exactly the trained function (C = trained weights, "
        "A = 0, B small random), then fine-tune with the shared engine. Model, data and "
        "hardware settings default to those stored with the checkpoint; pass the "
        "fine-tuning budget (--epochs, --warmup-epochs, --lr, ...) as flags.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="first-order weights: a run folder (its best.safetensors), .safetensors or .pt",
    )
    p.add_argument(
        "--from-ema", action="store_true", help="start from the first-order run's EMA weights"
    )
    p.add_argument(
        "--channel",
        action="store_true",
        help="also make the first layer of each channel MLP quadratic (no registered twin: "
        "load the result with quadranet.adapt.load_adapted)",
    )
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="train only the new quadratic parts (A, B); every trained weight stays fixed",
    )
    p.add_argument(
        "--b-std",
        type=float,
        default=INIT_STD,
        help=f"std of the random B part (default: {INIT_STD})",
    )
    add_config_arguments(p, default_source="the checkpoint's run", sourced=checkpoint_keys())
    p.set_defaults(func=guard(run_adapt, "adapt"))


def adapt_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < the checkpoint's model/data/hardware < --config YAML < flags.

    The checkpoint's model and model kwargs also win over the YAML (they describe the
    weights); explicit flags win over everything.
    """
    saved = checkpoint_config(resolve_eval_checkpoint(args.checkpoint, args.from_ema))
    values: dict[str, Any] = dict(saved)
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    values.update({k: saved[k] for k in ARCHITECTURE_KEYS if k in saved})
    flags = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "config"})
    return config_from_args(flags, base=values)


def run_adapt(args: argparse.Namespace) -> int:
    """`quadranet adapt`."""
    cfg = adapt_config(args)
    result = fine_tune(
        cfg,
        args.checkpoint,
        channel=args.channel,
        adapter_only=args.adapter_only,
        b_std=args.b_std,
        use_ema=args.from_ema,
    )
    if D.is_main_process():
        print(summary_lines(result, target_model_name(cfg.model, args.channel)))
    return 0


def summary_lines(result: TrainResult, target: str | None) -> str:
    """What was trained, how well, and how to load the weights."""
    out, s = result.output_dir, result.summary
    best = out / "best.safetensors"
    if target is None:
        load = f"quadranet.adapt.load_adapted('{best}')"
    else:
        load = (
            f"create_model('{target}', **model_kwargs) + load_state_dict, "
            f"or `quadranet eval --checkpoint {out}`"
        )
    return "\n".join(
        [
            f"adapted: {s['model']} on {s['dataset']}, epochs: {s['epochs']}",
            f"final top-1 {_pct(result.final.get('top1'))}  "
            f"EMA {_pct(result.final.get('top1_ema'))}  "
            f"best {_pct(result.best_top1)} (epoch {result.best_epoch})",
            f"weights: {out / 'last.safetensors'} (final), {best} (best)",
            f"load:    {load}",
            f"report:  {out / REPORT_NAME}",
        ]
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"
