"""Batch sharpness: the curvature of each mini-batch's loss along its own gradient."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import choice, integer, real
from ..operators import (
    LossFn,
    batch_size,
    check_scalar_loss,
    differentiable,
    restored_parameters,
    select_parameters,
    take_batch,
)
from ..operators.differences import GradientDifference

ROUTES = ("double_backward", "finite_difference")
"""The routes :func:`batch_sharpness` takes for its products."""

Average = Callable[[Callable[[], Tensor], Tensor], Tensor]
"""``average(compute, like)``: the mean over the ranks of what ``compute()`` returns (shaped
``like``); the identity on one process."""


@dataclass(frozen=True)
class BatchSharpnessResult:
    """A Monte Carlo estimate of batch sharpness ``E_B[g_Bᵀ H_B g_B / ‖g_B‖²]``.

    Attributes:
        value: the mean over the drawn batches.
        stderr: its standard error (``std / √n``); ``nan`` with a single draw.
        num_batches: batches drawn.
        batch_size: samples per batch (per process under data parallelism).
        samples: each batch's ``g_Bᵀ H_B g_B / ‖g_B‖²``.
        converged: whether ``stderr ≤ rtol · |value|`` was reached before ``max_batches``.
        num_hvps: Hessian-vector products (one per batch; by finite differences each costs
            four or more gradients, see
            :class:`~lightning_landscape.operators.differences.GradientDifference`).
        seconds: wall-clock time.
    """

    value: float
    stderr: float
    num_batches: int
    batch_size: int
    samples: tuple[float, ...]
    converged: bool
    num_hvps: int
    seconds: float


def _identity(compute: Callable[[], Tensor], like: Tensor) -> Tensor:
    return compute()


def batch_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    size: int,
    *,
    params: Sequence[str] | None = None,
    rtol: float = 0.01,
    min_batches: int = 10,
    max_batches: int = 200,
    seed: int = 0,
    average: Average | None = None,
    route: str = "double_backward",
) -> BatchSharpnessResult:
    r"""Batch sharpness (Andreyev & Beneventano): ``E_B[g_Bᵀ H_B g_B / ‖g_B‖²]``.

    ``g_B`` and ``H_B`` are the gradient and Hessian of the loss of one mini-batch ``B`` of
    ``size`` samples drawn without replacement from ``data``, so each draw costs one forward, a
    ``create_graph`` backward and one Hessian-vector product. Draws continue until the relative
    standard error is at most ``rtol`` (after ``min_batches``) or ``max_batches`` were drawn.
    Under mini-batch SGD this, not the full-batch λ_max, is what settles at ``2/η``.

    With ``average`` (data parallelism) every rank draws its own batch from its own ``data``;
    the global batch's gradient is the mean of theirs and so is its Hessian-vector product, so
    the estimate is that of the global batch of ``size × world`` samples, and every rank takes
    the same stopping decision.

    Args:
        model: the network (in the mode the curvature is wanted in).
        loss_fn: ``loss_fn(model, batch) -> scalar`` (a mean over the batch).
        data: the pool to draw from (a batch of more than ``size`` samples).
        size: samples per batch, e.g. the training batch size.
        params: names or patterns of the probed parameters (default: all trainable).
        rtol: target relative standard error, in (0, 1).
        min_batches: draws before the stopping rule applies (at least 2).
        max_batches: the most draws.
        seed: seed of the draws (a private generator: the global RNG is left alone).
        average: the mean over ranks (see :data:`Average`); default: one process.
        route: how ``H_B g_B`` is computed: ``"double_backward"`` (exact) or
            ``"finite_difference"`` (central differences of the batch's gradient along ``g_B``
            with the step control of :class:`~lightning_landscape.HessianOperator`'s route of
            that name; the parameters are moved in place and restored bit for bit), for models
            whose backward pass autograd cannot differentiate (see
            :func:`~lightning_landscape.solvers.symmetry_defect`).

    Returns:
        The estimate.

    Raises:
        ValueError: on invalid settings, or if ``data`` holds ``size`` samples or fewer.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.randn(32, 2)
        >>> loss_fn = lambda m, b: 0.5 * (m(b) ** 2).mean()  # H_B = X_Bᵀ X_B / |B|
        >>> result = batch_sharpness(model, loss_fn, x, 8, max_batches=5, min_batches=2)
        >>> result.num_batches <= 5 and result.value > 0
        True
    """
    size = integer("size", size)
    rtol = real("rtol", rtol, low=0, high=1, high_open=True)
    min_batches = integer("min_batches", min_batches, minimum=2)
    max_batches = integer("max_batches", max_batches, minimum=min_batches)
    pool = batch_size(data)
    if pool <= size:
        raise ValueError(
            f"batch sharpness draws batches of {size} samples from the probe data, which holds "
            f"{pool}: there is nothing to draw. Take more probe samples (more than {size})."
        )
    average = _identity if average is None else average
    route = choice("route", route, ROUTES)
    chosen = [p for _, p in select_parameters(model, params)]
    like = torch.empty(
        sum(p.numel() for p in chosen), dtype=chosen[0].dtype, device=chosen[0].device
    )
    generator = torch.Generator().manual_seed(seed)
    difference = GradientDifference(like.dtype)  # its step control carries over between draws
    start = time.perf_counter()
    samples: list[float] = []
    converged = False
    while len(samples) < max_batches:
        index = torch.randperm(pool, generator=generator)[:size]
        drawn = take_batch(data, index)
        if route == "finite_difference":
            draw = _draw_by_differences(model, loss_fn, drawn, chosen, like, average, difference)
            samples.append(draw)
        else:
            samples.append(_draw(model, loss_fn, drawn, chosen, like, average))
        n = len(samples)
        if n >= min_batches:
            mean, stderr = _mean_stderr(samples)
            if stderr <= rtol * abs(mean):
                converged = True
                break
    mean, stderr = _mean_stderr(samples)
    return BatchSharpnessResult(
        value=mean,
        stderr=stderr,
        num_batches=len(samples),
        batch_size=size,
        samples=tuple(samples),
        converged=converged,
        num_hvps=len(samples),
        seconds=time.perf_counter() - start,
    )


def _mean_stderr(samples: Sequence[float]) -> tuple[float, float]:
    n = len(samples)
    mean = math.fsum(samples) / n
    if n < 2:
        return mean, math.nan
    var = math.fsum((s - mean) ** 2 for s in samples) / (n - 1)
    return mean, math.sqrt(var / n)


def _flat(params: Sequence[Tensor], tensors: Sequence[Tensor | None]) -> Tensor:
    """Per-parameter pieces as one flat vector, zeros where a piece is ``None``."""
    return torch.cat(
        [
            torch.zeros_like(p).reshape(-1) if t is None else t.detach().reshape(-1)
            for p, t in zip(params, tensors, strict=True)
        ]
    )


def _batch_gradients(
    model: nn.Module, loss_fn: LossFn, batch: Any, params: list[Tensor], create_graph: bool
) -> tuple[Tensor | None, ...]:
    """The gradients of ``batch``'s loss w.r.t. ``params`` (frozen ones too), per parameter."""
    with torch.enable_grad(), differentiable(params):
        loss = check_scalar_loss(loss_fn(model, batch))
        return torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)


def _draw_by_differences(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: list[Tensor],
    like: Tensor,
    average: Average,
    difference: GradientDifference,
) -> float:
    """``gᵀHg / gᵀg`` of one batch with ``Hg`` from central differences of its gradient."""

    def gradient() -> Tensor:
        def local() -> Tensor:
            return _flat(params, _batch_gradients(model, loss_fn, batch, params, False))

        return average(local, like)

    g = gradient()
    gg = float(g @ g)
    if gg == 0.0:
        return 0.0
    with restored_parameters(params) as saved:
        theta = math.sqrt(math.fsum(float((t.double() ** 2).sum()) for t in saved))
        hg = difference.hvp(params, saved, g, gradient, theta, lambda t: float(t.norm()))
    return float(g @ hg) / gg


def _draw(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: list[Tensor],
    like: Tensor,
    average: Average,
) -> float:
    """``gᵀHg / gᵀg`` of one batch (the global batch's under ``average``)."""
    graph: dict[str, Any] = {}

    def local_gradient() -> Tensor:
        graph["grads"] = _batch_gradients(model, loss_fn, batch, params, True)
        return _flat(params, graph["grads"])

    g = average(local_gradient, like)

    def local_product() -> Tensor:
        grads = graph["grads"]
        live = [i for i, t in enumerate(grads) if t is not None and t.requires_grad]
        pieces = torch.split(g, [p.numel() for p in params])
        hv: list[Tensor | None] = [None] * len(params)
        if live:
            with torch.enable_grad(), differentiable(params):
                out = torch.autograd.grad(
                    [grads[i] for i in live],
                    [params[i] for i in live],
                    grad_outputs=[pieces[i].view_as(params[i]) for i in live],
                    allow_unused=True,
                )
            for i, t in zip(live, out, strict=True):
                hv[i] = t
        graph.clear()
        return _flat(params, hv)

    hg = average(local_product, like)
    gg = float(g @ g)
    return float(g @ hg) / gg if gg > 0 else 0.0
