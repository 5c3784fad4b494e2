"""check_products: a round's products checked for symmetry; the switch to finite differences."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_landscape import CurvatureExponent, ProbeFailure, Sharpness, curvature_context
from lightning_landscape.operators import HessianOperator
from lightning_landscape.probes import ProbeContext, ProductCheck, check_products
from tests._models import KernelMLP, classification_loss, dense_hessian

F64 = torch.float64


def _batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, dtype=F64, generator=gen)
    return x, torch.randint(0, 3, (32,), generator=gen)


def _context(model: nn.Module, route: str = "auto", batch: Any = None) -> ProbeContext:
    return ProbeContext(
        model,
        classification_loss,
        [_batch() if batch is None else batch],
        route=route,  # type: ignore[arg-type]
    )


def _top(ctx: ProbeContext, k: int = 3) -> Tensor:
    return Sharpness(k, lambda_min=False, tol=1e-8, warm_start=False).run(ctx).top.eigenvalues


def _true_top(k: int = 3) -> Tensor:
    reference = KernelMLP().double()
    with curvature_context(reference):
        hess = dense_hessian(reference, classification_loss, _batch())
    return torch.linalg.eigvalsh(hess).flip(0)[:k]


def test_correct_products_pass_and_nothing_changes() -> None:
    model = KernelMLP().double()
    with curvature_context(model):
        ctx = _context(model)
        check = check_products(ctx, switch=True)
        assert isinstance(check, ProductCheck)
        assert check.passed and not check.switched and check.finite_difference is None
        assert check.route == ctx.resolved_route == "double_backward"
        assert check.exact.defect < 1e-12 and check.message() is None
        assert check.summary() == {
            "route": "double_backward",
            "defect": check.exact.defect,
            "tolerance": check.exact.tolerance,
            "num_hvps": 4,
            "finite_difference_defect": None,
            "switched": False,
        }
        torch.testing.assert_close(_top(ctx), _true_top(), rtol=1e-8, atol=0.0)


@pytest.mark.parametrize("kernel", ["detached", "once"])
def test_a_fused_kernel_switches_the_round_to_finite_differences(kernel: str) -> None:
    model = KernelMLP(kernel).double()
    with curvature_context(model):
        ctx = _context(model)
        check = check_products(ctx, switch=True)
        assert check is not None and not check.passed and check.switched
        assert check.exact.defect > 0.1
        assert check.finite_difference is not None and check.finite_difference.defect < 1e-6
        assert ctx.resolved_route == "finite_difference"
        assert check.summary()["num_hvps"] == 8
        message = check.message("pass route='double_backward'")
        assert message is not None
        assert "not symmetric" in message and "finite_difference" in message
        assert "pass route='double_backward' to keep double_backward." in message
        # The eigenvalues measured after the switch are the true ones (to FD accuracy).
        torch.testing.assert_close(_top(ctx), _true_top(), rtol=1e-6, atol=0.0)


def test_without_switching_only_the_check_is_reported() -> None:
    model = KernelMLP("detached").double()
    with curvature_context(model):
        ctx = _context(model, route="double_backward")
        check = check_products(ctx, switch=False)
        assert check is not None and not check.passed and not check.switched
        assert check.finite_difference is None
        assert ctx.resolved_route == "double_backward"
        message = check.message()
        assert message is not None and "not reliable" in message


class _Twisted(torch.autograd.Function):
    """Forward ``½‖w‖²``, backward ``M w`` (``M`` not symmetric): the gradient of no function."""

    @staticmethod
    def forward(ctx: Any, w: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        return 0.5 * (w * w).sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (w,) = ctx.saved_tensors
        m = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]], dtype=w.dtype)
        return grad * (m @ w)


class _TwistedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=F64))


def _twisted_loss(model: nn.Module, batch: Any) -> Tensor:
    out: Tensor = _Twisted.apply(model.w)
    return out * batch


def test_when_finite_differences_fail_too_the_route_is_kept_and_still_works() -> None:
    model = _TwistedModel()
    with curvature_context(model):
        ctx = ProbeContext(model, _twisted_loss, [torch.tensor(1.0, dtype=F64)])
        check = check_products(ctx, switch=True)
        assert check is not None and not check.passed and not check.switched
        assert check.finite_difference is not None and not check.finite_difference.symmetric
        assert ctx.resolved_route == "double_backward"
        message = check.message()
        assert message is not None and "not symmetric either" in message
        # The released graph is rebuilt: products go on with the kept route (vᵀ∂(Mw) = Mᵀv).
        v = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
        expected = torch.tensor([2.0, 1.0, 0.0], dtype=F64)
        torch.testing.assert_close(ctx.operator().matvec(v), expected)


def test_nothing_to_check_with_finite_differences() -> None:
    model = KernelMLP("detached").double()
    with curvature_context(model):
        assert check_products(_context(model, route="finite_difference"), switch=True) is None


def test_probes_with_their_own_operators_follow_the_switch() -> None:
    """α builds its own products from ``ctx.route``: after the switch, finite differences too."""

    def alphas(model: nn.Module, route: str) -> dict[str, float]:
        with curvature_context(model):
            ctx = _context(model, route=route)
            if route == "auto":
                check = check_products(ctx, switch=True)
                assert check is not None and check.switched and ctx.route == "finite_difference"
            result = CurvatureExponent(top_k=6, layers=["l1.weight", "l2.weight"]).run(ctx)
        return {name: r.alpha for name, r in result.items()}

    truth = alphas(KernelMLP().double(), "double_backward")
    switched = alphas(KernelMLP("detached").double(), "auto")
    assert truth.keys() == switched.keys() == {"l1.weight", "l2.weight"}
    for name, alpha in truth.items():
        assert switched[name] == pytest.approx(alpha, rel=1e-4, abs=1e-6), name


def test_a_failed_finite_difference_product_restores_the_routes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(self: HessianOperator, block: Tensor) -> Tensor:
        raise ProbeFailure("another rank's Hessian-vector product failed")

    monkeypatch.setattr(HessianOperator, "_fd_matmat", fail)
    model = KernelMLP("detached").double()
    with curvature_context(model):
        ctx = _context(model)
        with pytest.raises(ProbeFailure):
            check_products(ctx, switch=True)
        assert ctx.route == "auto" and ctx.resolved_route == "double_backward"


def _sqrt_loss(model: nn.Module, batch: Any) -> Tensor:
    out: Tensor = (model.w.abs().sqrt() * batch).sum()  # finite loss, NaN curvature at 0
    return out


def test_non_finite_products_are_inconclusive() -> None:
    model = _TwistedModel()
    with torch.no_grad():
        model.w.zero_()
    with curvature_context(model):
        ctx = ProbeContext(model, _sqrt_loss, [torch.tensor(1.0, dtype=F64)])
        check = check_products(ctx, switch=True)
    assert check is not None and check.inconclusive and check.passed and not check.switched
    assert check.message() is None
