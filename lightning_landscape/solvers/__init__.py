"""Pure solver functions that take any :class:`~lightning_landscape.operators.CurvatureOperator`."""

from .density import spectral_density
from .lanczos import Criterion, lanczos, lanczos_ends
from .results import DensityResult, EigenResult, TraceResult, Which
from .trace import deflated_trace, hutchpp_trace

__all__ = [
    "Criterion",
    "DensityResult",
    "EigenResult",
    "TraceResult",
    "Which",
    "deflated_trace",
    "hutchpp_trace",
    "lanczos",
    "lanczos_ends",
    "spectral_density",
]
