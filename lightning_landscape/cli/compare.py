"""``lightning-landscape compare``: two checkpoints' spectra side by side and the barrier between.

Both checkpoints are loaded into one model rebuilt from the training config (see
:mod:`lightning_landscape.cli.analyze`); the top-k Hessian spectrum of each is measured by the
monitor's :class:`~lightning_landscape.probes.Sharpness` probe on the same probe batch, and the
loss on the straight line between the two weight vectors gives the linear-mode-connectivity
barrier. Before each spectrum the products are checked for symmetry
(:func:`~lightning_landscape.probes.check_products`, ``product_check`` in ``summary.json``: A's,
then B's, ``null`` where there was nothing to check); when one check moves to finite differences,
both spectra are measured by them, and ``route`` in ``summary.json`` says which route was used.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..callbacks.data import silenced
from ..context import curvature_context
from ..metrics import mode_connectivity
from ..operators import HVPRoute, batch_size
from ..probes import ProbeContext, Sharpness, SharpnessResult, fmt
from ..report import figures, tags
from .args import add_common, grid_steps, num_params, out_dir, run_command
from .load import CLIError, check_state, checked_products, make_loss_fn, prepare, probe_loss
from .output import Progress, print_table, save_figure, warn, write_summary


def build_parser() -> argparse.ArgumentParser:
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
    add_common(parser)
    parser.add_argument(
        "--steps",
        type=grid_steps,
        default=21,
        help="points on the line from A to B, both ends included (default 21)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default landscape_analysis/<A stem>_vs_<B stem>)",
    )
    return parser


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``compare`` on parsed arguments.

    Args:
        args: the namespace of :func:`build_parser`.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        CLIError: for user errors, including checkpoints of different architectures.
    """
    setup = prepare(
        [args.ckpt_a, args.ckpt_b],
        args.config,
        args.num_samples,
        args.device,
        args.seed,
        model_class=args.model_class,
        data_class=args.data_class,
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
    sharpness = Sharpness(args.top_k, lambda_min=False, warm_start=False)
    try:
        sharpness.check(model, num_params(model))
    except ValueError as err:
        raise CLIError(str(err)) from None
    out = out_dir(args.out, f"{Path(args.ckpt_a).stem}_vs_{Path(args.ckpt_b).stem}")
    batches, retain_graph = setup.probe_batches(args.norm_statistics)

    checks: list[dict[str, Any] | None] = []  # the products' symmetry check, A then B
    route: list[HVPRoute] = ["auto"]  # both spectra by finite differences once a check switched

    def spectrum(check: bool = True) -> SharpnessResult:
        ctx = ProbeContext(
            model,
            make_loss_fn(),
            batches,
            sample_batch=batch,
            retain_graph=retain_graph,
            route=route[0],
            seed=args.seed,
            warn=warn,
        )
        try:
            with curvature_context(model, norm_statistics=args.norm_statistics), silenced(model):
                if check:
                    checks.append(checked_products(ctx, args.seed))
                if ctx.route == "finite_difference":
                    route[0] = "finite_difference"
                return sharpness.run(ctx)
        finally:
            ctx.release()

    progress = Progress(["spectrum A", "spectrum B", "connectivity"], not args.no_progress)
    try:
        progress.start("spectrum A")
        loss_a, eig_a = probe_loss(model, batches, args.norm_statistics), spectrum()
        progress.done()
        progress.start("spectrum B")
        model.load_state_dict(state_b, strict=True)
        loss_b, eig_b = probe_loss(model, batches, args.norm_statistics), spectrum()
        if route[0] == "finite_difference" and not (checks[0] or {}).get("switched"):
            model.load_state_dict(state_a, strict=True)  # B's products switched: A's too
            eig_a = spectrum(check=False)
            model.load_state_dict(state_b, strict=True)
        progress.done()
        progress.start("connectivity")
        loss_fn = make_loss_fn()
        weights = [batch_size(b) for b in batches]

        def chunked_loss(m: torch.nn.Module, _: Any) -> torch.Tensor:
            """The probe loss over the chunks (their sample-weighted mean), as probe_loss."""
            losses = [w * loss_fn(m, b) for w, b in zip(weights, batches, strict=True)]
            return torch.stack(losses).sum() / sum(weights)

        with curvature_context(model, norm_statistics=args.norm_statistics), silenced(model):
            conn = mode_connectivity(
                model, state_a, state_b, chunked_loss, None, steps=args.steps, eval_mode=False
            )
        progress.done()
    finally:
        progress.close()
    la, lb = list(eig_a.eigenvalues), list(eig_b.eigenvalues)
    ratios = [b / a if a != 0 else float("nan") for a, b in zip(la, lb, strict=True)]
    rows = [["probe loss", fmt(loss_a), fmt(loss_b), fmt(loss_b / loss_a if loss_a else None)]]
    rows += [
        [f"λ_{i + 1}" if i else "λ_max", fmt(a), fmt(b), fmt(r)]
        for i, (a, b, r) in enumerate(zip(la, lb, ratios, strict=True))
    ]
    step_a, step_b = int(ckpt_a.get("global_step", 0)), int(ckpt_b.get("global_step", 0))
    spectra = figures.spectra_figure(la, lb, f"A (step {step_a})", f"B (step {step_b})")
    files = {
        name: str(save_figure(fig, out / f"{name}.png"))
        for name, fig in (
            (tags.SPECTRA_FIGURE.rpartition("/")[2], spectra),
            (tags.CONNECTIVITY_FIGURE.rpartition("/")[2], figures.connectivity_figure(conn)),
        )
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
        "converged_a": eig_a.converged,
        "converged_b": eig_b.converged,
        "product_check": checks,
        "route": route[0] if route[0] != "auto" else (checks[0] or {}).get("route", "auto"),
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-landscape compare``.

    Args:
        argv: the arguments after ``compare`` (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0, or 2 for a user error (message on stderr).
    """
    return run_command(build_parser(), run_compare, argv)
