"""Curvature metrics built on the operators: α, Δ₂^(D) and its k-sweep."""

from ._fit import PowerLawFit, fit_power_law
from .alpha import LAYER_TYPES, AlphaResult, curvature_exponents, group_alphas, layer_type
from .stabilization import StabilizationResult, full_space_delta2, stabilization
from .sweep import SweepResult, fit_loglog, log_spaced_ks, stabilization_sweep

__all__ = [
    "LAYER_TYPES",
    "AlphaResult",
    "PowerLawFit",
    "StabilizationResult",
    "SweepResult",
    "curvature_exponents",
    "fit_loglog",
    "fit_power_law",
    "full_space_delta2",
    "group_alphas",
    "layer_type",
    "log_spaced_ks",
    "stabilization",
    "stabilization_sweep",
]
