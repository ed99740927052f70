"""Triton kernels vs the cuDNN / ATen path of the depthwise quadratic conv, on a CUDA GPU.

For each stage shape of quadranet36_t at 224x224 (56x56x64, 28x28x128, 14x14x256,
7x7x512; k = 7), in float32 and bfloat16, times the training forward (y plus a, b kept for
backward), the inference forward (y) and the backward (dx, dW, db given a and b), then one
whole quadranet36_t training step (forward, backward, AdamW; channels-last, bf16 autocast
for the bf16 rows) with the kernels on and off. Timing: `triton.testing.do_bench`
(CUDA events, median; the L2 cache is flushed before each call).

    python benchmarks/gpu_kernels.py --batch 64 --output results/kernels_cuda
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

from quadranet.bench.runner import Column, markdown_table, write_csv
from quadranet.models import create_model
from quadranet.nn.depthwise import (
    TRITON_ENV_VAR,
    branch_convs,
    depthwise_quadratic_backward,
    quadratic_product,
)

STAGES = ((64, 56), (128, 28), (256, 14), (512, 7))  # quadranet36_t at 224x224
KERNEL = 7
CL = torch.channels_last
ARGS = ((1, 1), (KERNEL // 2, KERNEL // 2), (1, 1))


def triton_enabled(on: bool) -> mock._patch:
    """Dispatch the quadratic conv to the Triton kernels (on) or to cuDNN / ATen (off)."""
    return mock.patch.dict(os.environ, {TRITON_ENV_VAR: "1" if on else "0"})


def bench(fn: Callable[[], Any]) -> float:
    """Median milliseconds of fn on the GPU."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


def conv_cases(batch: int, c: int, size: int, dtype: torch.dtype) -> dict[str, Callable]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, c, size, size, device="cuda", generator=gen, dtype=dtype)
    x = x.contiguous(memory_format=CL)
    w = (torch.randn(3 * c, 1, KERNEL, KERNEL, device="cuda", generator=gen) / KERNEL).to(dtype)
    b = torch.randn(3 * c, device="cuda", generator=gen, dtype=dtype)
    grad = torch.randn_like(x)
    a, bb = branch_convs(x, w, b, ARGS, (0, 1))
    return {
        "forward, training (y, a, b)": lambda: (branch_convs(x, w, b, ARGS), None),
        "forward, inference (y)": lambda: quadratic_product(x, w, b, ARGS),
        "backward (dx, dW, db)": lambda: depthwise_quadratic_backward(
            x, w, b, a, bb, grad, ARGS, (True, True, True)
        ),
    }


def training_step(batch: int, dtype: torch.dtype) -> Callable[[], None]:
    torch.manual_seed(0)
    model = create_model("quadranet36_t").cuda().to(memory_format=CL)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=CL)
    target = torch.randint(0, 1000, (batch,), device="cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()

    return step


def row(dtype: str, what: str, shape: str, times: dict[bool, float]) -> dict[str, Any]:
    """A table row from the milliseconds with the kernels off (False) and on (True)."""
    out = dict(dtype=dtype, what=what, shape=shape, cudnn_ms=times[False], triton_ms=times[True])
    out["speedup"] = times[False] / times[True]
    print(out, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64, help="batch of the conv shapes")
    p.add_argument("--step-batch", type=int, default=64, help="batch of the training step")
    p.add_argument("--output", default="results/kernels_cuda")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU; see benchmarks/kernels.py for the CPU")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        name = "fp32" if dtype == torch.float32 else "bf16"
        for c, size in STAGES:
            shape = f"{args.batch}x{size}x{size}x{c}"
            for op in conv_cases(args.batch, c, size, dtype):
                times = {}
                for on in (False, True):  # the cases are rebuilt so each path makes its a, b
                    with triton_enabled(on):
                        times[on] = bench(conv_cases(args.batch, c, size, dtype)[op])
                rows.append(row(name, op, shape, times))
        times = {}
        for on in (False, True):
            with triton_enabled(on):
                times[on] = bench(training_step(args.step_batch, dtype))
        rows.append(row(name, "quadranet36_t training step", f"{args.step_batch}x224x224", times))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cols = [
        Column("dtype", "dtype"),
        Column("what", "what"),
        Column("shape", "shape (N x H x W x C)"),
        Column("cudnn_ms", "cuDNN / ATen (ms)", "{:.3f}"),
        Column("triton_ms", "Triton (ms)", "{:.3f}"),
        Column("speedup", "speed-up", "{:.2f}x"),
    ]
    gpu = torch.cuda.get_device_name()
    text = (
        f"# Depthwise quadratic conv on {gpu}: Triton kernels vs cuDNN / ATen\n\n"
        f"torch {torch.__version__}; `python benchmarks/gpu_kernels.py --batch {args.batch} "
        f"--step-batch {args.step_batch}`; median ms by triton.testing.do_bench.\n\n"
        + markdown_table(rows, cols)
    )
    (out / "kernels_cuda.md").write_text(text)
    write_csv(out / "kernels_cuda.csv", rows, [c.key for c in cols])
    print(text)


if __name__ == "__main__":
    main()
