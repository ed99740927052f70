"""`quadranet latency profile|check|measure` and `quadranet search`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from quadranet.commands import at_least
from quadranet.data import dataset_info
from quadranet.engine import distributed as D
from quadranet.engine.commands import guard
from quadranet.engine.config import add_config_arguments, config_from_args
from quadranet.nas.latency import (
    BACKENDS,
    MEMORY_FORMATS,
    STATISTICS,
    LatencyTable,
    Setting,
    arch_latency_report,
    check,
    profile,
)
from quadranet.nas.search import ARCH_SAMPLING, DERIVE, LOSS_FORMS, SearchOptions, search
from quadranet.nas.space import SearchSpace

# A short recipe for supernets on small images: no heavy augmentation, no EMA.
SEARCH_DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 64,
    "lr": 2e-3,
    "warmup_epochs": 0,
    "weight_decay": 0.05,
    "smoothing": 0.0,
    "mixup": 0.0,
    "cutmix": 0.0,
    "randaugment": None,
    "reprob": 0.0,
    "hflip": 0.0,
    "ema": False,
    "drop_path": 0.0,
    "workers": 0,
}


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 16,32,64, got {text!r}") from None


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the latency and search subcommands."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    lat = sub.add_parser("latency", help="latency tables for hardware-aware search")
    lat_sub = lat.add_subparsers(dest="latency_command", metavar="ACTION", required=True)

    p = lat_sub.add_parser(
        "profile",
        help="measure every candidate block and fixed part of a search space",
        formatter_class=fmt,
    )
    p.add_argument("--space", choices=("quadra", "mbconv"), default="quadra")
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: dataset's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dataset", default="mnist", help="gives channels, classes and size")
    p.add_argument("--dims", type=_ints, default=SearchSpace.dims, help="widths per stage")
    p.add_argument("--max-depths", type=_ints, default=SearchSpace.max_depths)
    p.add_argument("--stem-stride", type=int, default=1, choices=(1, 2, 4))
    p.add_argument("--memory-format", choices=MEMORY_FORMATS, default="contiguous")
    p.add_argument("--warmup", type=int, default=Setting.warmup)
    p.add_argument("--repeats", type=int, default=Setting.repeats)
    p.add_argument("--chain", type=int, default=Setting.chain, help="copies timed per block")
    p.add_argument(
        "--statistic",
        choices=STATISTICS,
        default="median",
        help="median of repeats; min resists other processes on the cores",
    )
    p.add_argument("-o", "--output", required=True, help="table JSON to write")
    p.set_defaults(func=run_profile)

    p = lat_sub.add_parser(
        "check",
        help="measure random architectures end to end against the table's prediction",
        formatter_class=fmt,
    )
    p.add_argument("table", help="latency table JSON")
    p.add_argument("--samples", type=at_least(1), default=20, help="random architectures timed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.10, help="relative error counted as ok")
    p.add_argument("-o", "--output", default=None, help="write the rows as JSON here")
    p.set_defaults(func=run_check)

    p = lat_sub.add_parser(
        "measure", help="measure a searched architecture against its target", formatter_class=fmt
    )
    p.add_argument("--arch", required=True, help="architecture JSON")
    p.add_argument("--table", default=None, help="table whose setting to use (default: arch's)")
    p.set_defaults(func=run_measure)

    p = sub.add_parser(
        "search",
        help="ProxylessNAS-style search of a network that fits a latency target",
        description="Search a QuadraNet (or MBConv) network under a latency target; writes "
        "arch.json, search_log.jsonl, probs.png and latency.png into the run folder. "
        "Training flags default to a short small-image recipe.",
    )
    g = p.add_argument_group("search options")
    g.add_argument(
        "--space",
        choices=("quadra", "mbconv"),
        default=None,
        help="must match the table's space (default: the table's)",
    )
    g.add_argument("--table", required=True, help="latency table JSON")
    g.add_argument("--target-ms", type=float, required=True, help="latency target T (ms)")
    g.add_argument(
        "--loss",
        choices=LOSS_FORMS,
        default="mul_log",
        help="mul_log: CE*(log E/log T)^beta; hinge: CE+lambda*max(0,E/T-1)",
    )
    g.add_argument("--beta", type=float, default=0.6)
    g.add_argument("--latency-lambda", type=float, default=1.0)
    g.add_argument("--arch-lr", type=float, default=6e-3)
    g.add_argument("--arch-sampling", choices=ARCH_SAMPLING, default="two_path")
    g.add_argument(
        "--arch-warmup-epochs",
        type=int,
        default=1,
        help="weight-only epochs before architecture steps",
    )
    g.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="fraction of the train split for architecture steps",
    )
    g.add_argument("--layer-scale-init", type=float, default=1e-6)
    g.add_argument(
        "--derive",
        choices=DERIVE,
        default="argmax",
        help="argmax per position, or the most probable architecture within "
        "[budget-fraction * T, T] of predicted latency",
    )
    g.add_argument("--budget-fraction", type=float, default=0.9)
    g.add_argument("--data", dest="dataset", default=argparse.SUPPRESS, help="alias of --dataset")
    add_config_arguments(p, defaults=SEARCH_DEFAULTS)
    p.set_defaults(func=guard(run_search, "search"))


def run_profile(args: argparse.Namespace) -> int:
    """`quadranet latency profile`."""
    info = dataset_info(args.dataset)
    space = SearchSpace(
        kind=args.space,
        dims=args.dims,
        max_depths=args.max_depths,
        stem_stride=args.stem_stride,
        img_size=args.img_size or info.img_size,
        in_chans=info.in_chans,
        num_classes=info.num_classes,
    )
    setting = Setting(
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        batch=args.batch,
        memory_format=args.memory_format,
        warmup=args.warmup,
        repeats=args.repeats,
        chain=args.chain,
        statistic=args.statistic,
    )
    table = profile(space, setting, progress=_progress)
    path = table.save(args.output)
    print(
        f"wrote {path}: {len(space.dims) * len(space.candidates)} blocks, fixed "
        f"{table.fixed_ms:.3f} ms ({setting.backend}, {setting.device}, "
        f"{setting.threads} thread(s), batch {setting.batch}, {space.img_size}px)"
    )
    return 0


def run_check(args: argparse.Namespace) -> int:
    """`quadranet latency check`."""
    table = LatencyTable.load(args.table)
    result = check(table, args.samples, args.seed, args.tolerance, progress=_progress)
    if args.output:
        Path(args.output).write_text(json.dumps({"rows": result.rows}, indent=1) + "\n")
    print(f"{args.table}: {result.summary()}")
    return 0


def run_measure(args: argparse.Namespace) -> int:
    """`quadranet latency measure`."""
    table = LatencyTable.load(args.table) if args.table else None
    print(arch_latency_report(args.arch, table))
    return 0


def run_search(args: argparse.Namespace) -> int:
    """`quadranet search`."""
    table = LatencyTable.load(args.table)
    if args.space is not None and args.space != table.space.kind:
        raise ValueError(
            f"--space {args.space} but {args.table} was profiled for space "
            f"{table.space.kind!r}; profile a table with --space {args.space}"
        )
    base = {**SEARCH_DEFAULTS, "output": f"runs/search-{table.space.kind}-{args.target_ms:g}ms"}
    cfg = config_from_args(args, base=base)
    options = SearchOptions(
        target_ms=args.target_ms,
        loss=args.loss,
        beta=args.beta,
        latency_lambda=args.latency_lambda,
        arch_lr=args.arch_lr,
        arch_sampling=args.arch_sampling,
        arch_warmup_epochs=args.arch_warmup_epochs,
        holdout=args.holdout,
        layer_scale_init=args.layer_scale_init,
        derive=args.derive,
        budget_fraction=args.budget_fraction,
    )
    result = search(cfg, table, options, table_path=args.table)
    if D.is_main_process():
        print(
            f"architecture: {result.arch_path} (predicted {result.predicted_ms:.3f} ms, "
            f"target {options.target_ms:g} ms)"
        )
        print(f"log: {result.log_path}")
        for plot in result.plots:
            print(f"plot: {plot}")
        print(f"retrain: quadranet train --arch {result.arch_path} --dataset {cfg.dataset}")
    return 0
