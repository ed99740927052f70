"""The depthwise quadratic conv's kernel backend against its ATen reference, side by side.

For each stage shape of quadranet36_t at 224x224 (56x56x64, 28x28x128, 14x14x256, 7x7x512;
k = 7, layer scale on) times the custom operator's training forward (y, a, b), inference
forward (y) and backward (dx, dW, db, dgamma) with the kernels on (`auto`: C++ on CPU, Triton
on CUDA) and off (the reference), then one whole quadranet36_t training step (drop-path 0.1,
AdamW) and inference batch with the kernels on and off. CPU: median of `--repeats` calls
after warm-up; CUDA: `triton.testing.do_bench`.

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


def op_cases(batch: int, c: int, size: int, device: str, dtype: torch.dtype) -> dict[str, Callable]:
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
    return {
        "forward, training (y, a, b)": lambda: op(x, w, b, gamma, None, *GEOMETRY, True),
        "forward, inference (y)": lambda: op(x, w, b, gamma, None, *GEOMETRY, False),
        "backward (dx, dW, db, dgamma)": lambda: backward(
            grad, x, w, b, gamma, a, bb, *GEOMETRY, [True] * 4
        ),
    }


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
    rows = []
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        cases = []
        for c, size in STAGES:
            shape = f"{args.batch}x{size}x{size}x{c}"
            cases += [(what, shape, fn) for what, fn in
                      op_cases(args.batch, c, size, args.device, dtype).items()]  # fmt: skip
        steps = model_steps(args.infer_batch, args.step_batch, args.device, dtype)
        cases += [(what, "224x224", fn) for what, fn in steps.items()]
        for what, shape, fn in cases:
            times = {}
            for on in (False, True, False, True):  # alternate; keep the faster of each
                with ops.kernels(MODES[on]):
                    times[on] = min(times.get(on, float("inf")), bench(fn))
            row = dict(
                dtype=name, what=what, shape=shape, ref_ms=times[False], kernel_ms=times[True]
            )
            row["speedup"] = times[False] / times[True]
            print(row, flush=True)
            rows.append(row)
    cols = [
        Column("dtype", "dtype"),
        Column("what", "what"),
        Column("shape", "shape (N x H x W x C)"),
        Column("ref_ms", "reference (ms)", "{:.2f}"),
        Column("kernel_ms", "kernels (ms)", "{:.2f}"),
        Column("speedup", "speed-up", "{:.2f}x"),
    ]
    if args.device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:
        where = machine_info(torch.get_num_threads())
    command = " ".join(["python benchmarks/kernels.py", *(sys.argv[1:] if argv is None else argv)])
    text = (f"# Depthwise quadratic conv: kernels vs the ATen reference\n\n{where}; "
            f"`{command}`.\n\n" + markdown_table(rows, cols))  # fmt: skip
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.md").write_text(text)
    write_csv(out / "kernels.csv", rows, [c.key for c in cols])
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
