"""The `quadranet` console script: answers `--help` and `--version` without importing torch.

Any import from the `quadranet` package first runs its `__init__`, which registers the models
with timm (the documented `import quadranet` behaviour) and so imports torch and timm, seconds
of work. A bare `quadranet`, `quadranet --help` and `quadranet --version` need neither: this
module lives outside the package and answers them from the table below; every other command
line goes to `quadranet.cli.main`. A test checks that this help and version are exactly what
`quadranet.cli.build_parser()` prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PROG = "quadranet"
DESCRIPTION = "QuadraNet: quadratic-neuron vision backbones."
DEBUG_HELP = "on an error, show the Python traceback instead of a one-line message"
# (command, one-line help) in the order `quadranet.cli` registers them
COMMANDS = (
    ("models", "list the registered models with params and MACs"),
    ("info", "params, MACs, stage shapes and saved bytes of one model"),
    ("train", "train a model (flags or --config YAML; run under torchrun for DDP)"),
    ("eval", "top-1/top-5 of a checkpoint on a validation split"),
    ("demo", "train a small QuadraNet on bundled MNIST, evaluate it and write a report"),
    ("bench", "benchmarks: memory (Table II), throughput (Table I)"),
    ("latency", "latency tables for hardware-aware search"),
    ("search", "ProxylessNAS-style search of a network that fits a latency target"),
    (
        "adapt",
        "turn a trained first-order model (convnet*, convnext_*) into a quadratic one and "
        "fine-tune it",
    ),
    ("export", "export a model to ONNX, check it in ONNX Runtime, optionally quantize to int8"),
    ("push", "save a model or checkpoint in timm's hub layout (config.json + model.safetensors)"),
)
FAST_ARGV = ((), ("-h",), ("--help",), ("--version",))


def installed_version() -> str | None:
    """The installed distribution's version (None when running from an uninstalled tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quadranet")
    except PackageNotFoundError:
        return None


def top_level_parser(version: str) -> argparse.ArgumentParser:
    """The top-level parser as `quadranet.cli.build_parser` makes it, each command a stub."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"{PROG} {version}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in COMMANDS:
        sub.add_parser(name, help=text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `quadranet` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    version = installed_version() if tuple(args) in FAST_ARGV else None
    if version is not None:
        parser = top_level_parser(version)
        if not args:  # as quadranet.cli does: the help, and a usage error's exit status
            parser.print_help()
            return 2
        try:
            parser.parse_args(args)
        except SystemExit as done:  # --help and --version print, then exit 0
            return int(done.code or 0)
    from quadranet.cli import main as full_main

    return full_main(args)


if __name__ == "__main__":
    sys.exit(main())
