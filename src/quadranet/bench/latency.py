"""`quadranet bench latency`: inference latency per backend (torch, torch.compile, ONNX Runtime).

Each model runs on each backend in its own fresh child process (retained malloc, the given
threads). For every batch size: `warmup` untimed calls, then `repeats` timed calls; the
table gives the median per call with the min-max range. Set-up is timed on its own and
excluded: for torch.compile the first call at each batch size (compilation), for ONNX
Runtime the export to ONNX plus the session creation. Ratios divide a model's median by
that of quadranet36_t (and hornet_t) on the same backend and batch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quadranet.bench.runner import (
    ALLOCATORS,
    ChildProcesses,
    Column,
    Panel,
    Stats,
    allocator_env,
    choice_list,
    int_list,
    machine_info,
    progress,
    ratio,
    time_fn,
    write_report,
)
from quadranet.bench.throughput import build_model, vars_json
from quadranet.export import ExportError, OnnxModel, export_onnx

BACKENDS = ("torch", "torch-compile", "onnxruntime")
PRECISIONS = ("fp32", "bf16")
DEFAULT_MODELS = ("quadranet36_t", "hornet_t", "swin_tiny_patch4_window7_224", "convnext_tiny")
REFERENCES = ("quadranet36_t", "hornet_t")
FP32_ONLY = ("onnxruntime",)  # ONNX Runtime's CPU kernels are fp32 (or int8), not bf16


def _time_torch(
    name: str,
    compile: bool,
    batches: Sequence[int],
    img_size: int,
    precision: str,
    channels_last: bool,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    model = build_model(name).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    run = torch.compile(model) if compile else model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times, setup = {}, {}
    for batch in batches:
        x = torch.randn(batch, 3, img_size, img_size).contiguous(memory_format=memory_format)

        def call(x: torch.Tensor = x) -> None:
            with torch.no_grad(), autocast:
                run(x)

        start = time.perf_counter()
        call()  # compiles for this shape under torch.compile; excluded from the timing
        setup[batch] = time.perf_counter() - start
        times[batch] = time_fn(call, warmup, repeats).as_dict()
    return dict(times=times, setup_s=setup if compile else None)


def _time_onnxruntime(
    name: str, batches: Sequence[int], img_size: int, warmup: int, repeats: int
) -> dict[str, Any]:
    model = build_model(name).eval()
    with tempfile.TemporaryDirectory(prefix="quadranet-latency-") as tmp:
        start = time.perf_counter()
        result = export_onnx(model, Path(tmp) / f"{name}.onnx", 3, img_size, dynamic_batch=True)
        session = OnnxModel(result.path, threads=torch.get_num_threads())
        setup = time.perf_counter() - start
        del model
        times = {}
        for batch in batches:
            x = np.random.default_rng(0).standard_normal((batch, 3, img_size, img_size))
            x = x.astype(np.float32)
            times[batch] = time_fn(lambda x=x: session(x), warmup, repeats).as_dict()
    return dict(times=times, setup_s={b: setup for b in batches}, exporter=result.exporter)


def measure_latency(
    name: str,
    backend: str,
    batches: Sequence[int] = (1,),
    img_size: int = 224,
    precision: str = "fp32",
    channels_last: bool = True,
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, Any]:
    """Seconds per inference call at each batch size of one model on one backend (a child job).

    A backend that fails to compile or export returns {"error": message} instead of raising.
    """
    torch.manual_seed(0)
    try:
        if backend == "onnxruntime":
            out = _time_onnxruntime(name, batches, img_size, warmup, repeats)
        else:
            out = _time_torch(
                name,
                backend == "torch-compile",
                batches,
                img_size,
                precision,
                channels_last,
                warmup,
                repeats,
            )
    except ExportError as err:
        return dict(error=str(err)[:300])
    except (ValueError, FileNotFoundError):
        raise  # a wrong model name or input size: the user's to fix, not a backend failure
    except Exception as err:  # torch.compile needs a C++ compiler and may fail on a model
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return dict(error=f"{type(err).__name__}: {first[:300]}")
    return dict(out, threads=torch.get_num_threads())


def run_latency_bench(
    models: Sequence[str] = DEFAULT_MODELS,
    backends: Sequence[str] = BACKENDS,
    batches: Sequence[int] = (1, 32),
    img_size: int = 224,
    precision: str = "fp32",
    channels_last: bool = True,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    allocator: str = "retained",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Table rows (model x backend x batch) and the raw results per (model, backend)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    if min([repeats, img_size, *batches]) < 1 or warmup < 0:
        raise ValueError("repeats, batch sizes and img-size must be positive, warmup >= 0")
    if not models or len(set(models)) != len(models):
        raise ValueError(f"models must be distinct names, got {list(models)}")
    allocator_env(allocator)  # a missing jemalloc fails before any work
    job = dict(
        batches=list(batches),
        img_size=img_size,
        precision=precision,
        channels_last=channels_last,
        warmup=warmup,
        repeats=repeats,
    )
    raw: dict[str, dict[str, Any]] = {}
    with ChildProcesses(allocator, threads, preload=[__name__]) as children:
        for name in models:
            build_model_check(name)
        for name in models:
            for backend in backends:
                key = f"{name}|{backend}"
                if precision != "fp32" and backend in FP32_ONLY:
                    raw[key] = dict(error=f"{backend} runs fp32 models only here; not measured")
                    progress(f"[latency] {name} on {backend}: skipped ({precision})")
                    continue
                progress(f"[latency] {name} on {backend}")
                raw[key] = children.run(
                    f"{__name__}:measure_latency", dict(name=name, backend=backend, **job)
                )
                if "error" in raw[key]:
                    progress(f"[latency] {name} on {backend} failed: {raw[key]['error']}")
    rows = _rows(models, backends, batches, raw)
    return rows, raw


def build_model_check(name: str) -> None:
    """Fail early on an unknown model name (built on the meta device, no weights)."""
    with torch.device("meta"):
        build_model(name)


def _rows(
    models: Sequence[str],
    backends: Sequence[str],
    batches: Sequence[int],
    raw: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        for backend in backends:
            result = raw[f"{name}|{backend}"]
            for batch in batches:
                row: dict[str, Any] = dict(model=name, backend=backend, batch=batch)
                if "error" in result:
                    row["note"] = result["error"]
                else:
                    stats = Stats.of(result["times"][str(batch)]["values"])
                    setup = result.get("setup_s")
                    row.update(
                        ms=1e3 * stats.median,
                        ms_min=1e3 * stats.min,
                        ms_max=1e3 * stats.max,
                        images_per_s=batch / stats.median,
                        setup_s=setup[str(batch)] if setup else None,
                        display=f"{1e3 * stats.median:.1f} ({1e3 * stats.min:.1f}–"
                        f"{1e3 * stats.max:.1f})",
                        note=result.get("exporter") and f"{result['exporter']} exporter",
                    )
                rows.append(row)
    by_key = {(r["model"], r["backend"], r["batch"]): r for r in rows}
    for r in rows:
        for ref in REFERENCES:
            other = by_key.get((ref, r["backend"], r["batch"]))
            r[f"vs_{ref}"] = ratio(r.get("ms"), other.get("ms")) if other else None
    return rows


def _columns(rows: list[dict[str, Any]]) -> tuple[list[Column], list[str]]:
    present = [ref for ref in REFERENCES if any(r["model"] == ref for r in rows)]
    cols = [
        Column("model", "model"),
        Column("backend", "backend"),
        Column("batch", "batch"),
        Column("display", "latency ms (min–max)", align="right"),
        Column("images_per_s", "img/s", "{:.1f}"),
        Column("setup_s", "compile/export s", "{:.1f}"),
        *(Column(f"vs_{ref}", f"/ {ref}", "{:.2f}x") for ref in present),
        Column("note", "note", align="left"),
    ]
    keys = ["model", "backend", "batch", "ms", "ms_min", "ms_max", "images_per_s", "setup_s"]
    return cols, keys + [f"vs_{ref}" for ref in present] + ["note"]


def _panels(rows: list[dict[str, Any]], models: Sequence[str], batches: Sequence[int]) -> list:
    panels = []
    for batch in batches:
        series, errors = {}, {}
        for backend in dict.fromkeys(r["backend"] for r in rows):
            picked = [
                next(
                    r for r in rows if (r["model"], r["backend"], r["batch"]) == (m, backend, batch)
                )
                for m in models
            ]
            series[backend] = [r.get("ms") for r in picked]
            errors[backend] = (
                [r.get("ms_min", float("nan")) for r in picked],
                [r.get("ms_max", float("nan")) for r in picked],
            )
        panels.append(
            Panel(f"batch {batch} (min-max)", "ms per batch", list(models), series, errors)
        )
    return panels


def _cmd_latency(args: argparse.Namespace) -> int:
    threads = args.threads or torch.get_num_threads()
    batches = [b for group in args.batch or [[1, 32]] for b in group]
    backends = [b for group in args.backend or [list(BACKENDS)] for b in group]
    rows, raw = run_latency_bench(
        models=args.models or list(DEFAULT_MODELS),
        backends=list(dict.fromkeys(backends)),
        batches=list(dict.fromkeys(batches)),
        img_size=args.img_size,
        precision=args.precision,
        channels_last=args.channels_last,
        threads=threads,
        warmup=args.warmup,
        repeats=args.repeats,
        allocator=args.allocator,
    )
    layout = "channels-last" if args.channels_last else "NCHW"
    notes = [
        f"{args.img_size}x{args.img_size}, {args.precision}"
        + (" (torch.autocast bfloat16)" if args.precision == "bf16" else "")
        + f", torch inputs {layout}; ONNX Runtime: CPU provider, all graph optimisations",
        f"median of {args.repeats} calls after {args.warmup} warm-up calls, one fresh child "
        "process per model and backend",
        "compile/export s: torch.compile's first call at that batch size, or export to ONNX + "
        "session creation; excluded from the latency",
        f"machine: {machine_info(threads, args.allocator)}",
    ]
    columns, keys = _columns(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    paths = write_report(
        args.output,
        "latency",
        "Inference latency: torch eager, torch.compile, ONNX Runtime",
        notes,
        rows,
        columns,
        keys,
        _panels(rows, models, list(dict.fromkeys(batches))),
    )
    paths["json"] = Path(args.output) / "latency_raw.json"
    paths["json"].write_text(json.dumps(dict(settings=vars_json(args), results=raw), indent=1))
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def add_parser(bench_sub: argparse._SubParsersAction) -> None:
    """Register `quadranet bench latency`."""
    p = bench_sub.add_parser(
        "latency",
        help="inference latency on torch, torch.compile and ONNX Runtime",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("models", nargs="*", help=f"model names (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument(
        "--backend",
        type=choice_list(BACKENDS, "backend"),
        action="append",
        default=None,
        help=f"one or more of {', '.join(BACKENDS)} (repeat or comma-separate; default all)",
    )
    p.add_argument(
        "--batch", type=int_list, action="append", default=None, help="batch sizes (default 1,32)"
    )
    p.add_argument("--img-size", type=int, default=224, help="input side (default 224)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default) or bf16 (CPU autocast)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels-last weights and inputs on the torch backends (default on)",
    )
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    p.add_argument(
        "--repeats", type=int, default=10, help="timed calls per batch size (default 10)"
    )
    p.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="retained",
        help="malloc of the child processes (default retained)",
    )
    p.add_argument(
        "--output", default="results/latency", help="output folder (default results/latency)"
    )
    p.set_defaults(func=_cmd_latency)
