"""Spectral density by stochastic Lanczos quadrature (SLQ; Golub & Meurant, Ubaru et al. 2017).

Each run starts single-vector Lanczos from a random Rademacher unit vector ``v`` and builds the
``m × m`` tridiagonal ``T = VᵀAV``. Its eigenvalues ``θ_j`` (Ritz values) and the squared first
components ``τ_j = (e₁ᵀ s_j)²`` of its eigenvectors form the Gauss quadrature rule of the spectral
measure ``μ_v = Σ_i (q_iᵀv)² δ(λ − λ_i)``: ``vᵀ f(A) v ≈ Σ_j τ_j f(θ_j)``, exact for polynomials
of degree ``< 2m``. Since ``E[μ_v] = (1/n) Σ_i δ(λ − λ_i)``, the mean over runs estimates the
normalised spectral density (Ghorbani, Krishnan & Xiao 2019; Papyan 2020).

The weights are the squared *first* components; PyHessian used the whole squared eigenvectors
for a while (fixed in its PR #23). Every Lanczos vector is orthogonalised twice against all
previous ones, so there are no spurious copies of converged Ritz values.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from .._validate import integer
from ..operators import CurvatureOperator
from ._orthogonality import private_generator
from .results import DensityResult

_BREAKDOWN_REL = 100.0  # β <= min(100 ε, 1e-3) · ‖T‖ ends a run: an invariant subspace was found


def _lanczos_runs(
    op: CurvatureOperator, starts: Tensor, m: int
) -> tuple[Tensor, Tensor, list[int], int, bool]:
    """``m`` Lanczos steps from each column of ``starts`` (unit vectors), in lockstep.

    Returns ``(alpha, beta, lengths, num_hvps, finite)``: the diagonals ``(b, m)`` and
    off-diagonals ``(b, m)`` of each run's tridiagonal in float64, the steps each run completed
    (fewer than ``m`` after a breakdown), the products spent, and whether everything was finite.
    """
    n, b = starts.shape
    sh = op.sharding

    def summed(t: Tensor) -> Tensor:  # partial inner products summed over the shards
        return t if sh is None else sh.reduce(t.to(torch.float64)).to(t.dtype)

    eps = torch.finfo(starts.dtype).eps
    rel_tol = min(_BREAKDOWN_REL * eps, 1e-3)
    basis = torch.empty(b, m, n, dtype=starts.dtype, device=starts.device)
    basis[:, 0] = starts.T
    alpha = torch.zeros(b, m, dtype=torch.float64)
    beta = torch.zeros(b, m, dtype=torch.float64)
    anorm = torch.zeros(b, dtype=torch.float64)
    lengths = [m] * b
    active = list(range(b))
    num_hvps = 0
    for j in range(m):
        idx = torch.tensor(active, device=starts.device)
        every = len(active) == b
        w = op.matmat(basis[:, j].T if every else basis[idx, j].T).T  # (a, n)
        num_hvps += len(active)
        vs = basis[:, : j + 1] if every else basis[idx, : j + 1]  # (a, j+1, n)
        h = summed(torch.bmm(vs, w.unsqueeze(2)))  # (a, j+1, 1)
        w = w - torch.bmm(h.transpose(1, 2), vs).squeeze(1)
        h2 = summed(torch.bmm(vs, w.unsqueeze(2)))
        w = w - torch.bmm(h2.transpose(1, 2), vs).squeeze(1)
        diag = (h + h2)[:, j, 0].to(torch.float64).cpu()
        if sh is None:
            norms = w.norm(dim=1).to(torch.float64).cpu()  # the one host sync per step
        else:
            norms = sh.reduce((w.to(torch.float64) ** 2).sum(dim=1).cpu()).sqrt()
        if not bool(torch.isfinite(diag).all() and torch.isfinite(norms).all()):
            return alpha, beta, lengths, num_hvps, False
        rows = torch.tensor(active)
        alpha[rows, j] = diag
        if j == m - 1:
            break
        anorm[rows] = torch.maximum(anorm[rows], torch.maximum(diag.abs(), norms))
        broke = norms <= rel_tol * anorm[rows]
        beta[rows, j] = torch.where(broke, 0.0, norms)
        still: list[int] = []
        for i, r in enumerate(active):
            if bool(broke[i]):
                lengths[r] = j + 1
            else:
                norm = w[i].norm() if sh is None else float(norms[i])
                basis[r, j + 1] = w[i] / norm
                still.append(r)
        active = still
        if not active:
            break
    return alpha, beta, lengths, num_hvps, True


def spectral_density(
    op: CurvatureOperator,
    *,
    num_runs: int = 8,
    lanczos_steps: int = 40,
    seed: int = 0,
    generator: torch.Generator | None = None,
    parallel_runs: int = 1,
) -> DensityResult:
    """Estimate the spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Each of ``num_runs`` runs draws a Rademacher start vector ``v / √n`` and takes
    ``m = min(lanczos_steps, n)`` steps of single-vector Lanczos with full reorthogonalisation
    (each step orthogonalises twice against the whole basis; coefficients kept in float64). The
    eigenvalues ``θ_j`` of the run's tridiagonal ``T`` are its quadrature nodes and the squared
    first components of ``T``'s eigenvectors its weights ``τ_j`` (they sum to 1). A run stops
    early when ``β ≈ 0`` (its Krylov space is invariant; the nodes are then exact eigenvalues
    and its weights the exact squared projections of ``v`` onto those eigenspaces).

    Cost: ``num_runs · m`` products (fewer after breakdowns) and memory for ``parallel_runs · m``
    vectors of length ``n``. Extreme nodes converge to ``λ_min`` / ``λ_max`` quickly when they
    are separated; :meth:`~lightning_landscape.results.DensityResult.moment` gives unbiased
    ``(1/n) tr(Aᵖ)`` estimates for ``p < 2m``.

    Args:
        op: the symmetric operator.
        num_runs: independent start vectors (>= 1). The estimates' standard errors fall as
            ``1/√num_runs``.
        lanczos_steps: Lanczos steps (quadrature nodes) per run (>= 1); capped at ``n``.
        seed: seed of the private generator for the start vectors (ignored if ``generator`` is
            given). The global RNG is never touched.
        generator: an explicit ``torch.Generator`` on the operator's device.
        parallel_runs: runs advanced in lockstep, one batched product of ``parallel_runs``
            vectors per step (>= 1). Start vectors are drawn up front, so the result does not
            depend on it beyond rounding; larger values use more memory but fewer, larger
            products (faster on accelerators and with vmapped Hessian products).

    Returns:
        A :class:`~lightning_landscape.results.DensityResult`. If the operator produces NaN/inf
        the solve stops and returns all-NaN nodes and weights (``result.is_finite`` is False)
        rather than raising.

    Raises:
        ValueError: if ``num_runs``, ``lanczos_steps`` or ``parallel_runs`` is not a positive
            integer.

    Example:
        >>> import torch
        >>> from lightning_landscape.operators import MatrixOperator
        >>> from lightning_landscape.solvers import spectral_density
        >>> a = torch.diag(torch.tensor([-1.0, 1.0, 2.0, 3.0], dtype=torch.float64))
        >>> res = spectral_density(MatrixOperator(a), num_runs=4, lanczos_steps=10)
        >>> res.nodes.shape  # the steps are capped at n = 4, where the nodes are exact
        torch.Size([4, 4])
        >>> [round(x, 6) for x in res.nodes[0].tolist()]
        [-1.0, 1.0, 2.0, 3.0]
        >>> round(res.moment(1) * 4, 6)  # the trace
        5.0
        >>> round(res.negative_mass(), 6)
        0.25
    """
    t_start = time.perf_counter()
    num_runs = integer("num_runs", num_runs)
    lanczos_steps = integer("lanczos_steps", lanczos_steps)
    parallel_runs = integer("parallel_runs", parallel_runs)
    n, dtype, device = op.global_size, op.dtype, op.device
    m = min(lanczos_steps, n)
    if generator is None:
        generator = private_generator(op, seed)
    bits = torch.randint(0, 2, (op.size, num_runs), device=device, generator=generator)
    starts = (bits.to(dtype) * 2 - 1) / n**0.5

    nodes = torch.full((num_runs, m), float("nan"), dtype=torch.float64)
    weights = torch.zeros(num_runs, m, dtype=torch.float64)
    num_steps = [0] * num_runs
    num_hvps = 0
    for g0 in range(0, num_runs, parallel_runs):
        g1 = min(g0 + parallel_runs, num_runs)
        alpha, beta, lengths, used, finite = _lanczos_runs(op, starts[:, g0:g1], m)
        num_hvps += used
        if not finite:
            nan = torch.full((num_runs, m), float("nan"), dtype=torch.float64)
            return DensityResult(
                nodes=nan,
                weights=nan.clone(),
                num_runs=num_runs,
                lanczos_steps=lanczos_steps,
                num_steps=(0,) * num_runs,
                num_hvps=num_hvps,
                seconds=time.perf_counter() - t_start,
            )
        for i, k in enumerate(lengths):
            off = beta[i, : k - 1]
            tri = torch.diag(alpha[i, :k]) + torch.diag(off, 1) + torch.diag(off, -1)
            theta, vecs = torch.linalg.eigh(tri)
            nodes[g0 + i, :k] = theta
            weights[g0 + i, :k] = vecs[0] ** 2
            num_steps[g0 + i] = k
    return DensityResult(
        nodes=nodes,
        weights=weights,
        num_runs=num_runs,
        lanczos_steps=lanczos_steps,
        num_steps=tuple(num_steps),
        num_hvps=num_hvps,
        seconds=time.perf_counter() - t_start,
    )
