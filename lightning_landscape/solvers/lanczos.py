"""Thick-restart Lanczos for extreme eigenpairs, with the vector work bounded by memory bandwidth.

Wu & Simon (2000) thick restart keeps the basis bounded by ``max_basis`` vectors: when the basis is
full, the wanted Ritz vectors (plus a few more) are kept, the rest discarded, and the recurrence
continues from the last residual vector.

Orthogonality. Single-vector Lanczos (the default) runs on the three-term recurrence with *partial
reorthogonalisation* (Simon 1984; Larsen's PROPACK): each new vector's inner products with the
basis are measured (one pass over the basis), and only when one exceeds the trigger ``τ`` (the
tolerance, clamped to ``[ε^(3/4), √ε]``) are those above ``ε^(3/4)`` subtracted (vector by vector,
or in one more pass when many are). That keeps the basis semi-orthogonal, which keeps the Ritz
values at working accuracy (Simon 1984) and rules out ghost copies of converged eigenvalues; the
residuals read off the recurrence can understate the true residuals of the returned Ritz vectors
by up to about ``τ · ‖A‖`` (the subtracted components are left out of the projected matrix;
``benchmarks/residual_bounds.py`` measured up to 0.87 τ over start seeds in float64), so a pair
reported converged has a true residual below about ``2 tol``; the Ritz vectors are orthonormal to
about ``j·τ``. (Adding the subtracted components to the reported residuals would make them
bounds, but the asymmetry of float32 products puts those components near 1e-4 of ``β``, at or
above the tolerances in use, so such a bound would stall float32 solves.) Most steps cost one pass
instead of the four of "twice is enough" (at 10 M parameters a pass over 20 vectors costs about
a quarter of a cheap Hessian-vector product). Float32 Hessian-vector products are themselves
asymmetric at ~1e-5, which leaves inner products of that size at every step: a fixed trigger at
``ε^(3/4)`` (6e-6) fired on that noise at almost every step and bought no accuracy. Block
Lanczos (``block_size > 1``) orthogonalises every block against the whole basis by classical
Gram–Schmidt with a selective second pass.

Convergence is judged by Ritz residuals, ``‖A y − θ y‖ = ‖C_j s_j‖`` (read off the recurrence at
no extra cost), against the spectral scale ``‖A‖`` (the largest Ritz value magnitude seen), so
that eigenvalues at or near zero converge too; with ``criterion="eigenvalue"``, by the
a-posteriori eigenvalue-error bound ``‖r‖² / gap`` built from the same residuals. A wanted Ritz
value within its residual of zero is not accepted before ARPACK's default Krylov dimension
(``max(2k + 1, 20)`` products): in a large dimension the first Ritz values of a random start sit
in the dense bulk of a Hessian spectrum near zero, with residuals far below ``tol · ‖A‖``. Host
synchronisation happens once per step, for the convergence check and the orthogonality measurement.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor

from .._validate import choice, integer, optional_integer, real
from ..operators import CurvatureOperator, Sharding, default_max_basis
from ._orthogonality import (
    DGKS,
    coefficients,
    column_norms,
    combine_rows,
    dot,
    orthogonality_threshold,
    orthonormal_columns,
    private_generator,
    project_out,
    project_out_block,
    semi_orthogonality,
    vector_norm,
)
from .results import EigenResult, Which

_WHICH = ("largest", "smallest")
_CRITERIA = ("residual", "eigenvalue")

Criterion = Literal["residual", "eigenvalue"]


def _error_bounds(theta: Tensor, raw: Tensor, cols: Tensor, scale: Tensor) -> Tensor:
    """Relative eigenvalue-error bounds ``min(‖r_i‖, ‖r_i‖² / gap_i) / scale_i`` for ``cols``.

    ``theta`` are all Ritz values of the projected matrix and ``raw`` the absolute residual
    norms of all of them. ``gap_i = min_{j≠i} (|θ_i − θ_j| − ‖r_j‖)``: the distance to the nearest
    other Ritz value, shrunk by that neighbour's own residual (an interval that, once the
    neighbour has settled, contains its eigenvalue). Where this is not positive, or there is no
    other Ritz value, only the residual bound ``|λ − θ_i| <= ‖r_i‖`` is used.
    """
    dist = (theta[cols, None] - theta[None, :]).abs() - raw[None, :]  # (kk, j)
    dist[torch.arange(len(cols)), cols] = math.inf  # not its own neighbour
    gap = dist.min(dim=1).values if theta.numel() > 1 else torch.zeros(len(cols), dtype=theta.dtype)
    r = raw[cols]
    temple = torch.where(gap > 0, r * r / gap.clamp_min(torch.finfo(theta.dtype).tiny), math.inf)
    return torch.minimum(r, temple) / scale


def _converged(
    resid: Tensor, bounds: Tensor, tol: float, criterion: str, moved: Tensor | None = None
) -> Tensor:
    """The per-pair convergence flags of ``criterion`` (see :func:`lanczos`).

    ``moved``: relative change of each Ritz value since the previous check (``None``: no
    previous check, which the eigenvalue criterion needs).
    """
    by_residual = resid <= tol
    if criterion == "residual":
        return by_residual
    if moved is None:
        return by_residual
    return by_residual | ((bounds <= tol) & (resid <= math.sqrt(tol)) & (moved <= tol))


def _separated(theta: Tensor, raw: Tensor, num_hvps: int, floor: int) -> Tensor:
    """Which wanted Ritz values may be accepted: those whose residual interval excludes zero.

    A Ritz value within its residual of zero, ``|θ| <= ‖r‖``, cannot be told apart from the dense
    bulk of a Hessian spectrum near zero, which the Ritz values of a small Krylov space sit in
    before it has reached the end of the spectrum. Measured on a train-mode ResNet-18 (λ_max 129,
    λ_min −204): from a random start the largest Ritz value after 2 products was 1e-4 with a
    residual of 9e-4 of the spectral scale, "converged" at ``tol=1e-3``; three products later it
    was 0.99 λ_max. Such a value is accepted only once ``floor`` products are spent (ARPACK's
    default Krylov dimension), so that a true eigenvalue at zero still converges.
    """
    if num_hvps >= floor:
        return torch.ones_like(theta, dtype=torch.bool)
    return theta.abs() > raw


def _validate(
    k: int, n: int, which: str, tol: float, max_basis: int | None, criterion: str = "residual"
) -> int:
    integer("k", k)
    if k > n:
        raise ValueError(
            f"k={k} eigenpairs requested but the operator has only {n} dimensions; use k <= {n}."
        )
    choice("which", which, _WHICH)
    real("tol", tol, low=0, high=1, high_open=True)
    choice("criterion", criterion, _CRITERIA)
    m = default_max_basis(k, n) if max_basis is None else min(int(max_basis), n)
    if m < n and m < k + 1:
        raise ValueError(
            f"max_basis={max_basis} is too small for k={k}: it must be at least k + 1 = {k + 1}."
        )
    return m


def _warm_columns(
    start: Tensor, n: int, dtype: torch.dtype, device: torch.device, sharding: Sharding | None
) -> tuple[Tensor, Tensor]:
    """Warm-start vectors as ``(n, p)`` columns in the solve's dtype, and their norms (> 0)."""
    warm = start.to(device=device, dtype=dtype)
    warm = warm.unsqueeze(1) if warm.ndim == 1 else warm
    if warm.ndim != 2 or warm.shape[0] != n:
        raise ValueError(f"start vectors must have {n} rows, got shape {tuple(start.shape)}")
    return warm, column_norms(warm, sharding).clamp_min(torch.finfo(dtype).tiny)


def _start_block(
    n: int,
    b: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    start: Tensor | None,
    noise: float,
    sharding: Sharding | None = None,
) -> Tensor:
    """Orthonormal ``(n, b)`` start block: random, or warm vectors summed round-robin + noise."""
    if b == 1:
        return _start_vector(n, dtype, device, generator, start, noise, sharding).unsqueeze(1)
    rand = torch.randn(n, b, dtype=dtype, device=device, generator=generator)
    rand = rand / column_norms(rand, sharding)
    block = rand
    if start is not None:
        warm, norms = _warm_columns(start, n, dtype, device, sharding)
        cols = warm / norms
        groups = torch.zeros(n, b, dtype=dtype, device=device)
        groups.index_add_(1, torch.arange(cols.shape[1], device=device) % b, cols)
        norms = column_norms(groups, sharding)
        groups = torch.where(norms > 0, groups / norms.clamp_min(1e-300), rand)
        block = groups + noise * rand
        if not torch.isfinite(block).all():
            block = rand
    q = orthonormal_columns(block, sharding)[0]
    return q / column_norms(q, sharding)  # unit columns to the accuracy of a dot product


def _start_vector(
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    start: Tensor | None,
    noise: float,
    sharding: Sharding | None,
) -> Tensor:
    """:func:`_start_block` for one vector, in a few passes over ``n`` entries.

    The unit warm vectors summed (one matrix-vector product over them), normalised, plus
    ``noise`` times a random unit vector, normalised; random alone without a usable warm start.
    The same vector as the block path's, without its ``(n, p)`` temporaries.
    """
    rand = torch.randn(n, dtype=dtype, device=device, generator=generator)
    rand.div_(vector_norm(rand, sharding))
    if start is None:
        return rand
    warm, norms = _warm_columns(start, n, dtype, device, sharding)
    v = warm @ norms.reciprocal()
    norm = vector_norm(v, sharding)
    if not (norm > 0 and math.isfinite(norm)):
        return rand
    v.div_(norm).add_(rand, alpha=noise)
    return v.div_(vector_norm(v, sharding))


def _orthonormalize(
    w: Tensor, basis: Tensor, generator: torch.Generator, sharding: Sharding | None = None
) -> tuple[Tensor, Tensor]:
    """Orthonormalise the columns of ``w`` (already orthogonal to ``basis`` rows).

    Returns ``(q, c)`` with orthonormal ``q`` (n, b), orthogonal to ``basis``, and ``c = qᵀ w``.
    Rank-deficient directions (a Krylov breakdown: an invariant subspace was found) are replaced
    by random directions orthogonal to everything so far; their coupling is then ~0. A block that
    is merely ill-conditioned (``R`` with a small diagonal) is projected against the basis once
    more, since ``q = w R⁻¹`` amplifies what rounding left of the basis in ``w``.
    """
    sh = sharding
    eps = torch.finfo(w.dtype).eps
    scale = float(column_norms(w, sh).max()) if w.shape[1] else 0.0
    if w.shape[1] == 1:
        norm = vector_norm(w[:, 0], sh)
        if norm > 100 * eps * max(scale, 1e-300) and scale > 0.0:
            q = w / norm
            return q, coefficients(q.T, w, sh).to(torch.float64)
        diag = torch.zeros(1)
    else:
        q, r = orthonormal_columns(w, sh)
        diag = r.diagonal().abs()
    if bool((diag <= 100 * eps * max(scale, 1e-300)).any()) or scale == 0.0:
        cols: list[Tensor] = []
        for i in range(w.shape[1]):
            x = w[:, i].clone()
            for attempt in range(3):
                for _ in range(2):
                    x = x - basis.T @ coefficients(basis, x, sh)
                    for c in cols:
                        x = x - c * dot(c, x, sh)
                norm = vector_norm(x, sh)
                if norm > 100 * eps * max(scale, 1e-300) or attempt == 2:
                    break
                x = torch.randn(w.shape[0], dtype=w.dtype, device=w.device, generator=generator)
                scale = max(scale, vector_norm(x, sh))
            cols.append(x / vector_norm(x, sh))
        q = torch.stack(cols, dim=1)
    elif float(diag.min()) < math.sqrt(eps) * float(diag.max()):
        q = q - basis.T @ coefficients(basis, q, sh)
        q, _ = orthonormal_columns(q, sh)
    q = q / column_norms(q, sh)
    return q, coefficients(q.T, w, sh).to(torch.float64)


def _by_end(
    ends: tuple[int, int],
    values: Tensor,
    vectors: Tensor | None,
    residuals: Tensor,
    bounds: Tensor,
    converged: Tensor,
    *,
    tol: float,
    criterion: str,
    num_hvps: int,
    restarts: int,
    seconds: float,
) -> list[EigenResult]:
    """One :class:`EigenResult` per requested end, the solve's cost counted in the first.

    The pairs come largest first (descending), then smallest (ascending): the first
    ``min(ends[0], len(values))`` belong to the largest end, the rest to the smallest.
    """
    n_hi = min(ends[0], values.numel())
    parts = (("largest", slice(0, n_hi)), ("smallest", slice(n_hi, None)))
    out: list[EigenResult] = []
    for (which, part), wanted in zip(parts, ends, strict=True):
        if not wanted:
            continue
        first = not out
        out.append(
            EigenResult(
                eigenvalues=values[part],
                eigenvectors=None if vectors is None else vectors[:, part],
                residuals=residuals[part],
                converged=converged[part],
                which=which,  # type: ignore[arg-type]
                tol=float(tol),
                num_hvps=num_hvps if first else 0,
                num_restarts=restarts if first else 0,
                seconds=seconds if first else 0.0,
                criterion=criterion,
                error_bounds=bounds[part],
            )
        )
    return out


def _non_finite(
    ends: tuple[int, int], tol: float, num_hvps: int, restarts: int, t_start: float, criterion: str
) -> list[EigenResult]:
    """The results of a solve whose operator produced NaN/inf: all NaN, nothing converged."""
    nan = torch.full((sum(ends),), float("nan"), dtype=torch.float64)
    return _by_end(
        ends,
        nan,
        None,
        nan,
        nan,
        torch.zeros(sum(ends), dtype=torch.bool),
        tol=tol,
        criterion=criterion,
        num_hvps=num_hvps,
        restarts=restarts,
        seconds=time.perf_counter() - t_start,
    )


def _dense_solve(
    op: CurvatureOperator,
    ends: tuple[int, int],
    tol: float,
    return_eigenvectors: bool,
    t_start: float,
    criterion: str = "residual",
) -> list[EigenResult]:
    """Small operators: materialise ``A`` with ``n`` products and use ``eigh``."""
    n = op.size
    eye = torch.eye(n, dtype=op.dtype, device=op.device)
    cols = [op.matmat(eye[:, c : c + 64]) for c in range(0, n, 64)]
    dense = torch.cat(cols, dim=1).to(torch.float64)
    dense = 0.5 * (dense + dense.T)
    if not bool(torch.isfinite(dense).all()):
        return _non_finite(ends, tol, n, 0, t_start, criterion)
    values, vectors = torch.linalg.eigh(dense)
    idx = torch.cat([torch.arange(n - 1, n - 1 - ends[0], -1), torch.arange(ends[1])])
    idx = idx.to(values.device)
    vals, vecs = values[idx], vectors[:, idx]
    scale = torch.full_like(vals, max(float(values.abs().max()), torch.finfo(torch.float64).tiny))
    raw = (dense @ vecs - vecs * vals).norm(dim=0)
    resid = (raw / scale).cpu()
    full_raw = torch.zeros(n, dtype=torch.float64, device=values.device)
    full_raw[idx] = raw
    bounds = _error_bounds(values.cpu(), full_raw.cpu(), idx.cpu(), scale.cpu())
    return _by_end(
        ends,
        vals.cpu(),
        vecs.to(op.dtype) if return_eigenvectors else None,
        resid,
        bounds,
        _converged(resid, bounds, tol, criterion, torch.zeros_like(resid)),
        tol=tol,
        criterion=criterion,
        num_hvps=n,
        restarts=0,
        seconds=time.perf_counter() - t_start,
    )


def _wanted_order(theta: Tensor, ends: tuple[int, int]) -> Tensor:
    """Ritz value indices by priority (what a thick restart keeps first).

    The ``ends[0]`` largest (descending), the ``ends[1]`` smallest (ascending), then the others
    alternately from the top and the bottom.
    """
    desc = torch.argsort(theta, descending=True)
    hi, lo = ends
    if lo == 0:
        return desc
    if hi == 0:
        return desc.flip(0)
    j = desc.numel()
    n_hi = min(hi, j)
    n_lo = min(lo, j - n_hi)
    middle = desc[n_hi : j - n_lo]
    rest = torch.stack([middle, middle.flip(0)], dim=1).flatten()[: middle.numel()]
    return torch.cat([desc[:n_hi], desc[j - n_lo :].flip(0), rest])


def _single_step(
    op: CurvatureOperator,
    basis: Tensor,
    proj: Tensor,
    j: int,
    first: int,
    beta_prev: float,
    levels: tuple[float, float],
    tnorm: float,
    generator: torch.Generator,
    n: int,
) -> tuple[float, float]:
    """One single-vector Lanczos step on column ``j`` with partial reorthogonalisation.

    Writes column ``j`` of ``proj`` and the next Lanczos vector ``basis[j + 1]``; returns
    ``(β_j, ‖T‖ estimate)``; ``beta_prev`` is ``β_{j-1}``. The column where the recurrence
    (re)started (``first``: 0, or the residual vector after a thick restart, coupled to every
    kept Ritz vector) is orthogonalised against the whole basis; later columns use the
    three-term recurrence, and the new vector is reorthogonalised only when one of its measured
    inner products with the basis exceeds ``levels[0]`` (``tol`` within ``[ε^(3/4), √ε]``),
    then against every basis
    vector whose inner product exceeds ``levels[1]`` (``ε^(3/4)``); the coefficients of such a
    reorthogonalisation are rounding corrections and stay out of ``proj``.
    """
    sh = op.sharding
    trigger, threshold = levels
    v = basis[j]
    w = op.matvec_into(v, basis[j + 1])  # the next basis row: no vector-sized temporary
    if j == first:  # v_j's own coefficient by an accurate dot, then the rest of the basis
        alpha = dot(v, w, sh)
        w.add_(v, alpha=-alpha)
        col = torch.zeros(j + 1, dtype=torch.float64)
        if j > 0:
            h, _ = project_out(w, basis[:j], sh)
            col[:j] = h.to(torch.float64).cpu()
        rest = dot(v, w, sh)  # what rounding left along v_j
        w.add_(v, alpha=-rest)
        col[j] = alpha + rest
    else:
        w.add_(basis[j - 1], alpha=-beta_prev)
        alpha = dot(v, w, sh)
        w.add_(v, alpha=-alpha)
        col = torch.zeros(j + 1, dtype=torch.float64)
        col[j - 1], col[j] = beta_prev, alpha
    proj[: j + 1, j] = col
    proj[j, : j + 1] = col
    row_sum = float(col.abs().sum())
    if not math.isfinite(row_sum):
        return math.nan, tnorm
    beta = vector_norm(w, sh)
    tnorm = max(tnorm, row_sum + beta)
    if j + 1 >= n:  # the basis spans the whole space: the residual is zero
        return 0.0, tnorm
    if j > first:
        # The true inner products with the whole basis (one pass); the corrective pass only when
        # one of them exceeds the orthogonality threshold.
        h = coefficients(basis[: j + 1], w, sh)
        habs = h.abs()
        if float(habs.max()) > trigger * beta:
            over = (habs > threshold * beta).nonzero().flatten().tolist()
            if 3 * len(over) > j + 1:  # many offenders: one pass over the whole basis
                w.addmv_(basis[: j + 1].T, h, alpha=-1.0)
            else:  # against the offending vectors only (usually the converged Ritz directions)
                for i in over:
                    w.add_(basis[i], alpha=-float(h[i]))
            if vector_norm(w, sh) < DGKS * beta:  # most of w cancelled: rounding may remain
                project_out(w, basis[: j + 1], sh)
            beta = vector_norm(w, sh)
    eps = torch.finfo(w.dtype).eps
    if beta <= 100 * eps * max(tnorm, 1e-300):  # breakdown: an invariant subspace was found
        q, _ = _orthonormalize(torch.zeros_like(w).unsqueeze(1), basis[: j + 1], generator, sh)
        basis[j + 1] = q[:, 0]
        return 0.0, tnorm
    w.div_(beta)
    return beta, tnorm


def _block_step(
    op: CurvatureOperator,
    basis: Tensor,
    proj: Tensor,
    j: int,
    b: int,
    generator: torch.Generator,
    n: int,
) -> Tensor:
    """One block Lanczos step on columns ``j .. j+b-1``, orthogonalised against the whole basis.

    Writes those columns of ``proj`` and the next block ``basis[j+b : j+2b]``; returns the
    coupling ``C_j`` (``(b, b)``, float64, host) of the new block.
    """
    w = op.matmat(basis[j : j + b].T).contiguous()  # (n, b)
    v_prev = basis[: j + b]
    h, _ = project_out_block(w, v_prev, op.sharding)
    h = h.to(torch.float64).cpu()
    proj[: j + b, j : j + b] = h
    proj[j : j + b, : j + b] = h.T
    diag = proj[j : j + b, j : j + b]
    proj[j : j + b, j : j + b] = 0.5 * (diag + diag.T)
    if j + b >= n or not bool(torch.isfinite(h).all()):
        return torch.zeros(b, b, dtype=torch.float64)
    q, c = _orthonormalize(w, v_prev, generator, op.sharding)
    basis[j + b : j + 2 * b] = q.T
    return c.cpu()


@dataclass(frozen=True)
class _Settings:
    """A solve's settings, named and documented as :func:`lanczos`'s arguments."""

    tol: float
    criterion: Criterion
    block_size: int | None
    max_basis: int | None
    max_basis_bytes: int | None
    max_hvps: int | None
    start: Tensor | None
    start_noise: float
    seed: int
    generator: torch.Generator | None
    return_eigenvectors: bool

    @classmethod
    def of(cls, arguments: dict[str, Any]) -> _Settings:
        """The settings among a public solver's ``arguments`` (its ``locals()``), by name."""
        return cls(**{f.name: arguments[f.name] for f in fields(cls)})


def lanczos(
    op: CurvatureOperator,
    k: int = 1,
    *,
    which: Which = "largest",
    tol: float = 1e-3,
    criterion: Criterion = "residual",
    block_size: int | None = None,
    max_basis: int | None = None,
    max_basis_bytes: int | None = None,
    max_hvps: int | None = None,
    start: Tensor | None = None,
    start_noise: float = 0.05,
    seed: int = 0,
    generator: torch.Generator | None = None,
    return_eigenvectors: bool = True,
) -> EigenResult:
    """Extreme eigenpairs of a symmetric operator by thick-restart block Lanczos.

    Each step applies the operator to a block of ``block_size`` vectors (one batched
    Hessian-vector product) and extends the projected matrix. Single vectors follow the
    three-term recurrence with partial reorthogonalisation (one pass over the basis to measure
    the new vector's inner products; those above ε^(3/4) are subtracted, see the module
    docstring); blocks are orthogonalised against the whole basis by Gram–Schmidt with a
    selective second pass. A block of size ``b`` resolves eigenvalues of multiplicity up to
    ``b``; single-vector Lanczos (``b = 1``) finds one copy of an exactly repeated eigenvalue
    per Krylov space, later copies only through rounding; likewise a member of a tight cluster
    (relative spacing far below ``tol``) whose component in the start vector is tiny may not
    have entered the Krylov space when the wanted residuals converge, and is then missed. This
    is inherent to single-vector Krylov methods (ARPACK shares it); a block at least as large as
    the cluster resolves it. When the basis bound reaches the
    dimension (``max_basis >= n``) the operator is instead applied to the identity (``n``
    products) and diagonalised densely, which is exact.

    Args:
        op: the symmetric operator.
        k: number of eigenpairs.
        which: ``"largest"`` (algebraically largest, descending) or ``"smallest"``
            (algebraically smallest, ascending). Never magnitude ordering.
        tol: tolerance for every pair, relative to the spectral scale, in the sense set by
            ``criterion``; in ``(0, 1)``.
        criterion: when a wanted Ritz pair ``(θ_i, v_i)`` counts as converged, with
            ``r_i = A v_i − θ_i v_i`` and the spectral scale ``s = ‖A‖`` (estimated by the
            largest Ritz value magnitude seen; the same for every pair, so eigenvalues at or
            near zero, such as λ_min of a model with exact zero curvature, converge too):

            * ``"residual"`` (default): ``‖r_i‖ <= tol · s``. Then ``(θ_i, v_i)`` is an exact
              eigenpair of ``A + E`` with ``‖E‖ <= tol · ‖A‖`` (a backward-error guarantee), so,
              by Weyl, some eigenvalue of ``A`` lies within ``tol · ‖A‖`` of ``θ_i``, and
              within ``(tol · ‖A‖)² / gap`` of an eigenvalue separated from the rest of the
              spectrum by ``gap``. For λ_max (``|θ| = ‖A‖``) this is a relative error below
              ``tol``; an eigenvalue far below ``‖A‖`` in magnitude is resolved to an absolute
              ``tol · ‖A‖`` at worst.
            * ``"eigenvalue"``: the a-posteriori eigenvalue error bound
              ``min(‖r_i‖, ‖r_i‖² / gap_i) <= tol · s`` (Kato–Temple / Kahan–Parlett–Jiang
              ``|λ − θ_i| <= ‖r_i‖² / gap``) together with the safeguard
              ``‖r_i‖ <= √tol · s``; or the residual test above. Use it when only the
              eigenvalues matter: the eigenvalue error is quadratic in the residual, so it
              stops earlier (never later: the residual test is part of it). The eigenvectors
              then have residuals up to ``√tol`` only.

            ``gap_i`` is an *estimate*: the true gap is from ``θ_i`` to the nearest eigenvalue
            of ``A`` other than the one ``θ_i`` approximates, and Ritz values approach the
            spectrum from inside (for the top pair ``θ_2 <= λ_2``), so the distance to the
            nearest other Ritz value can overstate it, which understates the error. Hence:
            ``gap_i = min_{j≠i}(|θ_i − θ_j| − ‖r_j‖)`` (each neighbour's distance shrunk by its
            own residual: trusted only once the neighbour has settled; if not positive, the
            bound is ``‖r_i‖``); ``θ_i`` must also have moved by at most ``tol · s`` since
            the previous check (typically one extra product); and the safeguard
            ``‖r_i‖ <= √tol · s`` caps the error at ``√tol · s`` (Weyl) whatever the gap
            estimate says. Guarantee: the error is within ``tol · s`` when the gap estimate
            is right, and within ``√tol · s`` always. It can exceed ``tol · s`` when an
            eigenvalue within about ``√tol · s`` of ``θ_i`` has not been resolved yet (a
            near-degenerate pair with relative spacing between ``tol`` and ``√tol``); use
            ``"residual"`` where that matters. Neither criterion detects an eigenvalue that has
            not entered the Krylov space at all (see above). ``result.error_bounds`` holds the
            relative bounds ``min(‖r_i‖, ‖r_i‖² / gap_i) / s``.

            Under either criterion a wanted value whose residual interval contains zero
            (``|θ_i| <= ‖r_i‖``) counts as converged only after ``max(2k + 1, 20)`` products
            (ARPACK's default Krylov dimension; ``k`` both ends together): such a Ritz value
            cannot be told apart from the bulk of a Hessian spectrum near zero, where the
            first Ritz values of a random start in millions of dimensions sit while the
            Krylov space has not reached the end yet (measured: a train-mode ResNet-18 with
            λ_max 129 and λ_min −204 reported λ_max ≈ 1e-4, "converged", after 2 products). A
            true eigenvalue at zero therefore needs ``max_hvps`` of at least that many products
            (below it, it is reported unconverged). Only values whose interval contains zero
            are held back: a bulk away from zero, narrower than ``tol · s``, would still pass.
        block_size: vectors per step (default 1). Use at least the multiplicity of exactly
            repeated eigenvalues you need resolved; larger blocks converge in fewer steps but
            usually more products, so give them a larger ``max_basis``.
        max_basis: most Krylov vectors held at once (memory ``(max_basis + block_size) · n``);
            default ``min(n, max(2k + 10, 20))``.
        max_basis_bytes: bound on the same memory in bytes (this process's slices when the
            operator is sharded): ``max_basis`` is lowered to fit ``(max_basis + block_size)``
            vectors in it. Smaller bases restart more often, which costs a few more products
            (λ_max of an 11 M-parameter ResNet-18 at ``tol=1e-4``: 35 products with 8 vectors,
            32 with 20).
        max_hvps: operator applications allowed before giving up (results are then returned
            with ``converged`` False where the tolerance was not met); at least
            ``k + block_size - 1``; default ``max(20 · max_basis, 200)``.
        start: warm start: a vector ``(n,)`` or block ``(n, p)`` (e.g. the previous Ritz
            vectors), summed round-robin into the first block.
        start_noise: weight of a random unit vector added to each warm-start column, so
            directions outside the previous subspace are still explored.
        seed: seed of the private generator for random vectors (ignored if ``generator`` is
            given). The global RNG is never touched.
        generator: an explicit ``torch.Generator`` on the operator's device.
        return_eigenvectors: keep the ``(n, k)`` Ritz vectors in the result.

    Returns:
        An :class:`~lightning_landscape.results.EigenResult`. If the operator produces NaN/inf,
        the solve stops and returns NaN eigenvalues with ``converged`` all False (check
        ``result.is_finite``) rather than raising.

    Raises:
        ValueError: on invalid ``k``, ``which``, ``tol``, ``criterion``, ``block_size``,
            ``max_basis``, ``max_basis_bytes``, ``max_hvps`` or ``start``.

    Example:
        >>> import torch
        >>> from lightning_landscape.operators import MatrixOperator
        >>> from lightning_landscape.solvers import lanczos
        >>> a = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = lanczos(MatrixOperator(a), k=2, tol=1e-8)
        >>> [round(x, 8) for x in res.eigenvalues.tolist()]
        [100.0, 99.0]
    """
    integer("k", k)
    choice("which", which, _WHICH)
    ends = (k, 0) if which == "largest" else (0, k)
    return _solve(op, ends, _Settings.of(locals()))[0]


def lanczos_ends(
    op: CurvatureOperator,
    k_largest: int = 1,
    k_smallest: int = 1,
    *,
    tol: float = 1e-3,
    criterion: Criterion = "residual",
    block_size: int | None = None,
    max_basis: int | None = None,
    max_basis_bytes: int | None = None,
    max_hvps: int | None = None,
    start: Tensor | None = None,
    start_noise: float = 0.05,
    seed: int = 0,
    generator: torch.Generator | None = None,
    return_eigenvectors: bool = True,
) -> tuple[EigenResult, EigenResult]:
    """The largest and the smallest eigenpairs of a symmetric operator from one Krylov space.

    Lanczos resolves both ends of the spectrum at once: one thick-restart solve (the same
    algorithm, tolerance and guarantees as :func:`lanczos`) keeps the wanted Ritz vectors at
    both ends through its restarts and stops when all ``k_largest + k_smallest`` have converged.
    Sharpness and λ_min together then cost about as many products as the slower of the two
    alone, not their sum. The basis must hold both ends' vectors: the default ``max_basis`` is
    that of ``k = k_largest + k_smallest``.

    Args:
        op: the symmetric operator.
        k_largest: number of algebraically largest eigenpairs (``>= 1``).
        k_smallest: number of algebraically smallest eigenpairs (``>= 1``).
        tol: as in :func:`lanczos` (relative to the spectral scale, the same for every pair).
        criterion: as in :func:`lanczos`.
        block_size: as in :func:`lanczos`.
        max_basis: as in :func:`lanczos`, for ``k = k_largest + k_smallest``.
        max_basis_bytes: as in :func:`lanczos`.
        max_hvps: as in :func:`lanczos`.
        start: warm start (e.g. the previous top and bottom Ritz vectors side by side).
        start_noise: as in :func:`lanczos`.
        seed: as in :func:`lanczos`.
        generator: as in :func:`lanczos`.
        return_eigenvectors: as in :func:`lanczos`.

    Returns:
        ``(largest, smallest)``: two :class:`~lightning_landscape.results.EigenResult` of
        ``which="largest"`` (descending) and ``"smallest"`` (ascending). The solve's products,
        restarts and seconds are counted once, in ``largest``; ``smallest`` reports ``0``
        products and ``0.0`` seconds.

    Raises:
        ValueError: on invalid arguments, as :func:`lanczos`.

    Example:
        >>> import torch
        >>> from lightning_landscape.operators import MatrixOperator
        >>> from lightning_landscape.solvers import lanczos_ends
        >>> a = torch.diag(torch.linspace(-3.0, 10.0, 200, dtype=torch.float64))
        >>> top, bottom = lanczos_ends(MatrixOperator(a), 2, 1, tol=1e-8)
        >>> [round(x, 6) for x in top.eigenvalues.tolist()], round(bottom.eigenvalues[0].item(), 6)
        ([10.0, 9.934673], -3.0)
    """
    integer("k_largest", k_largest)
    integer("k_smallest", k_smallest)
    top, bottom = _solve(op, (k_largest, k_smallest), _Settings.of(locals()))
    return top, bottom


def _solve(op: CurvatureOperator, ends: tuple[int, int], settings: _Settings) -> list[EigenResult]:
    """Thick-restart Lanczos for the ``ends[0]`` largest and ``ends[1]`` smallest eigenpairs.

    Returns one result per requested end (largest first); the cost is counted in the first.
    """
    t_start = time.perf_counter()
    tol, criterion = settings.tol, settings.criterion
    local, dtype, device, sh = op.size, op.dtype, op.device, op.sharding
    n = op.global_size
    k = sum(ends)
    m = _validate(k, n, "largest", tol, settings.max_basis, criterion)
    optional_integer("block_size", settings.block_size)
    b = 1 if settings.block_size is None else max(1, min(settings.block_size, n - m, m - k))
    cap = optional_integer("max_basis_bytes", settings.max_basis_bytes)
    if cap is not None:
        vector = local * dtype.itemsize
        fits = cap // max(vector, 1) - b
        if fits < min(k + 1, n):
            raise ValueError(
                f"max_basis_bytes={cap} holds {fits + b} vectors of {vector} bytes, "
                f"too few for k={k}: at least k + 1 + block_size = {k + 1 + b} are needed, "
                f"i.e. max_basis_bytes >= {(k + 1 + b) * vector}."
            )
        m = min(m, fits)
        b = max(1, min(b, m - k))
    budget = max(20 * m, 200) if settings.max_hvps is None else int(settings.max_hvps)
    # Products after which a wanted value near zero is accepted (see _separated). Not capped by
    # the budget: a solve that runs out first reports such a value unconverged.
    floor = min(max(2 * k + 1, 20), n)
    if budget < k + b - 1:
        raise ValueError(
            f"max_hvps={settings.max_hvps} cannot reach k={k} Ritz pairs with blocks of {b}: "
            f"use max_hvps >= {k + b - 1}."
        )
    if settings.start is not None and (
        settings.start.ndim not in (1, 2) or settings.start.shape[0] != local
    ):
        raise ValueError(
            f"start vectors must have {local} rows, got shape {tuple(settings.start.shape)}"
        )
    if m >= n and budget >= n and sh is None:
        return _dense_solve(op, ends, tol, settings.return_eigenvectors, t_start, criterion)
    generator = settings.generator
    if generator is None:
        generator = private_generator(op, settings.seed)

    basis = torch.empty(m + b, local, dtype=dtype, device=device)  # rows are Lanczos vectors
    proj = torch.zeros(m, m, dtype=torch.float64)  # V^T A V, on the host
    basis[:b] = _start_block(
        local, b, dtype, device, generator, settings.start, settings.start_noise, sh
    ).T
    coupling = torch.zeros(b, b, dtype=torch.float64)
    eps = torch.finfo(dtype).eps
    levels = (semi_orthogonality(eps, tol), orthogonality_threshold(eps))

    j = 0  # completed columns of `proj`
    first = 0  # the column where the current recurrence (re)started: orthogonalised in full
    num_hvps = 0
    restarts = 0
    theta = s_vecs = None
    result_cols = torch.arange(0)
    resid = torch.zeros(0, dtype=torch.float64)
    bounds = torch.zeros(0, dtype=torch.float64)
    converged = torch.zeros(0, dtype=torch.bool)  # the wanted pairs' flags at the last check
    moved: Tensor | None = None
    previous: Tensor | None = None  # the wanted Ritz values at the previous check
    anorm = 0.0  # the largest Ritz value magnitude seen: the spectral scale
    tnorm = 0.0  # the largest row sum of |T|: the breakdown test's ‖A‖
    while True:
        # ---- one Lanczos step: columns j .. j+b-1
        if b == 1:
            beta_prev = float(coupling[0, 0])
            beta, tnorm = _single_step(
                op, basis, proj, j, first, beta_prev, levels, tnorm, generator, n
            )
            coupling = torch.full((1, 1), beta, dtype=torch.float64)
        else:
            coupling = _block_step(op, basis, proj, j, b, generator, n)
        num_hvps += b
        if not (
            bool(torch.isfinite(proj[: j + b, j : j + b]).all())
            and math.isfinite(float(coupling.sum()))
        ):
            return _non_finite(ends, tol, num_hvps, restarts, t_start, criterion)
        j += b

        out_of_budget = num_hvps + b > budget
        if j < min(k, m) and not out_of_budget:
            continue

        # ---- Rayleigh-Ritz on the current basis
        projected = proj[:j, :j]
        if not bool(torch.isfinite(projected).all()):
            return _non_finite(ends, tol, num_hvps, restarts, t_start, criterion)
        theta, s_vecs = torch.linalg.eigh(projected)
        order = _wanted_order(theta, ends)
        # The spectral scale: the largest Ritz value magnitude seen (Ritz values lie inside the
        # spectrum, so it approaches ‖A‖ from below and never drops after a restart).
        anorm = max(anorm, float(theta.abs().max()), torch.finfo(torch.float64).tiny)
        kk = min(k, j)
        result_cols = order[:kk]
        raw = (coupling @ s_vecs[j - b : j]).norm(dim=0)  # every Ritz pair's ‖r‖
        scale = torch.full((kk,), anorm, dtype=theta.dtype)
        resid = raw[result_cols] / scale
        bounds = _error_bounds(theta, raw, result_cols, scale)
        current = theta[result_cols]
        moved = None
        if previous is not None and previous.shape == current.shape:
            moved = (current - previous).abs() / scale
        previous = current
        exhausted = j >= n
        separated = _separated(current, raw[result_cols], num_hvps, floor)
        converged = _converged(resid, bounds, tol, criterion, moved) & separated
        done = kk == k and bool(converged.all())
        if done or out_of_budget or exhausted:
            break
        if j + b <= m:
            continue

        # ---- thick restart: keep the wanted Ritz vectors plus half of the rest
        keep = max(k, min(m - b, k + (m - k) // 2))
        keep_cols = order[:keep]
        combine_rows(basis[:j], s_vecs[:, keep_cols], out=basis[:keep])  # in place
        basis[keep : keep + b] = basis[j : j + b]
        cpl = coupling @ s_vecs[j - b : j, keep_cols]  # (b, keep)
        proj.zero_()
        proj[:keep, :keep] = torch.diag(theta[keep_cols])
        proj[keep : keep + b, :keep] = cpl
        proj[:keep, keep : keep + b] = cpl.T
        if b == 1:  # the residual was only orthogonal to ε^(3/4): make it so to rounding
            q = basis[keep]
            project_out(q, basis[:keep], sh)
            q.div_(vector_norm(q, sh))
        j = first = keep
        restarts += 1

    assert theta is not None and s_vecs is not None
    vectors = None
    if settings.return_eigenvectors:
        vectors = combine_rows(basis[:j], s_vecs[:, result_cols]).T  # (n, kk): contiguous columns
    return _by_end(
        ends,
        theta[result_cols].to(torch.float64),
        vectors,
        resid,
        bounds,
        converged,
        tol=tol,
        criterion=criterion,
        num_hvps=num_hvps,
        restarts=restarts,
        seconds=time.perf_counter() - t_start,
    )
