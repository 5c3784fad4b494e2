"""Curvature metrics built on the operators: the per-layer curvature exponent α."""

from ._fit import PowerLawFit, fit_power_law
from .alpha import LAYER_TYPES, AlphaResult, curvature_exponents, group_alphas, layer_type
from .stabilization import StabilizationResult, full_space_delta2, stabilization

__all__ = [
    "LAYER_TYPES",
    "AlphaResult",
    "PowerLawFit",
    "StabilizationResult",
    "curvature_exponents",
    "fit_power_law",
    "full_space_delta2",
    "group_alphas",
    "layer_type",
    "stabilization",
]
