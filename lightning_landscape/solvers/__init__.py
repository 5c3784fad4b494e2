"""Pure solver functions that take any :class:`~lightning_landscape.operators.CurvatureOperator`."""

from .density import spectral_density
from .lanczos import Criterion, lanczos, lanczos_ends
from .results import DensityResult, EigenResult, SymmetryResult, TraceResult, Which
from .symmetry import SYMMETRY_TOLERANCE, symmetry_defect
from .trace import deflated_trace, hutchpp_trace

__all__ = [
    "SYMMETRY_TOLERANCE",
    "Criterion",
    "DensityResult",
    "EigenResult",
    "SymmetryResult",
    "TraceResult",
    "Which",
    "deflated_trace",
    "hutchpp_trace",
    "lanczos",
    "lanczos_ends",
    "spectral_density",
    "symmetry_defect",
]
