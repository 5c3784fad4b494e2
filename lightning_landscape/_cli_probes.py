"""The probes of ``lightning-landscape analyze``, one function each.

Every probe takes ``(model, batch, args, step)`` and returns its part of ``summary.json``, its
TensorBoard scalars (the monitor's ``landscape/...`` tags), its figures (by TensorBoard tag; the
PNG is named after the tag's last component) and its rows of the printed table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, cast

import lightning.pytorch as pl
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from ._cli_load import CLIError
from ._cli_report import fmt
from .callbacks._probe import silenced, training_step_loss
from .context import curvature_context
from .operators import HessianOperator, LossFn, batch_size
from .results import EigenResult

Row = list[str]
ProbeOutput = tuple[dict[str, Any], dict[str, float], dict[str, Figure], list[Row]]
ProbeFn = Callable[[pl.LightningModule, Any, argparse.Namespace, int], ProbeOutput]

DENSITY_RUNS = 8
DENSITY_STEPS = 40
TRACE_HVPS = 30
ALPHA_TOP_K = 20
DELTA2_D = 10
SLICE_STEPS = 21


def make_loss_fn() -> LossFn:
    """The probe loss: what ``training_step(batch, 0)`` returns (call inside ``silenced``).

    Returns:
        ``loss_fn(model, batch) -> Tensor``.
    """

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        return training_step_loss(cast(pl.LightningModule, model), batch)

    return loss_fn


def probe_loss(model: pl.LightningModule, batch: Any) -> float:
    """The loss on the probe batch in eval mode (also checks ``training_step`` returns a loss).

    Args:
        model: the model.
        batch: the probe batch.

    Returns:
        The loss.

    Raises:
        CLIError: if ``training_step`` does not return a loss tensor or a dict with ``"loss"``.
    """
    with silenced(model), curvature_context(model), torch.no_grad():
        try:
            return float(training_step_loss(model, batch))
        except ValueError:
            raise CLIError(
                "the model's training_step(batch, 0) must return the loss tensor or a dict with "
                "'loss' to be analysed"
            ) from None


def top_eigen(model: pl.LightningModule, batch: Any, k: int, seed: int) -> EigenResult:
    """The ``k`` largest Hessian eigenvalues of the probe loss.

    Args:
        model: the model.
        batch: the probe batch.
        k: how many.
        seed: the solver's seed.

    Returns:
        The :class:`~lightning_landscape.results.EigenResult`.
    """
    from .functional import hessian_eigenvalues

    with silenced(model):
        return hessian_eigenvalues(model, make_loss_fn(), batch, k=k, seed=seed)


def _eigen(
    model: pl.LightningModule, batch: Any, args: argparse.Namespace, step: int
) -> ProbeOutput:
    from .functional import hessian_eigenvalues

    top = top_eigen(model, batch, args.top_k, args.seed)
    with silenced(model):
        low = hessian_eigenvalues(
            model, make_loss_fn(), batch, k=1, which="smallest", seed=args.seed
        )
    values = top.eigenvalues.tolist()
    lam_min = float(low.eigenvalues[0])
    max_res = float(top.residuals.max())
    part = {
        "lambda_max": values[0],
        "eigenvalues": values,
        "residuals": top.residuals,
        "converged": top.all_converged,
        "lambda_min": lam_min,
        "lambda_min_residual": float(low.residuals[0]),
        "lambda_min_converged": low.all_converged,
        "num_hvps": top.num_hvps + low.num_hvps,
        "seconds": top.seconds + low.seconds,
    }
    scalars = {
        "landscape/lambda_max": values[0],
        "landscape/lambda_min": lam_min,
        "landscape/converged": float(top.all_converged),
        "landscape/max_residual": max_res,
    }
    scalars.update({f"landscape/eigenvalues/{i}": v for i, v in enumerate(values)})
    conv = "converged" if top.all_converged else "NOT converged"
    rows = [["λ_max", fmt(values[0]), f"{conv}, max residual {max_res:.1e}"]]
    rows += [[f"λ_{i + 1}", fmt(v), ""] for i, v in enumerate(values[1:], start=1)]
    rows.append(["λ_min", fmt(lam_min), "converged" if low.all_converged else "NOT converged"])
    return part, scalars, {}, rows


def _trace(
    model: pl.LightningModule, batch: Any, args: argparse.Namespace, step: int
) -> ProbeOutput:
    from .functional import hessian_trace

    with silenced(model):
        res = hessian_trace(model, make_loss_fn(), batch, num_hvps=TRACE_HVPS, seed=args.seed)
    part = {
        "trace": res.trace,
        "stderr": res.stderr,
        "num_hvps": res.num_hvps,
        "seconds": res.seconds,
    }
    scalars = {"landscape/trace": res.trace, "landscape/trace_stderr": res.stderr}
    rows = [["trace", fmt(res.trace), f"± {fmt(res.stderr, 3)} (Hutch++, {res.num_hvps} HVPs)"]]
    return part, scalars, {}, rows


def _density(
    model: pl.LightningModule, batch: Any, args: argparse.Namespace, step: int
) -> ProbeOutput:
    from .callbacks._density_figure import density_figure
    from .solvers import spectral_density

    with silenced(model), curvature_context(model):
        op = HessianOperator(model, make_loss_fn(), [batch])
        try:
            res = spectral_density(
                op, num_runs=DENSITY_RUNS, lanczos_steps=DENSITY_STEPS, seed=args.seed
            )
        finally:
            op.release()
    neg = res.negative_mass()
    part = {
        "negative_mass": neg,
        "lambda_max_node": res.lambda_max,
        "lambda_min_node": res.lambda_min,
        "mean_eigenvalue": res.moment(1),
        "num_runs": res.num_runs,
        "lanczos_steps": res.lanczos_steps,
        "num_hvps": res.num_hvps,
        "seconds": res.seconds,
        "nodes": res.nodes,
        "weights": res.weights,
    }
    figures = {"landscape/density": density_figure(res, step)} if res.is_finite else {}
    rows = [["negative mass", fmt(neg), f"SLQ density, {res.num_runs} runs × {DENSITY_STEPS}"]]
    return part, {"landscape/negative_mass": neg}, figures, rows


def _alpha(
    model: pl.LightningModule, batch: Any, args: argparse.Namespace, step: int
) -> ProbeOutput:
    from .callbacks._figures import alpha_figure
    from .metrics import curvature_exponents, group_alphas

    with silenced(model):
        results = curvature_exponents(model, make_loss_fn(), batch, top_k=ALPHA_TOP_K)
    groups = group_alphas(results)
    layers = {
        name: {
            "layer_type": r.layer_type,
            "shape": r.shape,
            "alpha": r.alpha,
            "r2": r.r2,
            "alpha_theil_sen": r.alpha_theil_sen,
            "num_points": r.num_points,
            "sigma_decades": r.sigma_decades,
            "reliable": r.reliable,
            "unreliable_reason": r.unreliable_reason,
            "sigma": r.sigma,
            "h": r.h,
        }
        for name, r in results.items()
    }
    scalars: dict[str, float] = {}
    rows: list[Row] = []
    for name, r in results.items():
        scalars[f"landscape/alpha/{name}"] = r.alpha
        scalars[f"landscape/alpha_r2/{name}"] = r.r2
        note = f"{r.layer_type}, R² {r.r2:.2f}, " + (
            "reliable" if r.reliable else f"unreliable: {r.unreliable_reason}"
        )
        rows.append([f"α {name}", fmt(r.alpha, 4), note])
    for kind, value in groups.items():
        scalars[f"landscape/alpha_group/{kind}"] = value
        rows.append([f"α group {kind}", fmt(value, 4), "mean over reliable layers"])
    figures = {"landscape/alpha_fit": alpha_figure(results, step)}
    return {"layers": layers, "groups": groups}, scalars, figures, rows


def _delta2(
    model: pl.LightningModule, batch: Any, args: argparse.Namespace, step: int
) -> ProbeOutput:
    from .callbacks._delta2 import metrics
    from .metrics import stabilization

    k = batch_size(batch) - 1
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    D = min(DELTA2_D, n)
    with silenced(model):
        res = stabilization(model, make_loss_fn(), batch, k, D=D, seed=args.seed)
    part = {
        "value": res.value,
        "k": res.k,
        "D": D,
        "sigma": res.sigma,
        "estimator": res.estimator,
        "a": res.a,
        "converged": res.converged,
        "terms": res.terms(),
        "eigenvalues": res.eigenvalues,
        "num_hvps": res.num_hvps,
        "seconds": res.seconds,
    }
    rows = [["Δ₂^(D)", fmt(res.value), f"k={k}, D={D}, σ={res.sigma:g} ({res.estimator})"]]
    return part, metrics(res, None), {}, rows


def _slice(
    model: pl.LightningModule, batch: Any, args: argparse.Namespace, step: int
) -> ProbeOutput:
    from .callbacks._slice_figure import slice_figure
    from .metrics import loss_slice

    with silenced(model):
        res = loss_slice(
            model,
            make_loss_fn(),
            batch,
            directions="eigen",
            dims=2,
            steps=SLICE_STEPS,
            seed=args.seed,
        )
    part = {
        "center_loss": res.center_loss,
        "eigenvalues": res.eigenvalues,
        "converged": res.converged,
        "coords": res.coords,
        "losses": res.losses,
        "num_evals": res.num_evals,
        "seconds": res.seconds,
    }
    finite = res.losses[torch.isfinite(res.losses)]
    top = float(finite.max()) if finite.numel() else float("nan")
    note = f"{SLICE_STEPS}×{SLICE_STEPS} grid on the top-2 eigenvectors, max loss {fmt(top, 4)}"
    rows = [["slice centre loss", fmt(res.center_loss), note]]
    return part, {}, {"landscape/loss_slice": slice_figure(res, step)}, rows


PROBE_FNS: dict[str, ProbeFn] = {
    "eigen": _eigen,
    "trace": _trace,
    "density": _density,
    "alpha": _alpha,
    "delta2": _delta2,
    "slice": _slice,
}
