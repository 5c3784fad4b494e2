"""Gram–Schmidt kernels and Simon's orthogonality estimate for the Lanczos solver.

Everything here is bandwidth-bound vector work on ``(n,)`` vectors and an ``(m, n)`` row-major
basis: at 10 M parameters one pass over a 20-vector basis reads 0.9 GB, about a quarter of a cheap
Hessian-vector product on a CPU. The kernels therefore count passes:

* :func:`project_out` — classical Gram–Schmidt against the basis (2 passes), with the second,
  corrective pass only when the first one cancelled most of the vector (the Daniel–Gragg–
  Kaufman–Stewart test, η = 1/√2) instead of always ("twice is enough" costs 4 passes);
* :func:`orthogonality_threshold` — single-vector Lanczos runs on the three-term recurrence,
  measures the new vector's inner products with the basis (one pass) and subtracts those above
  this threshold (usually a few: the converged Ritz directions): partial reorthogonalisation in
  the sense of Simon (1984), with measured instead of estimated inner products (estimates by
  Simon's recurrence fell short of the true ones by 17× on a test matrix, so they are not trusted
  to skip the pass).

Dot products and norms of long float32 vectors go through :func:`dot` (chunks summed in float64):
``torch.linalg.vector_norm`` of a float32 vector of 10⁷ entries was measured 4e-4 off on the CPU
and a plain ``torch.dot`` of it with itself 9e-5, enough to bias a Ritz value at ``tol=1e-4``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DGKS = 1.0 / math.sqrt(2.0)  # a second Gram–Schmidt pass when ‖w_after‖ < DGKS · ‖w_before‖


_CHUNK = 1 << 18  # float32 dot products of this length are accurate to ~1e-7 relative


def dot(x: Tensor, y: Tensor) -> float:
    """``xᵀy`` of two vectors, accurate in float32 at any length.

    One float32 ``torch.dot`` over 10⁷ entries was measured 9e-5 off for ``xᵀx`` on the CPU
    (``torch.linalg.vector_norm`` 4e-4): enough to bias a Ritz value at ``tol=1e-4``. Chunks of
    2¹⁸ entries (errors ≤ 4e-7) are summed in float64 instead; the cost is that of one dot.
    """
    n = x.numel()
    if n <= _CHUNK or x.dtype == torch.float64:
        return float(torch.dot(x, y))
    return math.fsum(
        float(torch.dot(x[i : i + _CHUNK], y[i : i + _CHUNK])) for i in range(0, n, _CHUNK)
    )


def vector_norm(x: Tensor) -> float:
    """``‖x‖₂`` of a vector through :func:`dot` (accurate in float32 at 10⁷ entries)."""
    return math.sqrt(max(dot(x, x), 0.0))


def column_norms(x: Tensor) -> Tensor:
    """Column norms of an ``(n, b)`` block, each through :func:`vector_norm`.

    (Not through the Gram matrix ``xᵀx``: that float32 GEMM over 5·10⁶ rows was measured 3e-3 off.)
    """
    norms = [vector_norm(x[:, i].contiguous()) for i in range(x.shape[1])]
    return torch.tensor(norms, dtype=x.dtype, device=x.device)


def project_out(w: Tensor, basis: Tensor) -> tuple[Tensor, float]:
    """Remove from ``w`` (a vector ``(n,)``, in place) its components along the rows of ``basis``.

    One classical Gram–Schmidt pass, and a second only when the first cancelled more than
    ``1 − DGKS`` of ``w``'s norm (then rounding in the first pass may have left components of
    relative size ``ε · ‖w_before‖ / ‖w_after‖``).

    Args:
        w: the vector, overwritten.
        basis: ``(j, n)`` orthonormal rows.

    Returns:
        ``(h, before)``: the total coefficients ``basis @ w_original`` (``(j,)``, ``w``'s dtype)
        and ``‖w‖`` before the projection.
    """
    before = vector_norm(w)
    h = basis @ w
    w.addmv_(basis.T, h, alpha=-1.0)
    if vector_norm(w) < DGKS * before:
        h2 = basis @ w
        w.addmv_(basis.T, h2, alpha=-1.0)
        h += h2
    return h, before


def project_out_block(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`project_out` for an ``(n, b)`` block (in place).

    Returns:
        ``(h, before)``: coefficients ``(j, b)`` and the column norms before the projection.
    """
    before = column_norms(w)
    h = basis @ w
    w.addmm_(basis.T, h, alpha=-1.0)
    if bool((column_norms(w) < DGKS * before).any()):
        h2 = basis @ w
        w.addmm_(basis.T, h2, alpha=-1.0)
        h += h2
    return h, before


def orthogonality_threshold(eps: float) -> float:
    """Largest ``|v_iᵀ v_j|`` a Lanczos basis may reach before a vector is reorthogonalised.

    ``ε^(3/4)`` (the usual choice of partial reorthogonalisation): well inside
    semi-orthogonality (``√ε``, which is enough for the Ritz values, Simon 1984), and tight
    enough that the Ritz vectors are orthonormal, and their reported residuals exact, to about
    ``ε^(3/4) · ‖A‖`` (6e-6 in float32, 2e-12 in float64).

    Args:
        eps: unit roundoff of the basis' dtype.

    Returns:
        The threshold.
    """
    return float(eps**0.75)
