"""The ``"compiled"`` route: ``torch.compile`` of the forward-over-reverse product.

Products are checked against ``dense_hessian`` in float64. One test compiles with the default
backend (inductor); the others use ``aot_eager`` (the ``fast_compile`` fixture, which also records
the graphs compiled), which traces the product through dynamo and AOT autograd the same way but
skips inductor's C++ code generation.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_landscape import HessianOperator, curvature_context
from lightning_landscape.operators import hessian
from tests._models import KINDS, dense_hessian, make_model

F64 = torch.float64
Graphs = list[torch.fx.GraphModule]


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rel_err(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def _recorder(monkeypatch: pytest.MonkeyPatch, error: BaseException | None = None) -> list[Any]:
    """Replace ``torch.compile``: record what it is asked to compile; the result raises
    ``error`` when called (or runs the function uncompiled)."""
    calls: list[Any] = []

    def fake(fn: Any, **kwargs: Any) -> Any:
        calls.append(fn)

        def run(*args: Any) -> Any:
            if error is not None:
                raise error
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake)
    return calls


@pytest.mark.slow
def test_inductor_products_match_dense_hessian_and_leave_the_rng_alone() -> None:
    model, loss_fn, batch = make_model("cnn")  # BatchNorm with non-trivial running statistics
    hess = dense_hessian(model, loss_fn, batch)
    block = _randn(hess.shape[0], 3, seed=2)
    rng = torch.get_rng_state()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], route="compiled")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback to "functorch"
            out = op.matmat(block)
    assert op.route == "compiled"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
    assert _rel_err(out, hess @ block) < 1e-10
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("kind", KINDS)
def test_products_match_dense_hessian(kind: str, fast_compile: Graphs) -> None:
    model, loss_fn, batch = make_model(kind)
    hess = dense_hessian(model, loss_fn, batch)
    n = hess.shape[0]
    v, block = _randn(n, seed=1), _randn(n, 5, seed=2)
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], route="compiled", max_block=2)
        hv = op.matvec(v)
        assert len(fast_compile) == 1  # one whole graph for a vector
        hblock = op.matmat(block)  # in chunks of 2, 2 and 1: one graph per width
        assert len(fast_compile) == 3
    assert op.route == "compiled" and op.batches_blocks
    assert _rel_err(hv, hess @ v) < 1e-10
    assert _rel_err(hblock, hess @ block) < 1e-10
    assert op.num_matvecs == 6


def test_two_batches_are_weighted_like_the_other_routes(fast_compile: Graphs) -> None:
    model, loss_fn, batch = make_model("mlp")
    halves = [tuple(t[:3] for t in batch), tuple(t[3:] for t in batch)]
    v = _randn(sum(p.numel() for p in model.parameters()), seed=3)
    with curvature_context(model):
        compiled = HessianOperator(model, loss_fn, halves, route="compiled").matvec(v)
        eager = HessianOperator(model, loss_fn, halves, route="functorch").matvec(v)
    assert fast_compile and _rel_err(compiled, eager) < 1e-12


def test_a_new_operator_reuses_the_compiled_product(fast_compile: Graphs) -> None:
    """Each round builds a new operator: same model and shapes, so no second compilation, and the
    products follow the new parameters and batch (they are inputs, not constants)."""
    model, loss_fn, batch = make_model("mlp")
    v = _randn(sum(p.numel() for p in model.parameters()), seed=4)
    with curvature_context(model):
        first = HessianOperator(model, loss_fn, [batch], route="compiled")
        hv0 = first.matvec(v)
        first.release()  # frees the traced functions; the next product rebuilds them
        assert torch.equal(first.matvec(v), hv0) and first.route == "compiled"
    assert len(fast_compile) == 1
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    other = tuple(t.flip(0) for t in batch)
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [other], route="compiled")
        hv = op.matvec(v)
    assert len(fast_compile) == 1 and op.route == "compiled"
    assert _rel_err(hv, dense_hessian(model, loss_fn, other) @ v) < 1e-10


class _Breaking(nn.Module):
    """A model whose forward pass has a graph break (``torch._dynamo.graph_break``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc1(x))
        torch._dynamo.graph_break()
        return self.fc2(h)


def test_a_graph_break_falls_back_instead_of_running_partly_eager(fast_compile: Graphs) -> None:
    torch.manual_seed(0)
    model = _Breaking().double()
    batch = (torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,)))

    def loss_fn(m: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    v = _randn(sum(p.numel() for p in model.parameters()), seed=7)
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], route="compiled")
        failed = "(?s)torch.compile failed.*graph_break.*'functorch'"
        with pytest.warns(RuntimeWarning, match=failed):
            hv = op.matvec(v)
    assert op.route == "functorch"
    assert _rel_err(hv, dense_hessian(model, loss_fn, batch) @ v) < 1e-10


def test_a_failed_compilation_is_remembered_per_model_parameters_and_width(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _recorder(monkeypatch, RuntimeError("no C++ compiler"))
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
        assert len(calls) == 1
        # Another block width, and another parameter set, are tried on their own.
        wide = HessianOperator(model, loss_fn, [batch], route="compiled")
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            wide.matmat(_randn(hess.shape[0], 2, seed=6))
        head = HessianOperator(model, loss_fn, [batch], route="compiled", params=["fc3.*"])
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            head.matvec(_randn(head.size, seed=6))
    assert op.route == later.route == wide.route == head.route == "functorch"
    assert len(calls) == 3
    assert _rel_err(hv, hess @ v) < 1e-10 and torch.equal(hv, again) and torch.equal(hv, third)


def test_out_of_memory_is_raised_and_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _recorder(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    model, loss_fn, batch = make_model("mlp")
    v = _randn(sum(p.numel() for p in model.parameters()), seed=8)
    with curvature_context(model):
        for _ in range(2):  # tried again: a later round may have the memory
            op = HessianOperator(model, loss_fn, [batch], route="compiled")
            with pytest.raises(torch.OutOfMemoryError):
                op.matvec(v)
    assert len(calls) == 2 and model not in hessian._UNCOMPILABLE


def test_an_error_of_the_loss_itself_is_raised_and_not_blamed_on_compiling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The uncompiled product fails the same way, so the error is the loss's: raised as it is."""
    _recorder(monkeypatch)  # "compiles" to the function itself
    model, loss_fn, batch = make_model("mlp")
    evaluations = [0]

    def flaky(m: nn.Module, b: Any) -> Tensor:
        evaluations[0] += 1
        if evaluations[0] > 1:  # the operator's own loss evaluation passes, products fail
            raise ValueError("a bug in the loss")
        return loss_fn(m, b)

    with curvature_context(model):
        op = HessianOperator(model, flaky, [batch], route="compiled")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no "torch.compile failed"
            with pytest.raises(ValueError, match="a bug in the loss"):
                op.matvec(_randn(op.size, seed=9))
    assert model not in hessian._UNCOMPILABLE


def test_alpha_and_delta2_keep_their_per_layer_and_per_size_products_uncompiled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """α has an operator per layer, Δ₂ two per batch size: compiled, each would be a graph."""
    from lightning_landscape import curvature_exponents, stabilization

    calls = _recorder(monkeypatch)
    model, loss_fn, batch = make_model("mlp")
    alphas = {
        route: curvature_exponents(model, loss_fn, batch, top_k=3, route=route)
        for route in ("compiled", "functorch")
    }
    deltas = {
        route: stabilization(model, loss_fn, batch, 4, D=2, route=route)
        for route in ("compiled", "functorch")
    }
    assert calls == []
    assert alphas["compiled"].keys() == alphas["functorch"].keys() and alphas["compiled"]
    for name, result in alphas["compiled"].items():
        assert result.alpha == pytest.approx(alphas["functorch"][name].alpha, rel=1e-12), name
    assert deltas["compiled"].value == pytest.approx(deltas["functorch"].value, rel=1e-12)


def test_eager_route() -> None:
    assert hessian.eager_route("compiled") == "functorch"
    for route in ("auto", "functorch", "double_backward", "finite_difference"):
        assert hessian.eager_route(route) == route  # type: ignore[arg-type]
