"""Δ₂^(D) in the monitor: settings, the measurement and the logged scalars."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..metrics import (
    StabilizationResult,
    SweepResult,
    log_spaced_ks,
    stabilization,
    stabilization_sweep,
)
from ..metrics.stabilization import ESTIMATORS
from ..operators import HVPRoute, LossFn, batch_size


@dataclass(frozen=True)
class Delta2Settings:
    """The monitor's ``delta2_*`` arguments (its cadence aside), validated."""

    D: int
    sigma: float
    k: int | None
    estimator: str
    num_samples: int
    sweep: bool
    sweep_points: int
    sweep_repeats: int
    figure: bool

    def __post_init__(self) -> None:
        for name in ("D", "sweep_points", "sweep_repeats", "num_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"delta2_{name} must be a positive integer, got {value!r}")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int)):
            raise ValueError(f"delta2_k must be a positive integer or None, got {self.k!r}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"delta2_k must be a positive integer or None, got {self.k!r}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma)):
            raise ValueError(f"delta2_sigma must be a finite number > 0, got {self.sigma!r}")
        if self.sigma <= 0:
            raise ValueError(f"delta2_sigma must be a finite number > 0, got {self.sigma!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"delta2_estimator must be one of {ESTIMATORS}, got {self.estimator!r}"
            )
        if self.estimator != "gm" and self.num_samples < 2:
            raise ValueError("delta2_num_samples must be >= 2 for a Monte Carlo estimator")
        if self.sweep and self.sweep_points < 2:
            raise ValueError("delta2_sweep_points must be >= 2 to fit a slope")

    def resolve_k(self, batch: Any) -> int:
        """The ``k`` to use on ``batch`` (default: all samples but one).

        Raises:
            ValueError: if the batch is too small for ``k + 1`` samples.
        """
        n = batch_size(batch)
        k = n - 1 if self.k is None else self.k
        if k < 1 or k + 1 > n:
            raise ValueError(
                f"Δ₂^(D) needs k + 1 samples on the probe data: it holds {n}, delta2_k={self.k}. "
                "Raise num_probe_samples or lower delta2_k."
            )
        return k


def measure(
    settings: Delta2Settings,
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: list[str] | None,
    route: HVPRoute,
    start: Tensor | None,
    seed: int,
) -> tuple[StabilizationResult, SweepResult | None]:
    """Δ₂^(D) at the configured ``k`` and, with ``sweep``, the k-sweep up to that ``k``."""
    k = settings.resolve_k(batch)
    result = stabilization(
        model,
        loss_fn,
        batch,
        k,
        D=settings.D,
        sigma=settings.sigma,
        estimator=settings.estimator,  # type: ignore[arg-type]
        num_samples=settings.num_samples,
        params=params,
        start=start,
        route=route,
        seed=seed,
    )
    sweep = None
    if settings.sweep and k >= 2:
        sweep = stabilization_sweep(
            model,
            loss_fn,
            batch,
            ks=log_spaced_ks(min(2, k), k, settings.sweep_points),
            repeats=settings.sweep_repeats,
            D=settings.D,
            sigma=settings.sigma,
            estimator=settings.estimator,  # type: ignore[arg-type]
            num_samples=settings.num_samples,
            params=params,
            start=result.eigenvectors,
            route=route,
            seed=seed,
        )
    return result, sweep


def metrics(result: StabilizationResult, sweep: SweepResult | None) -> dict[str, float]:
    """The scalars logged for one measurement (``landscape/delta2...``)."""
    out = {
        "landscape/delta2_D": result.value,
        "landscape/delta2/a": result.a,
        "landscape/delta2/c_norm": float(result.c.norm()),
        "landscape/delta2/trace_B": float(result.B.trace()),
        "landscape/delta2/frobenius_B": float(result.B.norm()),
        "landscape/delta2/k": float(result.k),
        "landscape/delta2/converged": float(result.converged),
        "landscape/delta2_cost/seconds": result.seconds,
        "landscape/delta2_cost/hvps": float(result.num_hvps),
    }
    if result.estimator != "gm":
        out["landscape/delta2/stderr"] = result.stderr
    for name, value in result.terms().items():
        out[f"landscape/delta2/term_{name}"] = value
    if sweep is not None:
        out["landscape/delta2_cost/seconds"] += sweep.seconds
        out["landscape/delta2_cost/hvps"] += float(sweep.num_hvps)
        if math.isfinite(sweep.slope):
            out["landscape/delta2/slope"] = sweep.slope
        if math.isfinite(sweep.slope_stderr):
            out["landscape/delta2/slope_stderr"] = sweep.slope_stderr
    return out
