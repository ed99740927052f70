"""Subcommands of the `quadranet` CLI."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterable


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
