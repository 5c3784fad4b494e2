"""Curvature exponent α per layer: how curvature scales with the gradient's singular values."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from matplotlib.figure import Figure
from torch import nn

from .._validate import flag, integer, patterns
from ..metrics import AlphaResult, curvature_exponents, group_alphas
from ..metrics.alpha import resolve_layers
from ..report import figures, tags
from ..report.layout import ALPHA, Layout, multiline
from .base import Probe, ProbeContext, Row, fmt

AlphaResults = Mapping[str, AlphaResult]
"""One α measurement: the :class:`~lightning_landscape.AlphaResult` of each layer, by name."""


class CurvatureExponent(Probe):
    r"""Per-layer curvature exponent α (:func:`~lightning_landscape.curvature_exponents`).

    ``h_k ≈ c·σ_k^α``: the Hessian's curvature along the layer gradient's k-th singular direction
    against its singular value, on the probe data as one batch
    (:attr:`~lightning_landscape.probes.ProbeContext.single_batch`; under DDP each rank on its own
    shard, rank 0's values logged). It costs ``top_k`` Hessian-vector products per layer, so keep
    it much sparser than :class:`Sharpness`. α is defined at convergence: in-training values are
    exploratory.

    Logs ``landscape/alpha/<layer>``, ``landscape/alpha_r2/<layer>``,
    ``landscape/alpha_group/<type>`` (mean over reliable layers), ``landscape/alpha_cost/...``
    and, with a TensorBoard logger, the figure ``landscape/alpha_fit``.

    Args:
        top_k: singular directions per layer.
        layers: names or ``fnmatch`` patterns of the weights (default: every trainable
            Linear/Conv weight and attention input projection); checked against the model before
            training starts.
        figure: log the log h vs log σ figure to TensorBoard.
        every_n_steps: see :class:`~lightning_landscape.probes.Cadence`.
        every_n_epochs: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_start: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_end: see :class:`~lightning_landscape.probes.Cadence`.

    Raises:
        ValueError: on invalid settings.
    """

    name = "alpha"
    scope = "local"
    cost_group = "alpha_cost"
    order = 40

    def __init__(
        self,
        top_k: int = 20,
        *,
        layers: list[str] | None = None,
        figure: bool = True,
        every_n_steps: int | None = 1000,
        every_n_epochs: int | None = None,
        on_train_start: bool = False,
        on_train_end: bool = True,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            on_train_start=on_train_start,
            on_train_end=on_train_end,
        )
        self.top_k = integer("top_k", top_k)
        self.layers = patterns("layers", layers)
        self.figure = flag("figure", figure)

    def check(self, model: nn.Module, num_params: int) -> None:
        """Resolve ``layers`` against the model (a mistyped pattern fails here, not mid-run)."""
        try:
            resolve_layers(model, self.layers)
        except ValueError as err:
            raise ValueError(f"CurvatureExponent(layers={self.layers!r}): {err}") from None

    def run(self, ctx: ProbeContext) -> AlphaResults:
        """α of every selected layer on the probe data as one batch."""
        return curvature_exponents(
            ctx.model,
            ctx.loss_fn,
            ctx.single_batch,
            top_k=self.top_k,
            layers=self.layers,
            route=ctx.route,
            eval_mode=False,  # the modes of the round's curvature_context
        )

    @staticmethod
    def cost_hvps(result: AlphaResults) -> int:
        """Products over all layers."""
        return sum(r.num_hvps for r in result.values())

    def scalars(self, result: AlphaResults) -> dict[str, float]:
        """α and R² per layer, mean α per layer type (finite values only)."""
        out: dict[str, float] = {}
        for name, r in result.items():
            if math.isfinite(r.alpha):
                out[tags.alpha_layer(name)] = r.alpha
                out[tags.alpha_r2(name)] = r.r2
        for kind, value in group_alphas(result).items():
            if math.isfinite(value):
                out[tags.alpha_group(kind)] = value
        return out

    def figures(self, result: AlphaResults, step: int) -> dict[str, Figure]:
        """Log h against log σ per layer type with the fitted lines."""
        return {tags.ALPHA_FIGURE: figures.alpha_figure(result, step)} if self.figure else {}

    def charts(self) -> Layout:
        """α by layer type, by layer, and the fits' R²."""
        return {
            ALPHA: {
                "α by layer type": multiline(tags.family(tags.ALPHA_GROUP)),
                "α by layer": multiline(tags.family(tags.ALPHA)),
                "fit R² by layer": multiline(tags.family(tags.ALPHA_R2)),
            }
        }

    def rows(self, result: AlphaResults) -> list[Row]:
        """One row per layer and per layer type."""
        rows: list[Row] = []
        for name, r in result.items():
            verdict = "reliable" if r.reliable else f"unreliable: {r.unreliable_reason}"
            rows.append([f"α {name}", fmt(r.alpha, 4), f"{r.layer_type}, R² {r.r2:.2f}, {verdict}"])
        for kind, value in group_alphas(result).items():
            rows.append([f"α group {kind}", fmt(value, 4), "mean over reliable layers"])
        return rows

    def summary(self, result: AlphaResults) -> dict[str, Any]:
        """Every layer's fit, and the group means."""
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
            for name, r in result.items()
        }
        return {"layers": layers, "groups": group_alphas(result)}
