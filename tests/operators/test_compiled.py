"""The ``"compiled"`` route: ``torch.compile`` of the forward-over-reverse product.

Products are checked against ``dense_hessian`` in float64. One test compiles with the default
backend (inductor); the others use ``aot_eager`` (the ``fast_compile`` fixture), which traces the
product through dynamo and AOT autograd the same way but skips inductor's C++ code generation.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import Tensor

from lightning_landscape import HessianOperator, curvature_context
from tests._models import KINDS, dense_hessian, make_model

F64 = torch.float64


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rel_err(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.slow
def test_inductor_products_match_dense_hessian_and_leave_the_rng_alone() -> None:
    model, loss_fn, batch = make_model("cnn")  # BatchNorm with non-trivial running statistics
    hess = dense_hessian(model, loss_fn, batch)
    block = _randn(hess.shape[0], 3, seed=2)
    rng = torch.get_rng_state()
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], route="compiled")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback to "functorch"
            out = op.matmat(block)
    assert op.route == "compiled"
    assert _rel_err(out, hess @ block) < 1e-10
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("kind", KINDS)
def test_products_match_dense_hessian(kind: str, fast_compile: None) -> None:
    model, loss_fn, batch = make_model(kind)
    hess = dense_hessian(model, loss_fn, batch)
    n = hess.shape[0]
    v, block = _randn(n, seed=1), _randn(n, 5, seed=2)
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], route="compiled", max_block=2)
        hv = op.matvec(v)
        hblock = op.matmat(block)  # in chunks of 2, 2 and 1
    assert op.route == "compiled" and op.batches_blocks
    assert _rel_err(hv, hess @ v) < 1e-10
    assert _rel_err(hblock, hess @ block) < 1e-10
    assert op.num_matvecs == 6


def test_two_batches_are_weighted_like_the_other_routes(fast_compile: None) -> None:
    model, loss_fn, batch = make_model("mlp")
    halves = [tuple(t[:3] for t in batch), tuple(t[3:] for t in batch)]
    v = _randn(sum(p.numel() for p in model.parameters()), seed=3)
    with curvature_context(model):
        compiled = HessianOperator(model, loss_fn, halves, route="compiled").matvec(v)
        eager = HessianOperator(model, loss_fn, halves, route="functorch").matvec(v)
    assert _rel_err(compiled, eager) < 1e-12


def test_a_new_operator_reuses_the_compiled_product(fast_compile: None) -> None:
    """Each round builds a new operator: same model and shapes, so no second compilation, and the
    products follow the new parameters and batch (they are inputs, not constants)."""
    model, loss_fn, batch = make_model("mlp")
    v = _randn(sum(p.numel() for p in model.parameters()), seed=4)
    with curvature_context(model):
        HessianOperator(model, loss_fn, [batch], route="compiled").matvec(v)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    other = tuple(t.flip(0) for t in batch)
    with curvature_context(model):
        hv = HessianOperator(model, loss_fn, [other], route="compiled").matvec(v)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert _rel_err(hv, dense_hessian(model, loss_fn, other) @ v) < 1e-10


def test_a_product_that_does_not_compile_falls_back_to_functorch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compiled: list[Any] = []

    def broken(fn: Any, **kwargs: Any) -> Any:
        def run(*args: Any) -> Any:
            raise RuntimeError("no C++ compiler")

        compiled.append(fn)
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model, loss_fn, batch = make_model("mlp")
    hess = dense_hessian(model, loss_fn, batch)
    v = _randn(hess.shape[0], seed=5)
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], route="compiled")
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*'functorch'"):
            hv = op.matvec(v)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning, no second compilation
            again = op.matvec(v)
            # The next operator on the same model and parameters (the next monitor round).
            later = HessianOperator(model, loss_fn, [batch], route="compiled")
            third = later.matvec(v)
            # Another parameter set is tried on its own.
            head = HessianOperator(model, loss_fn, [batch], route="compiled", params=["fc3.*"])
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            head.matvec(_randn(head.size, seed=6))
    assert op.route == later.route == head.route == "functorch"
    assert len(compiled) == 2
    assert _rel_err(hv, hess @ v) < 1e-10 and torch.equal(hv, again) and torch.equal(hv, third)


def test_alpha_keeps_its_per_layer_products_uncompiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer has its own operator: compiled, each would compile a graph of its own."""
    from lightning_landscape import curvature_exponents

    def refuse(fn: Any, **kwargs: Any) -> Any:
        raise AssertionError("α's per-layer products must not be compiled")

    monkeypatch.setattr(torch, "compile", refuse)
    model, loss_fn, batch = make_model("mlp")
    kw: dict[str, Any] = {"top_k": 3}
    compiled = curvature_exponents(model, loss_fn, batch, route="compiled", **kw)
    eager = curvature_exponents(model, loss_fn, batch, route="functorch", **kw)
    assert compiled.keys() == eager.keys() and compiled
    for name in compiled:
        assert compiled[name].alpha == pytest.approx(eager[name].alpha, rel=1e-12), name
