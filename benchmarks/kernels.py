"""C++ CPU kernels vs the oneDNN / ATen path, side by side in one process.

For each stage shape of quadranet36_t (batch 16, 224x224: 56x56x64, 28x28x128, 14x14x256,
7x7x512; k = 7) times:
- the depthwise quadratic conv's training forward (y plus a, b kept for backward),
  inference forward and backward (dx, dW, db);
- the channel MLP's GELU in backward (gelu + gelu_backward vs the one-pass kernel) and at
  inference (torch's GELU vs the in-place exp-free kernel);
- the LayerNorm work of a memory-efficient branch's backward (LN again, its backward and
  the residual's gradient: ATen vs the row-wise kernels);
- the whole channel MLP with its residual at inference and in training (whole-tensor ops
  vs the chunked kernels, timed at every stage although the models use them only where
  `quadranet.nn.fused.chunked_mlp_kernels` says they pay);
then one full quadranet36_t training step (forward, backward, AdamW; channels-last) with
the kernels on and off.
Old and new alternate call by call (swapping which goes first every round) so drift hits
both alike; the table gives medians with min-max. The script re-runs itself in a child
process with the chosen allocator (default: glibc retaining freed memory) and threads.

    python benchmarks/kernels.py --threads 2 --repeats 7 --step-rounds 3
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

from quadranet.bench.runner import (
    ALLOCATORS,
    Column,
    Stats,
    allocator_env,
    machine_info,
    markdown_table,
    write_csv,
)
from quadranet.blocks import ChannelMlp
from quadranet.models import create_model
from quadranet.nn import ext, fused
from quadranet.nn.depthwise import (
    branch_convs,
    depthwise_quadratic_backward,
    depthwise_quadratic_conv2d,
)

CHILD_FLAG = "QUADRANET_KERNEL_BENCH_CHILD"
STAGES = ((64, 56), (128, 28), (256, 14), (512, 7))  # quadranet36_t at 224x224
KERNEL = 7
MLP_RATIO = 4
CL = torch.channels_last


def interleaved(
    old: Callable[[], Any], new: Callable[[], Any], repeats: int, min_time: float = 0.0
) -> tuple[Stats, Stats]:
    """Seconds per call of old and new, alternating (and swapping the lead each round).

    Each sample runs a variant enough times back to back to last about `min_time` seconds
    (from the untimed warm-up call), so short ops are not at the mercy of the scheduler.
    """
    fns = {"old": old, "new": new}
    calls = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        calls[name] = max(1, math.ceil(min_time / max(time.perf_counter() - start, 1e-6)))
    times: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(repeats):
        for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
            start = time.perf_counter()
            for _ in range(calls[name]):
                fns[name]()
            times[name].append((time.perf_counter() - start) / calls[name])
    return Stats.of(times["old"]), Stats.of(times["new"])


def conv_cases(batch: int, c: int, size: int) -> dict[str, tuple[Callable, Callable]]:
    """(old, new) callables of the depthwise quadratic conv at one stage shape."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, size, size, generator=gen).contiguous(memory_format=CL)
    w = torch.randn(3 * c, 1, KERNEL, KERNEL, generator=gen) / KERNEL
    b = torch.randn(3 * c, generator=gen)
    grad = torch.randn(batch, c, size, size, generator=gen).contiguous(memory_format=CL)
    args = ((1, 1), (KERNEL // 2, KERNEL // 2), (1, 1))
    ops = ext.load()
    with ext.cpu_kernels(False):
        a, bb = branch_convs(x, w, b, args, (0, 1))

    def off(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with ext.cpu_kernels(False):
                return fn()

        return run

    def forward_old() -> Any:
        ya, yb, yc = branch_convs(x, w, b, args)
        return torch.addcmul(yc, ya, yb), ya, yb

    def inference() -> Any:
        with torch.no_grad():
            return depthwise_quadratic_conv2d(x, w, b, padding=KERNEL // 2)

    def backward() -> Any:
        return depthwise_quadratic_backward(x, w, b, a, bb, grad, args, (True, True, True))

    return {
        "forward (train: y, a, b)": (
            off(forward_old),
            lambda: ops.quadratic_forward(x, w, b, True, True, True, False),
        ),
        "forward (inference: y)": (off(inference), inference),
        "backward (dx, dW, db)": (off(backward), backward),
    }


def gelu_case(batch: int, c: int, size: int) -> tuple[Callable, Callable]:
    """(old, new) GELU work of the channel MLP's backward at one stage shape: GELU(u),
    dL/du and fc1's bias gradient (its column sums)."""
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(batch * size * size, MLP_RATIO * c, generator=gen)
    grad0 = torch.randn(u.shape, generator=gen)
    grad = torch.empty_like(grad0)  # both refresh it (the kernel scales it in place)
    ops = ext.load()

    def old() -> Any:
        grad.copy_(grad0)
        grad_u = torch.ops.aten.gelu_backward(grad, u)
        return F.gelu(u), grad_u, grad_u.sum(0)

    def new() -> Any:
        return ops.gelu_and_grad(u, grad.copy_(grad0), True)

    return old, new


def layer_norm_case(batch: int, c: int, size: int) -> tuple[Callable, Callable]:
    """(old, new) LayerNorm work of a memory-efficient branch's backward at one stage shape:
    LN(x) again, then LN's backward plus the residual's gradient (F.layer_norm,
    native_layer_norm_backward and an add vs the two row-wise kernels)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, size, size, c, generator=gen)
    grad_n, res = torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen)
    w, b = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [c], w, b, 1e-6)
    ops = ext.load()

    def old() -> Any:
        n = F.layer_norm(x, (c,), w, b, 1e-6)
        grads = torch.ops.aten.native_layer_norm_backward(
            grad_n, x, [c], mean, rstd, w, b, [True, True, True]
        )
        return n, grads[0] + res, grads[1], grads[2]

    def new() -> Any:
        return ops.layer_norm_apply(x, mean, rstd, w, b), *ops.layer_norm_backward(
            grad_n, x, mean, rstd, w, res
        )

    return old, new


def inference_gelu_case(batch: int, c: int, size: int) -> tuple[Callable, Callable]:
    """(old, new) GELU of the channel MLP at inference: torch's GELU vs the in-place kernel
    (both refresh the input first, so neither works on its own output)."""
    u0 = torch.randn(batch * size * size, MLP_RATIO * c, generator=torch.Generator().manual_seed(2))
    u = torch.empty_like(u0)
    ops = ext.load()

    def old() -> Any:
        return F.gelu(u.copy_(u0))

    def new() -> Any:
        return ops.gelu_(u.copy_(u0))

    return old, new


def inference_mlp_case(batch: int, c: int, size: int) -> tuple[Callable, Callable]:
    """(old, new) channel MLP with its residual at inference, x + fc2(GELU(fc1(LN(x)))):
    whole-tensor ops (LayerNorm, fc1, the in-place GELU kernel, fc2, add) vs the chunked
    kernel whose hidden activation stays in cache (`mlp_inference`)."""
    gen = torch.Generator().manual_seed(3)
    hidden = MLP_RATIO * c
    x = torch.randn(batch, size, size, c, generator=gen)
    ln_w, ln_b, b1, b2 = (torch.randn(n, generator=gen) for n in (c, c, hidden, c))
    w1 = torch.randn(hidden, c, generator=gen) / c**0.5
    w2 = torch.randn(c, hidden, generator=gen) / hidden**0.5
    ops = ext.load()

    def old() -> Any:
        h = F.linear(F.layer_norm(x, (c,), ln_w, ln_b, 1e-6), w1, b1)
        return x + F.linear(ops.gelu_(h), w2, b2)

    def new() -> Any:
        return ops.mlp_inference(x, ln_w, ln_b, 1e-6, w1, b1, w2, b2, True)

    return old, new


def training_mlp_case(batch: int, c: int, size: int) -> tuple[Callable, Callable]:
    """(old, new) training forward and backward of the memory-efficient channel MLP with its
    residual: the whole-tensor path vs the chunked kernels (`mlp_forward`, `mlp_backward`)."""
    torch.manual_seed(4)
    mlp = ChannelMlp(c, MLP_RATIO, layer_scale_init=0.5, memory_efficient=True)
    x = torch.randn(batch, size, size, c, requires_grad=True)
    grad = torch.randn(batch, size, size, c)

    def old() -> Any:  # the whole-tensor op, the residual added outside (as the blocks do)
        x.grad = None
        with mock.patch.object(fused, "CHUNKED_MLP_MIN_HIDDEN", 1 << 62):
            (x + mlp(x)).backward(grad)
        return x.grad

    def new() -> Any:  # the chunked kernels at any shape, the residual in their pass
        x.grad = None
        with (
            mock.patch.object(fused, "CHUNKED_MLP_MIN_HIDDEN", 0),
            mock.patch.object(fused, "CHUNKED_MLP_MAX_DIM", 1 << 30),
        ):
            mlp.fused_residual(x).backward(grad)
        return x.grad

    return old, new


def training_step(batch: int, img_size: int, model_name: str) -> Callable[[], None]:
    """One training step (forward, cross-entropy, backward, AdamW) in channels-last."""
    torch.manual_seed(0)
    model = create_model(model_name).to(memory_format=CL).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, img_size, img_size).contiguous(memory_format=CL)
    target = torch.randint(0, model.num_classes, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    return step


def row(stage: str, op: str, old: Stats, new: Stats) -> dict[str, Any]:
    return dict(
        stage=stage,
        op=op,
        old_ms=old.median * 1e3,
        new_ms=new.median * 1e3,
        speedup=old.median / new.median,
        old_range=f"{old.min * 1e3:.1f}-{old.max * 1e3:.1f}",
        new_range=f"{new.min * 1e3:.1f}-{new.max * 1e3:.1f}",
    )


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    if ext.load() is None:
        raise SystemExit("the C++ kernels are unavailable here (see the warning above)")
    rows = []
    for c, size in STAGES:
        stage = f"{size}x{size}x{c}"
        for op, (old, new) in conv_cases(args.batch, c, size).items():
            rows.append(row(stage, op, *interleaved(old, new, args.repeats, args.min_time)))
            print(f"{stage} {op}: x{rows[-1]['speedup']:.2f}", file=sys.stderr, flush=True)
        for op, case in (
            ("gelu + gelu' + bias grad (MLP backward)", gelu_case),
            ("gelu (MLP inference, in place)", inference_gelu_case),
            ("LN again + LN backward + residual (branch backward)", layer_norm_case),
            ("channel MLP + residual (inference, chunked)", inference_mlp_case),
            ("channel MLP + residual (training fwd + bwd, chunked)", training_mlp_case),
        ):
            old, new = case(args.batch, c, size)
            rows.append(row(stage, op, *interleaved(old, new, args.repeats, args.min_time)))
    if args.step_rounds > 0:
        step = training_step(args.batch, args.img_size, args.model)

        def step_with(enabled: bool) -> Callable[[], None]:
            def run_step() -> None:
                with ext.cpu_kernels(enabled):
                    step()

            return run_step

        old, new = interleaved(step_with(False), step_with(True), args.step_rounds)
        rows.append(row(f"{args.model} b{args.batch}", "training step", old, new))
    return rows


COLUMNS = [
    Column("stage", "shape (HxWxC)"),
    Column("op", "op"),
    Column("old_ms", "oneDNN/ATen ms", "{:.1f}"),
    Column("old_range", "min-max"),
    Column("new_ms", "kernel ms", "{:.1f}"),
    Column("new_range", "min-max"),
    Column("speedup", "speed-up", "{:.2f}x"),
]


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.threads, args.allocator)
    md = (
        "# C++ CPU kernels vs oneDNN/ATen (fp32, channels-last)\n\n"
        f"- {info}\n- batch {args.batch}, k = {KERNEL}, medians of {args.repeats} interleaved "
        f"samples of at least {args.min_time} s ({args.step_rounds} single steps for the "
        "training step)\n"
        f"- `python benchmarks/kernels.py --threads {args.threads} --repeats {args.repeats} "
        f"--min-time {args.min_time} --step-rounds {args.step_rounds} "
        f"--allocator {args.allocator}`\n\n"
    )
    md += markdown_table(rows, COLUMNS) + "\n"
    (out / "kernels.md").write_text(md)
    write_csv(out / "kernels.csv", rows, [c.key for c in COLUMNS])
    print(md)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7, help="timed calls per op and variant")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per op sample")
    p.add_argument("--step-rounds", type=int, default=3, help="timed steps each; 0 skips")
    p.add_argument("--model", default="quadranet36_t")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--allocator", choices=ALLOCATORS, default="retained")
    p.add_argument("--output", default="results/kernels")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get(CHILD_FLAG) != "1":  # re-run with the allocator and thread settings
        env = allocator_env(args.allocator, args.threads)
        env[CHILD_FLAG] = "1"
        cmd = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])]
        return subprocess.run(cmd, env=env).returncode
    write(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
