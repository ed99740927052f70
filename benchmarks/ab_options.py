"""Variants of one model's step timed in one process, call by call alternating.

`compare_trees.py` runs one child process per measurement, which is what comparing two
source trees needs, but on a shared CPU the children's times drift by tens of percent.
Variants of the same tree can instead share one process, one model and one allocator
state: each timed call of one variant is followed by one of the others (order flipped every
repeat), and the medians are compared.

    python benchmarks/ab_options.py --variant eager='{}' --variant compiled='{"compile": true}'
    python benchmarks/ab_options.py --variant on='{}' --variant off='{"mlp_kernel": false}'

Options of a variant: `compile` (torch.compile of the model; compilation happens in the
warm-up calls), `mlp_kernel` (false: every channel MLP through the ATen reference instead
of the chunked C++ kernels), `policy` (constants of `quadranet.ops.policy` set during the
variant's calls, e.g. `{"MLP_MAX_CHANNELS": 256}`), and, for inference only,
`reparameterize` (true: a copy made by `quadranet.reparameterize`) with `residual_in_ops`
(false: that copy adds the residuals as separate ops, as the block's training form does).
The model is built with drop-path 0.1 for training (as the engine trains) and run
channels-last float32; training is forward, backward and fused AdamW. The script restarts
itself under `--allocator` (default: glibc retaining freed memory) with that many OpenMP
threads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import timm
import torch
from compare_trees import (  # this folder is on sys.path when run
    add_output_arguments,
    add_step_arguments,
    check_output,
    write_output,
)

import quadranet  # (also registers the models)
from quadranet.bench.runner import ALLOCATORS, allocator_env, machine_info
from quadranet.blocks import MixerBlock
from quadranet.ops import policy

_UNDER_ALLOCATOR = "QUADRANET_AB_ALLOCATOR_SET"
OPTIONS = ("compile", "mlp_kernel", "policy", "reparameterize", "residual_in_ops")


@contextlib.contextmanager
def _policy(constants: dict[str, int]) -> Iterator[None]:
    saved = {name: getattr(policy, name) for name in constants}
    for name, value in constants.items():
        setattr(policy, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(policy, name, value)


def _variants(specs: list[str]) -> dict[str, dict]:
    variants = {}
    for spec in specs:
        label, _, text = spec.partition("=")
        options = json.loads(text or "{}")
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise SystemExit(f"unknown option(s) {sorted(unknown)}; choose from {OPTIONS}")
        missing = [name for name in options.get("policy", {}) if not hasattr(policy, name)]
        if missing:
            raise SystemExit(f"quadranet.ops.policy has no {missing}")
        variants[label] = options
    return variants


def _inference_form(model: torch.nn.Module, options: dict) -> torch.nn.Module:
    """The model, or its reparameterized copy (residual adds inside the ops or not)."""
    if not options.get("reparameterize"):
        return model
    folded = quadranet.reparameterize(model)
    for block in folded.modules():
        if isinstance(block, MixerBlock):
            block.reparameterized = options.get("residual_in_ops", True)
    return folded


def _steps(args: argparse.Namespace, train: bool, variants: dict[str, dict]) -> dict:
    """label -> a function running one call of that variant."""
    cl = torch.channels_last
    model = timm.create_model(args.model, drop_path_rate=0.1 if train else 0.0)
    model = model.to(memory_format=cl).train(train)
    batch = args.train_batch if train else args.batch
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=cl)
    target = torch.randint(0, 1000, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) if train else None
    steps: dict[str, Callable[[], None]] = {}
    for label, options in variants.items():
        run = _inference_form(model, options) if not train else model
        run = torch.compile(run) if options.get("compile") else run
        constants = dict(options.get("policy", {}))
        if not options.get("mlp_kernel", True):
            constants["MLP_MAX_CHANNELS"] = 0  # no map qualifies for the chunked MLP

        def step(run: Callable = run, constants: dict = constants) -> None:
            with _policy(constants):
                if opt is None:
                    with torch.inference_mode():
                        run(x)
                    return
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(run(x), target).backward()
                opt.step()

        steps[label] = step
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", required=True, help="label=options as JSON")
    add_step_arguments(p)
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per variant")
    p.add_argument("--allocator", choices=ALLOCATORS, default="retained")
    add_output_arguments(p)
    args = p.parse_args(argv)
    check_output(args)
    variants = _variants(args.variant)
    if os.environ.get(_UNDER_ALLOCATOR) is None:  # the allocator is chosen at process start
        env = allocator_env(args.allocator, args.threads)
        env[_UNDER_ALLOCATOR] = "1"
        os.execve(sys.executable, [sys.executable, __file__, *(argv or sys.argv[1:])], env)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    first = next(iter(variants))
    record: dict = dict(vars(args), machine=machine_info(args.threads, args.allocator))
    print(record["machine"], flush=True)
    lines = [record["machine"]]
    for kind in ("train", "infer"):
        steps = _steps(args, kind == "train", variants)
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        times: dict[str, list[float]] = {label: [] for label in steps}
        for r in range(args.repeats):
            for label in list(steps) if r % 2 == 0 else list(steps)[::-1]:
                start = time.perf_counter()
                steps[label]()
                times[label].append(time.perf_counter() - start)
            print(f"[{kind}] repeat {r + 1}/{args.repeats}", flush=True)
        medians = {label: statistics.median(t) for label, t in times.items()}
        for label, t in times.items():
            lines.append(
                f"{kind} {label}: {medians[label]:.3f} s a call ({min(t):.3f}-{max(t):.3f}); "
                f"speed vs {first}: {medians[first] / medians[label]:.3f}x"
            )
            print(lines[-1], flush=True)
        record[kind] = {"times": times, "median": medians}
    write_output(args, record, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
