"""Curvature-aware optimizers: :class:`SAM` (sharpness-aware minimization) and its adaptive form.

:class:`SAM` wraps any :class:`torch.optim.Optimizer` class; with ``adaptive=True`` it is ASAM.
"""

from .sam import SAM

__all__ = ["SAM"]
