"""Optimizers and what the library reads from them.

:class:`SAM` (sharpness-aware minimization; with ``adaptive=True`` ASAM) wraps any
:class:`torch.optim.Optimizer` class; :func:`stability_threshold` is the edge of stability an
optimizer's settings imply for the raw Hessian.
"""

from .sam import SAM
from .thresholds import Stability, probed_stability, stability_threshold

__all__ = ["SAM", "Stability", "probed_stability", "stability_threshold"]
