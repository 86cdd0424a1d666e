"""The ``dreamblend`` command: one subcommand per module in :mod:`dreamblend.commands`.

Each command module defines ``register(subparsers)`` (adds its parser and sets ``func``), so
commands import their heavy dependencies only when they run.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dreamblend.commands import help_text

COMMANDS = ("demo", "generate", "batch", "train", "bench", "eval", "maps", "suggest", "generate_jedi", "ui")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamblend", description=help_text(__doc__.splitlines()[0]))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"dreamblend.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
