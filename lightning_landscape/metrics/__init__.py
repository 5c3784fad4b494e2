"""Curvature metrics built on the operators: the per-layer curvature exponent α."""

from ._fit import PowerLawFit, fit_power_law
from .alpha import LAYER_TYPES, AlphaResult, curvature_exponents, group_alphas, layer_type

__all__ = [
    "LAYER_TYPES",
    "AlphaResult",
    "PowerLawFit",
    "curvature_exponents",
    "fit_power_law",
    "group_alphas",
    "layer_type",
]
