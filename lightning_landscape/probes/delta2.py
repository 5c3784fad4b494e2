"""Stabilization Δ₂^(D): how much the loss landscape moves when one more sample joins."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure
from torch import Tensor, nn

from .._validate import choice, flag, integer, optional_integer, real
from ..metrics import (
    StabilizationResult,
    SweepResult,
    log_spaced_ks,
    stabilization,
    stabilization_sweep,
)
from ..metrics.delta2 import ESTIMATORS, Estimator
from ..operators import batch_size
from ..report import figures, tags
from ..report.layout import DELTA2, Layout, multiline
from .base import Probe, ProbeContext, Row, fmt, warm_vectors
from .sharpness import SharpnessResult


@dataclass(frozen=True)
class StabilizationMeasurement:
    """One Δ₂^(D) measurement and, with ``sweep=True``, its k-sweep.

    Attributes:
        result: Δ₂^(D) at the configured ``k``.
        sweep: the k-sweep up to that ``k``, or ``None``.
    """

    result: StabilizationResult
    sweep: SweepResult | None

    @property
    def num_hvps(self) -> int:
        """Products of the measurement and of the sweep."""
        return self.result.num_hvps + (0 if self.sweep is None else self.sweep.num_hvps)


class Stabilization(Probe):
    r"""The curvature-aligned stabilization criterion Δ₂^(D) (:func:`~.stabilization`).

    How much the loss landscape changes, in the top-D Hessian eigenspace, when sample ``k + 1``
    joins the first ``k``. With the monitor's default data on one process the monitor collects
    one sample beyond the probe set (:attr:`extra_samples`), so with the default ``k`` (all
    samples but that one) ``L_k`` is exactly the probe loss, and when :class:`Sharpness` ran in
    the same round its eigenvectors start the D-dimensional eigensolve (otherwise this probe's
    own eigenvectors from its last measurement do, also after a resume). Under DDP each rank
    measures its own first probe batch (``k`` = its size − 1) and rank 0's value is logged.

    It needs the loss to be a mean of per-sample losses, so BatchNorm-type layers use their
    running statistics here (eval mode), whatever the monitor's ``norm_statistics``; on such a
    model the sharpness eigenvectors of the round are then only an approximate start.

    Logs ``landscape/delta2_D``, its parts ``landscape/delta2/{a, c_norm, trace_B, frobenius_B,
    k, converged}``, the Gaussian-moment terms ``landscape/delta2/term_*``, its cost
    ``landscape/delta2_cost/...``; with ``sweep=True`` also ``landscape/delta2/slope`` (theory
    −2), ``landscape/delta2/slope_stderr`` and the TensorBoard figure ``landscape/delta2_sweep``.

    Args:
        D: subspace dimension.
        sigma: per-coordinate standard deviation σ of the Gaussian, in parameter units (the
            quadratic model behind ``"gm"`` is trusted for small σ).
        k: samples of the smaller loss ``L_k`` (default: all samples of the batch but one).
        estimator: ``"gm"`` (closed form), ``"qmc"`` or ``"mc"``.
        num_samples: Monte Carlo draws for ``"qmc"``/``"mc"``.
        sweep: also run the k-sweep (:func:`~lightning_landscape.stabilization_sweep`) on a
            log-spaced grid up to ``k`` (``sweep_points × sweep_repeats`` measurements).
        sweep_points: grid points of the sweep.
        sweep_repeats: sample orders averaged at each grid point.
        figure: log the sweep figure to TensorBoard.
        save_warm_start: keep the D eigenvectors in checkpoints, so a resumed run starts its
            next eigensolve where the last one ended.
        every_n_steps: see :class:`~lightning_landscape.probes.Cadence`.
        every_n_epochs: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_start: see :class:`~lightning_landscape.probes.Cadence`.
        on_train_end: see :class:`~lightning_landscape.probes.Cadence`.

    Raises:
        ValueError: on invalid settings.
    """

    name = "delta2"
    scope = "local"
    cost_group = "delta2_cost"
    order = 30

    def __init__(
        self,
        D: int = 10,
        sigma: float = 1e-3,
        k: int | None = None,
        estimator: Estimator = "gm",
        num_samples: int = 64,
        *,
        sweep: bool = False,
        sweep_points: int = 6,
        sweep_repeats: int = 4,
        figure: bool = True,
        save_warm_start: bool = True,
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
        self.D = integer("D", D)
        self.sigma = real("sigma", sigma, low=0)
        self.k = optional_integer("k", k)
        self.estimator: Estimator = choice("estimator", estimator, ESTIMATORS)
        self.num_samples = integer(
            "num_samples", num_samples, minimum=1 if estimator == "gm" else 2
        )
        self.sweep = flag("sweep", sweep)
        self.sweep_points = integer("sweep_points", sweep_points, minimum=2 if sweep else 1)
        self.sweep_repeats = integer("sweep_repeats", sweep_repeats)
        self.figure = flag("figure", figure)
        self.save_warm_start = flag("save_warm_start", save_warm_start)
        self.warm: Tensor | None = None

    @property
    def extra_samples(self) -> int:
        """One sample beyond the probe set, so ``L_k`` is the probe loss."""
        return 1

    def check(self, model: nn.Module, num_params: int) -> None:
        """Refuse ``D`` above the number of probed parameters."""
        if self.D > num_params:
            raise ValueError(
                f"Stabilization: D={self.D} exceeds the {num_params} probed parameters; "
                f"use D <= {num_params}."
            )

    def check_data(self, sample_batch: Any) -> None:
        """Refuse a batch too small for ``k + 1`` samples."""
        self.resolve_k(sample_batch)

    def resolve_k(self, batch: Any) -> int:
        """The ``k`` used on ``batch`` (default: all samples but one).

        Raises:
            ValueError: if the batch is too small for ``k + 1`` samples.
        """
        n = batch_size(batch)
        k = n - 1 if self.k is None else self.k
        if k < 1 or k + 1 > n:
            raise ValueError(
                f"Δ₂^(D) needs k + 1 samples on the probe data: it holds {n}, k={self.k}. "
                "Raise num_probe_samples or lower Stabilization's k."
            )
        return k

    def run(self, ctx: ProbeContext) -> StabilizationMeasurement:
        """Δ₂^(D) on the sample batch and, with ``sweep``, the k-sweep."""
        batch = ctx.sample_batch
        k = self.resolve_k(batch)
        same_round = ctx.results.get("sharpness")
        start = (
            same_round.top.eigenvectors if isinstance(same_round, SharpnessResult) else self.warm
        )
        device = next(iter(ctx.model.parameters())).device
        common: dict[str, Any] = {
            "D": self.D,
            "sigma": self.sigma,
            "estimator": self.estimator,
            "num_samples": self.num_samples,
            "params": ctx.params,
            "route": ctx.route,
            "seed": ctx.seed,
            # Eval mode whatever the round's norm_statistics: Δ₂^(D) compares L_k and L_{k+1},
            # means of per-sample losses, which train-mode BatchNorm would couple.
            "eval_mode": True,
        }
        result = stabilization(
            ctx.model,
            ctx.loss_fn,
            batch,
            k,
            start=warm_vectors(start, ctx.num_params, device),
            **common,
        )
        sweep = None
        if self.sweep and k >= 2:
            sweep = stabilization_sweep(
                ctx.model,
                ctx.loss_fn,
                batch,
                ks=log_spaced_ks(min(2, k), k, self.sweep_points),
                repeats=self.sweep_repeats,
                start=result.eigenvectors,
                **common,
            )
        return StabilizationMeasurement(result, sweep)

    def is_finite(self, result: StabilizationMeasurement) -> bool:
        """Whether Δ₂ and its four terms are finite."""
        r = result.result
        return all(math.isfinite(v) for v in (r.value, *r.terms().values()))

    def record(self, result: StabilizationMeasurement, step: int) -> None:
        """Keep the eigenvectors to start the next measurement."""
        super().record(result, step)
        self.warm = result.result.eigenvectors

    def scalars(self, result: StabilizationMeasurement) -> dict[str, float]:
        """Δ₂^(D), its parts and terms, and the sweep's slope."""
        r, sweep = result.result, result.sweep
        out = {
            tags.DELTA2: r.value,
            tags.delta2_part("a"): r.a,
            tags.delta2_part("c_norm"): float(r.c.norm()),
            tags.delta2_part("trace_B"): float(r.B.trace()),
            tags.delta2_part("frobenius_B"): float(r.B.norm()),
            tags.delta2_part("k"): float(r.k),
            tags.delta2_part("converged"): float(r.converged),
        }
        if r.estimator != "gm":
            out[tags.delta2_part("stderr")] = r.stderr
        for name, value in r.terms().items():
            out[tags.delta2_part(f"term_{name}")] = value
        if sweep is not None:
            if math.isfinite(sweep.slope):
                out[tags.DELTA2_SLOPE] = sweep.slope
            if math.isfinite(sweep.slope_stderr):
                out[tags.DELTA2_SLOPE_STDERR] = sweep.slope_stderr
        return out

    def figures(self, result: StabilizationMeasurement, step: int) -> dict[str, Figure]:
        """Δ₂^(D) against k on log-log axes (with ``sweep``)."""
        if result.sweep is None or not self.figure:
            return {}
        return {tags.DELTA2_FIGURE: figures.delta2_sweep_figure(result.sweep, step)}

    def charts(self) -> Layout:
        """Δ₂^(D), its terms and the sweep's slope."""
        return {
            DELTA2: {
                "Δ₂^(D)": multiline(tags.exact(tags.DELTA2)),
                "Gaussian-moment terms": multiline(tags.starting(tags.delta2_part("term_"))),
                "k-sweep slope (theory −2)": multiline(
                    tags.exact(tags.DELTA2_SLOPE), tags.exact(tags.DELTA2_SLOPE_STDERR)
                ),
            }
        }

    def rows(self, result: StabilizationMeasurement) -> list[Row]:
        """Δ₂^(D) with its settings, and the slope with ``sweep``."""
        r = result.result
        rows = [["Δ₂^(D)", fmt(r.value), f"k={r.k}, D={r.D}, σ={r.sigma:g} ({r.estimator})"]]
        if result.sweep is not None:
            s = result.sweep
            rows.append(["Δ₂ k-sweep slope", fmt(s.slope, 4), f"± {fmt(s.slope_stderr, 2)}"])
        return rows

    def summary(self, result: StabilizationMeasurement) -> dict[str, Any]:
        """Δ₂^(D), its parts, terms and cost."""
        r = result.result
        out: dict[str, Any] = {
            "value": r.value,
            "k": r.k,
            "D": r.D,
            "sigma": r.sigma,
            "estimator": r.estimator,
            "a": r.a,
            "converged": r.converged,
            "terms": r.terms(),
            "eigenvalues": r.eigenvalues,
            "num_hvps": result.num_hvps,
            "seconds": r.seconds,
        }
        if result.sweep is not None:
            out["sweep"] = {
                "ks": result.sweep.ks,
                "values": result.sweep.values,
                "slope": result.sweep.slope,
                "slope_stderr": result.sweep.slope_stderr,
            }
        return out

    def state_dict(self) -> dict[str, Any]:
        """The step guard and (with ``save_warm_start``) the D eigenvectors."""
        state = super().state_dict()
        keep = self.save_warm_start and self.warm is not None
        state["warm"] = self.warm.cpu() if keep and self.warm is not None else None
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        super().load_state_dict(state_dict)
        self.warm = state_dict.get("warm")
