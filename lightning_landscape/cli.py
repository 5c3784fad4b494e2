"""The ``lightning-landscape`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-landscape`` console script.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The process exit code.
    """
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
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse exits first
    return 2
