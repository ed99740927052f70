"""The depthwise quadratic conv's kernel backend against its ATen reference, side by side.

For each stage shape of quadranet36_t at 224x224 (56x56x64, 28x28x128, 14x14x256, 7x7x512;
k = 7, layer scale on) times the custom operator's training forward (y, a, b), inference
forward (y) and backward (dx, dW, db, dgamma) with the kernels on (`auto`: C++ on CPU, Triton
on CUDA) and off (the reference), then one whole quadranet36_t training step (drop-path 0.1,
AdamW) and inference batch with the kernels on and off. CPU: median of `--repeats` calls
after warm-up; CUDA: `triton.testing.do_bench`.

Each conv case is also timed as three plain depthwise convolutions (cuDNN on CUDA, oneDNN
on CPU: forward, or `convolution_backward` giving dx, dW and db of each), the baseline a
fused kernel has to beat, and on CUDA set against its floors: the memory floor (the bytes
the op must move at the copy bandwidth measured in the same run: x in and y, a, b out;
x, a, b, g in and dx out for backward) and the arithmetic floor (its multiply-adds at the
GPU's nominal float32 rate, 128 lanes x 2 FLOPs x clock per multiprocessor).

    python benchmarks/kernels.py --device cpu --threads 2 --output results/kernels
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quadranet import ops
from quadranet.bench.runner import Column, machine_info, markdown_table, write_csv
from quadranet.models import create_model

STAGES = ((64, 56), (128, 28), (256, 14), (512, 7))  # quadranet36_t at 224x224
KERNEL = 7
CL = torch.channels_last
GEOMETRY = ([1, 1], [KERNEL // 2] * 2, [1, 1])
MODES = {True: "auto", False: "off"}


def timer(device: str, repeats: int) -> Callable[[Callable[[], Any]], float]:
    """Median milliseconds of a call."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100)

    def measure(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    return measure


def op_cases(batch: int, c: int, size: int, device: str, dtype: torch.dtype) -> dict[str, tuple]:
    """what -> (op call, three plain depthwise convs, bytes moved at least, FLOPs)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, size, size, generator=gen).to(device, dtype)
    x = x.contiguous(memory_format=CL)
    w = (torch.randn(3 * c, 1, KERNEL, KERNEL, generator=gen) / KERNEL).to(device)
    b, gamma = torch.randn(3 * c, generator=gen).to(device), torch.rand(c).to(device)
    grad = torch.randn_like(x)
    op, backward = (
        torch.ops.quadranet.quadratic_dwconv,
        torch.ops.quadranet.quadratic_dwconv_backward,
    )
    _, a, bb = op(x, w, b, gamma, None, *GEOMETRY, True)
    plain_w = [t.to(dtype).contiguous() for t in w.view(c, 3, 1, KERNEL, KERNEL).unbind(1)]
    plain_b = [t.to(dtype).contiguous() for t in b.view(c, 3).unbind(1)]

    def plain_forward() -> None:
        for wi, bi in zip(plain_w, plain_b, strict=True):
            F.conv2d(x, wi, bi, 1, KERNEL // 2, 1, c)

    def plain_backward() -> None:
        for wi in plain_w:
            torch.ops.aten.convolution_backward(
                grad, x, wi, [c], *GEOMETRY, False, [0, 0], c, [True, True, True]
            )

    e, item = x.numel(), x.element_size()
    macs = 3 * KERNEL * KERNEL * e
    return {
        "forward, training (y, a, b)": (
            lambda: op(x, w, b, gamma, None, *GEOMETRY, True), plain_forward, 4 * e * item,
            2 * macs,
        ),
        "forward, inference (y)": (
            lambda: op(x, w, b, gamma, None, *GEOMETRY, False), plain_forward, 2 * e * item,
            2 * macs,
        ),
        "backward (dx, dW, db, dgamma)": (
            lambda: backward(grad, x, w, b, gamma, a, bb, *GEOMETRY, [True] * 4),
            plain_backward, 5 * e * item, 4 * macs,
        ),
    }  # fmt: skip


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    from triton.testing import do_bench

    src = torch.empty(2**28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (do_bench(lambda: dst.copy_(src)) / 1e3)


def fp32_flops() -> float | None:
    """Nominal float32 FLOP/s of the GPU: multiprocessors x 128 lanes x 2 x max SM clock."""
    import subprocess

    try:
        mhz = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits", "-i",
             str(torch.cuda.current_device())],
            capture_output=True, text=True, check=True,
        ).stdout.split()[0]  # fmt: skip
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return sms * 128 * 2 * float(mhz) * 1e6


def model_steps(batch: int, train_batch: int, device: str, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = create_model("quadranet36_t", drop_path_rate=0.1).to(device).to(memory_format=CL)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    x = torch.randn(train_batch, 3, 224, 224, device=device).contiguous(memory_format=CL)
    xi = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=CL)
    target = torch.randint(0, 1000, (train_batch,), device=device)
    amp = dict(device_type=x.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def train() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**amp):
            F.cross_entropy(model(x), target).backward()
        opt.step()

    def infer() -> None:
        model.eval()
        with torch.no_grad(), torch.autocast(**amp):
            model(xi)

    return {
        f"quadranet36_t training step (batch {train_batch})": train,
        f"quadranet36_t inference (batch {batch})": infer,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--batch", type=int, default=16, help="batch of the conv shapes")
    p.add_argument("--step-batch", type=int, default=16, help="batch of the training step")
    p.add_argument("--infer-batch", type=int, default=32, help="batch of the inference pass")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per CPU measurement")
    p.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16")
    p.add_argument("--output", default="results/kernels")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = timer(args.device, args.repeats)
    cuda = args.device.startswith("cuda")
    bandwidth = copy_bandwidth() if cuda else None
    flops = fp32_flops() if cuda else None
    rows = []
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        cases = []
        for c, size in STAGES:
            shape = f"{args.batch}x{size}x{size}x{c}"
            cases += [(what, shape, *case) for what, case in
                      op_cases(args.batch, c, size, args.device, dtype).items()]  # fmt: skip
        steps = model_steps(args.infer_batch, args.step_batch, args.device, dtype)
        cases += [(what, "224x224", fn, None, None, None) for what, fn in steps.items()]
        for what, shape, fn, plain, nbytes, nflops in cases:
            times = {}
            for on in (False, True, False, True):  # alternate; keep the faster of each
                with ops.kernels(MODES[on]):
                    times[on] = min(times.get(on, float("inf")), bench(fn))
            row = dict(
                dtype=name, what=what, shape=shape, ref_ms=times[False], kernel_ms=times[True]
            )
            row["speedup"] = times[False] / times[True]
            if plain is not None:
                row["plain_ms"] = bench(plain)
                row["vs_plain"] = row["plain_ms"] / times[True]
            if nbytes is not None and bandwidth:
                row["mem_floor_pct"] = 100 * nbytes / bandwidth / (times[True] / 1e3)
            if nflops is not None and flops:
                row["flop_floor_pct"] = 100 * nflops / flops / (times[True] / 1e3)
            print(row, flush=True)
            rows.append(row)
    cols = [
        Column("dtype", "dtype"),
        Column("what", "what"),
        Column("shape", "shape (N x H x W x C)"),
        Column("ref_ms", "reference (ms)", "{:.2f}"),
        Column("kernel_ms", "kernels (ms)", "{:.2f}"),
        Column("speedup", "speed-up", "{:.2f}x"),
        Column("plain_ms", "3 plain dw convs (ms)", "{:.2f}"),
        Column("vs_plain", "plain / kernels", "{:.2f}x"),
    ]
    if cuda:
        cols += [
            Column("mem_floor_pct", "% of memory floor", "{:.0f}%"),
            Column("flop_floor_pct", "% of fp32 arithmetic floor", "{:.0f}%"),
        ]
    if args.device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
        where += f", copy bandwidth {bandwidth / 1e12:.2f} TB/s"
        where += f", nominal fp32 {flops / 1e12:.1f} TFLOP/s" if flops else ""
    else:
        where = machine_info(torch.get_num_threads())
        where += f", C++ kernels built with `{' '.join(ops.cpu.cflags())}`"
    command = " ".join(["python benchmarks/kernels.py", *(sys.argv[1:] if argv is None else argv)])
    title = "# Depthwise quadratic conv: kernels vs the ATen reference and plain convs"
    text = f"{title}\n\n{where}; `{command}`.\n\n" + markdown_table(rows, cols)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.md").write_text(text)
    write_csv(out / "kernels.csv", rows, [c.key for c in cols])
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
