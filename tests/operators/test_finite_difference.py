"""The finite-difference HVP route against the exact routes, on the three test models.

``HessianOperator(route="finite_difference")`` computes ``(∇L(θ + h v) − ∇L(θ − h v)) / 2h`` with
``h = fd_eps · max(‖θ‖, 1) / ‖v‖`` and ``fd_eps = ε_mach^(1/3)`` by default, Richardson-extrapolated
with step control (``fd_order=4``, the default; tests at the end of this file).

Measured with the default of issue 16 (``fd_order=2``, the plain central difference) on torch 2.13
CPU (6 random Gaussian vectors, max over columns of
``‖Hv_fd − Hv_exact‖ / ‖Hv_exact‖``; ``‖θ‖`` is the parameter norm that sets the step):

==========  =====  =======  ========  ========  =====================================
model       n      ‖θ‖      float64   float32   float32 eigenvalues (k=3 largest, tol
                                                1e-4), max relative error
==========  =====  =======  ========  ========  =====================================
mlp         155    2.71     3.4e-11   2.7e-05   2.9e-05
cnn (BN)    183    2.25     3.7e-11   2.9e-05   3.1e-05
attention   479    8.71     1.5e-10   9.6e-05   5.5e-04
==========  =====  =======  ========  ========  =====================================

In float32 the error is dominated by truncation (the step grows with ‖θ‖): for the attention
model ``fd_eps = 2e-3`` would give 2.6e-05 instead of 9.6e-05 at the default 4.9e-3. Run with
``-s`` to print the numbers of the current build.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_landscape import hessian_eigenvalues, hessian_trace, lanczos
from lightning_landscape.operators import HessianOperator
from tests._models import KINDS, make_model, mlp_batch

PRODUCT_RTOL = {torch.float64: 1e-8, torch.float32: 2e-4}


def _vectors(n: int, b: int, dtype: torch.dtype, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, b, generator=gen, dtype=torch.float64).to(dtype)


def _rel_errors(approx: Tensor, exact: Tensor) -> Tensor:
    approx, exact = approx.double(), exact.double()
    return (approx - exact).norm(dim=0) / exact.norm(dim=0)


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, saved: dict[str, Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), f"{key} changed"
        assert value.dtype == saved[key].dtype


def _theta_norm(model: nn.Module) -> float:
    return float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in model.parameters())))


# --------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", KINDS)
def test_products_match_exact_routes(kind: str, dtype: torch.dtype) -> None:
    model, loss_fn, batch = make_model(kind, dtype)
    block = _vectors(sum(p.numel() for p in model.parameters()), 6, dtype)
    fd = HessianOperator(model, loss_fn, [batch], route="finite_difference")
    db = HessianOperator(model, loss_fn, [batch], route="double_backward")
    fn = HessianOperator(model, loss_fn, [batch], route="functorch")
    exact = db.matmat(block)
    # The two exact routes agree to rounding, so either is the reference.
    assert _rel_errors(fn.matmat(block), exact).max() < 1e-6
    errors = _rel_errors(fd.matmat(block), exact)
    single = _rel_errors(fd.matvec(block[:, 0]).unsqueeze(1), exact[:, :1])
    print(
        f"\nFD {kind} {dtype}: n={fd.size} |theta|={_theta_norm(model):.2f} "
        f"max rel error {errors.max():.2e} (matvec {single.max():.2e})"
    )
    assert errors.max() <= PRODUCT_RTOL[dtype], errors
    assert single.max() <= PRODUCT_RTOL[dtype]
    assert fd.num_matvecs == 7


def test_products_over_several_weighted_batches() -> None:
    model, loss_fn, _ = make_model("mlp")
    batches = [mlp_batch(5, seed=1), mlp_batch(11, seed=2)]
    block = _vectors(155, 3, torch.float64)
    fd = HessianOperator(model, loss_fn, batches, route="finite_difference")
    exact = HessianOperator(model, loss_fn, batches, route="double_backward").matmat(block)
    assert _rel_errors(fd.matmat(block), exact).max() <= 1e-8


def test_parameter_subset_with_a_frozen_parameter() -> None:
    model, loss_fn, batch = make_model("mlp")
    model.fc1.weight.requires_grad_(False)
    params = ["fc1.weight", "fc3.*"]
    fd = HessianOperator(model, loss_fn, [batch], params=params, route="finite_difference")
    db = HessianOperator(model, loss_fn, [batch], params=params, route="double_backward")
    assert fd.size == 48 + 24 + 3
    block = _vectors(fd.size, 4, torch.float64)
    saved = _snapshot(model)
    assert _rel_errors(fd.matmat(block), db.matmat(block)).max() <= 1e-8
    _assert_unchanged(model, saved)
    assert model.fc1.weight.requires_grad is False and model.fc1.weight.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_float32_eigenvalues_match_exact_route(kind: str) -> None:
    model, loss_fn, batch = make_model(kind, torch.float32)
    saved = _snapshot(model)
    kw: dict[str, Any] = {"tol": 1e-4}
    exact = hessian_eigenvalues(model, loss_fn, batch, k=3, route="double_backward", **kw)
    approx = hessian_eigenvalues(model, loss_fn, batch, k=3, route="finite_difference", **kw)
    exact_min = hessian_eigenvalues(
        model, loss_fn, batch, which="smallest", route="double_backward", **kw
    )
    approx_min = hessian_eigenvalues(
        model, loss_fn, batch, which="smallest", route="finite_difference", **kw
    )
    _assert_unchanged(model, saved)
    assert exact.all_converged and approx.all_converged and approx_min.all_converged
    rel = (approx.eigenvalues - exact.eigenvalues).abs() / exact.eigenvalues.abs()
    rel_min = float(
        (approx_min.eigenvalues - exact_min.eigenvalues).abs() / exact_min.eigenvalues.abs()
    )
    print(f"\nFD eigenvalues {kind} float32: largest {rel.max():.2e}, smallest {rel_min:.2e}")
    assert rel.max() <= 1e-3, (approx.eigenvalues, exact.eigenvalues)
    assert rel_min <= 1e-3, (approx_min.eigenvalues, exact_min.eigenvalues)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_trace_matches_exact_route(kind: str) -> None:
    """Same seed, so the same Hutch++ probes: only the FD error separates the estimates."""
    model, loss_fn, batch = make_model(kind)
    exact = hessian_trace(model, loss_fn, batch, num_hvps=12, route="double_backward")
    approx = hessian_trace(model, loss_fn, batch, num_hvps=12, route="finite_difference")
    assert approx.num_hvps == exact.num_hvps == 12
    assert approx.trace == pytest.approx(exact.trace, rel=1e-7)


# --------------------------------------------------------------------------------------------------
# Parameters are restored bit for bit
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_restored_bit_for_bit_after_each_product(kind: str) -> None:
    model, loss_fn, batch = make_model(kind, torch.float32)
    flags = [p.requires_grad for p in model.parameters()]
    saved = _snapshot(model)
    fd = HessianOperator(model, loss_fn, [batch], route="finite_difference")
    block = _vectors(fd.size, 3, torch.float32, seed=5)
    for j in range(3):
        fd.matvec(block[:, j])
        _assert_unchanged(model, saved)
    fd.matmat(block)
    _assert_unchanged(model, saved)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("fail_at", [1, 2], ids=["during_plus_step", "during_minus_step"])
def test_parameters_restored_after_an_exception_mid_product(fail_at: int) -> None:
    """The loss raises at the ``fail_at``-th gradient evaluation, with θ ± h v in place."""
    model, loss_fn, batch = make_model("cnn")
    model.fc.bias.requires_grad_(False)  # also restored: the route makes it differentiable
    saved = _snapshot(model)
    seen: dict[str, Any] = {"grad_calls": 0}

    def failing(m: nn.Module, b: Any) -> Tensor:
        if torch.is_grad_enabled():
            seen["grad_calls"] += 1
            if seen["grad_calls"] == fail_at:
                seen["weight_at_failure"] = m.conv.weight.detach().clone()
                raise RuntimeError("loss failed mid-product")
        return loss_fn(m, b)

    fd = HessianOperator(model, failing, [batch], route="finite_difference")
    with pytest.raises(RuntimeError, match="loss failed mid-product"):
        fd.matvec(_vectors(fd.size, 1, torch.float64)[:, 0])
    # The parameters really were perturbed when the loss raised...
    assert not torch.equal(seen["weight_at_failure"], saved["conv.weight"])
    # ...and are back, bit for bit, with their requires_grad flags.
    _assert_unchanged(model, saved)
    assert model.fc.bias.requires_grad is False
    assert all(p.grad is None for p in model.parameters())
    # The operator still works afterwards.
    seen["grad_calls"] = -(10**9)
    assert torch.isfinite(fd.matvec(_vectors(fd.size, 1, torch.float64)[:, 0])).all()
    _assert_unchanged(model, saved)


# --------------------------------------------------------------------------------------------------
# Step size and edge cases
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf")])
def test_fd_eps_must_be_positive(bad: float) -> None:
    model, loss_fn, batch = make_model("mlp")
    with pytest.raises(ValueError, match=r"fd_eps must be a finite number > 0"):
        HessianOperator(model, loss_fn, [batch], route="finite_difference", fd_eps=bad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_default_and_custom_fd_eps(dtype: torch.dtype) -> None:
    model, loss_fn, batch = make_model("mlp", dtype)
    default = HessianOperator(model, loss_fn, [batch], route="finite_difference", fd_order=2)
    assert default.fd_eps == pytest.approx(torch.finfo(dtype).eps ** (1 / 3), rel=1e-12)
    # Order 2 has no step control: the step is the one asked for (order 4 would shrink it).
    coarse = HessianOperator(
        model, loss_fn, [batch], route="finite_difference", fd_eps=5e-2, fd_order=2
    )
    assert coarse.fd_eps == 5e-2
    block = _vectors(default.size, 3, dtype)
    exact = HessianOperator(model, loss_fn, [batch], route="double_backward").matmat(block)
    # The custom step is used: far from the balanced default, the truncation error dominates.
    assert (
        _rel_errors(coarse.matmat(block), exact).max()
        > 10 * _rel_errors(default.matmat(block), exact).max()
    )


def test_zero_vector_gives_zero_product_without_evaluating_the_loss() -> None:
    model, loss_fn, batch = make_model("attention")
    calls = {"grad": 0}

    def counting(m: nn.Module, b: Any) -> Tensor:
        calls["grad"] += int(torch.is_grad_enabled())
        return loss_fn(m, b)

    saved = _snapshot(model)
    fd = HessianOperator(model, counting, [batch], route="finite_difference")
    zero = torch.zeros(fd.size, dtype=torch.float64)
    out = fd.matvec(zero)
    assert torch.equal(out, zero) and calls["grad"] == 0
    # A zero column in a block is zero; the other columns are unaffected by it.
    v = _vectors(fd.size, 1, torch.float64)[:, 0]
    block = torch.stack([v, zero, 3.0 * v], dim=1)
    out = fd.matmat(block)
    assert torch.equal(out[:, 1], torch.zeros_like(v))
    # (equal to rounding only: ‖v‖ of a strided column may round differently)
    assert torch.allclose(out[:, 0], fd.matvec(v), rtol=1e-12, atol=0)
    # The step is relative to ‖v‖, so the same perturbation is applied: homogeneous to rounding.
    assert torch.allclose(out[:, 2], 3.0 * out[:, 0], rtol=1e-12, atol=0)
    _assert_unchanged(model, saved)


# --------------------------------------------------------------------------------------------------
# Richardson extrapolation (fd_order=4)
# --------------------------------------------------------------------------------------------------


def test_fourth_order_cancels_the_truncation_error_along_the_top_eigenvector() -> None:
    """Along the sharpest direction the ``h²`` term dominates in float32; order 4 removes it.

    float64, so rounding stays far below both truncation errors and the orders are visible.
    """
    model, loss_fn, batch = make_model("attention", torch.float64)
    exact = HessianOperator(model, loss_fn, [batch], route="double_backward")
    top = lanczos(exact, k=1, tol=1e-10).eigenvectors[:, 0]
    want = exact @ top
    errors = {}
    for order in (2, 4):
        fd = HessianOperator(
            model, loss_fn, [batch], route="finite_difference", fd_eps=1e-2, fd_order=order
        )
        errors[order] = float(_rel_errors((fd @ top).unsqueeze(1), want.unsqueeze(1))[0])
    assert errors[4] < errors[2] / 100, errors
    assert errors[4] < 1e-4, errors  # measured 1.3e-5 (order 2: 7.5e-3)


def test_fourth_order_costs_four_gradients_and_restores_parameters() -> None:
    model, loss_fn, batch = make_model("mlp", torch.float32)
    saved = _snapshot(model)
    fd = HessianOperator(model, loss_fn, [batch], route="finite_difference", fd_order=4)
    calls = 0
    inner = fd._gradient

    def counted() -> Tensor:
        nonlocal calls
        calls += 1
        return inner()

    fd._gradient = counted  # type: ignore[method-assign]
    fd.matmat(_vectors(fd.size, 2, torch.float32))
    assert calls == 8
    _assert_unchanged(model, saved)
    with pytest.raises(ValueError, match="fd_order"):
        HessianOperator(model, loss_fn, [batch], route="finite_difference", fd_order=3)


class _WithTable(nn.Module):
    """A model plus a large-norm table the loss barely uses (like an N(0, 1) embedding of a big
    vocabulary): ``‖θ‖`` and so the nominal step are set by the table, not by the sharp part."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.table = nn.Parameter(
            5.0 * torch.randn(20_000, generator=torch.Generator().manual_seed(0))
        )


def test_step_control_recovers_accuracy_when_the_parameter_norm_misleads_the_step() -> None:
    inner, inner_loss, batch = make_model("attention", torch.float32)
    model = _WithTable(inner)

    def loss_fn(m: nn.Module, b: Any) -> Tensor:
        return inner_loss(m.inner, b) + 1e-3 * (m.table[:3] ** 2).sum()

    exact = HessianOperator(model, loss_fn, [batch], route="double_backward")
    top = lanczos(exact, k=1, tol=1e-5).eigenvectors[:, 0]
    want = (exact @ top).unsqueeze(1)
    plain = HessianOperator(model, loss_fn, [batch], route="finite_difference", fd_order=2)
    controlled = HessianOperator(model, loss_fn, [batch], route="finite_difference")
    plain_error = float(_rel_errors((plain @ top).unsqueeze(1), want)[0])
    error = float(_rel_errors((controlled @ top).unsqueeze(1), want)[0])
    print(f"\nstep control: order 2 {plain_error:.2e}, order 4 controlled {error:.2e}")
    assert plain_error > 0.05
    assert error < 1e-3
    assert controlled.difference.halvings > 0 and controlled.difference.scale < 1.0
