"""One-call curvature functions on a model, a loss and a probe batch.

These wrap :class:`~lightning_landscape.operators.HessianOperator`,
:func:`~lightning_landscape.curvature_context` and the solvers; use those directly to reuse one
operator for several solves.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from ._validate import optional_integer
from .context import NormStatistics, check_norm_statistics, curvature_context
from .operators import (
    CurvatureOperator,
    DistributedOperator,
    HessianOperator,
    HVPRoute,
    LossFn,
    batch_size,
    split_batch,
)
from .operators.distributed import distributed_world
from .solvers import hutchpp_trace, lanczos
from .solvers.lanczos import Criterion
from .solvers.results import EigenResult, TraceResult, Which


@contextlib.contextmanager
def _hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: Sequence[str] | Sequence[Tensor] | None,
    route: HVPRoute,
    eval_mode: bool,
    distributed: bool | None,
    timeout: datetime.timedelta | None,
    micro_batch_size: int | None = None,
    norm_statistics: NormStatistics = "running",
) -> Iterator[CurvatureOperator]:
    """A Hessian operator on one batch, inside the curvature context, released on exit.

    Inside an initialised process group with more than one rank (unless ``distributed`` is
    False) every rank's batch is a shard and the operator is the sample-weighted mean over ranks.
    With ``micro_batch_size`` the batch is split into micro-batches whose graphs are built one at
    a time (the memory of one micro-batch, one extra forward and backward pass per product).
    ``norm_statistics`` goes to :func:`~lightning_landscape.curvature_context`; with ``"batch"``
    and normalisation layers, a one-sample remainder joins the micro-batch before it (train-mode
    BatchNorm needs two samples), as the monitor's chunks do.
    """
    optional_integer("micro_batch_size", micro_batch_size)
    batch_stats = check_norm_statistics(model, eval_mode, norm_statistics)
    batches = [batch]
    if micro_batch_size is not None:
        batches = split_batch(batch, micro_batch_size, min_size=2 if batch_stats else 1)
    with curvature_context(model, eval_mode=eval_mode, norm_statistics=norm_statistics):
        local = HessianOperator(model, loss_fn, batches, params=params, route=route)
        try:
            use_dist = distributed_world() > 1 if distributed is None else distributed
            if use_dist:
                yield DistributedOperator(local, float(batch_size(batch)), timeout=timeout)
            else:
                yield local
        finally:
            local.release()


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int = 1,
    *,
    tol: float = 1e-3,
    criterion: Criterion = "residual",
    which: Which = "largest",
    params: Sequence[str] | Sequence[Tensor] | None = None,
    max_basis: int | None = None,
    max_basis_bytes: int | None = None,
    max_hvps: int | None = None,
    start: Tensor | None = None,
    return_eigenvectors: bool = False,
    route: HVPRoute = "auto",
    seed: int = 0,
    eval_mode: bool = True,
    norm_statistics: NormStatistics = "running",
    distributed: bool | None = None,
    timeout: datetime.timedelta | None = None,
    micro_batch_size: int | None = None,
) -> EigenResult:
    """Extreme eigenvalues of the loss Hessian on one probe batch.

    The Hessian is that of ``loss_fn(model, batch)`` with respect to ``params`` (default: all
    trainable parameters), evaluated with the model in ``eval()`` mode (BatchNorm on its running
    statistics unless ``norm_statistics="batch"``), autocast off and the math attention backend
    (see :func:`~lightning_landscape.curvature_context`); the model, its ``.grad`` and every RNG
    are left exactly as they were.

    Args:
        model: the model.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor`` (the mean loss of the batch).
        batch: the probe batch, already on the model's device.
        k: number of eigenvalues.
        tol: relative tolerance for every returned eigenpair (Ritz residual by default).
        criterion: ``"residual"`` (default) or ``"eigenvalue"``: stop on the estimated
            eigenvalue error ``‖r‖² / gap`` instead (cheaper when only the eigenvalues matter;
            see :func:`~lightning_landscape.solvers.lanczos` for its guarantee).
        which: ``"largest"`` for the k algebraically largest (descending; ``[0]`` is the
            sharpness λ_max) or ``"smallest"`` for the k most negative (ascending; ``[0]`` is
            λ_min).
        params: parameter subset: names, ``fnmatch`` patterns or tensors.
        max_basis: bound on the Krylov basis (memory ``(max_basis + 1) × num_params``).
        max_basis_bytes: the same bound in bytes (``max_basis`` is lowered to fit).
        max_hvps: Hessian-vector-product budget; pairs not converged by then are flagged.
        start: warm-start vector(s), e.g. ``previous.eigenvectors``.
        return_eigenvectors: keep the ``(num_params, k)`` eigenvectors in the result.
        route: HVP route: ``"auto"``, ``"functorch"``, ``"compiled"``, ``"double_backward"``
            or ``"finite_difference"`` (see :class:`~lightning_landscape.HessianOperator`).
        seed: seed of the private generator for the random start vector.
        eval_mode: probe in ``eval()`` mode (default) or in the model's current modes.
        norm_statistics: how BatchNorm layers (and InstanceNorm with running statistics)
            normalise; models without them get the same Hessian either way. ``"running"``
            (default): with their running statistics, the function evaluation computes.
            ``"batch"`` (needs ``eval_mode``): each batch (each micro-batch with
            ``micro_batch_size``; under ``distributed`` each rank's shard) with its own
            statistics, leaving the running statistics alone. With the batch or
            ``micro_batch_size`` at the training batch size that is the Hessian of the loss
            training optimises, whose λ_max governs its stability, and what
            :class:`~lightning_landscape.LandscapeMonitor` measures by default; early in
            training the two can differ by orders of magnitude.
        distributed: treat ``batch`` as this rank's shard and return the result for the union
            of all ranks' shards (one all-reduce per Hessian-vector product). ``None``: yes
            when called inside an initialised process group with more than one rank.
        timeout: bound on each collective wait under ``distributed``.
        micro_batch_size: memory cap: split ``batch`` into micro-batches of at most this many
            samples, whose gradient graphs are built one at a time on every product (peak
            memory of one micro-batch instead of the whole batch, at one extra forward and
            backward pass per micro-batch per product). The Hessian is the same for models
            whose forward pass does not couple samples; with BatchNorm and
            ``norm_statistics="batch"`` it is the sample-weighted mean of the micro-batches'
            Hessians, each normalised with its own statistics.

    Returns:
        An :class:`~lightning_landscape.results.EigenResult`; check ``.converged``.

    Raises:
        ValueError: for k < 1 or larger than the number of parameters, tol <= 0, an unknown
            ``which``/``criterion``/``route``/``norm_statistics``, ``norm_statistics="batch"``
            with ``eval_mode=False`` on a model with normalisation layers, unknown parameter
            names, no trainable
            parameters, a loss that is not a scalar, or an invalid ``max_basis_bytes`` or
            ``micro_batch_size``.
        TypeError: if ``loss_fn`` does not return a tensor.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import lightning_landscape as ll
        >>> model = nn.Linear(3, 1, bias=False)
        >>> x = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> loss_fn = lambda m, b: 0.5 * (m(b) ** 2).sum()  # Hessian = x^T x
        >>> ll.hessian_eigenvalues(model, loss_fn, x, k=2, tol=1e-6).eigenvalues
        tensor([9., 4.], dtype=torch.float64)
    """
    with _hessian(
        model,
        loss_fn,
        batch,
        params,
        route,
        eval_mode,
        distributed,
        timeout,
        micro_batch_size,
        norm_statistics,
    ) as op:
        return lanczos(
            op,
            k,
            which=which,
            tol=tol,
            criterion=criterion,
            max_basis=max_basis,
            max_basis_bytes=max_basis_bytes,
            max_hvps=max_hvps,
            start=start,
            seed=seed,
            return_eigenvectors=return_eigenvectors,
        )


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    num_hvps: int = 30,
    params: Sequence[str] | Sequence[Tensor] | None = None,
    route: HVPRoute = "auto",
    seed: int = 0,
    eval_mode: bool = True,
    norm_statistics: NormStatistics = "running",
    distributed: bool | None = None,
    timeout: datetime.timedelta | None = None,
    micro_batch_size: int | None = None,
) -> TraceResult:
    """Trace of the loss Hessian on one probe batch, by Hutch++ with a standard error.

    Args:
        model: the model.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batch: the probe batch, already on the model's device.
        num_hvps: Hessian-vector products to spend (at least 3).
        params: parameter subset: names, ``fnmatch`` patterns or tensors.
        route: HVP route: ``"auto"``, ``"functorch"``, ``"compiled"``, ``"double_backward"``
            or ``"finite_difference"`` (see :class:`~lightning_landscape.HessianOperator`).
        seed: seed of the private generator for the random probes.
        eval_mode: probe in ``eval()`` mode (default) or in the model's current modes.
        norm_statistics: ``"running"`` (default) or ``"batch"``, as in
            :func:`hessian_eigenvalues`.
        distributed: treat ``batch`` as this rank's shard and return the result for the union
            of all ranks' shards (one all-reduce per Hessian-vector product). ``None``: yes
            when called inside an initialised process group with more than one rank.
        timeout: bound on each collective wait under ``distributed``.
        micro_batch_size: memory cap: split ``batch`` into micro-batches of at most this many
            samples, whose gradient graphs are built one at a time on every product (peak
            memory of one micro-batch instead of the whole batch, at one extra forward and
            backward pass per micro-batch per product). The Hessian is the same for models
            whose forward pass does not couple samples; with BatchNorm and
            ``norm_statistics="batch"`` it is the sample-weighted mean of the micro-batches'
            Hessians, each normalised with its own statistics.

    Returns:
        A :class:`~lightning_landscape.results.TraceResult`.

    Raises:
        ValueError: for num_hvps < 3, an unknown ``route`` or ``norm_statistics``,
            ``norm_statistics="batch"`` with ``eval_mode=False`` on a model with normalisation
            layers, unknown parameter names, no trainable parameters or a non-scalar loss.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import lightning_landscape as ll
        >>> model = nn.Linear(3, 1, bias=False)
        >>> x = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> loss_fn = lambda m, b: 0.5 * (m(b) ** 2).sum()
        >>> round(ll.hessian_trace(model, loss_fn, x, num_hvps=9).trace, 4)  # 1 + 4 + 9
        14.0
    """
    with _hessian(
        model,
        loss_fn,
        batch,
        params,
        route,
        eval_mode,
        distributed,
        timeout,
        micro_batch_size,
        norm_statistics,
    ) as op:
        return hutchpp_trace(op, num_hvps, seed=seed)
