"""Matplotlib figures of loss slices and of linear mode connectivity (callback layer)."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from ..metrics import ConnectivityResult, SliceResult


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
