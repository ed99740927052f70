"""Subcommands of the `quadranet` CLI."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Iterable


def add_command_modules(sub: argparse._SubParsersAction, modules: Iterable[str]) -> None:
    """Call `add_parser(sub)` of each module; a module that is not installed is skipped."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.add_parser(sub)


def at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= `low` (a count, a size)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse
