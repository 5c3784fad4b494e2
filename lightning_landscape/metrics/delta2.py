"""Curvature-aligned stabilization criterion Δ₂^(D) (Kiselev & Grabovoy, arXiv:2604.14870).

With nested samples, ``L_m`` the loss on the first ``m`` samples of a batch and ``U_D`` the top-D
eigenvectors (algebraic order) of the Hessian ``H^(k)`` of ``L_k`` at the current weights ``w``,

    Δ₂^(D)(k+1) = E_z[(L_{k+1}(w + U_D z) − L_k(w + U_D z))²],   z ~ N(0, σ² I_D).

Its local quadratic model is ``a + cᵀz + ½ zᵀBz`` with ``a = L_{k+1}(w) − L_k(w)``,
``c = U_Dᵀ(g^(k+1) − g^(k))`` (the released code's linear term, valid away from a minimiser of
``L_k``; the paper's ``U_Dᵀ g^(k+1)`` assumes ``g^(k) = 0``) and ``B = Ĥ_{k+1} − Ĥ_k``,
``Ĥ_m = sym(U_Dᵀ H^(m) U_D)``, both Hessians exact on the same nested data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._validate import choice, is_int, real
from ..context import curvature_context
from ..operators import (
    HessianOperator,
    HVPRoute,
    LossFn,
    batch_size,
    check_scalar_loss,
    restored_parameters,
    select_parameters,
    slice_batch,
)
from ..operators.hessian import eager_route
from ..solvers import lanczos

Estimator = Literal["gm", "qmc", "mc"]
ESTIMATORS: tuple[Estimator, ...] = ("gm", "qmc", "mc")


@dataclass(frozen=True)
class StabilizationResult:
    """Δ₂^(D) at one sample count ``k`` (``L_k`` vs ``L_{k+1}``).

    Attributes:
        value: the estimate of Δ₂^(D)(k+1).
        stderr: Monte Carlo standard error of ``value`` (``0.0`` for ``"gm"``, which is exact for
            the quadratic model).
        estimator: ``"gm"`` (Gaussian moment closed form of the quadratic model), ``"qmc"``
            (Monte Carlo on the quadratic model) or ``"mc"`` (Monte Carlo on the true losses).
        a: ``L_{k+1}(w) − L_k(w)``.
        c: 1-D float64 CPU tensor ``U_Dᵀ(g^(k+1) − g^(k))``.
        B: ``(D, D)`` float64 CPU tensor ``sym(U_DᵀH^(k+1)U_D) − sym(U_DᵀH^(k)U_D)``.
        eigenvalues: 1-D float64 CPU tensor, the D largest eigenvalues of ``H^(k)`` (descending).
        eigenvectors: ``(N, D)`` orthonormal ``U_D`` (parameter dtype and device); pass it as
            ``start=`` of the next call to warm-start the eigensolver.
        converged: whether every eigenpair met the Lanczos tolerance.
        num_hvps: Hessian-vector products spent (eigensolver and both compressed Hessians).
        seconds: wall-clock time of the whole call.
        k: number of samples of the smaller loss.
        D: subspace dimension.
        sigma: per-coordinate standard deviation of the Gaussian in parameter units.
    """

    value: float
    stderr: float
    estimator: str
    a: float
    c: Tensor
    B: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor
    converged: bool
    num_hvps: int
    seconds: float
    k: int
    D: int
    sigma: float

    def terms(self) -> dict[str, float]:
        """The four terms of the Gaussian-moment closed form (they sum to the ``"gm"`` value).

        Returns:
            ``{"mean": a², "cross": a σ² tr B, "linear": σ² ‖c‖², "quadratic":
            (σ⁴/4)(2 tr B² + (tr B)²)}`` for this result's ``a``, ``c``, ``B`` and ``sigma``
            (whatever its estimator).
        """
        return _moment_terms(self.a, self.c, self.B, self.sigma)


def _first(batch: Any, m: int) -> Any:
    """The first ``m`` samples (dimension 0 of every tensor) of a batch."""
    return slice_batch(batch, 0, m)


def _check_common(batch: Any, k: int, sigma: float) -> None:
    if not is_int(k) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (the number of samples of L_k), got {k!r}")
    n = batch_size(batch)
    if k + 1 > n:
        raise ValueError(f"batch holds {n} samples; need at least k + 1 = {k + 1}")
    real("sigma", sigma, low=0)


def _check_samples(num_samples: int) -> None:
    if not is_int(num_samples) or num_samples < 2:
        raise ValueError(
            f"num_samples must be an integer >= 2 for a Monte Carlo estimate (it needs a "
            f"standard error), got {num_samples!r}"
        )


def _mean_stderr(values: Tensor) -> tuple[float, float]:
    values = values.to(torch.float64)
    return float(values.mean()), float(values.std(unbiased=True)) / math.sqrt(values.numel())


def _moment_terms(a: float, c: Tensor, B: Tensor, sigma: float) -> dict[str, float]:
    tr = float(torch.trace(B))
    tr2 = float((B * B).sum())
    s2 = sigma**2
    return {
        "mean": a * a,
        "cross": a * s2 * tr,
        "linear": s2 * float(c @ c),
        "quadratic": 0.25 * s2 * s2 * (2.0 * tr2 + tr * tr),
    }


def _gaussian_moment(a: float, c: Tensor, B: Tensor, sigma: float) -> float:
    """``E(a + cᵀz + ½zᵀBz)²`` for ``z ~ N(0, σ²I)`` (Isserlis), ``B`` symmetric."""
    t = _moment_terms(a, c, B, sigma)
    return t["mean"] + t["cross"] + t["linear"] + t["quadratic"]


def _loss_gap_mc(
    model: nn.Module,
    loss_fn: LossFn,
    small: Any,
    large: Any,
    params: Sequence[Tensor],
    directions: Iterable[Tensor],
) -> Tensor:
    """``(L_{k+1}(w + δ_s) − L_k(w + δ_s))²`` for each flat direction ``δ_s`` in ``directions``.

    The probed parameters are moved in place under ``no_grad`` and restored bit-for-bit (also on
    error); ``directions`` may be a lazy iterable, so only one direction need exist at a time.
    """
    numels = [p.numel() for p in params]
    out: list[float] = []
    with restored_parameters(params) as saved, torch.no_grad():
        for delta in directions:
            pieces = torch.split(delta, numels)
            for p, w0, d in zip(params, saved, pieces, strict=True):
                p.copy_(w0 + d.view_as(p))
            big = check_scalar_loss(loss_fn(model, large)).to(torch.float64)
            sml = check_scalar_loss(loss_fn(model, small)).to(torch.float64)
            out.append(float(big - sml) ** 2)
    return torch.tensor(out, dtype=torch.float64)


def stabilization(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int,
    *,
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
) -> StabilizationResult:
    """Curvature-aligned stabilization Δ₂^(D)(k+1) between ``L_k`` and ``L_{k+1}``.

    ``L_m = loss_fn(model, first m samples of batch)`` (every tensor sliced along dimension 0), so
    the losses are nested. ``U_D`` comes from thick-restart Lanczos on the exact Hessian of
    ``L_k``; ``B`` costs ``D`` Hessian-vector products per Hessian. Runs inside
    :func:`~lightning_landscape.curvature_context`; the weights, gradients, modes and global RNG
    are left as they were. Random draws use a private generator seeded with ``seed``.

    Args:
        model: the network at the weights ``w`` to probe.
        loss_fn: ``loss_fn(model, batch) -> scalar``, a per-sample mean (the same reduction for
            every ``m``).
        batch: holds at least ``k + 1`` samples.
        k: number of samples of the smaller loss (``>= 1``).
        D: subspace dimension (``1 <= D <= N``, the number of probed parameters).
        sigma: per-coordinate std of ``z ~ N(0, σ² I_D)`` in parameter units (not a radius).
        estimator: ``"gm"`` (closed form of the quadratic model, O(D²)), ``"qmc"`` (Monte Carlo
            on the quadratic model) or ``"mc"`` (Monte Carlo on the true losses at
            ``w + U_D z``, two forward passes per draw).
        num_samples: Monte Carlo draws S (``>= 2``) for ``"qmc"`` and ``"mc"``.
        tol: relative Ritz-residual tolerance of the eigensolver.
        params: parameter subset (see :func:`~lightning_landscape.operators.select_parameters`).
        start: warm start for the eigensolver, e.g. a previous result's ``eigenvectors``.
        route: Hessian-vector product route of :class:`HessianOperator` (``"compiled"``
            means ``"functorch"`` here: the two batch sizes of every ``k`` would each compile).
        seed: seeds the eigensolver and the Monte Carlo draws.
        eval_mode: probe with every submodule in ``eval()`` (restored afterwards).

    Returns:
        A :class:`StabilizationResult`.

    Raises:
        ValueError: for ``k < 1``, a batch with fewer than ``k + 1`` samples, ``D`` outside
            ``[1, N]``, a non-positive or non-finite ``sigma``, an unknown estimator, or
            ``num_samples < 2`` with a Monte Carlo estimator.
        FloatingPointError: if ``L_k`` or its Hessian is NaN/inf at ``w``.
    """
    t0 = time.perf_counter()
    _check_common(batch, k, sigma)
    choice("estimator", estimator, ESTIMATORS)
    if estimator != "gm":
        _check_samples(num_samples)
    size = sum(p.numel() for _, p in select_parameters(model, params))
    if not is_int(D) or not 1 <= D <= size:
        raise ValueError(
            f"D must be an integer in [1, {size}] (the number of probed parameters), got {D!r}"
        )
    small, large = _first(batch, k), _first(batch, k + 1)
    with curvature_context(model, eval_mode=eval_mode):
        route = eager_route(route)  # one operator per batch size k: no compilation for each
        op_k = HessianOperator(model, loss_fn, [small], params=params, route=route)
        op_k1 = HessianOperator(model, loss_fn, [large], params=params, route=route)
        try:
            eig = lanczos(op_k, D, which="largest", tol=tol, start=start, seed=seed)
            if not (eig.is_finite and math.isfinite(op_k.loss_value)) or eig.eigenvectors is None:
                raise FloatingPointError(
                    f"the loss or its Hessian on the first k={k} samples is NaN/inf at these "
                    "weights; Δ₂^(D) is undefined there"
                )
            U = eig.eigenvectors
            h_k = (U.T @ op_k.matmat(U)).to(device="cpu", dtype=torch.float64)
            h_k1 = (U.T @ op_k1.matmat(U)).to(device="cpu", dtype=torch.float64)
            B = 0.5 * (h_k1 + h_k1.T) - 0.5 * (h_k + h_k.T)
            with op_k._differentiable():
                g_diff = op_k1._gradient() - op_k._gradient()
            c = (U.T @ g_diff).to(device="cpu", dtype=torch.float64)
            a = op_k1.loss_value - op_k.loss_value
            num_hvps = op_k.num_matvecs + op_k1.num_matvecs
        finally:
            op_k.release()
            op_k1.release()
        gen = torch.Generator().manual_seed(seed)
        stderr = 0.0
        if estimator == "gm":
            value = _gaussian_moment(a, c, B, sigma)
        elif estimator == "qmc":
            z = sigma * torch.randn(num_samples, D, generator=gen, dtype=torch.float64)
            q = a + z @ c + 0.5 * ((z @ B) * z).sum(dim=1)
            value, stderr = _mean_stderr(q * q)
        else:
            # same draws as "qmc" with the same seed (common random numbers)
            z = sigma * torch.randn(num_samples, D, generator=gen, dtype=torch.float64)
            directions = U @ z.T.to(device=U.device, dtype=U.dtype)
            sq = _loss_gap_mc(model, loss_fn, small, large, op_k.params, directions.T)
            value, stderr = _mean_stderr(sq)
    return StabilizationResult(
        value=value,
        stderr=stderr,
        estimator=estimator,
        a=a,
        c=c,
        B=B,
        eigenvalues=eig.eigenvalues,
        eigenvectors=U,
        converged=eig.all_converged,
        num_hvps=num_hvps,
        seconds=time.perf_counter() - t0,
        k=k,
        D=D,
        sigma=float(sigma),
    )


def full_space_delta2(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int,
    *,
    sigma: float = 1e-3,
    num_samples: int = 64,
    seed: int = 0,
    params: Sequence[str] | Sequence[Tensor] | None = None,
    eval_mode: bool = True,
) -> tuple[float, float]:
    """Full-space Δ₂(k+1) = E[(L_{k+1}(w + δ) − L_k(w + δ))²], δ ~ N(0, σ² I_N), by Monte Carlo.

    Evaluated on the true losses (nested first ``k`` / ``k + 1`` samples, see
    :func:`stabilization`); the probed parameters are moved in place and restored bit-for-bit.

    Args:
        model: the network at the weights ``w``.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        batch: holds at least ``k + 1`` samples.
        k: number of samples of the smaller loss (``>= 1``).
        sigma: per-coordinate std of δ in parameter units.
        num_samples: Monte Carlo draws (``>= 2``).
        seed: seeds the private generator of the draws.
        params: parameter subset (see :func:`~lightning_landscape.operators.select_parameters`).
        eval_mode: probe with every submodule in ``eval()`` (restored afterwards).

    Returns:
        ``(value, stderr)``: the Monte Carlo mean and its standard error.

    Raises:
        ValueError: for ``k < 1``, a batch with fewer than ``k + 1`` samples, a non-positive or
            non-finite ``sigma``, or ``num_samples < 2``.
    """
    _check_common(batch, k, sigma)
    _check_samples(num_samples)
    probed = [p for _, p in select_parameters(model, params)]
    size = sum(p.numel() for p in probed)
    small, large = _first(batch, k), _first(batch, k + 1)
    gen = torch.Generator().manual_seed(seed)
    like = probed[0]

    def draws() -> Iterator[Tensor]:  # one direction at a time: memory O(N), not O(N·S)
        for _ in range(num_samples):
            delta = sigma * torch.randn(size, generator=gen, dtype=torch.float64)
            yield delta.to(device=like.device, dtype=like.dtype)

    with curvature_context(model, eval_mode=eval_mode):
        out = _loss_gap_mc(model, loss_fn, small, large, probed, draws())
    return _mean_stderr(out)
