"""Checks of the kernel boundary on a GPU, printed as JSON lines (one per check).

- which backend each block of quadranet36_t uses (`quadranet.ops.explain`);
- FLOPs seen by `FlopCounterMode` with the Triton kernels on (published MACs);
- `torch.compile(fullgraph=True)`: a training step (drop-path 0.1) and inference match
  eager, in float32 and under bf16 autocast, with the compile time.

Step times are `quadranet bench throughput --device cuda` (`quadranet.bench.steps`).

`--device cpu --small` runs the same code at toy sizes (a dry run without a GPU).

    python benchmarks/gpu_checks.py --out results/gpu_checks/checks.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import quadranet  # noqa: F401  (registers the models)
from quadranet import ops

CL = torch.channels_last


def emit(out: Path | None, **record: object) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")


def model_on(name: str, device: str, drop_path: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=drop_path)
    return model.to(device).to(memory_format=CL)


def images(n: int, size: int, device: str) -> torch.Tensor:
    return torch.randn(n, 3, size, size, device=device).contiguous(memory_format=CL)


def step(model, run, x, target, dtype):  # noqa: ANN001, ANN201
    """One seeded training step: (loss, gradients)."""
    torch.manual_seed(1)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = F.cross_entropy(run(x), target)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-12)).item()


def norm_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all entries."""
    return ((a.float() - b.float()).norm() / (b.float().norm() + 1e-12)).item()


def check_explain_and_flops(args: argparse.Namespace) -> None:
    model = model_on(args.model, args.device).eval()
    x = images(1, args.size, args.device)
    report = ops.explain(model, x)
    backends = sorted(set(report.backends().values()))
    reasons = sorted({row[3] for row in report.rows})
    emit(args.out, check="explain", model=args.model, backends=backends, reasons=reasons,
         blocks=len(report.rows))  # fmt: skip
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    emit(args.out, check="flops", model=args.model, size=args.size,
         gmacs=counter.get_total_flops() / 2e9)  # fmt: skip


def check_compile(args: argparse.Namespace, dtype: torch.dtype) -> None:
    model = model_on(args.compile_model, args.device, drop_path=0.1)
    x = images(args.compile_batch, args.size, args.device)
    target = torch.arange(args.compile_batch, device=args.device) % 10
    eager = step(model, model, x, target, dtype)
    compiled = torch.compile(model, fullgraph=True)
    t = time.perf_counter()
    got = step(model, compiled, x, target, dtype)
    compile_s = time.perf_counter() - t
    grad_err = norm_err(torch.cat([g.flatten() for g in got[1]]),
                        torch.cat([e.flatten() for e in eager[1]]))  # fmt: skip
    model.eval()
    with (
        torch.no_grad(),
        torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32),
    ):
        out_err = rel_err(compiled(x), model(x))
    loss_err = rel_err(got[0], eager[0])
    emit(args.out, check="compile", model=args.compile_model, dtype=str(dtype), loss_err=loss_err,
         grad_norm_err=grad_err, eval_rel_err=out_err, compile_s=compile_s)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="toy sizes (a CPU dry run)")
    p.add_argument("--out", type=Path, default=None, help="JSON-lines file to append to")
    args = p.parse_args(argv)
    small = args.small
    args.model = "quadranet25_xxs" if small else "quadranet36_t"
    args.compile_model = "quadranet25_xxs"
    args.size = 64 if small else 224
    args.compile_batch = 4 if small else 32
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    if args.device.startswith("cuda"):
        emit(args.out, check="device", name=torch.cuda.get_device_name(), torch=torch.__version__)
    check_explain_and_flops(args)
    for dtype in (torch.float32, torch.bfloat16):
        check_compile(args, dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
