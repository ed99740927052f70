"""`quadranet bench <benchmark>`: the paper's measurements (Table I, Table II, ...)."""

from __future__ import annotations

import argparse

from quadranet.commands import add_command_modules

# Each module defines `add_parser(subparsers)` for one benchmark.
BENCHMARK_MODULES = (
    "quadranet.bench.memory",
    "quadranet.bench.throughput",
    "quadranet.bench.latency",
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `bench` and its benchmarks."""
    parser = sub.add_parser("bench", help="benchmarks: memory (Table II), throughput (Table I)")
    bench_sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    add_command_modules(bench_sub, BENCHMARK_MODULES)
