"""Training and inference steps timed in the four ways people run them on a GPU.

`quadranet bench throughput --modes ...` (the default on CUDA) times, per model and mode:

- `eager`: plain PyTorch;
- `graph`: eager with the whole step captured in one CUDA graph (training: forward,
  backward and a fused, capturable AdamW step; inference: the forward), replayed;
- `compile`: `torch.compile(fullgraph=True)` of the model;
- `compile-graph`: the same with `mode="reduce-overhead"` (inductor's CUDA graphs).

Steps are timed back to back, `steps` of them between two CUDA events with one
synchronisation (on the CPU: a wall clock around them). One more profiled step gives the
kernel launches per step and the GPU-busy fraction (kernel time / step time). Training
runs with drop-path, as the engine trains; inference runs the model in its inference form
(timm's `reparameterize_model`, applied after training's timing); `cudnn.benchmark` is on.
Compiled models run their timed steps with recompilation turned into an error, so the
numbers are for one graph, and are first checked against eager: loss and gradients of one
training step, with the same drop-path masks (inductor draws random numbers as eager does
for the check only). Modes are only compared within a mode.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.utils.model import reparameterize_model

MODES = ("eager", "graph", "compile", "compile-graph")
GRAPH_MODES = ("graph", "compile-graph")
MiB = 2**20
# Largest relative error of a compiled step's loss and gradients against eager that still
# counts as a match: fp32 differs only in summation order; bf16 rounds fused
# intermediates differently.
PARITY_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}


def check_modes(modes: list[str], device: str) -> list[str]:
    """The modes, validated for `device` (CUDA graphs need a CUDA device)."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"--modes takes a comma-separated subset of {', '.join(MODES)}")
    if not device.startswith("cuda") and any(m in GRAPH_MODES for m in modes):
        raise ValueError("the graph and compile-graph modes need --device cuda (CUDA graphs)")
    return modes


def _timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    """A function timing `n` back-to-back calls (seconds per call, one synchronisation)."""

    def cuda(fn: Callable[[], Any], n: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / n

    def cpu(fn: Callable[[], Any], n: int) -> float:
        begin = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - begin) / n

    return cuda if device.type == "cuda" else cpu


def _kernels_per_call(fn: Callable[[], Any], device: torch.device) -> tuple[int, float]:
    """(kernel launches, summed kernel seconds) of one call, from the profiler (CUDA only)."""
    if device.type != "cuda":
        return 0, 0.0
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(getattr(e, "device_time", 0.0) or getattr(e, "cuda_time", 0.0) for e in kernels)
    return len(kernels), busy / 1e6


def _captured(step: Callable[[], Any], warmup: int) -> Callable[[], Any]:
    """Warm `step` up on a side stream, capture it in one CUDA graph; returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 3)):  # autotuning and cuDNN's choices happen here
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def compiled_parity(
    model: torch.nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    precision: str = "bf16",
    backend: str = "inductor",
) -> dict[str, float]:
    """Relative error of one compiled training step against eager, on copies of `model`:
    the loss, and the largest over parameters of |grad_compiled - grad_eager| / |grad_eager|
    (Frobenius norms). Both draw the same drop-path masks from the same seed."""
    device_type = x.device.type
    bf16 = precision == "bf16"
    grads = []
    for compiled in (False, True):
        net = copy.deepcopy(model).train()
        run = torch.compile(net, backend=backend, fullgraph=True) if compiled else net
        torch.manual_seed(0)
        with torch._inductor.config.patch(fallback_random=True):
            with torch.autocast(device_type, torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(run(x), target)
            loss.backward()
        grads.append((loss.detach().float(), [p.grad for p in net.parameters()]))
    (loss_e, grads_e), (loss_c, grads_c) = grads

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))

    grad_err = max(
        (rel(c, e) for c, e in zip(grads_c, grads_e, strict=True) if e is not None), default=0.0
    )
    return dict(loss_rel_err=rel(loss_c, loss_e), grad_rel_err=grad_err)


def measure_steps(
    model: torch.nn.Module,
    mode: str,
    x_train: torch.Tensor,
    target: torch.Tensor,
    x_infer: torch.Tensor,
    precision: str = "bf16",
    steps: int = 20,
    warmup: int = 3,
) -> dict[str, Any]:
    """Seconds per training and inference step of `model` (already on its device) in
    `mode`, with peak memory, launches, GPU-busy fraction and set-up (compile) time."""
    device = x_train.device
    use_graph = mode == "graph"
    if mode in GRAPH_MODES and device.type != "cuda":
        raise ValueError(f"mode {mode!r} needs a CUDA device")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    run = model
    parity: dict[str, float] = {}
    if mode.startswith("compile"):
        parity = compiled_parity(model, x_train, target, precision)
        kind = "reduce-overhead" if mode == "compile-graph" else "default"
        run = torch.compile(model, mode=kind, fullgraph=True, dynamic=False)
    bf16 = precision == "bf16"

    def autocast() -> torch.autocast:  # no weight-cast cache inside a captured graph
        cache = not use_graph
        return torch.autocast(device.type, torch.bfloat16, enabled=bf16, cache_enabled=cache)

    def mark() -> None:  # a new iteration for inductor's CUDA graphs
        if mode == "compile-graph":
            torch.compiler.cudagraph_mark_step_begin()

    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, weight_decay=0.05, fused=True, capturable=use_graph
    )

    def body() -> None:  # forward, backward and optimizer step
        mark()
        with autocast():
            loss = F.cross_entropy(run(x_train), target)
        loss.backward()
        opt.step()

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        body()

    def infer_step() -> None:
        mark()
        with torch.no_grad(), autocast():
            run(x_infer)

    time_calls = _timer(device)
    out: dict[str, Any] = {}
    for phase in ("train", "infer"):
        model.train(phase == "train")
        if phase == "infer":  # compiled modes recompile for it in the warm-up calls
            reparameterize_model(model, inplace=True)
        step = train_step if phase == "train" else infer_step
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        begin = time.perf_counter()
        if use_graph:
            if phase == "train":
                step()  # gradients and AdamW state exist before capture
                opt.zero_grad(set_to_none=True)
                call = _captured(body, warmup)
            else:
                call = _captured(step, warmup)
        else:
            for _ in range(warmup):
                step()
            call = step
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        setup = time.perf_counter() - begin
        no_recompile = (
            torch._dynamo.config.patch(error_on_recompile=True)
            if mode.startswith("compile")
            else contextlib.nullcontext()
        )
        with no_recompile:
            seconds = time_calls(call, steps)
            launches, kernel_s = _kernels_per_call(call, device)
        batch = (x_train if phase == "train" else x_infer).shape[0]
        out[phase] = dict(
            seconds=seconds,
            ips=batch / seconds,
            setup_s=setup,
            launches=launches,
            busy=kernel_s / seconds if device.type == "cuda" else None,
            peak_alloc_mib=(torch.cuda.max_memory_allocated(device) - base) / MiB
            if device.type == "cuda"
            else None,
            peak_reserved_mib=torch.cuda.max_memory_reserved(device) / MiB
            if device.type == "cuda"
            else None,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["parity"] = parity
    return out


def measure_model(
    name: str,
    mode: str,
    img_size: int = 224,
    batch: int = 256,
    train_batch: int = 128,
    precision: str = "bf16",
    channels_last: bool = True,
    steps: int = 20,
    warmup: int = 3,
    device: str = "cuda",
    drop_path_rate: float = 0.1,
) -> dict[str, Any]:
    """`measure_steps` of a model built by name (a child job of `run_steps_bench`)."""
    from quadranet.bench.throughput import build_model

    torch.manual_seed(0)
    dev = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(name, drop_path_rate).to(dev, memory_format=fmt)
    num_classes = getattr(model, "num_classes", 0) or 1000

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, img_size, img_size, device=dev).contiguous(memory_format=fmt)

    target = torch.randint(0, num_classes, (train_batch,), device=dev)
    result = measure_steps(
        model, mode, images(train_batch), target, images(batch), precision, steps, warmup
    )
    if dev.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(dev)
    return result


def run_steps_bench(
    models: list[str], modes: list[str], threads: int | None = None, **settings: Any
) -> list[dict[str, Any]]:
    """One row per (mode, model), each measured in its own child process; `settings` are
    `measure_model`'s keyword arguments (image size, batches, precision, device, ...)."""
    from quadranet.bench.runner import ChildProcesses, progress
    from quadranet.bench.throughput import model_costs

    check_modes(modes, settings.get("device", "cuda"))
    img_size = settings.get("img_size", 224)
    rows = []
    with ChildProcesses("default", threads, preload=[__name__]) as children:
        children.start()
        macs = {m: model_costs(m, img_size, 1, 1)["macs"] / 1e9 for m in models}
        begin = time.perf_counter()
        for mode in modes:
            for name in models:
                progress(f"[steps] {mode}: {name} ({time.perf_counter() - begin:.0f}s elapsed)")
                job = dict(name=name, mode=mode, **settings)
                res = children.run(f"{__name__}:measure_model", job)
                rows.append(_row(name, mode, macs[name], res))
    _add_ratios(rows)
    return rows


def _row(name: str, mode: str, gmacs: float, res: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = dict(model=name, mode=mode, gmacs=gmacs)
    for phase in ("train", "infer"):
        r = res[phase]
        row.update({
            f"{phase}_ips": r["ips"],
            f"{phase}_gmacs_per_s": r["ips"] * gmacs,
            f"{phase}_launches": r["launches"],
            f"{phase}_busy_pct": None if r["busy"] is None else 100 * r["busy"],
            f"{phase}_setup_s": r["setup_s"],
        })  # fmt: skip
    row["peak_alloc_mib"] = res["train"]["peak_alloc_mib"]
    row["peak_reserved_mib"] = res["train"]["peak_reserved_mib"]
    row["device_name"] = res.get("device_name", "CPU")
    parity = res.get("parity") or {}
    row["grad_rel_err"] = parity.get("grad_rel_err")
    row["loss_rel_err"] = parity.get("loss_rel_err")
    return row


def parity_failures(rows: list[dict[str, Any]], precision: str) -> list[str]:
    """One line per compiled row whose loss or gradients do not match eager's."""
    tolerance = PARITY_TOLERANCE[precision]
    return [
        f"{r['mode']} {r['model']}: compiled step differs from eager (loss {r['loss_rel_err']:.1e}"
        f", gradients {r['grad_rel_err']:.1e}; tolerance {tolerance:g})"
        for r in rows
        if r.get("grad_rel_err") is not None
        and max(r["grad_rel_err"], r["loss_rel_err"]) > tolerance
    ]


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Within each mode: speed and memory against hornet_t, per-GMAC speed against ConvNeXt-T."""
    from quadranet.bench.runner import ratio

    for mode in {r["mode"] for r in rows}:
        same = {r["model"]: r for r in rows if r["mode"] == mode}
        hornet, convnext = same.get("hornet_t"), same.get("convnext_tiny")
        for r in same.values():
            for phase in ("train", "infer"):
                ips = f"{phase}_ips"
                r[f"{phase}_vs_hornet_t"] = ratio(r[ips], hornet and hornet[ips])
                r[f"{phase}_per_gmac_vs_convnext"] = ratio(
                    r[f"{phase}_gmacs_per_s"], convnext and convnext[f"{phase}_gmacs_per_s"]
                )
            r["peak_vs_hornet_t"] = ratio(r["peak_alloc_mib"], hornet and hornet["peak_alloc_mib"])


def write_steps_report(
    rows: list[dict[str, Any]], output: str, settings: dict[str, Any]
) -> dict[str, Any]:
    """`steps_<precision>.md/.csv/.png` under `output`; returns the paths."""
    from quadranet.bench.runner import Column, Panel, write_report

    device = rows[0]["device_name"] if rows else "?"
    precision = settings["precision"]
    cols = [
        Column("mode", "mode"),
        Column("model", "model"),
        Column("gmacs", "GMACs", "{:.2f}"),
        Column("train_ips", "train img/s", "{:,.0f}"),
        Column("infer_ips", "infer img/s", "{:,.0f}"),
        Column("train_vs_hornet_t", "train / hornet_t", "{:.2f}x"),
        Column("infer_vs_hornet_t", "infer / hornet_t", "{:.2f}x"),
        Column("train_per_gmac_vs_convnext", "train per GMAC / convnext", "{:.2f}x"),
        Column("infer_per_gmac_vs_convnext", "infer per GMAC / convnext", "{:.2f}x"),
        Column("peak_alloc_mib", "peak train alloc. (MiB)", "{:,.0f}"),
        Column("peak_vs_hornet_t", "peak / hornet_t", "{:.2f}x"),
        Column("peak_reserved_mib", "reserved (MiB)", "{:,.0f}"),
        Column("train_launches", "launches / train step", "{:,}"),
        Column("infer_launches", "launches / infer step", "{:,}"),
        Column("train_busy_pct", "GPU busy train", "{:.0f}%"),
        Column("infer_busy_pct", "GPU busy infer", "{:.0f}%"),
        Column("train_setup_s", "train set-up (s)", "{:.1f}"),
        Column("infer_setup_s", "infer set-up (s)", "{:.1f}"),
        Column("grad_rel_err", "grad. rel. error vs eager", "{:.1e}"),
    ]
    notes = [
        f"{device}; {settings['img_size']}x{settings['img_size']}, {precision}"
        + (" (torch.autocast bfloat16, float32 weights)" if precision == "bf16" else "")
        + (", channels-last" if settings["channels_last"] else ", NCHW"),
        f"training: batch {settings['train_batch']}, cross-entropy, backward, fused AdamW, "
        f"drop-path {settings['drop_path']}; inference: batch {settings['batch']}, no_grad",
        f"each: {settings['steps']} steps back to back after {settings['warmup']} warm-up "
        + (
            "steps, wall clock (CPU)"
            if device == "CPU"
            else "steps, between two CUDA events (one synchronisation); cudnn.benchmark on"
        )
        + "; one child process per model and mode",
        "modes (compare within a mode): eager; graph = the whole step captured in one CUDA "
        "graph (capturable AdamW); compile = torch.compile(fullgraph=True); compile-graph = "
        "mode='reduce-overhead'; compiled steps run with recompilation as an error",
        "grad. rel. error vs eager: a compiled training step's largest relative gradient "
        "error against eager (same drop-path masks); the command fails above "
        f"{PARITY_TOLERANCE[precision]:g}",
        "launches: CUDA kernels in one profiled step; GPU busy: their summed time / step time; "
        "set-up: warm-up (and compile, capture) wall time; peak alloc.: "
        "torch.cuda.max_memory_allocated during training above what was allocated before",
        f"command: {settings['command']}",
    ]
    panels = []
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["mode"], r["model"]): r for r in rows}
    for key, title in (("train_ips", "training"), ("infer_ips", "inference")):
        series = {m: [by.get((m, n), {}).get(key) for n in models] for m in modes}
        panels.append(Panel(f"{title} ({device}, {precision})", "images/s", models, series))
    keys = [c.key for c in cols] + ["loss_rel_err", "device_name"]
    title = f"Training and inference steps on {device} ({precision})"
    return write_report(output, f"steps_{precision}", title, notes, rows, cols, keys, panels)
