"""The arguments ``analyze`` and ``compare`` share, and running a command with clean errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .load import CLIError


def positive_int(text: str) -> int:
    """An ``argparse`` type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def grid_steps(text: str) -> int:
    """An ``argparse`` type: points on a line, both ends included (at least 2)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 points (both ends), got {value}")
    return value


def add_common(parser: argparse.ArgumentParser) -> None:
    """The config, class, sample, seed and device options of both commands."""
    parser.add_argument(
        "--config",
        required=True,
        metavar="CONFIG.yaml",
        help="the LightningCLI YAML you train with: its `model:` and `data:` are read "
        "(class_path + init_args, or the plain form with --model-class/--data-class); other "
        "keys such as `trainer:` are ignored",
    )
    parser.add_argument(
        "--model-class",
        metavar="PKG.CLASS",
        help="the LightningModule, when the config's `model:` holds only its init args (the "
        "class is given to LightningCLI in code)",
    )
    parser.add_argument(
        "--data-class",
        metavar="PKG.CLASS",
        help="the LightningDataModule, when the config's `data:` holds only its init args (or "
        "is absent)",
    )
    parser.add_argument(
        "--top-k", type=positive_int, default=5, help="number of largest eigenvalues (default 5)"
    )
    parser.add_argument(
        "--num-samples",
        type=positive_int,
        default=256,
        help="probe samples: the first N of the train dataset, unshuffled (default 256)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the solvers, and the global seed unless the config sets seed_everything "
        "(default 0)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="where to probe; auto: CUDA when available (default auto)",
    )
    parser.add_argument(
        "--norm-statistics",
        choices=("batch", "running"),
        default="batch",
        help="BatchNorm-type layers: batch = each chunk of the training batch size normalised "
        "with its own statistics, as in training (default); running = eval mode, the running "
        "statistics",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def num_params(model: nn.Module) -> int:
    """Trainable parameters of ``model`` (what the probes differentiate)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def out_dir(given: str | None, default_name: str) -> Path:
    """The output directory (created): ``given`` or ``landscape_analysis/<default_name>``."""
    out = Path(given) if given is not None else Path("landscape_analysis") / default_name
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_command(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Any],
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv``, run, and turn a :class:`CLIError` into exit code 2 with its message.

    Returns:
        The exit code.
    """
    args = parser.parse_args(argv)
    try:
        run(args)
    except CLIError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
