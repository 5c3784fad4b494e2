"""Optimizer stability thresholds for comparing sharpness with the learning rate.

For gradient descent on a quadratic, the iteration is stable iff ``η · λ_max < 2``; with heavy-ball
momentum ``β`` the bound is ``η · λ_max < 2 + 2β`` (Cohen et al., ICLR 2021). Adaptive methods
precondition the gradient, so their stability is set by the *preconditioned* Hessian ``P⁻¹H``:
Adam's step ``Δθ = −η P⁻¹ m`` with ``P = (1 − β₁ᵗ)(√(v / (1 − β₂ᵗ)) + ε)`` and ``m`` the
β₁-average of gradients is stable iff ``λ₁(P⁻¹H) < (2 + 2β₁)/((1 − β₁)η)``, i.e. ``38/η`` for
β₁ = 0.9 (Cohen et al. 2022); RMSprop (``P = √v + ε``, heavy-ball momentum β) iff
``λ₁(P⁻¹H) < (2 + 2β)/η``. A :class:`~lightning_landscape.optim.SAM` wrapper is looked through:
the threshold is that of its base optimizer (SAM's update is the base optimizer's update with the
gradient taken at the perturbed weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..operators.sharded import local_tensor
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


@dataclass(frozen=True)
class Stability:
    """The stability condition of the optimizer that updates the probed parameters.

    Attributes:
        kind: ``"raw"`` (SGD: stable while λ_max of the Hessian is below :attr:`threshold`) or
            ``"preconditioned"`` (Adam, AdamW, RMSprop: stable while λ₁ of the preconditioned
            Hessian is below it).
        threshold: ``(2 + 2β)/η`` for SGD; ``(2 + 2β₁)/((1 − β₁)η)`` for Adam and
            ``(2 + 2β)/η`` for RMSprop, with η and β of the first param group that holds a
            probed parameter (the reference group). ``math.inf`` while that η is 0 (a warm-up's
            first step, the end of a decay to 0): no step is unstable then, and the stability
            ratio is 0.
        optimizer: the optimizer's class name (the base optimizer's, under SAM).
        scale: ``"preconditioned"`` only: the per-entry scale ``S = ρ_g / P`` over the flat
            probed parameters (in :func:`~lightning_landscape.operators.select_parameters`
            order), so that ``λ₁(S^½ (H + Γ) S^½)`` is the preconditioned sharpness
            λ₁(P⁻¹H) in the reference group's terms. ``ρ_g`` is 1 in the reference group and
            folds in any other group's step: ``(η_g (1 − β₁,g)/(2 + 2β₁,g))`` over the
            reference group's (Adam; ``η_g/(2 + 2β_g)`` for RMSprop), 0 for entries no
            optimizer updates. While the reference η is 0 the groups' ``initial_lr`` (which
            LR schedulers keep) stand in for the η in ``ρ_g``. The stability ratio is
            ``λ₁ / threshold``. ``None`` before the optimizer's first step (it has no state
            yet).
        shift: ``"preconditioned"`` only: ``Γ``, the coupled L2 coefficient γ per entry (Adam
            with ``weight_decay``, not AdamW's decoupled decay), or ``None`` if there is none.
    """

    kind: Literal["raw", "preconditioned"]
    threshold: float
    optimizer: str
    scale: Tensor | None = None
    shift: Tensor | None = None

    @property
    def edge(self) -> float | None:
        """:attr:`threshold`, or ``None`` while η is 0 (no step is unstable: there is no edge)."""
        return self.threshold if math.isfinite(self.threshold) else None


def _owners(
    optimizers: Sequence[torch.optim.Optimizer], params: Sequence[Tensor]
) -> dict[int, list[int]]:
    wanted = {id(p) for p in params}
    owners: dict[int, list[int]] = {}
    for i, optimizer in enumerate(optimizers):
        for g, group in enumerate(optimizer.param_groups):
            if any(id(p) in wanted for p in group["params"]):
                owners.setdefault(i, []).append(g)
    return owners


def probed_stability(
    optimizers: Sequence[torch.optim.Optimizer], params: Sequence[Tensor]
) -> tuple[Stability | None, str | None]:
    """The stability condition that applies to the Hessian over ``params``, if one does.

    It is that of the optimizer that updates the probed parameters: ``torch.optim.SGD`` (raw
    λ_max against ``(2 + 2β)/η``), ``torch.optim.Adam``/``AdamW`` or ``RMSprop`` (the
    preconditioned Hessian, from the optimizer's own state with bias correction), each also as the
    base optimizer of :class:`~lightning_landscape.optim.SAM`. There is none when the probed
    parameters are updated by several optimizers (a GAN's generator and discriminator: probe one
    of them with ``params=``), by SGD param groups with different thresholds (probe one group;
    an adaptive optimizer folds each group's η into the preconditioner instead), by another
    optimizer, or by no optimizer.

    Args:
        optimizers: the trainer's optimizers.
        params: the probed parameter tensors, in the order of the flat vectors.

    Returns:
        ``(stability, None)``, or ``(None, why)``. While the learning rate is 0 (a warm-up's
        first step, the end of a decay to 0) the threshold is ``math.inf``. Before an adaptive
        optimizer's first step the stability has no ``scale`` yet.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        >>> gen, disc = torch.optim.SGD([a], lr=0.01), torch.optim.SGD([b], lr=0.1)
        >>> probed_stability([gen, disc], [b])[0].threshold
        20.0
        >>> probed_stability([gen, disc], [a, b])[1][:48]
        'the probed parameters are updated by 2 optimizer'
    """
    owners = _owners(optimizers, params)
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
    name = type(inner).__name__
    if isinstance(inner, (torch.optim.Adam, torch.optim.RMSprop)):
        return _preconditioned(inner, groups, params)
    if not isinstance(inner, torch.optim.SGD):
        return None, (
            f"{name} has no stability threshold here (SGD, Adam, AdamW and RMSprop have; "
            "landscape/update/curvature works with any optimizer)"
        )
    # An SGD group's threshold is None only at a learning rate of 0: no edge then.
    thresholds = {stability_threshold(optimizer, g) or math.inf for g in groups}
    if len(thresholds) > 1:
        values = ", ".join(f"{t:.4g}" for t in sorted(thresholds))
        return None, (
            f"the probed parameters sit in param groups with different thresholds ({values}); "
            "probe one group's parameters with params= for a stability ratio"
        )
    return Stability("raw", thresholds.pop(), name), None


def _preconditioned(
    optimizer: torch.optim.Optimizer, groups: list[int], params: Sequence[Tensor]
) -> tuple[Stability | None, str | None]:
    """The per-entry scale ``S`` (and coupled-L2 shift) of an Adam-family or RMSprop optimizer."""
    adam = isinstance(optimizer, torch.optim.Adam)
    group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    reference = optimizer.param_groups[groups[0]]
    # At η = 0 there is no edge, but λ₁(P⁻¹H) is still defined: the groups' step sizes relative
    # to the reference group's come from the rates their schedulers scale (or are all alike).
    key = "lr"
    if not float(reference["lr"]) > 0:
        initial = [float(optimizer.param_groups[g].get("initial_lr", 0.0)) for g in groups]
        key = "initial_lr" if all(rate > 0 for rate in initial) else ""

    def step_size(group: dict[str, Any], rate: float | None = None) -> float:
        """``η (1 − β₁)/(2 + 2β₁)`` (Adam) or ``η/(2 + 2β)`` (RMSprop): 1 / the threshold."""
        if rate is None:
            rate = float(group[key]) if key else 1.0
        if adam:
            beta = float(group["betas"][0])
            return rate * (1 - beta) / (2 + 2 * beta)
        return rate / (2 + 2 * float(group.get("momentum", 0.0) or 0.0))

    edge = step_size(reference, float(reference["lr"]))
    threshold = 1 / edge if edge > 0 else math.inf
    unit = step_size(reference)
    scales: list[Tensor] = []
    shifts: list[Tensor] = []
    for p in params:
        g = group_of.get(id(p))
        if g is None:  # not updated by this optimizer: it does not move
            size = local_tensor(p).numel()  # under FSDP2: this process's slice
            scales.append(torch.zeros(size, dtype=torch.float64, device=p.device))
            shifts.append(scales[-1])
            continue
        group, state = optimizer.param_groups[g], optimizer.state.get(p, {})
        precond = _adam_precond(group, state) if adam else _rmsprop_precond(group, state)
        if precond is None:
            return Stability("preconditioned", threshold, type(optimizer).__name__), None
        scales.append((step_size(group) / unit / precond).reshape(-1))
        decay = float(group.get("weight_decay", 0.0) or 0.0)
        coupled = not (adam and group.get("decoupled_weight_decay", False))
        shifts.append(torch.full_like(scales[-1], decay if coupled else 0.0))
    shift = torch.cat(shifts)
    return Stability(
        "preconditioned",
        threshold,
        type(optimizer).__name__,
        scale=torch.cat(scales),
        shift=shift if bool(shift.any()) else None,
    ), None


def _adam_precond(group: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
    """``P = (1 − β₁ᵗ)(√(v / (1 − β₂ᵗ)) + ε)``, exactly as torch's Adam divides by it."""
    v = state.get("max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq")
    step = state.get("step")
    if not isinstance(v, Tensor) or step is None:
        return None
    t = float(step.item() if isinstance(step, Tensor) else step)
    if not t > 0:
        return None
    beta1, beta2 = (float(b) for b in group["betas"])
    eps = float(group["eps"])
    root = (local_tensor(v).detach().to(torch.float64) / (1 - beta2**t)).sqrt()
    precond: Tensor = (1 - beta1**t) * (root + eps)
    return precond


def _rmsprop_precond(group: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
    """``P = √v + ε`` (``√(v − m²) + ε`` when centered), as torch's RMSprop divides by it."""
    v = state.get("square_avg")
    if not isinstance(v, Tensor):
        return None
    v = local_tensor(v).detach().to(torch.float64)
    if group.get("centered"):
        mean = state.get("grad_avg")
        if isinstance(mean, Tensor):
            v = v - local_tensor(mean).detach().to(torch.float64) ** 2
    return v.clamp_min(0).sqrt() + float(group["eps"])
