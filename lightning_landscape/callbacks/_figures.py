"""Matplotlib figures the monitor logs to TensorBoard (callback layer: the only plotting code)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ..metrics import AlphaResult, SweepResult


def alpha_figure(results: Mapping[str, AlphaResult], step: int) -> Figure:
    """Log h_k against log σ_k per layer, one panel per layer type, with the fitted lines.

    Args:
        results: per-layer α results of one measurement.
        step: the global step (for the title).

    Returns:
        A matplotlib figure (not attached to pyplot).
    """
    types = sorted({r.layer_type for r in results.values()})
    fig = Figure(figsize=(4.2 * max(len(types), 1), 3.6), layout="constrained")
    axes = fig.subplots(1, max(len(types), 1), squeeze=False)[0]
    for ax, kind in zip(axes, types, strict=False):
        for name, r in results.items():
            if r.layer_type != kind or r.num_points == 0:
                continue
            sigma, h = r.sigma[r.kept].numpy(), r.h[r.kept].numpy()
            label = f"{name} α={r.alpha:.2f}" + ("" if r.reliable else " (unreliable)")
            points = ax.loglog(sigma, h, "o", ms=3, label=label)
            if math.isfinite(r.alpha) and len(sigma) >= 2:
                lo, hi = float(sigma.min()), float(sigma.max())
                xs = [lo, hi]
                ys = [math.exp(r.intercept) * x**r.alpha for x in xs]
                ax.loglog(xs, ys, "-", lw=1, color=points[0].get_color())
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
        ax.set_title(f"{kind} (step {step})")
        ax.set_xlabel("σ_k (gradient singular value)")
        ax.set_ylabel("h_k (curvature along u_k v_kᵀ)")
        ax.legend(fontsize=6)
    return fig


def delta2_sweep_figure(sweep: SweepResult, step: int) -> Figure:
    """Δ₂^(D) against k on log-log axes: means ± standard error, repeats, and the fitted line.

    Args:
        sweep: one k-sweep.
        step: the global step (for the title).

    Returns:
        A matplotlib figure (not attached to pyplot).
    """
    fig = Figure(figsize=(4.8, 3.6), layout="constrained")
    ax = fig.subplots()
    ks = list(sweep.ks)
    for row in sweep.per_repeat:
        ax.loglog(ks, row.tolist(), ".", ms=3, color="0.7")
    values, err = sweep.values.tolist(), sweep.stderr.nan_to_num(0.0).tolist()
    ax.errorbar(ks, values, yerr=err, fmt="o", ms=4, capsize=2, label="mean over orders")
    if math.isfinite(sweep.slope):
        ends = [ks[0], ks[-1]]
        fitted = [math.exp(sweep.intercept) * k**sweep.slope for k in ends]
        label = f"slope {sweep.slope:.2f} ± {sweep.slope_stderr:.2f}"
        ax.loglog(ends, fitted, "-", lw=1, label=label)
        ax.loglog(
            ends,
            [fitted[0], fitted[0] * (ends[1] / ends[0]) ** -2],
            ":",
            lw=1,
            color="0.4",
            label="k⁻² (theory)",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("k (samples)")
    ax.set_ylabel(f"Δ₂^(D), D={sweep.D}, σ={sweep.sigma:g}")
    ax.set_title(f"stabilization vs k (step {step})")
    ax.legend(fontsize=7)
    return fig
