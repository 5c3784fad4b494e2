"""Pure solver functions that take any :class:`~lightning_landscape.operators.CurvatureOperator`."""

from .density import spectral_density
from .lanczos import lanczos
from .trace import hutchpp_trace

__all__ = ["hutchpp_trace", "lanczos", "spectral_density"]
