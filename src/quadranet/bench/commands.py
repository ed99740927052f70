"""`quadranet bench <benchmark>`: the paper's measurements (Table I, Table II, ...)."""

from __future__ import annotations

import argparse
import importlib

# Each module defines `add_parser(subparsers)` for one benchmark.
BENCHMARK_MODULES = ("quadranet.bench.memory", "quadranet.bench.throughput")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `bench` and its benchmarks."""
    parser = sub.add_parser("bench", help="benchmarks: memory (Table II), throughput (Table I)")
    bench_sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name in BENCHMARK_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.add_parser(bench_sub)
