"""Probes: one object per measurement, shared by the monitor and the command line.

Each probe owns its settings (validated in its constructor), its :class:`Cadence`, its state (last
result, warm-start vectors) with ``state_dict``/``load_state_dict``, the tags it logs, its figures
and its custom-scalars charts. :class:`~lightning_landscape.LandscapeMonitor` runs them on their
cadences during training; ``lightning-landscape analyze`` runs the same objects once on a
checkpoint. A new measurement is a new :class:`Probe` subclass (see ``docs/architecture.md``).
"""

from .alpha import AlphaResults, CurvatureExponent
from .base import Cadence, Probe, ProbeContext, Row, Scope, fmt
from .batch import BatchSharpness
from .checks import ProductCheck, check_products
from .delta2 import Stabilization, StabilizationMeasurement
from .density import SpectralDensity
from .sharpness import Sharpness, SharpnessResult
from .slice import LossSlice
from .trace import Trace
from .update import UpdateCurvature, UpdateCurvatureResult

BUILTIN: dict[str, type[Probe]] = {
    cls.name: cls
    for cls in (
        Sharpness,
        Trace,
        BatchSharpness,
        SpectralDensity,
        CurvatureExponent,
        Stabilization,
        LossSlice,
    )
}
"""The built-in probes by name (``analyze --probes`` takes these names)."""

__all__ = [
    "BUILTIN",
    "AlphaResults",
    "BatchSharpness",
    "Cadence",
    "CurvatureExponent",
    "LossSlice",
    "Probe",
    "ProbeContext",
    "ProductCheck",
    "Row",
    "Scope",
    "Sharpness",
    "SharpnessResult",
    "SpectralDensity",
    "Stabilization",
    "StabilizationMeasurement",
    "Trace",
    "UpdateCurvature",
    "UpdateCurvatureResult",
    "check_products",
    "fmt",
]
