"""``lightning-landscape analyze``: the landscape probes, run once on a saved checkpoint.

The model and datamodule are rebuilt from the LightningCLI-style YAML config used for training
(only its ``model:``, ``data:`` and ``seed_everything:`` entries are read), the checkpoint's
``state_dict`` is loaded, the first ``--num-samples`` training samples are the probe batch (no
shuffling), and the probes of :mod:`lightning_landscape.probes` (the monitor's own objects, with
their defaults) measure the loss ``training_step`` returns, with its logging silenced and the
model in ``eval()`` mode. Writes a table to stdout, TensorBoard events with the monitor's
``landscape/...`` tags at the checkpoint's ``global_step``, PNG figures and a ``summary.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from ..callbacks.data import silenced
from ..context import curvature_context, running_stat_norms
from ..operators import ProbeFailure, batch_size
from ..probes import BUILTIN, Probe, ProbeContext, Row, Sharpness, fmt
from ..report import tags
from ..report.layout import compose_layout
from .args import add_common, num_params, out_dir, run_command
from .load import CLIError, checked_products, make_loss_fn, prepare, probe_loss
from .output import (
    Progress,
    print_table,
    render,
    save_png,
    warn,
    write_summary,
    write_tensorboard,
)

_SKIPPED = (
    ProbeFailure,
    torch.OutOfMemoryError,
    getattr(torch.linalg, "LinAlgError", RuntimeError),
)
ALIASES = {"eigen": "sharpness"}
"""Older probe names ``--probes`` still takes."""
DEFAULT_PROBES = "sharpness,trace,density"


def probe_names(text: str) -> list[str]:
    """An ``argparse`` type: comma-separated probe names (see :data:`~..probes.BUILTIN`)."""
    names = [ALIASES.get(s.strip(), s.strip()) for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in BUILTIN]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown probe name(s) {', '.join(map(repr, unknown)) or repr(text)}; "
            f"choose from {', '.join(BUILTIN)} (comma-separated)"
        )
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-landscape analyze``.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-landscape analyze",
        description="Loss-landscape geometry of one Lightning checkpoint: Hessian spectrum, "
        "trace,\ndensity, α, Δ₂ and a 2-D loss slice, by the monitor's own probes.",
        epilog="example:\n  lightning-landscape analyze lightning_logs/version_0/checkpoints/"
        "last.ckpt --config config.yaml --probes sharpness,trace,density,slice --top-k 5\n\n"
        f"probes: {', '.join(BUILTIN)} ('eigen' is taken for 'sharpness')",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ckpt", metavar="CKPT", help="Lightning checkpoint (.ckpt)")
    add_common(parser)
    parser.add_argument(
        "--probes",
        type=probe_names,
        default=probe_names(DEFAULT_PROBES),
        help=f"comma-separated subset of {','.join(BUILTIN)} (default {DEFAULT_PROBES})",
    )
    parser.add_argument(
        "--out", default=None, help="output directory (default landscape_analysis/<ckpt stem>)"
    )
    return parser


def make_probes(names: Sequence[str], top_k: int) -> list[Probe]:
    """The probes named, with their defaults (``Sharpness`` with ``top_k``), in run order."""
    probes = [Sharpness(top_k) if n == "sharpness" else BUILTIN[n]() for n in names]
    return sorted(probes, key=lambda p: p.order)


def run_analyze(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``analyze`` on parsed arguments.

    Args:
        args: the namespace of :func:`build_parser`.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        CLIError: for user errors (files, config, checkpoint, arguments).
    """
    setup = prepare(
        [args.ckpt],
        args.config,
        args.num_samples,
        args.device,
        args.seed,
        model_class=args.model_class,
        data_class=args.data_class,
    )
    model, batch, ckpt = setup.model, setup.batch, setup.checkpoints[0]
    probes = make_probes(args.probes, args.top_k)
    n = num_params(model)
    if n == 0:
        raise CLIError("the model has no trainable parameters")
    for probe in probes:
        try:
            probe.check(model, n)
            probe.check_data(batch)
        except ValueError as err:
            raise CLIError(f"the {probe.name} probe cannot run here: {err}") from None
    step = int(ckpt.get("global_step", 0))
    out = out_dir(args.out, Path(args.ckpt).stem)
    batches, retain_graph = setup.probe_batches(args.norm_statistics)
    loss = probe_loss(model, batches, args.norm_statistics)
    ctx = ProbeContext(
        model,
        make_loss_fn(),
        batches,
        sample_batch=batch,
        single_batch=batch,
        retain_graph=retain_graph,
        seed=args.seed,
        step=step,
        epoch=int(ckpt.get("epoch", 0) or 0),
        warn=warn,
        batch_size=setup.train_batch_size,
    )
    summary: dict[str, Any] = {
        "command": "analyze",
        "checkpoint": str(args.ckpt),
        "config": str(args.config),
        "global_step": step,
        "epoch": ckpt.get("epoch"),
        "num_samples": batch_size(batch),
        "num_params": n,
        "device": str(setup.device),
        "seed": args.seed,
        "probes": [p.name for p in probes],
        "norm_statistics": args.norm_statistics,
        "probe_loss": loss,
    }
    scalars: dict[str, float] = {tags.PROBE_LOSS: loss}
    figures: dict[str, Figure] = {}
    stats = f"{args.norm_statistics} statistics" if running_stat_norms(model) else "eval mode"
    rows: list[Row] = [["probe loss", fmt(loss), f"{batch_size(batch)} samples, {stats}"]]
    progress = Progress([p.name for p in probes], enabled=not args.no_progress)
    try:
        with curvature_context(model, norm_statistics=args.norm_statistics), silenced(model):
            summary["product_check"] = checked_products(ctx, args.seed)
            for probe in probes:
                progress.start(probe.name)
                try:
                    result = probe.run(ctx)
                except _SKIPPED as err:
                    warn(f"the {probe.name} probe failed ({type(err).__name__}: {err})")
                    summary[probe.name] = {"failed": f"{type(err).__name__}: {err}"}
                    rows.append([probe.name, "-", f"failed: {err}"])
                    progress.done()
                    continue
                ctx.results[probe.name] = result
                if not probe.is_finite(result):
                    warn(f"the {probe.name} probe produced NaN/inf values")
                summary[probe.name] = probe.summary(result)
                scalars.update(probe.scalars(result))
                figures.update(probe.figures(result, step))
                rows += probe.rows(result)
                progress.done()
    finally:
        ctx.release()
        progress.close()
    files: dict[str, str] = {}
    images = {tag: render(fig) for tag, fig in figures.items()}
    for tag, image in images.items():
        files[tag] = str(save_png(image, out / f"{tag.rpartition('/')[2]}.png"))
    write_tensorboard(out, step, scalars, images, compose_layout(p.charts() for p in probes))
    summary["scalars"] = scalars
    summary["files"] = {**files, "tensorboard": str(out), "summary": str(out / "summary.json")}
    write_summary(out, summary)
    title = f"landscape of {args.ckpt} (global step {step})"
    print_table(title, ["quantity", "value", "notes"], rows, align="lrl")
    print(f"wrote {out / 'summary.json'}, {len(files)} PNG(s) and TensorBoard events to {out}/")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-landscape analyze``.

    Args:
        argv: the arguments after ``analyze`` (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0, or 2 for a user error (message on stderr).
    """
    return run_command(build_parser(), run_analyze, argv)
