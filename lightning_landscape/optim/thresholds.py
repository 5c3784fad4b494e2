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

from collections.abc import Sequence

import torch
from torch import Tensor

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


def probed_threshold(
    optimizers: Sequence[torch.optim.Optimizer], params: Sequence[Tensor]
) -> tuple[float | None, str | None]:
    """The stability threshold that applies to the Hessian over ``params``, if one does.

    It is the threshold of the optimizer and param group that update the probed parameters. There
    is none when they are updated by several optimizers (a GAN's generator and discriminator: probe
    one of them with ``params=``) or by param groups with different thresholds, or by an
    optimizer whose raw-Hessian threshold is undefined (adaptive methods), or by no optimizer.

    Args:
        optimizers: the trainer's optimizers.
        params: the probed parameter tensors.

    Returns:
        ``(threshold, None)``, or ``(None, why)``; ``(None, None)`` while the threshold is only
        momentarily undefined (a learning rate of 0, e.g. at the start of a warm-up).

    Example:
        >>> import torch
        >>> a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        >>> gen, disc = torch.optim.SGD([a], lr=0.01), torch.optim.SGD([b], lr=0.1)
        >>> probed_threshold([gen, disc], [b])
        (20.0, None)
        >>> probed_threshold([gen, disc], [a, b])[1][:48]
        'the probed parameters are updated by 2 optimizer'
    """
    wanted = {id(p) for p in params}
    owners: dict[int, list[int]] = {}
    for i, optimizer in enumerate(optimizers):
        for g, group in enumerate(optimizer.param_groups):
            if any(id(p) in wanted for p in group["params"]):
                owners.setdefault(i, []).append(g)
    if not owners:
        return None, "no optimizer updates the probed parameters"
    if len(owners) > 1:
        names = ", ".join(f"{i} ({type(optimizers[i]).__name__})" for i in owners)
        return None, (
            f"the probed parameters are updated by {len(owners)} optimizers ({names}); probe "
            "one optimizer's parameters with params= (e.g. the discriminator's) to compare its "
            "sharpness with its threshold"
        )
    ((index, groups),) = owners.items()
    optimizer = optimizers[index]
    inner = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    if not isinstance(inner, torch.optim.SGD):
        return None, (
            f"{type(inner).__name__} is not plain SGD (adaptive optimizers are stable w.r.t. the "
            "preconditioned Hessian, not the raw λ_max)"
        )
    thresholds = {stability_threshold(optimizer, g) for g in groups}
    if None in thresholds:
        return None, None  # a learning rate of 0 (warm-up): no threshold at this step
    if len(thresholds) > 1:
        values = ", ".join(f"{t:.4g}" for t in sorted(t for t in thresholds if t is not None))
        return None, (
            f"the probed parameters sit in param groups with different thresholds ({values}); "
            "probe one group's parameters with params= for a stability ratio"
        )
    return thresholds.pop(), None
