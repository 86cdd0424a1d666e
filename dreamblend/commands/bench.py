"""``dreamblend bench``: the end-to-end benchmark (``python -m benchmarks.e2e``) under the CLI.

The benchmarks live in the source tree, not in the installed package, so this runs from a source
checkout (an editable install finds it next to the package). All arguments pass through.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import dreamblend

CHECKOUT = Path(dreamblend.__file__).resolve().parents[1]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="end-to-end benchmark of guided steps and images against the peers (see benchmarks/README.md)",
        description="Arguments are those of `python -m benchmarks.e2e` (try `dreamblend bench --help`).",
        # Every argument, --help included, belongs to the benchmark's parser: with no option prefix
        # of its own this parser takes them all as positionals instead of rejecting them.
        add_help=False,
        prefix_chars="\0",
    )
    parser.add_argument("args", nargs="*")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not (CHECKOUT / "benchmarks" / "e2e.py").is_file():
        print(
            f"dreamblend bench needs a source checkout (benchmarks/ next to {CHECKOUT / 'dreamblend'}); "
            "install the project with `pip install -e .` from a clone",
            file=sys.stderr,
        )
        return 2
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    return importlib.import_module("benchmarks.e2e").main(args.args)
