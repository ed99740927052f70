"""Bytes autograd keeps for backward in one training forward under CPU bf16 autocast.

Counts, with `torch.autograd.graph.saved_tensors_hooks`, every saved tensor's storage once
(parameters excluded), for each model with the kernels on (`auto`) and off (plain ops).

    python benchmarks/saved_bytes_autocast.py --img-size 224 --batch 8
"""

from __future__ import annotations

import argparse

import timm
import torch

import quadranet  # noqa: F401  (registers the models)
from quadranet import ops


def saved_mib(name: str, mode: str, img_size: int, batch: int) -> float:
    model = timm.create_model(name, drop_path_rate=0.1).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with (
        ops.kernels(mode),
        torch.autocast("cpu", torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        model.train()(x)
    return sum(saved.values()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="quadranet36_t,hornet_t,convnext_tiny")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    print("| model | kernels on (MiB) | kernels off, plain ops (MiB) |\n|---|---:|---:|")
    for name in args.models.split(","):
        on, off = (saved_mib(name, m, args.img_size, args.batch) for m in ("auto", "off"))
        print(f"| {name} | {on:.1f} | {off:.1f} |")


if __name__ == "__main__":
    main()
