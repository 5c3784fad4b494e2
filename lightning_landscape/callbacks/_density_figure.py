"""Matplotlib figures of the Hessian spectral density and of eigenvalue trajectories."""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib import colormaps
from matplotlib.figure import Figure

from ..results import DensityResult

_POS_COLOR = "tab:blue"
_NEG_COLOR = "tab:red"
_LOG_FLOOR = 1e-8  # log y-axes show densities down to 1e-8 of the peak


def density_figure(result: DensityResult, step: int, *, log_scale: bool = True) -> Figure:
    """The smoothed SLQ spectral density, in ``λ`` (left) and on a symmetric-log axis (right).

    Left: :meth:`DensityResult.smoothed` on a linear ``λ`` axis. Right:
    ``smoothed(log=True)``, the density of ``asinh(λ / a) / ln 10`` drawn on matplotlib's
    ``"asinh"`` x-scale (``a = result.log_linear_width``), which spreads a heavy-tailed spectrum
    by decades on both sides of 0. In both panels the region ``λ < 0`` is shaded red, the legend
    gives :meth:`DensityResult.negative_mass`, and the quadrature nodes of all runs are drawn as a
    rug along the bottom.

    Args:
        result: a finite spectral density estimate.
        step: the global step (for the title).
        log_scale: logarithmic density axes (showing down to 1e-8 of the peak), which is how
            Hessian spectra are usually read; linear otherwise.

    Returns:
        A matplotlib figure (not attached to pyplot) with two axes, each holding two lines (the
        density and the node rug).

    Raises:
        ValueError: if ``result`` is not finite.
    """
    if not result.is_finite:
        raise ValueError("cannot draw a non-finite spectral density (the operator produced NaN)")
    neg = result.negative_mass()
    valid_nodes = result.nodes[~result.nodes.isnan()].tolist()
    width = result.log_linear_width
    fig = Figure(figsize=(9.6, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = [
        (result.smoothed(), "λ"),
        (result.smoothed(log=True), f"λ (asinh scale, a={width:.2g})"),
    ]
    for ax, ((x_t, rho_t), xlabel) in zip(axes, panels, strict=True):
        x, rho = x_t.numpy(), rho_t.numpy()
        floor = float(rho.max()) * _LOG_FLOOR if log_scale else 0.0
        ax.plot(x, rho, "-", lw=1, color=_POS_COLOR, label="density")
        ax.fill_between(x, rho, floor, where=x >= 0, color=_POS_COLOR, alpha=0.2, lw=0)
        ax.fill_between(
            x,
            rho,
            floor,
            where=x <= 0,
            color=_NEG_COLOR,
            alpha=0.35,
            lw=0,
            label=f"λ < 0: mass {neg:.3g}",
        )
        ax.plot(
            valid_nodes,
            [0.03] * len(valid_nodes),
            "|",
            ms=9,
            color="0.2",
            alpha=0.5,
            transform=ax.get_xaxis_transform(),
            label=f"nodes ({result.num_runs} runs × {result.nodes.shape[1]})",
        )
        if log_scale:
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=6)
    axes[1].set_xscale("asinh", linear_width=width)
    axes[1].tick_params(axis="x", labelsize=7)  # the ticks around the linear region are dense
    axes[0].set_title(f"Hessian spectral density (step {step})")
    axes[1].set_title("symmetric-log view (density per decade)")
    return fig


def eigenvalue_trajectories_figure(
    steps: Sequence[int],
    eigenvalues: Sequence[tuple[float, ...]],
    thresholds: Sequence[float | None],
    lambda_min: Sequence[float | None],
) -> Figure:
    """Top-k Hessian eigenvalues over training, with λ_min and the stability threshold.

    Args:
        steps: global steps of the probes (x axis).
        eigenvalues: per probe, the top eigenvalues in descending order; line ``i`` joins the
            ``i``-th eigenvalue of every probe that has one.
        thresholds: per probe, the optimizer's stability threshold (e.g. ``2/η``) or ``None``;
            drawn dashed where known.
        lambda_min: per probe, the smallest eigenvalue or ``None``; drawn if any is known.

    Returns:
        A matplotlib figure (not attached to pyplot) with one axes holding ``k`` eigenvalue lines,
        plus one for λ_min and one for the threshold when present.

    Raises:
        ValueError: if the four sequences differ in length.
    """
    lengths = {len(steps), len(eigenvalues), len(thresholds), len(lambda_min)}
    if len(lengths) != 1:
        raise ValueError(
            "steps, eigenvalues, thresholds and lambda_min must have one entry per probe, got "
            f"lengths {len(steps)}, {len(eigenvalues)}, {len(thresholds)}, {len(lambda_min)}"
        )
    nan = math.nan
    fig = Figure(figsize=(5.6, 3.6), layout="constrained")
    ax = fig.subplots()
    xs = list(steps)
    k = max((len(e) for e in eigenvalues), default=0)
    for i in range(k):
        ys = [e[i] if len(e) > i else nan for e in eigenvalues]
        color = colormaps["viridis"](0.85 * i / max(k - 1, 1))  # λ_max darkest
        label = "λ_max" if i == 0 else f"λ_{i + 1}"
        ax.plot(xs, ys, ".-", ms=3, lw=1.4 if i == 0 else 0.8, color=color, label=label)
    if any(v is not None for v in lambda_min):
        ys = [nan if v is None else v for v in lambda_min]
        ax.plot(xs, ys, ".-", ms=3, lw=1, color=_NEG_COLOR, label="λ_min")
    if any(t is not None for t in thresholds):
        ys = [nan if t is None else t for t in thresholds]
        ax.plot(xs, ys, "--", lw=1.2, color=_POS_COLOR, label="stability threshold")
    ax.set_xlabel("step")
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_title("top Hessian eigenvalues")
    if k or ax.lines:
        ax.legend(fontsize=6, ncols=2 if k > 6 else 1)
    return fig
