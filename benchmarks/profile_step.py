"""Where a model's time goes: torch.profiler over training steps and inference batches.

Prints the ops with the most self time on the host (CPU) and, on CUDA, on the GPU, and
the wall-clock time per call next to the summed GPU kernel time (a step whose wall time
far exceeds its GPU time is bound by the host: Python and kernel launches).

    python benchmarks/profile_step.py --model quadranet36_t --device cuda --batch 16
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from quadranet.models import create_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="quadranet36_t")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3, help="profiled calls of each kind")
    p.add_argument("--rows", type=int, default=25, help="ops listed per table")
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    model = create_model(args.model).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=dev)
    x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, model.num_classes, (args.batch,), device=dev)

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()

    def infer() -> None:
        with torch.no_grad():
            model(x)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, fn, mode in (("training step", train, True), ("inference", infer, False)):
        model.train(mode)
        for _ in range(3):  # warm-up: kernel compilation, allocator
            fn()
        if cuda:
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        if cuda:
            torch.cuda.synchronize(dev)
        wall = (time.perf_counter() - start) / args.steps
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                fn()
            if cuda:
                torch.cuda.synchronize(dev)
        events = prof.key_averages()
        print(f"\n=== {args.model} {name}, batch {args.batch}, {dev}: {wall * 1e3:.1f} ms wall")
        if cuda:
            # kernels only: ops also list the kernels they launch as their own self time
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu = sum(e.self_device_time_total for e in kernels) / args.steps / 1e3
            print(f"GPU kernel time per call: {gpu:.1f} ms")
            print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
