"""symmetry_defect: on matrices of known asymmetry and on Hessians of models with fused kernels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_landscape import (
    HessianOperator,
    MatrixOperator,
    SymmetryResult,
    curvature_context,
    symmetry_defect,
)
from lightning_landscape.solvers import SYMMETRY_TOLERANCE
from tests._models import KernelMLP, classification_loss

F64 = torch.float64


def _symmetric(n: int = 120, seed: int = 0) -> Tensor:
    a = torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return a + a.T


def _relative_asymmetry(a: Tensor) -> float:
    """``‖A − Aᵀ‖_F / (√2 ‖A‖_F)``: what the defect estimates."""
    return float((a - a.T).norm() / (math.sqrt(2.0) * a.norm()))


def test_a_symmetric_matrix_passes_to_rounding() -> None:
    res = symmetry_defect(MatrixOperator(_symmetric()))
    assert isinstance(res, SymmetryResult)
    assert res.defect < 1e-14 and res.symmetric
    assert res.num_hvps == res.num_vectors == 4
    assert res.tolerance == SYMMETRY_TOLERANCE and res.seconds >= 0.0


@pytest.mark.parametrize("scale", [0.02, 0.1, 0.5])
def test_the_defect_estimates_the_relative_antisymmetric_part(scale: float) -> None:
    """Over 20 seeds the RMS defect is within 25 % of ‖A − Aᵀ‖_F / (√2 ‖A‖_F)."""
    s = _symmetric()
    k = torch.randn(120, 120, dtype=F64, generator=torch.Generator().manual_seed(1))
    a = s + scale * float(s.norm() / k.norm()) * (k - k.T)
    truth = _relative_asymmetry(a)
    defects = [symmetry_defect(MatrixOperator(a), seed=seed).defect for seed in range(20)]
    rms = math.sqrt(sum(d * d for d in defects) / len(defects))
    assert rms == pytest.approx(truth, rel=0.25)
    assert all(not symmetry_defect(MatrixOperator(a), seed=seed).symmetric for seed in range(5))


def test_counts_one_product_per_vector_and_leaves_the_global_rng() -> None:
    op = MatrixOperator(_symmetric(30))
    state = torch.get_rng_state()
    symmetry_defect(op, num_vectors=6, seed=3)
    assert op.num_matvecs == 6
    assert torch.equal(torch.get_rng_state(), state)


def test_zero_and_non_finite_operators() -> None:
    assert symmetry_defect(MatrixOperator(torch.zeros(5, 5, dtype=F64))).defect == 0.0
    bad = torch.eye(5, dtype=F64)
    bad[0, 0] = math.nan
    res = symmetry_defect(MatrixOperator(bad))
    assert math.isnan(res.defect) and not res.symmetric


def test_tolerance_defaults_by_dtype_and_validation() -> None:
    half = symmetry_defect(MatrixOperator(_symmetric(16).to(torch.bfloat16)))
    assert half.tolerance == 0.3 and half.symmetric
    assert symmetry_defect(MatrixOperator(_symmetric(16)), tol=1e-20).tolerance == 1e-20
    with pytest.raises(ValueError, match="num_vectors"):
        symmetry_defect(MatrixOperator(_symmetric(16)), num_vectors=1)
    with pytest.raises(ValueError, match="tol"):
        symmetry_defect(MatrixOperator(_symmetric(16)), tol=0.0)


def _batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, dtype=F64, generator=gen)
    return x, torch.randint(0, 3, (32,), generator=gen)


@pytest.mark.parametrize("kernel", ["detached", "once"])
def test_double_backward_through_a_fused_kernel_is_caught(kernel: str) -> None:
    """Kernel-style GELUs: same loss and gradient as F.gelu, silently wrong Hessian products.

    The double-backward products are not symmetric (and the top eigenvalue is off by tens of
    percent), the finite-difference products are, and agree with the reference model's.
    """
    batch = _batch()
    reference = KernelMLP().double()
    model = KernelMLP(kernel).double()
    with curvature_context(reference), curvature_context(model):
        exact = HessianOperator(reference, classification_loss, [batch], route="double_backward")
        fused = HessianOperator(model, classification_loss, [batch], route="double_backward")
        assert symmetry_defect(exact).defect < 1e-12
        assert symmetry_defect(fused).defect > 0.1
        v = torch.randn(exact.size, dtype=F64, generator=torch.Generator().manual_seed(5))
        truth = exact.matvec(v)
        assert float((fused.matvec(v) - truth).norm() / truth.norm()) > 0.05
        fused.release()  # finite differences move the parameters: the retained graph is stale
        fd = HessianOperator(model, classification_loss, [batch], route="finite_difference")
        assert symmetry_defect(fd).defect < 1e-6
        assert float((fd.matvec(v) - truth).norm() / truth.norm()) < 1e-6


def test_a_straight_through_estimator_is_symmetric() -> None:
    """A stop-gradient makes autograd differentiate a surrogate consistently: no false alarm."""

    def loss(model: torch.nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        h = model.act(model.l1(x))
        h = h + (torch.round(4 * h) / 4 - h).detach()  # straight-through quantisation
        return torch.nn.functional.cross_entropy(model.l3(model.act(model.l2(h))), y)

    model = KernelMLP().double()
    with curvature_context(model):
        op = HessianOperator(model, loss, [_batch()], route="double_backward")
        assert symmetry_defect(op).symmetric
