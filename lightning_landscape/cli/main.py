"""The ``lightning-landscape`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-landscape`` console script.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The process exit code.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    # analyze/compare parse their own arguments (positionals and options in any order).
    if args_list and args_list[0] in ("analyze", "compare"):
        from . import analyze, compare

        command = analyze.main if args_list[0] == "analyze" else compare.main
        return command(args_list[1:])
    parser = argparse.ArgumentParser(
        prog="lightning-landscape",
        description="Loss-landscape geometry for PyTorch Lightning.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo",
        help="train a small CNN on bundled digits with the monitor on (see `demo --help`)",
        add_help=False,
    )
    sub.add_parser(
        "analyze",
        help="Hessian spectrum, trace, density, α, Δ₂ and a loss slice of one checkpoint "
        "(see `analyze --help`)",
        add_help=False,
    )
    sub.add_parser(
        "compare",
        help="two checkpoints: spectra side by side and the mode-connectivity barrier "
        "(see `compare --help`)",
        add_help=False,
    )
    args, rest = parser.parse_known_args(args_list)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse exits first
    return 2
