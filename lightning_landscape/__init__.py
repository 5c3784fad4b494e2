"""lightning-landscape: watch the geometry of the loss landscape while a Lightning model trains.

Layers, from the bottom up:

* :mod:`~lightning_landscape.operators`: curvature operators (Hessian-vector products over a
  parameter subset on fixed probe data);
* :mod:`~lightning_landscape.solvers`: pure solvers (thick-restart Lanczos, Hutch++) on any
  operator;
* :mod:`~lightning_landscape.functional`: one-call metrics (:func:`hessian_eigenvalues`,
  :func:`hessian_trace`);
* :mod:`~lightning_landscape.callbacks`: the :class:`LandscapeMonitor` Lightning callback.
"""

from .callbacks import LandscapeHook, LandscapeMonitor, SharpnessAdaptiveRho, StabilityLRGuard
from .context import curvature_context, fork_rng
from .distributed import DistributedOperator, ProbeFailure
from .functional import hessian_eigenvalues, hessian_trace
from .metrics import (
    AlphaResult,
    ConnectivityResult,
    SliceResult,
    StabilizationResult,
    SweepResult,
    curvature_exponents,
    fit_power_law,
    full_space_delta2,
    group_alphas,
    linear_interpolation,
    loss_slice,
    mode_connectivity,
    stabilization,
    stabilization_sweep,
)
from .operators import CurvatureOperator, HessianOperator, MatrixOperator, split_batch
from .optim import SAM
from .results import DensityResult, EigenResult, ProbeReport, TraceResult
from .solvers import hutchpp_trace, lanczos, spectral_density
from .thresholds import stability_threshold

__version__ = "0.1.0.dev0"

__all__ = [
    "SAM",
    "AlphaResult",
    "ConnectivityResult",
    "CurvatureOperator",
    "DensityResult",
    "DistributedOperator",
    "EigenResult",
    "HessianOperator",
    "LandscapeHook",
    "LandscapeMonitor",
    "MatrixOperator",
    "ProbeFailure",
    "ProbeReport",
    "SharpnessAdaptiveRho",
    "SliceResult",
    "StabilityLRGuard",
    "StabilizationResult",
    "SweepResult",
    "TraceResult",
    "__version__",
    "curvature_context",
    "curvature_exponents",
    "fit_power_law",
    "fork_rng",
    "full_space_delta2",
    "group_alphas",
    "hessian_eigenvalues",
    "hessian_trace",
    "hutchpp_trace",
    "lanczos",
    "linear_interpolation",
    "loss_slice",
    "mode_connectivity",
    "spectral_density",
    "split_batch",
    "stability_threshold",
    "stabilization",
    "stabilization_sweep",
]
