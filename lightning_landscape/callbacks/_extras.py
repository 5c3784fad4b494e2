"""The monitor's side measurements on their own cadences: α, Δ₂^(D), loss slices, figures.

A mixin of :class:`~lightning_landscape.LandscapeMonitor` (kept apart so each file reads in one
sitting); it uses the monitor's settings and probe data and logs on global rank zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..metrics import (
    AlphaResult,
    SliceResult,
    StabilizationResult,
    SweepResult,
    curvature_exponents,
    group_alphas,
    loss_slice,
)
from ..operators import HVPRoute
from ..results import ProbeReport
from . import _delta2
from ._probe import silenced

_LINALG_ERROR: type[Exception] = getattr(torch.linalg, "LinAlgError", RuntimeError)


class _SideMeasurements:
    """α, Δ₂^(D), loss slices and the trajectory figure (state lives on the monitor)."""

    # Settings and state owned by LandscapeMonitor.
    alpha_top_k: int
    alpha_layers: list[str] | None
    alpha_figure: bool
    last_alpha: dict[str, AlphaResult] | None
    _last_alpha_step: int
    _delta2: _delta2.Delta2Settings
    last_delta2: StabilizationResult | None
    last_delta2_sweep: SweepResult | None
    _last_delta2_step: int
    _delta2_batch: Any
    _delta2_warm: Tensor | None
    _last_probe_step: int
    _warm_top: Tensor | None
    _probe_batches: list[Any] | None
    _resolved_route: HVPRoute | None
    route: HVPRoute
    params: list[str] | None
    seed: int
    history: list[ProbeReport]
    trajectory_figure: bool
    _figured_probes: int
    slice_directions: str
    slice_dims: int
    slice_steps: int
    slice_span: float
    last_slice: SliceResult | None
    _last_slice_step: int

    # Methods of the monitor: the probe loss, and warm-start vectors moved to a device.
    _loss: Callable[[torch.nn.Module, Any], Tensor]
    _warm: Callable[[Tensor | None, torch.device], Tensor | None]

    def _maybe_alpha(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_alpha_step or not self._probe_batches:
            return
        self._last_alpha_step = step
        try:
            with silenced(pl_module):
                results = curvature_exponents(
                    pl_module,
                    self._loss,
                    self._probe_batches[0],
                    top_k=self.alpha_top_k,
                    layers=self.alpha_layers,
                    route=self._resolved_route or self.route,
                )
        except (torch.OutOfMemoryError, _LINALG_ERROR) as err:
            rank_zero_warn(f"LandscapeMonitor: the α measurement at step {step} failed ({err}).")
            return
        self.last_alpha = results
        if trainer.is_global_zero:
            self._log_alpha(trainer, results, step)

    def _maybe_delta2(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_delta2_step or self._delta2_batch is None:
            return
        self._last_delta2_step = step
        # Reuse the eigenvalue probe's eigenvectors of this very step as the start.
        same_step = step == self._last_probe_step and self._warm_top is not None
        start = self._warm_top if same_step else self._delta2_warm
        try:
            with silenced(pl_module):
                result, sweep = _delta2.measure(
                    self._delta2,
                    pl_module,
                    self._loss,
                    self._delta2_batch,
                    params=self.params,
                    route=self._resolved_route or self.route,
                    start=self._warm(start, pl_module.device),
                    seed=self.seed + step,
                )
        except (torch.OutOfMemoryError, _LINALG_ERROR, FloatingPointError) as err:
            rank_zero_warn(f"LandscapeMonitor: Δ₂^(D) at step {step} failed ({err}); skipped.")
            return
        if not all(math.isfinite(v) for v in (result.value, *result.terms().values())):
            rank_zero_warn(f"LandscapeMonitor: Δ₂^(D) at step {step} is NaN/inf; skipped.")
            return
        self.last_delta2, self.last_delta2_sweep = result, sweep
        self._delta2_warm = result.eigenvectors
        if not trainer.is_global_zero:
            return
        values = _delta2.metrics(result, sweep)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
            if sweep is not None and self._delta2.figure and isinstance(logger, TensorBoardLogger):
                from ._figures import delta2_sweep_figure

                logger.experiment.add_figure(
                    "landscape/delta2_sweep", delta2_sweep_figure(sweep, step), global_step=step
                )

    def _log_alpha(self, trainer: pl.Trainer, results: dict[str, AlphaResult], step: int) -> None:
        metrics: dict[str, float] = {
            "landscape/alpha_cost/seconds": sum(r.seconds for r in results.values()),
            "landscape/alpha_cost/hvps": float(sum(r.num_hvps for r in results.values())),
        }
        for name, r in results.items():
            if math.isfinite(r.alpha):
                metrics[f"landscape/alpha/{name}"] = r.alpha
                metrics[f"landscape/alpha_r2/{name}"] = r.r2
        for kind, value in group_alphas(results).items():
            if math.isfinite(value):
                metrics[f"landscape/alpha_group/{kind}"] = value
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if self.alpha_figure and isinstance(logger, TensorBoardLogger):
                from ._figures import alpha_figure

                logger.experiment.add_figure(
                    "landscape/alpha_fit", alpha_figure(results, step), global_step=step
                )

    def _log_trajectories(self, trainer: pl.Trainer) -> None:
        """The eigenvalue-trajectory figure, when probes were added since the last one."""
        if not (self.trajectory_figure and trainer.is_global_zero) or len(self.history) < 2:
            return
        if len(self.history) == self._figured_probes:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        from ._density_figure import eigenvalue_trajectories_figure

        self._figured_probes = len(self.history)
        h = self.history
        fig = eigenvalue_trajectories_figure(
            [r.step for r in h],
            [r.eigenvalues for r in h],
            [r.stability_threshold for r in h],
            [r.lambda_min for r in h],
        )
        for logger in loggers:
            logger.experiment.add_figure(
                "landscape/eigenvalue_trajectories", fig, global_step=h[-1].step, close=False
            )

    def _maybe_slice(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A loss slice through the weights as a TensorBoard image (global rank zero only)."""
        step = trainer.global_step
        if not trainer.is_global_zero or not self._probe_batches or step == self._last_slice_step:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        self._last_slice_step = step
        try:
            with silenced(pl_module):
                result = loss_slice(
                    pl_module,
                    self._loss,
                    self._probe_batches[0],
                    directions=self.slice_directions,  # type: ignore[arg-type]
                    dims=self.slice_dims,
                    steps=self.slice_steps,
                    span=self.slice_span,
                    params=self.params,
                    seed=self.seed + step,
                )
        except (torch.OutOfMemoryError, _LINALG_ERROR, ValueError) as err:
            rank_zero_warn(f"LandscapeMonitor: the loss slice at step {step} failed ({err}).")
            return
        self.last_slice = result
        if loggers:
            from ._slice_figure import slice_figure

            fig = slice_figure(result, step)
            for logger in loggers:
                logger.experiment.add_figure(
                    "landscape/loss_slice", fig, global_step=step, close=False
                )
