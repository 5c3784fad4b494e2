"""Optimizer stability thresholds for comparing sharpness with the learning rate.

For gradient descent on a quadratic, the iteration is stable iff ``η · λ_max < 2``; with heavy-ball
momentum ``β`` the bound is ``η · λ_max < 2 + 2β`` (Cohen et al., ICLR 2021). Adaptive methods
(Adam, RMSprop, ...) precondition the gradient, so their stability is set by the *preconditioned*
Hessian ``P⁻¹H`` (threshold ``(2 + 2β₁)/((1 − β₁)η)``, i.e. ``38/η`` for β₁ = 0.9), not by the
raw λ_max: for them no raw-Hessian threshold is reported. A :class:`~lightning_landscape.optim.SAM`
wrapper is looked through: the threshold is that of its base optimizer (SAM's update is the base
optimizer's update with the gradient taken at the perturbed weights).
"""

from __future__ import annotations

import torch

from .sam import SAM


def stability_threshold(optimizer: torch.optim.Optimizer, group: int = 0) -> float | None:
    """The raw-Hessian stability threshold on λ_max for an SGD-family optimizer.

    Args:
        optimizer: the optimizer (the learning rate of ``param_groups[group]`` is used); for a
            :class:`~lightning_landscape.optim.SAM` wrapper, its base optimizer.
        group: index of the parameter group.

    Returns:
        ``(2 + 2β)/η`` for :class:`torch.optim.SGD` with momentum ``β`` (``2/η`` for β = 0), or
        ``None`` when the optimizer (the base optimizer of a SAM wrapper) is not SGD (adaptive
        methods) or η is not positive.
        Nesterov momentum and dampening are treated like heavy-ball momentum (an approximation).

    Example:
        >>> import torch
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> round(stability_threshold(torch.optim.SGD(p, lr=0.1, momentum=0.9)), 6)
        38.0
        >>> from lightning_landscape.optim import SAM
        >>> round(stability_threshold(SAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)), 6)
        38.0
    """
    if isinstance(optimizer, SAM):
        optimizer = optimizer.base_optimizer
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    settings = optimizer.param_groups[group]
    lr = float(settings["lr"])
    if not lr > 0:
        return None
    beta = float(settings.get("momentum", 0.0) or 0.0)
    return (2.0 + 2.0 * beta) / lr
