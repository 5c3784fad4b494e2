"""Linear mode connectivity: the loss along the straight line between two sets of weights.

``θ(t) = (1 − t) θ_A + t θ_B`` for ``t`` in ``[0, 1]``, and its loss barrier

    B = max_t [L(θ(t)) − ((1 − t) L(θ_A) + t L(θ_B))],

the largest rise of the loss above the straight line joining the endpoint losses, as in
Entezari et al., "The Role of Permutation Invariance in Linear Mode Connectivity of Neural
Networks" (ICLR 2022). Frankle et al., "Linear Mode Connectivity and the Lottery Ticket
Hypothesis" (ICML 2020) measure the rise above the *mean* endpoint error instead; the two agree
when the endpoint losses are equal. Both endpoints are on the grid, where the difference is exactly
zero, so ``B >= 0``; ``B = 0`` means the loss never rises above the line (e.g. a convex loss).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import integer
from ..context import NormStatistics, check_norm_statistics, curvature_context
from ..operators import LossFn, check_scalar_loss, select_parameters


@dataclass(frozen=True)
class ConnectivityResult:
    """The loss along ``θ(t) = (1 − t) θ_A + t θ_B``.

    Attributes:
        ts: 1-D float64 CPU tensor of the ``steps`` interpolation weights, ``0`` to ``1``.
        losses: 1-D float64 CPU tensor, ``losses[i] = L(θ(ts[i]))``.
        loss_a: ``L(θ_A)`` (``losses[0]``).
        loss_b: ``L(θ_B)`` (``losses[-1]``).
        barrier: ``max_t [L(θ(t)) − ((1 − t) L(θ_A) + t L(θ_B))]`` over the grid (``>= 0``;
            NaN if a loss is NaN).
        barrier_t: the first ``t`` where the maximum is reached (``0.0`` for a zero barrier).
        num_evals: loss evaluations (``steps``).
        seconds: wall-clock time of the whole call.
    """

    ts: Tensor
    losses: Tensor
    loss_a: float
    loss_b: float
    barrier: float
    barrier_t: float
    num_evals: int
    seconds: float

    @property
    def baseline(self) -> Tensor:
        """The straight line ``(1 − t) L(θ_A) + t L(θ_B)`` at :attr:`ts`."""
        return _line(self.ts, self.loss_a, self.loss_b)

    @property
    def excess(self) -> Tensor:
        """``losses − baseline``: the rise above the line (its maximum is :attr:`barrier`)."""
        return self.losses - self.baseline


def _line(ts: Tensor, start: float, end: float) -> Tensor:
    """``(1 − t) start + t end`` by ``torch.lerp``: exact at both ends and for ``start == end``."""
    return torch.lerp(torch.full_like(ts, start), torch.full_like(ts, end), ts)


def _check_state(
    name: str, state: Mapping[str, Any], ref: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``state`` in the model's key order, or a ValueError naming the first mismatching key."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{name} must be a state dict (a mapping), got {type(state).__name__}")
    for key, target in ref.items():
        if key not in state:
            hint = (
                "; for a Lightning checkpoint pass checkpoint['state_dict']"
                if "state_dict" in state
                else ""
            )
            raise ValueError(f"{name} has no entry {key!r}, which the model has{hint}")
        value = state[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"{name}[{key!r}] is a {type(value).__name__}, not a tensor")
        if value.shape != target.shape:
            raise ValueError(
                f"{name}[{key!r}] has shape {tuple(value.shape)} but the model's has "
                f"{tuple(target.shape)}"
            )
    for key in state:
        if key not in ref:
            raise ValueError(f"{name} has an entry {key!r} that the model does not have")
    return {key: state[key] for key in ref}


def _private(value: Tensor, target: Tensor, model_storages: set[int]) -> Tensor:
    """``value`` on ``target``'s device and dtype, copied if it shares memory with the model."""
    out = value.detach().to(device=target.device, dtype=target.dtype)
    if out.untyped_storage().data_ptr() in model_storages:
        out = out.clone()
    return out


def mode_connectivity(
    model: nn.Module,
    state_a: Mapping[str, Any],
    state_b: Mapping[str, Any],
    loss_fn: LossFn,
    batch: Any,
    *,
    steps: int = 21,
    params: Sequence[str] | Sequence[Tensor] | None = None,
    interpolate_buffers: bool = True,
    eval_mode: bool = True,
    norm_statistics: NormStatistics = "running",
) -> ConnectivityResult:
    """Loss along the line between two state dicts of one architecture, and its barrier.

    Loads ``θ(t) = (1 − t) θ_A + t θ_B`` (``torch.lerp``, exact at both ends) into ``model`` for
    ``steps`` evenly spaced ``t`` in ``[0, 1]`` and evaluates ``loss_fn(model, batch)`` under
    ``no_grad`` inside :func:`~lightning_landscape.curvature_context`. Afterwards ``model`` holds
    exactly its original state dict, ``.grad``, modes and RNG states (also on error). Made for
    comparing two checkpoints with one module instance: pass ``checkpoint["state_dict"]`` of
    each (tensors may live on another device; they are moved to the model's).

    Interpolated entries: every parameter (trainable or frozen), or the ``params`` subset, and,
    with ``interpolate_buffers``, every floating-point buffer (BatchNorm running statistics).
    Note that the averaged running statistics are not the statistics of the interpolated
    network's activations, so with BatchNorm in eval mode the barrier is inflated (Jordan et al.,
    "REPAIR", ICLR 2023, who re-estimate them; nothing here does).
    ``norm_statistics="batch"`` leaves them out instead: every point normalises the whole
    ``batch`` with the interpolated network's own statistics on it (the loss training optimises
    when ``batch`` has the training batch size; for a larger set pass a ``loss_fn`` that averages
    over training-size chunks, as ``lightning-landscape compare`` does). Integer buffers (e.g.
    ``num_batches_tracked``) come from the nearer endpoint (``state_a`` for ``t < ½``).
    Entries not interpolated (unselected parameters, buffers without ``interpolate_buffers``)
    come from ``state_a``, so the ``t = 1`` end is then ``θ_A`` with the interpolated entries
    of ``θ_B``.

    Args:
        model: a module of the architecture of both states (used as the carrier; restored).
        state_a: the ``t = 0`` state dict; its keys and shapes must equal the model's.
        state_b: the ``t = 1`` state dict, likewise.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batch: the evaluation batch, already on the model's device.
        steps: grid points on ``[0, 1]`` (``>= 2``; both ends included).
        params: parameters to interpolate (names, ``fnmatch`` patterns or tensors, see
            :func:`~lightning_landscape.operators.select_parameters`); default all.
        interpolate_buffers: interpolate floating buffers too (else take ``state_a``'s).
        eval_mode: evaluate with every submodule in ``eval()`` (restored afterwards).
        norm_statistics: ``"running"`` (default): BatchNorm-type layers normalise with the
            (interpolated) running statistics; ``"batch"`` (needs ``eval_mode``): with each
            point's statistics on ``batch``, the running statistics left alone.

    Returns:
        A :class:`ConnectivityResult`.

    Raises:
        ValueError: for ``steps < 2``, state dicts whose keys or shapes differ from the
            model's (the message names the first mismatching key), an unknown
            ``norm_statistics``, or ``"batch"`` with ``eval_mode=False`` on a model with
            normalisation layers.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_landscape.metrics import mode_connectivity
        >>> model = nn.Linear(1, 1, bias=False)
        >>> loss_fn = lambda m, x: ((m(x) ** 2).sum() - 1.0) ** 2  # zero at w = ±1
        >>> a, b = {"weight": torch.tensor([[-1.0]])}, {"weight": torch.tensor([[1.0]])}
        >>> r = mode_connectivity(model, a, b, loss_fn, torch.ones(1, 1), steps=3)
        >>> r.losses, r.barrier, r.barrier_t
        (tensor([0., 1., 0.], dtype=torch.float64), 1.0, 0.5)
    """
    t0 = time.perf_counter()
    integer("steps", steps, minimum=2)
    check_norm_statistics(model, eval_mode, norm_statistics)
    ref = model.state_dict(keep_vars=True)
    a, b = _check_state("state_a", state_a, ref), _check_state("state_b", state_b, ref)
    if params is None:
        chosen = {id(p) for p in model.parameters()}
    else:
        chosen = {id(p) for _, p in select_parameters(model, params)}
    storages = {t.untyped_storage().data_ptr() for t in ref.values()}
    lerp: list[tuple[Tensor, Tensor, Tensor]] = []  # (target, A, B) interpolated
    nearest: list[tuple[Tensor, Tensor, Tensor]] = []  # (target, A, B) A for t < ½, else B
    fixed: list[tuple[Tensor, Tensor]] = []  # (target, A)
    for key, target in ref.items():
        va, vb = _private(a[key], target, storages), _private(b[key], target, storages)
        is_param = isinstance(target, nn.Parameter)
        if not (id(target) in chosen if is_param else interpolate_buffers):
            fixed.append((target, va))
        elif target.is_floating_point():
            lerp.append((target, va, vb))
        else:
            nearest.append((target, va, vb))
    ts = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    losses = torch.empty(steps, dtype=torch.float64)
    backup = [(t, t.detach().clone()) for t in ref.values()]
    context = curvature_context(model, eval_mode=eval_mode, norm_statistics=norm_statistics)
    with context, torch.no_grad():
        try:
            for target, va in fixed:
                target.copy_(va)
            for i, t in enumerate(ts.tolist()):
                for target, va, vb in lerp:
                    target.copy_(torch.lerp(va, vb, t))
                for target, va, vb in nearest:
                    target.copy_(va if t < 0.5 else vb)
                loss = check_scalar_loss(loss_fn(model, batch))
                losses[i] = float(loss.detach().to(torch.float64))
        finally:
            for target, saved in backup:
                target.copy_(saved)
    loss_a, loss_b = float(losses[0]), float(losses[-1])
    excess = losses - _line(ts, loss_a, loss_b)
    if bool(torch.isnan(excess).any()):
        barrier, barrier_t = float("nan"), float("nan")
    else:
        i_max = int(torch.argmax(excess))
        barrier, barrier_t = float(excess[i_max]), float(ts[i_max])
    return ConnectivityResult(
        ts=ts,
        losses=losses,
        loss_a=loss_a,
        loss_b=loss_b,
        barrier=barrier,
        barrier_t=barrier_t,
        num_evals=steps,
        seconds=time.perf_counter() - t0,
    )


def linear_interpolation(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    steps: int = 21,
    params: Sequence[str] | Sequence[Tensor] | None = None,
    interpolate_buffers: bool = True,
    eval_mode: bool = True,
    norm_statistics: NormStatistics = "running",
) -> ConnectivityResult:
    """Loss along the line from ``model_a``'s weights to ``model_b``'s (two live modules).

    :func:`mode_connectivity` with ``model_a`` as the carrier and the two modules' state dicts;
    both modules are left exactly as they were.

    Args:
        model_a: the ``t = 0`` network (used to evaluate; restored afterwards).
        model_b: the ``t = 1`` network, same architecture (only read).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batch: the evaluation batch, already on ``model_a``'s device.
        steps: grid points on ``[0, 1]`` (``>= 2``).
        params: parameters of ``model_a`` to interpolate; default all.
        interpolate_buffers: interpolate floating buffers too (else take ``model_a``'s).
        eval_mode: evaluate with every submodule in ``eval()`` (restored afterwards).
        norm_statistics: ``"running"`` or ``"batch"``, as in :func:`mode_connectivity`.

    Returns:
        A :class:`ConnectivityResult`.

    Raises:
        ValueError: for ``steps < 2``, modules whose state dicts differ in keys or shapes, or
            ``norm_statistics`` as in :func:`mode_connectivity`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_landscape.metrics import linear_interpolation
        >>> m = nn.Linear(2, 1)
        >>> loss_fn = lambda m, x: m(x).pow(2).mean()
        >>> linear_interpolation(m, m, loss_fn, torch.randn(4, 2)).barrier
        0.0
    """
    return mode_connectivity(
        model_a,
        model_a.state_dict(),
        model_b.state_dict(),
        loss_fn,
        batch,
        steps=steps,
        params=params,
        interpolate_buffers=interpolate_buffers,
        eval_mode=eval_mode,
        norm_statistics=norm_statistics,
    )
