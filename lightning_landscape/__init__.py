"""lightning-landscape: watch the geometry of the loss landscape while a Lightning model trains.

Layers, from the bottom up:

* :mod:`~lightning_landscape.operators`: curvature operators (Hessian-vector products over a
  parameter subset on fixed probe data, and their mean over data-parallel ranks);
* :mod:`~lightning_landscape.solvers`: pure solvers (thick-restart Lanczos, Hutch++, stochastic
  Lanczos quadrature) on any operator;
* :mod:`~lightning_landscape.metrics` and :mod:`~lightning_landscape.functional`: measurements
  built on those (sharpness, trace, α, Δ₂^(D), loss slices, mode connectivity);
* :mod:`~lightning_landscape.probes`: one object per measurement (settings, cadence, state, tags,
  figures), shared by the monitor and the command line;
* :mod:`~lightning_landscape.report`: tag names, the TensorBoard layout and the figures;
* :mod:`~lightning_landscape.callbacks`: the :class:`LandscapeMonitor` Lightning callback and the
  hooks that act on its reports; :mod:`~lightning_landscape.cli`: ``lightning-landscape``.
"""

from .callbacks import (
    LandscapeHook,
    LandscapeMonitor,
    ProbeReport,
    SharpnessAdaptiveRho,
    StabilityLRGuard,
)
from .context import curvature_context, fork_rng
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
from .operators import (
    CurvatureOperator,
    DistributedOperator,
    HessianOperator,
    MatrixOperator,
    ProbeFailure,
    split_batch,
)
from .optim import SAM, stability_threshold
from .probes import (
    BatchSharpness,
    CurvatureExponent,
    LossSlice,
    Probe,
    Sharpness,
    SpectralDensity,
    Stabilization,
    Trace,
    UpdateCurvature,
)
from .solvers import (
    DensityResult,
    EigenResult,
    SymmetryResult,
    TraceResult,
    deflated_trace,
    hutchpp_trace,
    lanczos,
    lanczos_ends,
    spectral_density,
    symmetry_defect,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "SAM",
    "AlphaResult",
    "BatchSharpness",
    "ConnectivityResult",
    "CurvatureExponent",
    "CurvatureOperator",
    "DensityResult",
    "DistributedOperator",
    "EigenResult",
    "HessianOperator",
    "LandscapeHook",
    "LandscapeMonitor",
    "LossSlice",
    "MatrixOperator",
    "Probe",
    "ProbeFailure",
    "ProbeReport",
    "Sharpness",
    "SharpnessAdaptiveRho",
    "SliceResult",
    "SpectralDensity",
    "StabilityLRGuard",
    "Stabilization",
    "StabilizationResult",
    "SweepResult",
    "SymmetryResult",
    "Trace",
    "TraceResult",
    "UpdateCurvature",
    "__version__",
    "curvature_context",
    "curvature_exponents",
    "deflated_trace",
    "fit_power_law",
    "fork_rng",
    "full_space_delta2",
    "group_alphas",
    "hessian_eigenvalues",
    "hessian_trace",
    "hutchpp_trace",
    "lanczos",
    "lanczos_ends",
    "linear_interpolation",
    "loss_slice",
    "mode_connectivity",
    "spectral_density",
    "split_batch",
    "stability_threshold",
    "stabilization",
    "stabilization_sweep",
    "symmetry_defect",
]
