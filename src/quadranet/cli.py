"""Command line interface: `quadranet <command> ...`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

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
    "quadranet.commands.push",
)


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching: `--lr-base` never silently means `--lr-base-size`
    (subcommand parsers, nested ones too, are of this class)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """A bad command line: one line saying what is wrong and where the help is."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


DEBUG_HELP = "on an error, show the Python traceback instead of a one-line message"


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """`--debug` after any (sub)command too; unset there, it keeps the top-level value."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                 help=DEBUG_HELP)  # fmt: skip
                _add_debug_flag(sub)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = Parser(prog="quadranet", description="QuadraNet: quadratic-neuron vision backbones.")
    parser.add_argument("--version", action="version", version=f"quadranet {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_command_modules(sub, COMMAND_MODULES)
    _add_debug_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `quadranet` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    if args.debug:
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # Errors about the user's input: one clear line, no traceback.
        print_error(args.command, err)
        return 2
    except KeyboardInterrupt:
        print(f"quadranet {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug or an unforeseen failure: still one line, exit 1
        print(
            f"quadranet {args.command}: internal error: {type(err).__name__}: {one_line(err)} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def one_line(err: BaseException) -> str:
    """An exception's message on one line (whitespace runs, newlines too, become a space)."""
    return " ".join(str(err).split())


def print_error(command: str, err: BaseException) -> None:
    """The one line on stderr that a command's known error ends in."""
    print(f"quadranet {command}: error: {one_line(err)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
