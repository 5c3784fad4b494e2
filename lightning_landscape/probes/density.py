"""Spectral density: stochastic Lanczos quadrature of the whole Hessian spectrum."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from .._validate import flag, integer
from ..report import figures, tags
from ..report.layout import SPECTRUM, Layout, margin
from ..solvers import DensityResult, spectral_density
from .base import Probe, ProbeContext, Row, fmt


class SpectralDensity(Probe):
    """The Hessian spectral density by SLQ (:func:`~lightning_landscape.spectral_density`).

    Runs on the round's Hessian operator (under DDP the global Hessian), ``num_runs ×
    lanczos_steps`` products. Logs ``landscape/negative_mass`` (the fraction of the spectrum
    below zero: read it with ``landscape/lambda_min``, since the bulk near zero has both signs),
    ``landscape/negative_mass_lower`` and ``landscape/negative_mass_upper`` (what the quadrature
    guarantees, :meth:`~lightning_landscape.solvers.DensityResult.negative_mass_bounds`: far
    apart when the bulk near zero is one heavy node, whose sign then decides the value) and,
    with a TensorBoard logger, the figure ``landscape/density`` (log-scale density, negative
    part shaded).

    Args:
        num_runs: SLQ runs (random start vectors).
        lanczos_steps: Lanczos steps per run.
        figure: log the density figure to TensorBoard.
        every_n_steps: see :class:`~lightning_landscape.probes.Cadence`.
        every_n_epochs: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_start: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_end: see :class:`~lightning_landscape.probes.Cadence`.

    Raises:
        ValueError: on invalid settings.
    """

    name = "density"
    supports_sharding = True
    order = 20

    def __init__(
        self,
        num_runs: int = 8,
        lanczos_steps: int = 40,
        *,
        figure: bool = True,
        every_n_steps: int | None = 500,
        every_n_epochs: int | None = None,
        on_train_start: bool = True,
        on_train_end: bool = True,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            on_train_start=on_train_start,
            on_train_end=on_train_end,
        )
        self.num_runs = integer("num_runs", num_runs)
        self.lanczos_steps = integer("lanczos_steps", lanczos_steps)
        self.figure = flag("figure", figure)

    def run(self, ctx: ProbeContext) -> DensityResult:
        """SLQ on the round's operator."""
        return spectral_density(
            ctx.operator(), num_runs=self.num_runs, lanczos_steps=self.lanczos_steps, seed=ctx.seed
        )

    def is_finite(self, result: DensityResult) -> bool:
        """Whether every node and weight is finite."""
        return result.is_finite

    def scalars(self, result: DensityResult) -> dict[str, float]:
        """The negative mass and its bounds."""
        lower, upper = result.negative_mass_bounds()
        return {
            tags.NEGATIVE_MASS: result.negative_mass(),
            tags.NEGATIVE_MASS_LOWER: lower,
            tags.NEGATIVE_MASS_UPPER: upper,
        }

    def figures(self, result: DensityResult, step: int) -> dict[str, Figure]:
        """The density figure."""
        return {tags.DENSITY_FIGURE: figures.density_figure(result, step)} if self.figure else {}

    def charts(self) -> Layout:
        """The negative-mass chart of the spectrum category, in the band of its bounds."""
        chart = margin(tags.NEGATIVE_MASS, tags.NEGATIVE_MASS_LOWER, tags.NEGATIVE_MASS_UPPER)
        return {SPECTRUM: {"negative eigenvalue mass (band: quadrature bounds)": chart}}

    def rows(self, result: DensityResult) -> list[Row]:
        """The negative mass, with its bounds."""
        lower, upper = result.negative_mass_bounds()
        note = (
            f"bounds {fmt(lower, 3)}–{fmt(upper, 3)}; SLQ density, "
            f"{result.num_runs} runs × {result.lanczos_steps}"
        )
        return [["negative mass", fmt(result.negative_mass()), note]]

    def summary(self, result: DensityResult) -> dict[str, Any]:
        """Negative mass, extreme nodes, the first moment and the quadrature itself."""
        return {
            "negative_mass": result.negative_mass(),
            "negative_mass_bounds": list(result.negative_mass_bounds()),
            "lambda_max_node": result.lambda_max,
            "lambda_min_node": result.lambda_min,
            "mean_eigenvalue": result.moment(1),
            "num_runs": result.num_runs,
            "lanczos_steps": result.lanczos_steps,
            "num_hvps": result.num_hvps,
            "seconds": result.seconds,
            "nodes": result.nodes,
            "weights": result.weights,
        }
