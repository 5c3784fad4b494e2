"""Curvature metrics: α, Δ₂^(D) and its k-sweep, loss slices, linear mode connectivity."""

from ._fit import PowerLawFit, fit_power_law
from .alpha import LAYER_TYPES, AlphaResult, curvature_exponents, group_alphas, layer_type
from .batch_sharpness import BatchSharpnessResult, batch_sharpness
from .connectivity import ConnectivityResult, linear_interpolation, mode_connectivity
from .delta2 import StabilizationResult, full_space_delta2, stabilization
from .delta2_sweep import SweepResult, fit_loglog, log_spaced_ks, stabilization_sweep
from .slice import SliceResult, loss_slice

__all__ = [
    "LAYER_TYPES",
    "AlphaResult",
    "BatchSharpnessResult",
    "ConnectivityResult",
    "PowerLawFit",
    "SliceResult",
    "StabilizationResult",
    "SweepResult",
    "batch_sharpness",
    "curvature_exponents",
    "fit_loglog",
    "fit_power_law",
    "full_space_delta2",
    "group_alphas",
    "layer_type",
    "linear_interpolation",
    "log_spaced_ks",
    "loss_slice",
    "mode_connectivity",
    "stabilization",
    "stabilization_sweep",
]
