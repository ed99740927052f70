"""Command line interface: `quadranet <command> ...`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from quadranet import __version__
from quadranet.commands import add_command_modules

# Each entry names a module that defines `add_parser(subparsers)`; the parser it adds
# sets `func` (a callable taking the parsed namespace and returning an exit code).
COMMAND_MODULES = (
    "quadranet.commands.models",
    "quadranet.engine.commands",
    "quadranet.bench.commands",
    "quadranet.commands.nas",
    "quadranet.commands.adapt",
    "quadranet.commands.export",
)


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching: `--lr-base` never silently means `--lr-base-size`
    (subcommand parsers, nested ones too, are of this class)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = Parser(prog="quadranet", description="QuadraNet: quadratic-neuron vision backbones.")
    parser.add_argument("--version", action="version", version=f"quadranet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_command_modules(sub, COMMAND_MODULES)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `quadranet` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # Errors about the user's input: one clear line, no traceback.
        print(f"quadranet {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
