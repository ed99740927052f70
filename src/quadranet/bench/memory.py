"""`quadranet bench memory`: training memory of stacks of blocks (the paper's Table II).

For each width and each block type, a stack of `depth` blocks on a `batch x dim x img x img`
map is measured three ways:

- saved bytes: what autograd keeps for backward at `batch` (exact; counted on the meta
  device, so any size works and nothing is allocated);
- peak memory of one training step (forward, backward, AdamW step) at `peak_batch`, in a
  fresh child process per row: RSS high-water mark above the RSS after building the stack
  and its input on CPU (with the `mmap` allocator the RSS follows the live tensors),
  `torch.cuda.max_memory_allocated` above the baseline on CUDA;
- step time at `peak_batch`: median of a few steps after warm-up, in another fresh child
  (with the `retained` allocator, as in `bench throughput`, so steps do not page-fault).

Each is also given as a ratio to ConvBlock and to HorBlock of the same width.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quadranet.bench.measure import saved_tensor_bytes
from quadranet.bench.runner import (
    ALLOCATORS,
    ChildProcesses,
    Column,
    Panel,
    allocator_env,
    available_memory,
    check_device,
    choice_list,
    int_list,
    machine_info,
    progress,
    ratio,
    synchronizer,
    time_fn,
    track_peak_memory,
    write_report,
)
from quadranet.blocks import ConvBlock, HorBlock, QuadraBlock, SkipBlock, SwinBlock

# Row key -> (label, factory(dim, index in the stack, img_size) -> block).
BlockFactory = Callable[[int, int, int], nn.Module]
ROWS: dict[str, tuple[str, BlockFactory]] = {
    "skip": ("SkipBlock", lambda dim, i, img: SkipBlock(dim)),
    "conv": ("ConvBlock", lambda dim, i, img: ConvBlock(dim)),
    "swin": (
        "SwinBlock",
        lambda dim, i, img: SwinBlock(dim, shift=i % 2 == 1, input_resolution=img),
    ),
    "hor": ("HorBlock (order 3)", lambda dim, i, img: HorBlock(dim, order=3)),
    "quadra-none": (
        "QuadraBlock (recompute none)",
        lambda dim, i, img: QuadraBlock(dim, recompute="none"),
    ),
    "quadra": ("QuadraBlock (recompute cheap, default)", lambda dim, i, img: QuadraBlock(dim)),
    "quadra-full": (
        "QuadraBlock (recompute full)",
        lambda dim, i, img: QuadraBlock(dim, recompute="full"),
    ),
}
REFERENCES = ("conv", "hor")  # ratio columns: relative to ConvBlock and to HorBlock

DEFAULT_DIMS = (64, 128)
DEFAULT_DEPTH = 24
DEFAULT_BATCH = 64
DEFAULT_IMG_SIZE = 56
# The paper's batch 64 at 128 channels needs up to 48 GiB (HorBlock's saved activations);
# at batch 8 the largest row saves 6 GiB, so a measured step fits a 24 GiB machine.
DEFAULT_PEAK_BATCH = 8
MEMORY_SAFETY = 0.8  # refuse a peak run predicted to need more of the available memory
MiB = 2**20


def build_stack(row: str, dim: int, depth: int, img_size: int = DEFAULT_IMG_SIZE) -> nn.Sequential:
    """`depth` blocks of one row type at width `dim` (Swin alternates shifted windows)."""
    if row not in ROWS:
        raise ValueError(f"unknown block row {row!r}; choose from {', '.join(ROWS)}")
    _, factory = ROWS[row]
    return nn.Sequential(*(factory(dim, i, img_size) for i in range(depth)))


def stack_saved_bytes(row: str, dim: int, depth: int, batch: int, img_size: int) -> int:
    """Bytes autograd saves for backward through the stack (counted on the meta device)."""
    with torch.device("meta"):
        stack = build_stack(row, dim, depth, img_size)
        x = torch.zeros(batch, dim, img_size, img_size, requires_grad=True)
    return saved_tensor_bytes(lambda: stack(x), exclude=tuple(stack.parameters()))


def _training_step(
    row: str, dim: int, depth: int, batch: int, img_size: int, device: str
) -> Callable[[], None]:
    """A training step (forward, backward, AdamW) of a freshly built stack and input."""
    device = check_device(device)
    torch.manual_seed(0)
    stack = build_stack(row, dim, depth, img_size).to(device)
    optimizer = torch.optim.AdamW(stack.parameters(), lr=1e-4)
    x = torch.randn(batch, dim, img_size, img_size, device=device, requires_grad=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        stack(x).mean().backward()
        optimizer.step()

    return step


def measure_peak(
    row: str, dim: int, depth: int, batch: int, img_size: int, device: str = "cpu"
) -> dict[str, Any]:
    """Peak memory of the first training step above the memory after building (a child job)."""
    step = _training_step(row, dim, depth, batch, img_size, device)
    # The first step of a fresh process: nothing freed earlier can hide in the baseline.
    with track_peak_memory(device) as peak:
        step()
    return dict(peak_bytes=peak.bytes, baseline_bytes=peak.baseline, exact_reset=peak.exact_reset)


def measure_step_time(
    row: str,
    dim: int,
    depth: int,
    batch: int,
    img_size: int,
    device: str = "cpu",
    warmup: int = 1,
    repeats: int = 3,
) -> dict[str, Any]:
    """Seconds per training step: median of `repeats` after `warmup` (a child job)."""
    step = _training_step(row, dim, depth, batch, img_size, device)
    return time_fn(step, warmup, repeats, synchronizer(device)).as_dict()


def run_memory_bench(
    dims: Sequence[int] = DEFAULT_DIMS,
    depth: int = DEFAULT_DEPTH,
    batch: int = DEFAULT_BATCH,
    img_size: int = DEFAULT_IMG_SIZE,
    peak_batch: int = DEFAULT_PEAK_BATCH,
    rows: Sequence[str] = tuple(ROWS),
    device: str = "cpu",
    peak_allocator: str = "mmap",
    allocator: str = "retained",
    threads: int | None = None,
    warmup: int = 1,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """One result row per (width, block): saved bytes, peak memory, step time, ratios.

    The peak and the step time of a row are measured in two fresh processes: one with
    `peak_allocator` (whose RSS follows the live tensors), one with `allocator`.
    """
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if min(depth, batch, img_size) <= 0 or peak_batch < 0:
        raise ValueError("depth, batch and img-size must be positive (peak-batch 0 skips peaks)")
    allocator_env(peak_allocator)  # a missing jemalloc fails here, before any work
    allocator_env(allocator)
    results = []
    with (
        ChildProcesses(peak_allocator, threads, preload=[__name__]) as peak_children,
        ChildProcesses(allocator, threads, preload=[__name__]) as time_children,
    ):
        if peak_batch:  # both servers import torch while the saved bytes are counted
            peak_children.start()
            time_children.start()
        for dim in dims:
            saved = {row: stack_saved_bytes(row, dim, depth, batch, img_size) for row in rows}
            for row in rows:
                result: dict[str, Any] = dict(
                    dim=dim,
                    block=ROWS[row][0],
                    row=row,
                    saved_mib=saved[row] / MiB,
                    peak_mib=None,
                    step_s=None,
                )
                if peak_batch:
                    _check_fits(row, dim, saved[row] * peak_batch / batch, device, peak_batch)
                    progress(f"[memory] {dim} ch, {ROWS[row][0]}: batch {peak_batch}")
                    job = dict(
                        row=row,
                        dim=dim,
                        depth=depth,
                        batch=peak_batch,
                        img_size=img_size,
                        device=device,
                    )
                    peak = peak_children.run(f"{__name__}:measure_peak", job)
                    timing = time_children.run(
                        f"{__name__}:measure_step_time", dict(job, warmup=warmup, repeats=repeats)
                    )
                    result.update(
                        peak_mib=peak["peak_bytes"] / MiB,
                        step_s=timing["median"],
                        exact_reset=peak["exact_reset"],
                    )
                results.append(result)
            _add_ratios([r for r in results if r["dim"] == dim])
    return results


def _check_fits(row: str, dim: int, predicted: float, device: str, peak_batch: int) -> None:
    """Refuse a CPU peak run whose saved activations alone would not fit in memory."""
    available = available_memory() if device == "cpu" else None
    if available is not None and predicted > MEMORY_SAFETY * available:
        raise ValueError(
            f"{ROWS[row][0]} at {dim} channels would save {predicted / 2**30:.1f} GiB at "
            f"batch {peak_batch} but only {available / 2**30:.1f} GiB is available; "
            "lower --peak-batch"
        )


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratio columns of saved bytes, peak and step time to the reference rows of one width."""
    by_row = {r["row"]: r for r in rows}
    for metric in ("saved_mib", "peak_mib", "step_s"):
        for ref in REFERENCES:
            ref_value = by_row[ref][metric] if ref in by_row else None
            for r in rows:
                r[f"{metric}_vs_{ref}"] = ratio(r[metric], ref_value)


def _columns(batch: int, peak_batch: int) -> list[Column]:
    cols = [Column("dim", "channels"), Column("block", "block")]
    for metric, header, fmt in (
        ("saved_mib", f"saved for backward (MiB, batch {batch})", "{:,.1f}"),
        ("peak_mib", f"peak step memory (MiB, batch {peak_batch})", "{:,.0f}"),
        ("step_s", f"step time (s, batch {peak_batch})", "{:.3f}"),
    ):
        cols.append(Column(metric, header, fmt))
        cols.extend(
            Column(f"{metric}_vs_{ref}", f"/ {ROWS[ref][0].split()[0]}", "{:.2f}x")
            for ref in REFERENCES
        )
    return cols


def _panels(results: list[dict[str, Any]], batch: int, peak_batch: int) -> list[Panel]:
    labels = list(dict.fromkeys(r["block"] for r in results))
    dims = list(dict.fromkeys(r["dim"] for r in results))

    def series(metric: str) -> dict[str, list[float | None]]:
        values = {(r["dim"], r["block"]): r[metric] for r in results}
        return {f"{d} ch": [values.get((d, b)) for b in labels] for d in dims}

    panels = [Panel(f"saved for backward, batch {batch}", "MiB", labels, series("saved_mib"))]
    if any(r["peak_mib"] is not None for r in results):
        panels.append(
            Panel(f"peak step memory, batch {peak_batch}", "MiB", labels, series("peak_mib"))
        )
        panels.append(Panel(f"step time, batch {peak_batch}", "s", labels, series("step_s")))
    return panels


def _cmd_memory(args: argparse.Namespace) -> int:
    threads = args.threads or torch.get_num_threads()
    results = run_memory_bench(
        dims=args.dims,
        depth=args.depth,
        batch=args.batch,
        img_size=args.img_size,
        peak_batch=args.peak_batch,
        rows=args.rows,
        device=args.device,
        peak_allocator=args.peak_allocator,
        allocator=args.allocator,
        threads=threads,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    peak_where = (
        "process RSS high-water mark above the RSS after building the stack and input, in a "
        f"fresh process per row, allocator {args.peak_allocator}"
        if args.device == "cpu"
        else "torch.cuda.max_memory_allocated above the memory allocated before the step"
    )
    notes = [
        f"stacks of {args.depth} blocks on a {args.img_size}x{args.img_size} map, fp32",
        f"saved for backward: bytes autograd keeps at batch {args.batch} (exact, parameters "
        "excluded, counted on the meta device)",
        f"peak step memory: first training step (forward, backward, AdamW) at batch "
        f"{args.peak_batch} on {args.device}; {peak_where}",
        f"step time: median of {args.repeats} steps after {args.warmup} warm-up, "
        f"batch {args.peak_batch}, in another fresh process per row"
        + (f", allocator {args.allocator}" if args.device == "cpu" else ""),
        f"machine: {machine_info(threads)}",
    ]
    if not args.peak_batch:
        notes = notes[:2] + notes[-1:]
    elif not all(r.get("exact_reset", True) for r in results):
        notes.append(
            "the kernel refused to reset the RSS high-water mark: peaks count from "
            "process start, an upper bound"
        )
    title = "Training memory of block stacks (QuadraNet paper, Table II)"
    columns = _columns(args.batch, args.peak_batch)
    paths = write_report(
        args.output,
        "memory",
        title,
        notes,
        results,
        columns,
        ["dim", "row", *(c.key for c in columns[1:])],
        _panels(results, args.batch, args.peak_batch),
    )
    print(Path(paths["md"]).read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def add_parser(bench_sub: argparse._SubParsersAction) -> None:
    """Register `quadranet bench memory`."""
    p = bench_sub.add_parser(
        "memory",
        help="training memory of 24-block stacks (Table II)",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dims", type=int_list, default=list(DEFAULT_DIMS), help="widths, e.g. 64,128")
    p.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="blocks per stack")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="batch of the saved bytes")
    p.add_argument("--img-size", type=int, default=DEFAULT_IMG_SIZE, help="map side")
    p.add_argument(
        "--peak-batch",
        type=int,
        default=DEFAULT_PEAK_BATCH,
        help="batch of the measured step (0: saved bytes only); the default fits 24 GiB",
    )
    p.add_argument(
        "--rows",
        type=choice_list(ROWS, "rows"),
        default=list(ROWS),
        help=f"blocks, from {','.join(ROWS)}",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] for the measured step")
    p.add_argument(
        "--peak-allocator",
        choices=ALLOCATORS,
        default="mmap",
        help="malloc of the peak-memory child: mmap gives every tensor back to the OS when "
        "freed, so the RSS follows the live tensors",
    )
    p.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="retained",
        help="malloc of the step-time child (as in `bench throughput`)",
    )
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed steps")
    p.add_argument("--output", default="results/bench_memory", help="folder for md, csv, png")
    p.set_defaults(func=_cmd_memory)
