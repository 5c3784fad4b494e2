"""The k-sweep of Δ₂^(D): how fast the landscape stabilises as samples are added.

For nested samples ``L_{k+1} − L_k = (ℓ_{k+1} − L_k)/(k + 1)``, so at fixed weights every part of
the quadratic model (``a``, ``c``, ``B``) shrinks like ``1/(k + 1)`` and the squared criteria like
``k⁻²``; Δ₁ (not squared) like ``k⁻¹``. :func:`stabilization_sweep` measures Δ₂^(D) on a
log-spaced grid of ``k`` and fits the log-log slope with its standard error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import integer
from ..operators import HVPRoute, LossFn, batch_size, take_batch
from .delta2 import Estimator, StabilizationResult, stabilization


@dataclass(frozen=True)
class SweepResult:
    """Δ₂^(D) over a grid of sample counts ``k`` and its fitted log-log slope.

    Attributes:
        ks: the sample counts ``k`` (each value is Δ₂^(D)(k + 1), ``L_k`` vs ``L_{k+1}``).
        values: 1-D float64 tensor, Δ₂^(D) at each ``k`` averaged over the repeats.
        stderr: 1-D float64 tensor, the standard error of each mean over the repeats (NaN with
            one repeat).
        per_repeat: ``(repeats, len(ks))`` float64 tensor of the individual estimates.
        slope: OLS slope of ``log values`` on ``log ks`` (theory: −2 for the squared criteria).
        slope_stderr: its standard error (NaN with fewer than 3 usable points).
        intercept: the OLS intercept (natural log).
        r2: coefficient of determination of the fit.
        estimator: the Δ₂^(D) estimator used at each point.
        D: subspace dimension.
        sigma: the Gaussian's per-coordinate standard deviation.
        repeats: sample orders averaged at each ``k``.
        converged: whether every eigensolve met its tolerance.
        num_hvps: Hessian-vector products spent in total.
        seconds: wall-clock time of the sweep.
        last: the result at the largest ``k`` of the last repeat (its ``eigenvectors`` make a
            warm start for the next sweep).
    """

    ks: tuple[int, ...]
    values: Tensor
    stderr: Tensor
    per_repeat: Tensor
    slope: float
    slope_stderr: float
    intercept: float
    r2: float
    estimator: str
    D: int
    sigma: float
    repeats: int
    converged: bool
    num_hvps: int
    seconds: float
    last: StabilizationResult


def log_spaced_ks(k_min: int, k_max: int, num: int) -> tuple[int, ...]:
    """Up to ``num`` distinct integers from ``k_min`` to ``k_max``, evenly spaced in ``log k``.

    Args:
        k_min: smallest ``k`` (``>= 1``).
        k_max: largest ``k`` (``>= k_min``).
        num: number of grid points wanted (``>= 1``); fewer are returned when rounding to
            integers makes points coincide.

    Returns:
        The sorted grid, always containing ``k_min`` and ``k_max``.

    Raises:
        ValueError: for ``k_min < 1``, ``k_max < k_min`` or ``num < 1``.

    Example:
        >>> log_spaced_ks(1, 1000, 4)
        (1, 10, 100, 1000)
    """
    if k_min < 1 or k_max < k_min or num < 1:
        raise ValueError(f"need 1 <= k_min <= k_max and num >= 1, got {k_min}, {k_max}, {num}")
    if num == 1 or k_min == k_max:
        return (k_max,)
    lo, hi = math.log(k_min), math.log(k_max)
    points = {round(math.exp(lo + (hi - lo) * i / (num - 1))) for i in range(num)}
    return tuple(sorted(points | {k_min, k_max}))


def fit_loglog(ks: Sequence[int], values: Tensor) -> tuple[float, float, float, float]:
    """OLS fit of ``log values`` on ``log ks`` over the positive, finite values.

    Args:
        ks: the sample counts.
        values: the criterion at each ``k``.

    Returns:
        ``(slope, slope_stderr, intercept, r2)``; NaN where fewer points than needed are usable
        (2 for the slope, 3 for its standard error).
    """
    x_all = torch.tensor([math.log(k) for k in ks], dtype=torch.float64)
    y_all = values.to(torch.float64)
    keep = torch.isfinite(y_all) & (y_all > 0)
    x, y = x_all[keep], torch.log(y_all[keep])
    n = int(x.numel())
    nan = float("nan")
    if n < 2 or float(x.max() - x.min()) == 0.0:
        return nan, nan, nan, nan
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum()) / sxx
    intercept = float(ym) - slope * float(xm)
    resid = y - (intercept + slope * x)
    ssr, sst = float((resid**2).sum()), float(((y - ym) ** 2).sum())
    r2 = 1.0 - ssr / sst if sst > 0 else 1.0
    stderr = math.sqrt(ssr / (n - 2) / sxx) if n >= 3 else nan
    return slope, stderr, intercept, r2


def stabilization_sweep(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    ks: Sequence[int] | None = None,
    *,
    num_k: int = 8,
    k_min: int = 2,
    repeats: int = 4,
    D: int = 10,
    sigma: float = 1e-3,
    estimator: Estimator = "gm",
    num_samples: int = 64,
    tol: float = 1e-6,
    params: Sequence[str] | Sequence[Tensor] | None = None,
    start: Tensor | None = None,
    route: HVPRoute = "auto",
    seed: int = 0,
    eval_mode: bool = True,
) -> SweepResult:
    """Δ₂^(D)(k + 1) on a log-spaced grid of ``k`` with the fitted log-log slope.

    Each repeat fixes one order of the batch's samples (repeat 0: the given order; later ones: a
    random permutation from a private generator), and for every ``k`` of the grid calls
    :func:`~lightning_landscape.stabilization` on the first ``k`` / ``k + 1`` samples of that
    order, so within a repeat the samples are nested. The values are averaged over repeats
    before the fit, which damps the sample-to-sample scatter of ``(ℓ_{k+1} − L_k)²``. Each
    eigensolve is warm-started from the previous one. Cost: ``repeats × len(ks)`` calls of
    :func:`~lightning_landscape.stabilization`.

    Args:
        model: the network at the weights to probe.
        loss_fn: ``loss_fn(model, batch) -> scalar``, a per-sample mean (for language models one
            sample is one sequence and the loss the token mean).
        batch: holds more samples than the largest ``k``.
        ks: explicit grid of sample counts (each ``>= 1`` and ``< batch size``); default
            :func:`log_spaced_ks` from ``k_min`` to ``batch size − 1`` with ``num_k`` points.
        num_k: grid points of the default grid.
        k_min: smallest ``k`` of the default grid.
        repeats: sample orders to average over (``>= 1``; the slope's standard error comes from
            the scatter about the fit, not from the repeats).
        D: subspace dimension.
        sigma: per-coordinate std of the Gaussian in parameter units.
        estimator: ``"gm"``, ``"qmc"`` or ``"mc"`` (see :func:`stabilization`).
        num_samples: Monte Carlo draws of the ``"qmc"``/``"mc"`` estimators.
        tol: eigensolver tolerance.
        params: parameter subset (see :func:`~lightning_landscape.operators.select_parameters`).
        start: warm start of the first eigensolve (e.g. a monitor's top eigenvectors).
        route: Hessian-vector product route.
        seed: seeds the permutations, eigensolvers and Monte Carlo draws.
        eval_mode: probe with every submodule in ``eval()``.

    Returns:
        A :class:`SweepResult`.

    Raises:
        ValueError: for a grid with fewer than 2 distinct ``k``, a ``k`` outside
            ``[1, batch size − 1]``, ``repeats < 1``, and everything :func:`stabilization`
            rejects.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(3, 1)
        >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
        >>> def loss_fn(m, b):
        ...     return ((m(b[0]) - b[1]) ** 2).mean()
        >>> sweep = stabilization_sweep(model, loss_fn, (x, y), D=2, repeats=4)
        >>> sweep.ks
        (2, 3, 5, 9, 14, 24, 38, 63)
        >>> -2.6 < sweep.slope < -1.4
        True
    """
    t0 = time.perf_counter()
    n = batch_size(batch)
    integer("repeats", repeats)
    if ks is None:
        if n < 3:
            raise ValueError(f"a sweep needs a batch of at least 3 samples, got {n}")
        grid = log_spaced_ks(min(max(k_min, 1), n - 1), n - 1, num_k)
    else:
        grid = tuple(sorted({int(k) for k in ks}))
    bad = [k for k in grid if not 1 <= k <= n - 1]
    if bad:
        raise ValueError(f"every k must lie in [1, {n - 1}] (batch size − 1), got {bad}")
    if len(grid) < 2:
        raise ValueError(f"a sweep needs at least 2 distinct k to fit a slope, got {grid}")
    gen = torch.Generator().manual_seed(seed)
    table = torch.empty(repeats, len(grid), dtype=torch.float64)
    num_hvps, converged = 0, True
    warm = start
    result: StabilizationResult | None = None
    for r in range(repeats):
        order = torch.arange(n) if r == 0 else torch.randperm(n, generator=gen)
        shuffled = batch if r == 0 else take_batch(batch, order)
        for j, k in enumerate(grid):
            result = stabilization(
                model,
                loss_fn,
                shuffled,
                k,
                D=D,
                sigma=sigma,
                estimator=estimator,
                num_samples=num_samples,
                tol=tol,
                params=params,
                start=warm,
                route=route,
                seed=seed + 1000 * r + j,
                eval_mode=eval_mode,
            )
            table[r, j] = result.value
            warm = result.eigenvectors
            num_hvps += result.num_hvps
            converged = converged and result.converged
    assert result is not None
    values = table.mean(dim=0)
    if repeats > 1:
        stderr = table.std(dim=0, unbiased=True) / math.sqrt(repeats)
    else:
        stderr = torch.full_like(values, float("nan"))
    slope, slope_se, intercept, r2 = fit_loglog(grid, values)
    return SweepResult(
        ks=grid,
        values=values,
        stderr=stderr,
        per_repeat=table,
        slope=slope,
        slope_stderr=slope_se,
        intercept=intercept,
        r2=r2,
        estimator=estimator,
        D=D,
        sigma=float(sigma),
        repeats=repeats,
        converged=converged,
        num_hvps=num_hvps,
        seconds=time.perf_counter() - t0,
        last=result,
    )
