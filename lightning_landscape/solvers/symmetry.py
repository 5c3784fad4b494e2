"""Is an operator symmetric? A cheap test of Hessian-vector products against ``uᵀAv = vᵀAu``.

A Hessian computed by autograd is symmetric whenever every operation's backward pass is itself
differentiated correctly: double backward then differentiates a scalar function twice. An
operation whose backward is *not* differentiable by autograd breaks this silently: a fused
kernel (a ``torch.autograd.Function`` whose backward calls a custom kernel or runs under
``no_grad``, or one marked ``@once_differentiable``) makes the second differentiation treat its
gradient as a constant, so the product loses the second-order terms through it and the
eigenvalues come out wrong without any error. On a 4-layer Hugging Face GPT-2 whose final
LayerNorm was such a kernel, λ_max came out 41.7 instead of 47.6, and the defect measured 0.23
against 1.0e-6 for the unmodified model (``benchmarks/product_symmetry.py``). Those lost terms
are rarely symmetric, which is what :func:`symmetry_defect` detects, with a few products.

A stop-gradient in the forward pass (``x.detach()``, straight-through estimators) does not show:
autograd then differentiates the surrogate function in which the detached value is a constant,
twice, consistently, and its Hessian is symmetric.
"""

from __future__ import annotations

import math
import time

import torch

from .._validate import integer, real
from ..operators import CurvatureOperator
from ._orthogonality import dot, private_generator, vector_norm
from .results import SymmetryResult
from .trace import _rademacher

#: Default tolerance on :attr:`SymmetryResult.defect` for float32/float64 operators. Correct
#: float32 products measured 1.0e-6 to 4.5e-6 at 3.4 M to 27 M parameters (ResNet-18 with running
#: and with batch statistics, two GPTs); one kernel-style LayerNorm in a GPT-2, 0.23 and 0.34
#: (``benchmarks/product_symmetry.py``).
SYMMETRY_TOLERANCE = 1e-2


def symmetry_defect(
    op: CurvatureOperator,
    num_vectors: int = 4,
    *,
    tol: float | None = None,
    seed: int = 0,
) -> SymmetryResult:
    """How far ``op``'s products are from a symmetric matrix's, from ``num_vectors`` products.

    Draws ``num_vectors`` random ``±1`` vectors ``v_i`` from a private generator (the global RNG
    is not touched), applies the operator to each, and compares ``v_jᵀ(A v_i)`` with
    ``v_iᵀ(A v_j)`` over every pair, relative to the size such a product has for random vectors
    (``√(‖Av_i‖² + ‖Av_j‖²)``). Memory: the vectors and one product. Sharded operators
    (FSDP) reduce the inner products over their shards.

    Args:
        op: the operator (e.g. a :class:`~lightning_landscape.HessianOperator`).
        num_vectors: random vectors, at least 2 (``k`` vectors give ``k(k−1)/2`` pairs; with 4,
            a defect far above rounding cannot hide behind one unlucky pair).
        tol: the largest defect accepted as symmetric; default
            :data:`SYMMETRY_TOLERANCE` (``1e-2``) for float32 and float64, ``0.3`` for 16-bit
            operators, whose own rounding is of the order of 1e-2.
        seed: seed of the private generator.

    Returns:
        A :class:`~lightning_landscape.solvers.SymmetryResult`.

    Raises:
        ValueError: if ``num_vectors < 2`` or ``tol`` is not positive.

    Example:
        >>> import torch
        >>> from lightning_landscape.operators import MatrixOperator
        >>> from lightning_landscape.solvers import symmetry_defect
        >>> a = torch.randn(50, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> symmetry_defect(MatrixOperator(a + a.T)).symmetric
        True
        >>> symmetry_defect(MatrixOperator(a)).symmetric  # a random matrix: defect about 1
        False
    """
    k = integer("num_vectors", num_vectors, minimum=2)
    if tol is None:
        tol = SYMMETRY_TOLERANCE if torch.finfo(op.dtype).bits >= 32 else 0.3
    tol = real("tol", tol, low=0)
    t0 = time.perf_counter()
    sh = op.sharding
    like = torch.empty(0, dtype=op.dtype, device=op.device)
    vectors = _rademacher(op.size, k, like, private_generator(op, seed))  # (n, k) column view
    cross = torch.zeros(k, k, dtype=torch.float64)  # cross[j, i] = v_jᵀ A v_i
    norms = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        product = op.matvec(vectors[:, i])
        norms[i] = vector_norm(product, sh)
        for j in range(k):
            if j != i:
                cross[j, i] = dot(vectors[:, j], product, sh)
        del product
    terms = []
    for i in range(k):
        for j in range(i + 1, k):
            scale = math.sqrt(float(norms[i] ** 2 + norms[j] ** 2))
            diff = float(cross[j, i] - cross[i, j])
            terms.append(0.0 if scale == 0.0 else diff / scale)  # zero products: A v = 0
    defect = math.sqrt(sum(t * t for t in terms) / len(terms))
    return SymmetryResult(
        defect=defect,
        tolerance=tol,
        num_hvps=k,
        num_vectors=k,
        seconds=time.perf_counter() - t0,
    )
