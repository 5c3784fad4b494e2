"""``lightning-landscape analyze`` and ``compare``: landscape geometry of saved checkpoints.

Both commands rebuild the model and datamodule from the LightningCLI-style YAML config used for
training (only its ``model:``, ``data:`` and ``seed_everything:`` entries are read), load the
checkpoint's ``state_dict``, take the first ``--num-samples`` training samples as the probe batch
(no shuffling) and probe the loss ``training_step`` returns, with its logging silenced and the
model in ``eval()`` mode. ``analyze`` writes a table to stdout, TensorBoard events with the
monitor's ``landscape/...`` tags at the checkpoint's ``global_step``, PNG figures and a
``summary.json``; ``compare`` puts two checkpoints' spectra side by side and measures the
linear-mode-connectivity barrier between them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from torch import nn

from ._cli_load import CLIError, Setup, check_state, prepare
from ._cli_probes import PROBE_FNS, make_loss_fn, probe_loss, top_eigen
from ._cli_report import (
    Progress,
    fmt,
    print_table,
    render,
    save_figure,
    save_png,
    spectra_figure,
    write_summary,
    write_tensorboard,
)
from .callbacks._probe import silenced
from .operators import batch_size

PROBES = ("eigen", "trace", "density", "alpha", "delta2", "slice")
DEFAULT_PROBES = "eigen,trace,density"


def _probe_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in PROBES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown probe name(s) {', '.join(map(repr, unknown)) or repr(text)}; "
            f"choose from {', '.join(PROBES)} (comma-separated)"
        )
    return list(dict.fromkeys(names))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _steps(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 points (both ends), got {value}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        metavar="CONFIG.yaml",
        help="LightningCLI-style YAML with `model:` and `data:` (class_path + init_args); "
        "other keys such as `trainer:` are ignored",
    )
    parser.add_argument(
        "--top-k", type=_positive_int, default=5, help="number of largest eigenvalues (default 5)"
    )
    parser.add_argument(
        "--num-samples",
        type=_positive_int,
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


def build_analyze_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-landscape analyze``.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-landscape analyze",
        description="Loss-landscape geometry of one Lightning checkpoint: Hessian spectrum, "
        "trace,\ndensity, α, Δ₂ and a 2-D loss slice.",
        epilog="example:\n  lightning-landscape analyze lightning_logs/version_0/checkpoints/"
        "last.ckpt --config config.yaml --probes eigen,trace,density,slice --top-k 5\n\n"
        f"probes: {', '.join(PROBES)}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ckpt", metavar="CKPT", help="Lightning checkpoint (.ckpt)")
    _common(parser)
    parser.add_argument(
        "--probes",
        type=_probe_list,
        default=_probe_list(DEFAULT_PROBES),
        help=f"comma-separated subset of {','.join(PROBES)} (default {DEFAULT_PROBES})",
    )
    parser.add_argument(
        "--out", default=None, help="output directory (default landscape_analysis/<ckpt stem>)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def build_compare_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-landscape compare``.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-landscape compare",
        description="Compare two checkpoints of one model: top-k Hessian spectra side by side\n"
        "and the loss barrier on the straight line between them.",
        epilog="example:\n  lightning-landscape compare epoch=4.ckpt epoch=9.ckpt "
        "--config config.yaml --top-k 5 --steps 21",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ckpt_a", metavar="CKPT_A", help="first checkpoint (t = 0)")
    parser.add_argument("ckpt_b", metavar="CKPT_B", help="second checkpoint (t = 1)")
    _common(parser)
    parser.add_argument(
        "--steps",
        type=_steps,
        default=21,
        help="points on the line from A to B, both ends included (default 21)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default landscape_analysis/<A stem>_vs_<B stem>)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_top_k(model: nn.Module, top_k: int) -> None:
    n = _num_params(model)
    if n == 0:
        raise CLIError("the model has no trainable parameters")
    if top_k > n:
        raise CLIError(f"--top-k {top_k} exceeds the model's {n} trainable parameters")


def _out_dir(given: str | None, default_name: str) -> Path:
    out = Path(given) if given is not None else Path("landscape_analysis") / default_name
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_analyze(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``analyze`` on parsed arguments.

    Args:
        args: the namespace of :func:`build_analyze_parser`.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        CLIError: for user errors (files, config, checkpoint, arguments).
    """
    setup: Setup = prepare([args.ckpt], args.config, args.num_samples, args.device, args.seed)
    model, batch, ckpt = setup.model, setup.batch, setup.checkpoints[0]
    _check_top_k(model, args.top_k)
    if "delta2" in args.probes and batch_size(batch) < 2:
        raise CLIError("the delta2 probe needs --num-samples >= 2")
    step = int(ckpt.get("global_step", 0))
    out = _out_dir(args.out, Path(args.ckpt).stem)
    loss = probe_loss(model, batch)
    summary: dict[str, Any] = {
        "command": "analyze",
        "checkpoint": str(args.ckpt),
        "config": str(args.config),
        "global_step": step,
        "epoch": ckpt.get("epoch"),
        "num_samples": batch_size(batch),
        "num_params": _num_params(model),
        "device": str(setup.device),
        "seed": args.seed,
        "probes": args.probes,
        "probe_loss": loss,
    }
    scalars: dict[str, float] = {"landscape/probe_loss": loss}
    figures: dict[str, Figure] = {}
    rows: list[list[str]] = [["probe loss", fmt(loss), f"{batch_size(batch)} samples, eval mode"]]
    progress = Progress(args.probes, enabled=not args.no_progress)
    try:
        for name in args.probes:
            progress.start(name)
            part, part_scalars, part_figures, part_rows = PROBE_FNS[name](model, batch, args, step)
            summary[name] = part
            scalars.update(part_scalars)
            figures.update(part_figures)
            rows += part_rows
            progress.done()
    finally:
        progress.close()
    files: dict[str, str] = {}
    images = {tag: render(fig) for tag, fig in figures.items()}
    for tag, image in images.items():
        files[tag] = str(save_png(image, out / f"{tag.rpartition('/')[2]}.png"))
    write_tensorboard(out, step, scalars, images)
    summary["scalars"] = scalars
    summary["files"] = {**files, "tensorboard": str(out), "summary": str(out / "summary.json")}
    write_summary(out, summary)
    title = f"landscape of {args.ckpt} (global step {step})"
    print_table(title, ["quantity", "value", "notes"], rows, align="lrl")
    print(f"wrote {out / 'summary.json'}, {len(files)} PNG(s) and TensorBoard events to {out}/")
    return summary


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``compare`` on parsed arguments.

    Args:
        args: the namespace of :func:`build_compare_parser`.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        CLIError: for user errors, including checkpoints of different architectures.
    """
    from .callbacks._slice_figure import connectivity_figure
    from .metrics import mode_connectivity

    setup = prepare(
        [args.ckpt_a, args.ckpt_b], args.config, args.num_samples, args.device, args.seed
    )
    model, batch = setup.model, setup.batch
    ckpt_a, ckpt_b = setup.checkpoints
    state_a, state_b = ckpt_a["state_dict"], ckpt_b["state_dict"]
    check_state(
        model,
        state_b,
        f"checkpoint B {args.ckpt_b!r}",
        f"it does not have the architecture of checkpoint A {args.ckpt_a!r} and the config's model",
    )
    _check_top_k(model, args.top_k)
    out = _out_dir(args.out, f"{Path(args.ckpt_a).stem}_vs_{Path(args.ckpt_b).stem}")
    progress = Progress(["spectrum A", "spectrum B", "connectivity"], not args.no_progress)
    try:
        progress.start("spectrum A")
        loss_a = probe_loss(model, batch)
        eig_a = top_eigen(model, batch, args.top_k, args.seed)
        progress.done()
        progress.start("spectrum B")
        model.load_state_dict(state_b, strict=True)
        loss_b = probe_loss(model, batch)
        eig_b = top_eigen(model, batch, args.top_k, args.seed)
        progress.done()
        progress.start("connectivity")
        with silenced(model):
            conn = mode_connectivity(
                model, state_a, state_b, make_loss_fn(), batch, steps=args.steps
            )
        progress.done()
    finally:
        progress.close()
    la, lb = eig_a.eigenvalues.tolist(), eig_b.eigenvalues.tolist()
    ratios = [b / a if a != 0 else float("nan") for a, b in zip(la, lb, strict=True)]
    rows = [["probe loss", fmt(loss_a), fmt(loss_b), fmt(loss_b / loss_a if loss_a else None)]]
    rows += [
        [f"λ_{i + 1}" if i else "λ_max", fmt(a), fmt(b), fmt(r)]
        for i, (a, b, r) in enumerate(zip(la, lb, ratios, strict=True))
    ]
    step_a, step_b = int(ckpt_a.get("global_step", 0)), int(ckpt_b.get("global_step", 0))
    files = {
        "spectra": str(
            save_figure(
                spectra_figure(la, lb, f"A (step {step_a})", f"B (step {step_b})"),
                out / "spectra.png",
            )
        ),
        "connectivity": str(save_figure(connectivity_figure(conn), out / "connectivity.png")),
    }
    summary: dict[str, Any] = {
        "command": "compare",
        "checkpoint_a": str(args.ckpt_a),
        "checkpoint_b": str(args.ckpt_b),
        "config": str(args.config),
        "global_step_a": step_a,
        "global_step_b": step_b,
        "num_samples": batch_size(batch),
        "device": str(setup.device),
        "probe_loss_a": loss_a,
        "probe_loss_b": loss_b,
        "eigenvalues_a": la,
        "eigenvalues_b": lb,
        "ratio_b_over_a": ratios,
        "converged_a": eig_a.all_converged,
        "converged_b": eig_b.all_converged,
        "connectivity": {
            "barrier": conn.barrier,
            "barrier_t": conn.barrier_t,
            "loss_a": conn.loss_a,
            "loss_b": conn.loss_b,
            "ts": conn.ts,
            "losses": conn.losses,
            "steps": conn.num_evals,
        },
        "files": {**files, "summary": str(out / "summary.json")},
    }
    write_summary(out, summary)
    title = f"A = {args.ckpt_a} (step {step_a}), B = {args.ckpt_b} (step {step_b})"
    print_table(title, ["quantity", "A", "B", "B/A"], rows)
    print(
        f"linear-mode-connectivity barrier: {fmt(conn.barrier)} at t = {conn.barrier_t:.3g} "
        f"({args.steps} points; loss A {fmt(conn.loss_a)}, loss B {fmt(conn.loss_b)})"
    )
    print(f"wrote {out / 'summary.json'} and 2 PNGs to {out}/")
    return summary


def _main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Any],
    argv: Sequence[str] | None,
) -> int:
    args = parser.parse_args(argv)
    try:
        run(args)
    except CLIError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


def analyze_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-landscape analyze``.

    Args:
        argv: the arguments after ``analyze`` (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0, or 2 for a user error (message on stderr).
    """
    return _main(build_analyze_parser(), run_analyze, argv)


def compare_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-landscape compare``.

    Args:
        argv: the arguments after ``compare`` (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0, or 2 for a user error (message on stderr).
    """
    return _main(build_compare_parser(), run_compare, argv)
