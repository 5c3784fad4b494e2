"""Hutch++ trace estimation (Meyer, Musco, Musco & Woodruff, 2021).

Hutch++ spends a third of its matrix-vector products on a sketch ``Q`` of the dominant range,
takes ``tr(QᵀAQ)`` exactly, and estimates the trace of the deflated remainder
``(I − QQᵀ)A(I − QQᵀ)`` with Hutchinson's estimator. For the quickly decaying spectra of neural
network Hessians this is far more accurate than plain Hutchinson for the same cost.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from ..operators import CurvatureOperator
from ._orthogonality import all_sum, coefficients, orthonormal_columns, private_generator
from .results import TraceResult


def _rademacher(n: int, b: int, like: Tensor, generator: torch.Generator) -> Tensor:
    bits = torch.randint(0, 2, (n, b), device=like.device, generator=generator)
    return bits.to(like.dtype) * 2 - 1


def hutchpp_trace(
    op: CurvatureOperator,
    num_hvps: int = 30,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> TraceResult:
    """Estimate ``tr(A)`` of a symmetric operator with Hutch++.

    The budget is split into a sketch of ``s = ⌊num_hvps / 3⌋`` vectors (``s`` products to form
    ``AS`` and ``s`` more for ``AQ``) and ``num_hvps − 2s`` Hutchinson probes on the deflated
    remainder. When the sketch spans the whole space (``s >= n``) the result is exact and its
    standard error is 0.

    Args:
        op: the symmetric operator.
        num_hvps: operator applications to spend (at least 3).
        seed: seed for the private generator (ignored if ``generator`` is given).
        generator: an explicit ``torch.Generator`` on the operator's device.

    Returns:
        A :class:`~lightning_landscape.results.TraceResult` whose ``stderr`` is the standard error
        of the Hutchinson part (the sketch part is exact).

    Raises:
        ValueError: if ``num_hvps < 3``.

    Example:
        >>> import torch
        >>> from lightning_landscape.operators import MatrixOperator
        >>> from lightning_landscape.solvers import hutchpp_trace
        >>> res = hutchpp_trace(MatrixOperator(torch.diag(torch.tensor([5.0, 1.0]))), num_hvps=6)
        >>> round(res.trace, 4)
        6.0
    """
    if num_hvps < 3:
        raise ValueError(f"Hutch++ needs num_hvps >= 3, got {num_hvps}")
    t_start = time.perf_counter()
    n, local, sh = op.global_size, op.size, op.sharding
    if generator is None:
        generator = private_generator(op, seed)
    like = torch.empty(0, dtype=op.dtype, device=op.device)
    s = min(num_hvps // 3, n)
    sketch = op.matmat(_rademacher(local, s, like, generator))
    q, r = orthonormal_columns(sketch, sh)
    for _ in range(3):  # sharded: a dependent sketch column comes back zero; draw a new one
        dead = r.diagonal() == 0
        if sh is None or not bool(dead.any()):
            break
        fresh = _rademacher(local, int(dead.sum()), like, generator)
        q, r = orthonormal_columns(torch.cat([q[:, ~dead], fresh], dim=1), sh)
    aq = op.matmat(q)
    exact_part = all_sum([float(torch.sum(q * aq))], sh)[0]
    used = 2 * s
    if s >= n:
        return TraceResult(exact_part, 0.0, used, 0, "hutch++", time.perf_counter() - t_start)
    g = num_hvps - used
    probes = _rademacher(local, g, like, generator)
    probes = probes - q @ coefficients(q.T, probes, sh)
    ag = op.matmat(probes)
    used += g
    samples = torch.sum(probes * ag, dim=0).to(torch.float64).cpu()
    if sh is not None:
        samples = sh.reduce(samples)
    remainder = float(samples.mean())
    stderr = float(samples.std(unbiased=True) / math.sqrt(g)) if g > 1 else float("nan")
    return TraceResult(
        exact_part + remainder, stderr, used, g, "hutch++", time.perf_counter() - t_start
    )
