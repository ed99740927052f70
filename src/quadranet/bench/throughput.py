"""`quadranet bench throughput`: speed and memory of whole models (the paper's Table I).

For each model: parameters, GMACs, saved activation bytes per image (counted on the meta
device), and, measured in a child process per model per round with the chosen malloc, on
the CPU or a CUDA GPU (`--device`): inference images/s, training images/s (forward,
backward, AdamW step), the peak memory of training (RSS on the CPU,
`torch.cuda.max_memory_allocated` on CUDA), and the share of the machine's dense matmul
rate that the model's conv and linear FLOPs reach (inference 2 x MACs per image,
training 6 x MACs per image). Inference runs each model in its inference form, as timm's
`reparameterize_model` makes it (QuadraNet's blocks: layer scales folded, residual adds
inside the operators; models without such a form are unchanged).
Models are interleaved over rounds (each round runs every model once, in a rotated
order) so that drift of the machine hits all alike; the table gives the median over
rounds with the min-max range.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.utils.model import reparameterize_model
from torch import nn

from quadranet.bench.measure import (
    activation_bytes_per_image,
    count_macs,
    count_params,
    gemm_seconds,
    record_gemms,
)
from quadranet.bench.reference import REFERENCE_NAME, create_reference_model
from quadranet.bench.runner import (
    ALLOCATORS,
    GEMM_SIZE,
    SETTLED_FAULTS,
    ChildProcesses,
    Column,
    Panel,
    Stats,
    allocator_env,
    check_device,
    machine_info,
    progress,
    ratio,
    synchronizer,
    time_fn,
    track_peak_memory,
    write_report,
)
from quadranet.models import create_model

DEFAULT_MODELS = (
    "quadranet36_t",
    "convnet36_t",
    "hornet_t",
    "swin_tiny_patch4_window7_224",
    "convnext_tiny",
    REFERENCE_NAME,
)
REFERENCES = ("hornet_t", REFERENCE_NAME)  # ratio columns, when these models are in the run
PRECISIONS = ("fp32", "bf16")
GEMM = "GEMM"  # the matmul-rate measurement, run in each round like a model
GEMM_TARGET = "quadranet.bench.runner:matmul_gflops"
CUDA_INFO = ("device_name", "matmul_allow_tf32", "cudnn_allow_tf32")  # from the GEMM job
MiB = 2**20
SETTLE = 4  # extra warm-up calls allowed while the allocator still grows (see `time_fn`)


DROP_PATH_RATE = 0.1  # the training engine's default stochastic depth


def build_model(name: str, drop_path_rate: float = 0.0) -> nn.Module:
    """A benchmark model by name: `reference`, or any timm / QuadraNet model (untrained)."""
    if name == REFERENCE_NAME:
        return create_reference_model(drop_path_rate=drop_path_rate)
    return create_model(name, pretrained=False, drop_path_rate=drop_path_rate)


def model_costs(name: str, img_size: int, batch: int = 32, train_batch: int = 16) -> dict[str, Any]:
    """Params, MACs, fp32 saved-activation bytes per image and the matrix products of an
    inference batch and a training step, all counted on the meta device."""
    with torch.device("meta"):
        model = build_model(name)
        x_infer = torch.zeros(batch, 3, img_size, img_size)
        x_train = torch.zeros(train_batch, 3, img_size, img_size)
        target = torch.zeros(train_batch, dtype=torch.long)
    try:
        macs = count_macs(model, img_size)
        act = activation_bytes_per_image(model, img_size)
        model.eval()
        with torch.no_grad():
            infer_gemms = record_gemms(lambda: model(x_infer))
        model.train()
        train_gemms = record_gemms(lambda: F.cross_entropy(model(x_train), target).backward())
    except Exception as err:
        raise ValueError(f"{name} failed at {img_size}x{img_size} (on meta): {err}") from err
    return dict(
        params=count_params(model),
        macs=macs,
        act_bytes_per_img=act,
        infer_gemms=sorted(infer_gemms.items()),
        train_gemms=sorted(train_gemms.items()),
    )


def measure_model(
    name: str,
    img_size: int = 224,
    batch: int = 32,
    train_batch: int = 16,
    precision: str = "fp32",
    channels_last: bool = True,
    compile: bool = False,
    warmup: int = 2,
    repeats: int = 5,
    settle: int = SETTLE,
    infer_gemms: Sequence[tuple[tuple[int, int, int, int], int]] = (),
    train_gemms: Sequence[tuple[tuple[int, int, int, int], int]] = (),
    device: str = "cpu",
    drop_path_rate: float = DROP_PATH_RATE,
) -> dict[str, Any]:
    """Training then inference speed of one model on `device`, the peak memory of training,
    and the time its matrix products alone take in this process (a child job). Training
    runs with stochastic depth `drop_path_rate`, as the training engine does.

    Training runs first so that its peak is measured before inference has used any memory.
    """
    torch.manual_seed(0)
    warmup = max(warmup, 1 if compile else 0)  # compilation happens in the warm-up calls
    dev = torch.device(device)
    sync = synchronizer(dev)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(name, drop_path_rate).to(dev, memory_format=memory_format)
    run = torch.compile(model, dynamic=False) if compile else model

    def autocast() -> torch.autocast:
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def images(n: int) -> torch.Tensor:
        x = torch.randn(n, 3, img_size, img_size, device=dev)
        return x.contiguous(memory_format=memory_format)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    x_train = images(train_batch)
    num_classes = getattr(model, "num_classes", 0) or 1000
    target = torch.randint(0, num_classes, (train_batch,), device=dev)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(run(x_train), target)
        loss.backward()
        optimizer.step()

    with track_peak_memory(dev) as peak:
        train = time_fn(train_step, warmup, repeats, sync, settle=settle)
    model.zero_grad(set_to_none=True)

    model.eval()
    reparameterize_model(model, inplace=True)  # the inference form (after training's timing)
    x_infer = images(batch)

    def infer_step() -> None:
        with torch.no_grad(), autocast():
            run(x_infer)

    infer = time_fn(infer_step, warmup, repeats, sync, settle=settle)
    gemm_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return dict(
        infer_gemm_s=gemm_seconds(infer_gemms, gemm_dtype, device=dev),
        train_gemm_s=gemm_seconds(train_gemms, gemm_dtype, device=dev),
        infer_ips=batch / infer.median,
        train_ips=train_batch / train.median,
        batch=batch,
        train_batch=train_batch,
        infer_s=infer.as_dict(),
        train_s=train.as_dict(),
        peak_train_bytes=peak.bytes,
        threads=torch.get_num_threads(),
        device=str(dev),
    )


def run_throughput_bench(
    models: Sequence[str] = DEFAULT_MODELS,
    img_size: int = 224,
    batch: int = 32,
    train_batch: int = 16,
    precision: str = "fp32",
    channels_last: bool = True,
    compile: bool = False,
    threads: int | None = None,
    rounds: int = 3,
    warmup: int = 2,
    repeats: int = 5,
    allocator: str = "retained",
    gemm_size: int = GEMM_SIZE,
    settle: int = SETTLE,
    device: str = "cpu",
    drop_path_rate: float = DROP_PATH_RATE,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Table rows (one per model) and the raw per-round measurements."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if min(rounds, repeats, batch, train_batch, img_size) < 1:
        raise ValueError("rounds, repeats, batch, train-batch and img-size must be positive")
    if warmup < 0 or settle < 0:
        raise ValueError(f"warmup and settle must be >= 0, got {warmup} and {settle}")
    if len(set(models)) != len(models) or not models:
        raise ValueError(f"--models needs distinct names, got {list(models)}")
    allocator_env(allocator)  # a missing jemalloc fails here, before any work
    device = check_device(device)  # so does a missing GPU
    job = dict(
        img_size=img_size,
        batch=batch,
        train_batch=train_batch,
        precision=precision,
        channels_last=channels_last,
        compile=compile,
        warmup=warmup,
        repeats=repeats,
        settle=settle,
        device=device,
        drop_path_rate=drop_path_rate,
    )
    gemm_dtype = "bfloat16" if precision == "bf16" else "float32"
    items = [GEMM, *models]
    raw: dict[str, list[dict[str, Any]]] = {item: [] for item in items}
    with ChildProcesses(allocator, threads, preload=[__name__]) as children:
        children.start()  # the server imports torch while the costs are counted
        # unknown names fail here
        costs = {name: model_costs(name, img_size, batch, train_batch) for name in models}
        start = time.perf_counter()
        for r in range(rounds):
            shift = r % len(items)
            for item in items[shift:] + items[:shift]:
                progress(
                    f"[throughput] round {r + 1}/{rounds}: {item} "
                    f"({time.perf_counter() - start:.0f}s elapsed)"
                )
                if item == GEMM:
                    target = GEMM_TARGET
                    kwargs = dict(size=gemm_size, dtype=gemm_dtype, device=device)
                else:
                    gemms = {k: costs[item][k] for k in ("infer_gemms", "train_gemms")}
                    target = f"{__name__}:measure_model"
                    kwargs = dict(name=item, **job, **gemms)
                raw[item].append(children.run(target, kwargs))
    gemm = Stats.of([g["gflops"] for g in raw[GEMM]])
    rows = [_row(name, costs[name], raw[name], gemm.median) for name in models]
    _add_ratios(rows)
    # the GPU's name and TF32 settings, read in a job (this process starts no CUDA)
    cuda = {k: raw[GEMM][0][k] for k in CUDA_INFO if k in raw[GEMM][0]}
    return rows, dict(
        gemm=gemm.as_dict(), gemm_dtype=gemm_dtype, device=device, **cuda, rounds=raw, costs=costs
    )


def _row(
    name: str, cost: dict[str, Any], results: list[dict[str, Any]], gemm_gflops: float
) -> dict[str, Any]:
    infer = Stats.of([r["infer_ips"] for r in results])
    train = Stats.of([r["train_ips"] for r in results])
    peak = Stats.of([r["peak_train_bytes"] for r in results])
    # share of the time the model's own matrix products alone would take (same process)
    infer_mm = Stats.of([r["infer_gemm_s"] * r["infer_ips"] / r["batch"] for r in results])
    train_mm = Stats.of([r["train_gemm_s"] * r["train_ips"] / r["train_batch"] for r in results])
    gflop_per_img = 2 * cost["macs"] / 1e9
    return dict(
        model=name,
        params_m=cost["params"] / 1e6,
        gmacs=cost["macs"] / 1e9,
        infer_ips=infer.median,
        infer_ips_min=infer.min,
        infer_ips_max=infer.max,
        train_ips=train.median,
        train_ips_min=train.min,
        train_ips_max=train.max,
        act_mib_per_img=cost["act_bytes_per_img"] / MiB,
        peak_train_mib=peak.median / MiB,
        infer_gemm_pct=100 * gflop_per_img * infer.median / gemm_gflops,
        train_gemm_pct=100 * 3 * gflop_per_img * train.median / gemm_gflops,
        infer_matmul_pct=100 * infer_mm.median,
        train_matmul_pct=100 * train_mm.median,
        infer_display=_range(infer),
        train_display=_range(train),
    )


def _range(stats: Stats) -> str:
    if len(stats.values) == 1:
        return f"{stats.median:.1f}"
    return f"{stats.median:.1f} ({stats.min:.1f}–{stats.max:.1f})"


RATIO_METRICS = ("infer_ips", "train_ips", "peak_train_mib")


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    by_model = {r["model"]: r for r in rows}
    for ref in REFERENCES:
        if ref not in by_model:
            continue
        for metric in RATIO_METRICS:
            for r in rows:
                r[f"{metric}_vs_{ref}"] = ratio(r[metric], by_model[ref][metric])


def _peak_name(device: str) -> str:
    """What the peak-memory column measures: the child's RSS, or CUDA allocations."""
    return "RSS" if device == "cpu" else "memory"


def _columns(
    rows: list[dict[str, Any]], gemm_dtype: str, device: str = "cpu"
) -> tuple[list[Column], list[str]]:
    """Markdown columns and CSV keys (the CSV keeps raw numbers, no display strings)."""
    gemm = "fp32" if gemm_dtype == "float32" else "bf16"
    peak = _peak_name(device)
    cols = [
        Column("model", "model"),
        Column("params_m", "params (M)", "{:.2f}"),
        Column("gmacs", "GMACs", "{:.3g}"),
        Column("infer_display", "inference img/s", align="right"),
        Column("train_display", "training img/s", align="right"),
        Column("act_mib_per_img", "saved act. (MiB/img)", "{:.1f}"),
        Column("peak_train_mib", f"peak train {peak} (MiB)", "{:,.0f}"),
        Column("infer_gemm_pct", f"inference % of {gemm} GEMM", "{:.0f}%"),
        Column("train_gemm_pct", f"training % of {gemm} GEMM", "{:.0f}%"),
        Column("infer_matmul_pct", "inference % of own-shape matmul", "{:.0f}%"),
        Column("train_matmul_pct", "training % of own-shape matmul", "{:.0f}%"),
    ]
    short = dict(infer_ips="inference", train_ips="training", peak_train_mib=f"peak {peak}")
    present = [ref for ref in REFERENCES if any(r["model"] == ref for r in rows)]
    ratio_cols = [
        Column(f"{m}_vs_{ref}", f"{short[m]} / {ref}", "{:.2f}x")
        for ref in present
        for m in RATIO_METRICS
    ]
    csv_keys = [
        "model",
        "params_m",
        "gmacs",
        "infer_ips",
        "infer_ips_min",
        "infer_ips_max",
        "train_ips",
        "train_ips_min",
        "train_ips_max",
        "act_mib_per_img",
        "peak_train_mib",
        "infer_gemm_pct",
        "train_gemm_pct",
        "infer_matmul_pct",
        "train_matmul_pct",
    ] + [c.key for c in ratio_cols]
    return cols + ratio_cols, csv_keys


def _panels(rows: list[dict[str, Any]], device: str = "cpu") -> list[Panel]:
    names = [r["model"] for r in rows]

    def speed(metric: str, title: str) -> Panel:
        values = [r[metric] for r in rows]
        lo = [r[f"{metric}_min"] for r in rows]
        hi = [r[f"{metric}_max"] for r in rows]
        return Panel(title, "images/s", names, {"": values}, {"": (lo, hi)})

    return [
        speed("infer_ips", "inference (min-max over rounds)"),
        speed("train_ips", "training (min-max over rounds)"),
        Panel(
            f"peak training {_peak_name(device)}",
            "MiB",
            names,
            {"": [r["peak_train_mib"] for r in rows]},
        ),
        Panel("saved activations", "MiB/image", names, {"": [r["act_mib_per_img"] for r in rows]}),
    ]


def _cmd_steps(args: argparse.Namespace) -> int:
    """The step benchmark (`quadranet.bench.steps`): CUDA, or CPU with --modes."""
    from quadranet.bench import steps

    device = check_device(args.device)
    cuda = device.startswith("cuda")
    modes = args.modes or (list(steps.MODES) if cuda else ["eager"])
    steps.check_modes(modes, device)
    batch = args.batch or (256 if cuda else 32)
    train_batch = args.train_batch or (128 if cuda else 16)
    rows = steps.run_steps_bench(
        models=args.models,
        modes=modes,
        img_size=args.img_size,
        batch=batch,
        train_batch=train_batch,
        precision=args.precision,
        channels_last=args.channels_last,
        steps=args.steps,
        warmup=args.warmup,
        device=device,
        drop_path_rate=args.drop_path,
        threads=args.threads,
    )
    settings = dict(
        vars_json(args), batch=batch, train_batch=train_batch, modes=modes,
        command="quadranet " + " ".join(sys.argv[1:]),
    )  # fmt: skip
    paths = steps.write_steps_report(rows, args.output, settings)
    json_path = Path(args.output) / f"steps_{args.precision}.json"
    json_path.write_text(json.dumps(dict(settings=settings, rows=rows), indent=1))
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in [*paths.values(), json_path])}")
    failures = steps.parity_failures(rows, args.precision)
    for line in failures:
        print(f"quadranet bench throughput: error: {line}", file=sys.stderr)
    return 1 if failures else 0


def _cmd_throughput(args: argparse.Namespace) -> int:
    if args.modes is not None or args.device.startswith("cuda"):
        return _cmd_steps(args)
    threads = args.threads or torch.get_num_threads()
    args.batch, args.train_batch = args.batch or 32, args.train_batch or 16
    rows, raw = run_throughput_bench(
        models=args.models,
        img_size=args.img_size,
        batch=args.batch,
        train_batch=args.train_batch,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        threads=threads,
        rounds=args.rounds,
        warmup=args.warmup,
        repeats=args.repeats,
        allocator=args.allocator,
        gemm_size=args.gemm_size,
        settle=args.settle,
        device=args.device,
        drop_path_rate=args.drop_path,
    )
    gemm = raw["gemm"]
    device = raw["device"]
    layout = "channels-last" if args.channels_last else "NCHW"
    if device == "cpu":
        peak_note = (
            "peak train RSS: high-water mark of the child's RSS during training above its RSS "
            "before the first step (weights, gradients, AdamW state and activations)"
        )
        machine = machine_info(threads, args.allocator)
    else:
        peak_note = (
            "peak train memory: torch.cuda.max_memory_allocated above the memory allocated "
            "before the first step (gradients, AdamW state and activations; the weights and "
            "the batch were allocated before)"
        )
        machine = f"{raw['device_name']} ({device}), host {machine_info(threads, args.allocator)}"
    notes = [
        f"{args.img_size}x{args.img_size}, {args.precision}"
        + (" (torch.autocast bfloat16)" if args.precision == "bf16" else "")
        + f", {layout}"
        + (", torch.compile (compile time excluded)" if args.compile else ", eager")
        + f", on {device}",
        f"inference: batch {args.batch}, the model reparameterized (timm's "
        "reparameterize_model); training (forward, backward, fused AdamW): batch "
        f"{args.train_batch}, drop-path {args.drop_path}; each the median of {args.repeats} "
        f"calls after {args.warmup} warm-up (and up to {args.settle} more while a call still "
        f"page-faults over {SETTLED_FAULTS} times and fewer than the one before: the "
        "allocator growing)",
        f"{args.rounds} round(s), models interleaved, one child process per model per round; "
        "img/s: median over rounds (min–max)",
        "GMACs: conv + linear (+ attention matmul) multiply-accumulates per image; saved act.: "
        "bytes autograd keeps for backward per image, fp32, parameters excluded",
        peak_note,
        f"% of GEMM: model FLOP/s (2 x MACs per inference image, 6 x MACs per training image) "
        f"/ the {raw['gemm_dtype']} {args.gemm_size}^3 matmul rate measured "
        f"in the same setting each round: {gemm['median']:.1f} GFLOP/s "
        f"({gemm['min']:.1f}–{gemm['max']:.1f})",
        "% of own-shape matmul: the time the model's own dense matrix products (linear, "
        "non-depthwise conv as im2col, attention; forward, and for training also both "
        "gradients) take alone at their exact shapes, timed in the same child right after the "
        "model, as a share of the model's time: the fraction of the machine's matmul rate, "
        "at the shapes this model needs, that the model reaches (median over rounds)",
        f"machine: {machine}",
    ]
    if device != "cpu":
        notes.append(
            "CUDA: torch's defaults left as they are: "
            f"torch.backends.cuda.matmul.allow_tf32={raw['matmul_allow_tf32']} (False: fp32 "
            f"matmuls in full fp32), torch.backends.cudnn.allow_tf32={raw['cudnn_allow_tf32']} "
            "(True: fp32 convolutions may use TF32); time read after torch.cuda.synchronize"
        )
    columns, csv_keys = _columns(rows, raw["gemm_dtype"], device)
    where = raw.get("device_name") or machine_info(threads).split(",")[0]
    title = f"Model throughput and training memory (QuadraNet paper, Table I) on {where}"
    paths = write_report(
        args.output, "throughput", title, notes, rows, columns, csv_keys, _panels(rows, device)
    )
    paths["json"] = Path(args.output) / "throughput_rounds.json"
    paths["json"].write_text(json.dumps(dict(settings=vars_json(args), **raw), indent=1))
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def vars_json(args: argparse.Namespace) -> dict[str, Any]:
    """The command's settings, JSON-ready."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list))}


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_parser(bench_sub: argparse._SubParsersAction) -> None:
    """Register `quadranet bench throughput`."""
    p = bench_sub.add_parser(
        "throughput",
        help="inference/training speed and memory of models (Table I)",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--models",
        type=_name_list,
        default=list(DEFAULT_MODELS),
        help="comma-separated timm/QuadraNet names, or 'reference' (unfused QuadraNet36-T)",
    )
    p.add_argument("--img-size", type=int, default=224, help="input side")
    p.add_argument(
        "--batch", type=int, default=None, help="inference batch (default: 32 on CPU, 256 on CUDA)"
    )
    p.add_argument(
        "--train-batch",
        type=int,
        default=None,
        help="training batch (default: 16 on CPU, 128 on CUDA)",
    )
    p.add_argument(
        "--modes",
        type=_name_list,
        default=None,
        help="step benchmark modes, compared within a mode: eager, graph (whole step in one "
        "CUDA graph), compile, compile-graph (default on CUDA: all four; on the CPU without "
        "--modes: the Table I benchmark)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode (step benchmark)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="bf16: torch.autocast to bfloat16 on the device (the GEMM timed in bf16 too)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the models and GEMMs run: cpu, cuda or cuda:N (peak memory is then "
        "torch.cuda.max_memory_allocated instead of RSS)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels-last memory format for weights and inputs",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument(
        "--drop-path",
        type=float,
        default=DROP_PATH_RATE,
        help="stochastic depth in the training steps (the training engine's default)",
    )
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all models")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument(
        "--settle",
        type=int,
        default=SETTLE,
        help="extra untimed calls allowed while a call still page-faults (the allocator "
        "growing its pool) and fewer than the call before",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    p.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="retained",
        help="malloc of the child processes: retained (glibc keeping freed memory), "
        "jemalloc (LD_PRELOAD), default (plain glibc), or mmap (every tensor its own "
        "mapping: the peak RSS follows the live tensors, steps page-fault)",
    )
    p.add_argument("--gemm-size", type=int, default=GEMM_SIZE, help="side of the GEMM timed")
    p.add_argument("--output", default="results/bench_throughput", help="folder for the outputs")
    p.set_defaults(func=_cmd_throughput)
