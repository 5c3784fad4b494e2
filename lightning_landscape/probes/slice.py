"""Loss slice: the loss on a line or plane through the weights, as a picture."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from matplotlib.figure import Figure

from .._validate import choice, integer, real
from ..metrics import SliceResult, loss_slice
from ..operators import ProbeFailure
from ..report import figures, tags
from .base import Probe, ProbeContext, Row, fmt

Directions = Literal["eigen", "random"]


class LossSlice(Probe):
    """The loss on a plane (or line) through the weights (:func:`~lightning_landscape.loss_slice`).

    ``steps ** dims`` loss evaluations on the probe data as one batch
    (:attr:`~lightning_landscape.probes.ProbeContext.single_batch`), on global rank zero only, with
    the directions either the top Hessian eigenvectors (unit length) or filter-normalised random
    directions (Li et al. 2018). Logs the TensorBoard figure ``landscape/loss_slice`` and its
    cost as ``landscape/slice_cost/...``.

    Args:
        directions: ``"eigen"`` or ``"random"``.
        dims: 1 (a line) or 2 (a plane).
        steps: grid points per axis.
        span: coordinates run over ``[−span, span]`` (parameter units along unit eigenvectors;
            multiples of the filter norms for random directions).
        every_n_steps: see :class:`~lightning_landscape.probes.Cadence`.
        every_n_epochs: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_start: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_end: see :class:`~lightning_landscape.probes.Cadence`.

    Raises:
        ValueError: on invalid settings.
    """

    name = "slice"
    scope = "rank_zero"
    cost_group = "slice_cost"
    order = 60

    def __init__(
        self,
        directions: Directions = "eigen",
        dims: int = 2,
        steps: int = 21,
        span: float = 1.0,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        on_train_start: bool = False,
        on_train_end: bool = True,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            on_train_start=on_train_start,
            on_train_end=on_train_end,
        )
        self.directions: Directions = choice("directions", directions, ("eigen", "random"))
        self.dims = choice("dims", dims, (1, 2))
        self.steps = integer("steps", steps, minimum=2)
        self.span = real("span", span, low=0)

    def run(self, ctx: ProbeContext) -> SliceResult:
        """The slice on the probe data (a degenerate direction is skipped, not raised)."""
        try:
            return loss_slice(
                ctx.model,
                ctx.loss_fn,
                ctx.single_batch,
                directions=self.directions,
                dims=self.dims,
                steps=self.steps,
                span=self.span,
                params=ctx.params,
                seed=ctx.seed,
                eval_mode=False,  # the modes of the round's curvature_context
            )
        except ValueError as err:  # e.g. a zero direction on this model and data
            raise ProbeFailure(str(err)) from err

    def is_finite(self, result: SliceResult) -> bool:
        """Whether the centre loss is finite (losses far from the weights may overflow)."""
        return math.isfinite(result.center_loss)

    def scalars(self, result: SliceResult) -> dict[str, float]:
        """None: the slice is a picture."""
        return {}

    def figures(self, result: SliceResult, step: int) -> dict[str, Figure]:
        """The slice's contour (2-D) or curve (1-D)."""
        return {tags.SLICE_FIGURE: figures.slice_figure(result, step)}

    def rows(self, result: SliceResult) -> list[Row]:
        """The centre loss and the largest loss on the grid."""
        finite = result.losses[torch.isfinite(result.losses)]
        top = float(finite.max()) if finite.numel() else float("nan")
        grid = "×".join([str(self.steps)] * self.dims)
        note = f"{grid} grid on {self.directions} directions, max loss {fmt(top, 4)}"
        return [["slice centre loss", fmt(result.center_loss), note]]

    def summary(self, result: SliceResult) -> dict[str, Any]:
        """The grid and its losses."""
        return {
            "center_loss": result.center_loss,
            "directions": result.directions,
            "eigenvalues": result.eigenvalues,
            "converged": result.converged,
            "coords": result.coords,
            "losses": result.losses,
            "num_evals": result.num_evals,
            "seconds": result.seconds,
        }
