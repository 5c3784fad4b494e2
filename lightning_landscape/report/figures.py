"""The matplotlib figures of every measurement (the monitor logs them, the CLI saves them).

Each function takes a result and returns a :class:`~matplotlib.figure.Figure` that is not attached
to pyplot (so it needs no display and is garbage-collected like any object).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ..metrics import AlphaResult, ConnectivityResult, SliceResult, SweepResult
from ..solvers import DensityResult


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


def stability_ratio_figure(
    steps: Sequence[int], ratios: Sequence[float], kinds: Sequence[str]
) -> Figure:
    """The stability ratio over training, with the edge of stability at 1.

    Args:
        steps: global steps of the probes that had a ratio.
        ratios: the ratios (sharpness over the optimizer's threshold).
        kinds: per probe, ``"raw"`` (SGD: η·λ_max/(2 + 2β)) or ``"preconditioned"`` (Adam:
            λ₁(P⁻¹H) over (2 + 2β₁)/((1 − β₁)η)); names the quantity in the title.

    Returns:
        A matplotlib figure (not attached to pyplot).

    Raises:
        ValueError: if the sequences differ in length.

    Example:
        >>> fig = stability_ratio_figure([10, 20, 30], [0.5, 0.9, 1.02], ["raw"] * 3)
        >>> fig.axes[0].get_title()
        'stability ratio η·λ_max/(2+2β)  (1: edge of stability)'
    """
    if not len(steps) == len(ratios) == len(kinds):
        raise ValueError("steps, ratios and kinds must have one entry per probe")
    fig = Figure(figsize=(5.6, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(list(steps), list(ratios), ".-", ms=3, lw=1.2, color=_POS_COLOR)
    ax.axhline(1.0, ls="--", lw=0.9, color="k")
    ax.set_ylim(bottom=0, top=max(1.2, 1.05 * max(ratios, default=1.0)))
    quantity = {"raw": "η·λ_max/(2+2β)", "preconditioned": "λ₁(P⁻¹H)/((2+2β₁)/((1−β₁)η))"}
    names = sorted({quantity.get(k, k) for k in kinds})
    ax.set_title(f"stability ratio {' | '.join(names)}  (1: edge of stability)")
    ax.set_xlabel("step")
    ax.set_ylabel("stability ratio")
    return fig


def _title(result: SliceResult, step: int | None) -> str:
    kind = result.directions
    if kind == "random":
        kind = f"random ({result.normalization}-normalised)"
    title = f"loss along {kind} direction{'s' if result.dims == 2 else ''}"
    if result.eigenvalues is not None:
        lams = ", ".join(f"λ{i + 1}={float(v):.3g}" for i, v in enumerate(result.eigenvalues))
        title += f"\n{lams}"
    if step is not None:
        title += f" (step {step})"
    return title


def _levels(z: np.ndarray, n: int = 20) -> np.ndarray | None:
    """Contour levels: log-spaced for positive losses, linear otherwise; None if constant."""
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        return None
    lo, hi = float(finite.min()), float(finite.max())
    if not hi > lo:
        return None
    if lo > 0:
        return np.geomspace(lo, hi, n)
    return np.linspace(lo, hi, n)


def slice_figure(result: SliceResult, step: int | None = None) -> Figure:
    """Loss against the coordinate (1-D) or loss contours over the plane (2-D).

    The centre ``w`` is marked; 2-D contours use log-spaced levels when all losses are positive.
    The title names the direction kind and, for Hessian eigendirections, their eigenvalues.

    Args:
        result: a :func:`~lightning_landscape.metrics.loss_slice` result.
        step: the global step for the title, or ``None``.

    Returns:
        A matplotlib figure (not attached to pyplot).
    """
    coords = result.coords.numpy()
    losses = result.losses.numpy()
    fig = Figure(figsize=(5.4, 4.2), layout="constrained")
    ax = fig.subplots()
    axis = "u" if result.directions == "eigen" else "d"
    if result.dims == 1:
        ax.plot(coords, losses, "-", lw=1.5)
        ax.plot([0.0], [result.center_loss], "o", ms=5, color="C3", label="w (current weights)")
        ax.set_xlabel(f"a (along {axis}₁)")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    else:
        z = np.ma.masked_invalid(losses.T)  # rows along d₂ (y), columns along d₁ (x)
        levels = _levels(losses)
        mesh: ScalarMappable
        if levels is None:
            mesh = ax.pcolormesh(coords, coords, z, shading="nearest")
        else:
            norm = LogNorm(levels[0], levels[-1]) if levels[0] > 0 else None
            mesh = ax.contourf(coords, coords, z, levels=levels, norm=norm, cmap="viridis")
            ax.contour(coords, coords, z, levels=levels[::2], colors="k", linewidths=0.3)
        fig.colorbar(mesh, ax=ax, label="loss", format="%.3g")
        ax.plot([0.0], [0.0], "+", ms=10, mew=2, color="C3", label="w (current weights)")
        ax.set_xlabel(f"a (along {axis}₁)")
        ax.set_ylabel(f"b (along {axis}₂)")
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_title(_title(result, step), fontsize=9)
    return fig


def connectivity_figure(result: ConnectivityResult, step: int | None = None) -> Figure:
    """Loss along ``θ(t) = (1 − t) θ_A + t θ_B`` with the straight baseline and the barrier.

    Args:
        result: a :func:`~lightning_landscape.metrics.mode_connectivity` result.
        step: the global step for the title, or ``None``.

    Returns:
        A matplotlib figure (not attached to pyplot).
    """
    ts = result.ts.numpy()
    fig = Figure(figsize=(4.8, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot(ts, result.losses.numpy(), "o-", ms=3, lw=1.5, label="L(θ(t))")
    ax.plot(ts, result.baseline.numpy(), "--", lw=1, color="0.4", label="(1−t)L(θ_A) + tL(θ_B)")
    if math.isfinite(result.barrier) and result.barrier > 0:
        t = result.barrier_t
        i = int(np.argmin(np.abs(ts - t)))
        top, base = float(result.losses[i]), float(result.baseline[i])
        ax.annotate(
            "",
            xy=(t, top),
            xytext=(t, base),
            arrowprops={"arrowstyle": "<->", "color": "C3", "lw": 1},
        )
        ax.text(t, 0.5 * (top + base), f"  barrier {result.barrier:.3g}", color="C3", va="center")
    ax.set_xticks([0.0, 0.25, 0.5, 0.75, 1.0], ["A", "0.25", "0.5", "0.75", "B"])
    ax.set_xlabel("t")
    ax.set_ylabel("loss")
    title = f"linear interpolation: barrier {result.barrier:.3g} at t={result.barrier_t:.2f}"
    if step is not None:
        title += f" (step {step})"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return fig


def spectra_figure(
    eig_a: Sequence[float], eig_b: Sequence[float], label_a: str, label_b: str
) -> Figure:
    """The top-k Hessian eigenvalues of two checkpoints side by side.

    Args:
        eig_a: eigenvalues of checkpoint A, descending.
        eig_b: eigenvalues of checkpoint B, descending.
        label_a: legend label of A.
        label_b: legend label of B.

    Returns:
        A matplotlib figure (not attached to pyplot), log y-axis when all values are positive.
    """
    fig = Figure(figsize=(5.4, 3.6), layout="constrained")
    ax = fig.subplots()
    for values, label, marker, offset in ((eig_a, label_a, "o", -0.1), (eig_b, label_b, "s", 0.1)):
        xs = [i + 1 + offset for i in range(len(values))]
        ax.plot(xs, list(values), marker, ms=6, label=label)
    finite = [v for v in (*eig_a, *eig_b) if math.isfinite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")
    ax.set_xticks(range(1, max(len(eig_a), len(eig_b)) + 1))
    ax.set_xlabel("i (i-th largest)")
    ax.set_ylabel("Hessian eigenvalue λ_i")
    ax.set_title("top-k Hessian spectra", fontsize=9)
    ax.legend(fontsize=7)
    return fig
