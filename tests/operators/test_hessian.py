"""Curvature operators: HessianOperator (both HVP routes) against the dense-Hessian oracle, and
MatrixOperator.

Every Hessian-vector product is checked against ``dense_hessian`` from ``tests/_models.py`` in
float64, on a plain MLP, a CNN with BatchNorm (eval mode, non-trivial running statistics) and a
causal-attention block with LayerNorm and SDPA.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_landscape import HessianOperator, MatrixOperator, curvature_context
from tests._models import (
    KINDS,
    MLP,
    KernelMLP,
    classification_loss,
    dense_hessian,
    make_model,
    mlp_batch,
)

ROUTES = ("functorch", "double_backward", "auto")
F64 = torch.float64


@functools.cache
def _dense(kind: str) -> Tensor:
    """Dense Hessian of the ``make_model(kind)`` problem (cached: it is the slow part)."""
    model, loss_fn, batch = make_model(kind)
    return dense_hessian(model, loss_fn, batch)


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _assert_rel_close(actual: Tensor, expected: Tensor, rtol: float = 1e-10) -> None:
    """Norm-wise relative closeness (robust to entries that are tiny by cancellation)."""
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    actual, expected = actual.detach(), expected.detach()
    err = float((actual - expected).norm() / expected.norm().clamp_min(1e-300))
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def _offsets(model: nn.Module) -> dict[str, slice]:
    """Slice of each parameter in the flat vector of all parameters (named_parameters order)."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


def _sub_block(model: nn.Module, full: Tensor, names: list[str]) -> Tensor:
    offs = _offsets(model)
    idx = torch.cat([torch.arange(offs[n].start, offs[n].stop) for n in names])
    return full[idx][:, idx]


# --------------------------------------------------------------------------------------------------
# Products against the dense Hessian
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", KINDS)
def test_products_match_dense_hessian(kind: str, route: str) -> None:
    model, loss_fn, batch = make_model(kind)
    hess = _dense(kind)
    n = hess.shape[0]
    v, block = _randn(n, seed=1), _randn(n, 5, seed=2)
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], route=route)
        assert op.size == n and op.dtype == F64
        hv = op.matvec(v)
        hblock = op.matmat(block)
        hmatmul = op @ block[:, 1]
        # A block larger than max_block is pushed through in chunks.
        small = HessianOperator(model, loss_fn, [batch], route=route, max_block=2)
        hchunked = small.matmat(block)
    assert route == "auto" or op.route == route
    assert op.route in ("functorch", "double_backward")
    _assert_rel_close(hv, hess @ v)
    _assert_rel_close(hblock, hess @ block)
    _assert_rel_close(hmatmul, hess @ block[:, 1])
    _assert_rel_close(hchunked, hess @ block)
    torch.testing.assert_close(hmatmul, hblock[:, 1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_functorch_blocks_are_chunked_by_max_block(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, loss_fn, batch = make_model(kind)
    hess = _dense(kind)
    block = _randn(hess.shape[0], 5, seed=3)
    chunk_sizes: list[int] = []
    real_vmap = torch.vmap

    def spy_vmap(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        inner = real_vmap(fn, *args, **kwargs)

        def call(*xs: Tensor):  # type: ignore[no-untyped-def]
            chunk_sizes.append(xs[0].shape[0])
            return inner(*xs)

        return call

    monkeypatch.setattr(torch, "vmap", spy_vmap)
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], route="functorch", max_block=2)
        out = op.matmat(block)
    assert chunk_sizes == [2, 2, 1]
    _assert_rel_close(out, hess @ block)


def test_matvec_and_matmat_agree_column_by_column() -> None:
    model, loss_fn, batch = make_model("mlp")
    block = _randn(155, 4, seed=4)
    for route in ("functorch", "double_backward"):
        with curvature_context(model):
            op = HessianOperator(model, loss_fn, [batch], route=route)
            cols = torch.stack([op.matvec(block[:, j]) for j in range(4)], dim=1)
            whole = op.matmat(block)
        torch.testing.assert_close(whole, cols, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("route", ["functorch", "double_backward", "finite_difference"])
@pytest.mark.parametrize("retain_graph", [True, False])
def test_matvec_into_is_matvec_written_in_place(route: str, retain_graph: bool) -> None:
    """Several weighted batches (the in-place sum over them), an unused parameter (no row)."""
    torch.manual_seed(0)
    model = _MLPWithUnused().double().eval()
    b1, b2 = mlp_batch(6, seed=1), mlp_batch(10, seed=2)
    v = _randn(sum(p.numel() for p in model.parameters()), 1, seed=5)[:, 0]
    with curvature_context(model):
        kw = {"retain_graph": retain_graph} if route == "double_backward" else {}
        op = HessianOperator(model, classification_loss, [b1, b2], route=route, **kw)
        expected = op.matvec(v)
        out = torch.full_like(v, float("nan"))  # overwritten, not added to
        assert op.matvec_into(v, out) is out
        assert op.num_matvecs == 2
    rtol = 1e-5 if route == "finite_difference" else 1e-12
    torch.testing.assert_close(out, expected, rtol=rtol, atol=1e-12)


def test_matvec_into_shape_errors() -> None:
    op = MatrixOperator(torch.diag(torch.arange(1.0, 6.0, dtype=F64)))
    v = torch.ones(5, dtype=F64)
    out = torch.empty(5, dtype=F64)
    torch.testing.assert_close(op.matvec_into(v, out), torch.arange(1.0, 6.0, dtype=F64))
    for bad_v, bad_out in ((torch.ones(4), out), (v, torch.empty(6)), (v, torch.empty(5, 1))):
        with pytest.raises(ValueError, match=r"matvec_into expects vectors of shape \(5,\)"):
            op.matvec_into(bad_v.double(), bad_out.double())
    assert op.num_matvecs == 1


# --------------------------------------------------------------------------------------------------
# Parameter subsets
# --------------------------------------------------------------------------------------------------

SUBSETS = [
    ("mlp", ["*.weight"], ["fc1.weight", "fc2.weight", "fc3.weight"]),
    ("mlp", ["fc1.*"], ["fc1.weight", "fc1.bias"]),
    ("mlp", ["fc3.bias", "fc1.weight"], ["fc1.weight", "fc3.bias"]),  # model order, not given
    ("cnn", ["bn.*", "conv.weight"], ["conv.weight", "bn.weight", "bn.bias"]),
    ("attention", ["ln1.*", "qkv.weight"], ["ln1.weight", "ln1.bias", "qkv.weight"]),
    ("attention", ["tok.weight", "pos"], ["pos", "tok.weight"]),  # own params come first
]


@pytest.mark.parametrize("route", ["functorch", "double_backward"])
@pytest.mark.parametrize(("kind", "patterns", "names"), SUBSETS)
def test_parameter_subset_is_dense_sub_block(
    kind: str, patterns: list[str], names: list[str], route: str
) -> None:
    model, loss_fn, batch = make_model(kind)
    expected = _sub_block(model, _dense(kind), names)
    m = expected.shape[0]
    block = _randn(m, 3, seed=5)
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], params=patterns, route=route)
        out = op.matmat(block)
    assert op.names == names
    assert op.size == m
    _assert_rel_close(out, expected @ block)


def test_parameter_subset_by_tensor_equals_by_name() -> None:
    model, loss_fn, batch = make_model("mlp")
    v = _randn(8 * 8 + 8, seed=6)
    with curvature_context(model):
        by_name = HessianOperator(model, loss_fn, [batch], params=["fc2.*"]).matvec(v)
        by_tensor = HessianOperator(
            model, loss_fn, [batch], params=[model.fc2.bias, model.fc2.weight]
        ).matvec(v)
    torch.testing.assert_close(by_tensor, by_name, rtol=1e-12, atol=1e-14)
    # also equals the oracle's sub-block (oracle order = the order given)
    sub = dense_hessian(model, loss_fn, batch, params=["fc2.weight", "fc2.bias"])
    _assert_rel_close(by_name, sub @ v)


@pytest.mark.parametrize("route", ROUTES)
def test_products_on_a_subset_are_detached(route: str) -> None:
    # Regression: the functorch route used to keep the unprobed parameters live in
    # functional_call, so products (and everything Lanczos built from them) carried a graph.
    model, loss_fn, batch = make_model("mlp")
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], params=["fc3.*"], route=route)
        hv = op.matvec(_randn(op.size, seed=7))
        hblock = op.matmat(_randn(op.size, 3, seed=8))
    assert not hv.requires_grad
    assert not hblock.requires_grad


@pytest.mark.parametrize(
    "route",
    [
        "functorch",
        "double_backward",
        "auto",
    ],
)
def test_frozen_parameter_selected_by_name(route: str) -> None:
    model, loss_fn, batch = make_model("mlp")
    expected = _sub_block(model, _dense("mlp"), ["fc1.weight"])
    model.fc1.weight.requires_grad_(False)
    v = _randn(48, seed=23)
    with curvature_context(model):
        try:
            op = HessianOperator(model, loss_fn, [batch], params=["fc1.weight"], route=route)
            hv = op.matvec(v)
        except ValueError as err:  # a clear refusal would be acceptable too
            assert "requires_grad" in str(err) or "trainable" in str(err)
            return
    _assert_rel_close(hv, expected @ v)
    assert not model.fc1.weight.requires_grad


# --------------------------------------------------------------------------------------------------
# Several batches
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_two_batches_default_weights_equal_concatenated_batch(route: str) -> None:
    model, loss_fn, _ = make_model("mlp")
    b1, b2 = mlp_batch(n=5, seed=1), mlp_batch(n=11, seed=2)
    cat = (torch.cat([b1[0], b2[0]]), torch.cat([b1[1], b2[1]]))
    expected = dense_hessian(model, loss_fn, cat)
    block = _randn(155, 3, seed=9)
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [b1, b2], route=route)
        out = op.matmat(block)
        hv = op.matvec(block[:, 0])
    assert op.weights == pytest.approx([5 / 16, 11 / 16])
    assert op.loss_value == pytest.approx(float(loss_fn(model, cat).detach()), rel=1e-12)
    _assert_rel_close(out, expected @ block)
    _assert_rel_close(hv, expected @ block[:, 0])


@pytest.mark.parametrize("route", ["functorch", "double_backward"])
def test_two_batches_explicit_weights(route: str) -> None:
    model, loss_fn, _ = make_model("mlp")
    b1, b2 = mlp_batch(n=5, seed=1), mlp_batch(n=11, seed=2)
    expected = 0.25 * dense_hessian(model, loss_fn, b1) + 0.75 * dense_hessian(model, loss_fn, b2)
    block = _randn(155, 2, seed=10)
    with curvature_context(model):
        out = HessianOperator(model, loss_fn, [b1, b2], weights=[2.0, 6.0], route=route).matmat(
            block
        )
    _assert_rel_close(out, expected @ block)


def test_single_batch_weight_is_irrelevant() -> None:
    model, loss_fn, batch = make_model("mlp")
    v = _randn(155, seed=11)
    with curvature_context(model):
        a = HessianOperator(model, loss_fn, [batch], weights=[7.0]).matvec(v)
    _assert_rel_close(a, _dense("mlp") @ v)


# --------------------------------------------------------------------------------------------------
# Route selection
# --------------------------------------------------------------------------------------------------


def test_auto_route_calibrates_once_and_records_timings() -> None:
    model, loss_fn, batch = make_model("mlp")
    hess = _dense("mlp")
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], route="auto", calibrate=True)
        assert op.route == "auto"
        assert op.route_seconds == {}
        block = _randn(155, 3, seed=12)
        first = op.matmat(block)
        chosen = op.route
        assert chosen in ("functorch", "double_backward")
        assert set(op.route_seconds) == {"functorch", "double_backward"}
        assert all(t > 0 for t in op.route_seconds.values())
        faster = min(op.route_seconds, key=op.route_seconds.__getitem__)
        assert chosen == faster
        # Calibration runs extra products (at least one more per column), and counts them.
        calibrated = op.num_matvecs
        assert calibrated >= 2 * 3
        assert calibrated % 3 == 0
        seconds = dict(op.route_seconds)
        second = op.matvec(block[:, 0])
        assert op.route == chosen
        assert op.route_seconds == seconds  # no re-calibration
        assert op.num_matvecs == calibrated + 1
    _assert_rel_close(first, hess @ block)
    _assert_rel_close(second, hess @ block[:, 0])


def test_auto_route_on_cpu_takes_double_backward_without_calibrating() -> None:
    model, loss_fn, batch = make_model("mlp")
    block = _randn(155, 3, seed=12)
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], route="auto")
        out = op.matmat(block)
        assert op.route == "double_backward"
        assert op.route_seconds == {}
        assert op.num_matvecs == 3  # no calibration products
    _assert_rel_close(out, _dense("mlp") @ block)


def _numpy_branch_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Data-dependent Python control flow through NumPy: fine for autograd, not for torch.func."""
    x, y = batch
    logits = model(x)
    if np.isfinite(logits.detach().numpy()).all():
        return F.cross_entropy(logits, y)
    return logits.sum()  # pragma: no cover - never taken


def _item_branch_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    loss = classification_loss(model, batch)
    if loss.item() > 0:
        return loss
    return -loss  # pragma: no cover - cross-entropy is positive


def test_functorch_route_fails_on_untraceable_loss() -> None:
    model, _, batch = make_model("mlp")
    with curvature_context(model):
        op = HessianOperator(model, _numpy_branch_loss, [batch], route="functorch")
        with pytest.raises(RuntimeError):
            op.matvec(_randn(155))


@pytest.mark.parametrize("first", ["matvec", "matmat"])
def test_auto_falls_back_to_double_backward_with_warning(first: str) -> None:
    model, _, batch = make_model("mlp")
    hess = _dense("mlp")  # same loss mathematically
    block = _randn(155, 4, seed=13)
    with curvature_context(model):
        op = HessianOperator(model, _numpy_branch_loss, [batch], route="auto", calibrate=True)
        with pytest.warns(RuntimeWarning, match="double backward"):
            out = op.matvec(block[:, 0]) if first == "matvec" else op.matmat(block)
        assert op.route == "double_backward"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not on every product
            later = op.matmat(block)
    expected = hess @ block[:, 0] if first == "matvec" else hess @ block
    _assert_rel_close(out, expected)
    _assert_rel_close(later, hess @ block)


def test_auto_with_item_in_loss_is_still_exact() -> None:
    # On current torch, `.item()` on the (unbatched) loss is traceable by torch.func, so either
    # route may be chosen; whichever it is, the products must be right.
    model, _, batch = make_model("mlp")
    block = _randn(155, 3, seed=14)
    with curvature_context(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        op = HessianOperator(model, _item_branch_loss, [batch], route="auto")
        out = op.matmat(block)
    assert op.route in ("functorch", "double_backward")
    _assert_rel_close(out, _dense("mlp") @ block)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def _op(model: nn.Module, loss_fn=classification_loss, batches=None, **kwargs) -> HessianOperator:  # type: ignore[no-untyped-def]
    with curvature_context(model):
        return HessianOperator(
            model, loss_fn, [mlp_batch()] if batches is None else batches, **kwargs
        )


def test_error_unknown_route() -> None:
    model, _, _ = make_model("mlp")
    with pytest.raises(ValueError, match="route"):
        _op(model, route="forward_over_reverse")


def test_error_bad_max_block() -> None:
    model, _, _ = make_model("mlp")
    with pytest.raises(ValueError, match="max_block"):
        _op(model, max_block=0)


def test_error_unknown_parameter_pattern_names_it() -> None:
    model, _, _ = make_model("mlp")
    with pytest.raises(ValueError, match=re.escape("'encoder.*'")) as info:
        _op(model, params=["fc1.weight", "encoder.*"])
    assert "fc1.weight" in str(info.value)  # lists known names to help


def test_error_empty_params() -> None:
    model, _, _ = make_model("mlp")
    with pytest.raises(ValueError, match="empty"):
        _op(model, params=[])


def test_error_foreign_or_mixed_params() -> None:
    model, _, _ = make_model("mlp")
    with pytest.raises(ValueError, match="not parameters of the model"):
        _op(model, params=[nn.Parameter(torch.zeros(3, dtype=F64))])
    with pytest.raises(ValueError, match="all names"):
        _op(model, params=["fc1.weight", model.fc2.weight])


def test_error_all_parameters_frozen() -> None:
    model, _, _ = make_model("mlp")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        _op(model)


def test_error_non_scalar_loss() -> None:
    model, _, _ = make_model("mlp")

    def per_sample(m: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    with pytest.raises(ValueError, match="scalar"):
        _op(model, loss_fn=per_sample)


def test_error_loss_returns_float() -> None:
    model, _, _ = make_model("mlp")
    with pytest.raises(TypeError, match="Tensor"):
        _op(model, loss_fn=lambda m, b: float(classification_loss(m, b)))


def test_error_integer_loss() -> None:
    model, _, _ = make_model("mlp")
    with pytest.raises(ValueError, match="floating"):
        _op(model, loss_fn=lambda m, b: b[1].sum())


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0], [1.0, 0.0], [1.0, -1.0]])
def test_error_bad_weights(weights: list[float]) -> None:
    model, _, _ = make_model("mlp")
    with pytest.raises(ValueError, match="weights"):
        _op(model, batches=[mlp_batch(n=4, seed=1), mlp_batch(n=6, seed=2)], weights=weights)


def test_error_no_batches() -> None:
    model, _, _ = make_model("mlp")
    with pytest.raises(ValueError, match="batch"):
        _op(model, batches=[])


# --------------------------------------------------------------------------------------------------
# Parameters without curvature
# --------------------------------------------------------------------------------------------------


class _MLPWithUnused(MLP):
    """The MLP plus a Linear layer that the forward pass never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(3, 2)


class _MLPWithLinearTerm(MLP):
    """The MLP plus a parameter that enters the loss only linearly (constant gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.ones(3))


def _linear_term_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return classification_loss(model, batch) + 0.1 * model.shift.sum()


@pytest.mark.parametrize(
    "route",
    [
        "functorch",
        "double_backward",
        "auto",
    ],
)
@pytest.mark.parametrize("variant", ["unused_layer", "linear_term"])
def test_parameters_without_curvature_get_zero_rows(variant: str, route: str) -> None:
    torch.manual_seed(0)
    if variant == "unused_layer":
        model: nn.Module = _MLPWithUnused().double().eval()
        loss_fn = classification_loss
        dead = ["unused.weight", "unused.bias"]
    else:
        model = _MLPWithLinearTerm().double().eval()
        loss_fn = _linear_term_loss
        dead = ["shift"]
    batch = mlp_batch()
    hess = dense_hessian(model, loss_fn, batch)
    offs = _offsets(model)
    dead_idx = torch.cat([torch.arange(offs[n].start, offs[n].stop) for n in dead])
    assert hess[dead_idx].abs().max() == 0  # the oracle agrees these rows are zero
    block = _randn(hess.shape[0], 3, seed=15)
    with curvature_context(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        op = HessianOperator(model, loss_fn, [batch], route=route)
        hv = op.matvec(block[:, 0])
        out = op.matmat(block)
    assert out[dead_idx].abs().max() == 0
    assert hv[dead_idx].abs().max() == 0
    _assert_rel_close(out, hess @ block)
    _assert_rel_close(hv, hess @ block[:, 0])


# --------------------------------------------------------------------------------------------------
# Inference-mode batches
# --------------------------------------------------------------------------------------------------

Pair = namedtuple("Pair", ["x", "y"])


def _dict_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def _pair_loss(model: nn.Module, batch: Pair) -> Tensor:
    return F.cross_entropy(model(batch.x), batch.y)


@pytest.mark.parametrize("route", ["functorch", "double_backward"])
@pytest.mark.parametrize("container", ["tuple", "dict", "namedtuple"])
@pytest.mark.parametrize("probe_in_inference_mode", [False, True])
def test_inference_mode_batches(route: str, container: str, probe_in_inference_mode: bool) -> None:
    model, _, _ = make_model("mlp")
    with torch.inference_mode():
        x, y = mlp_batch()
        batch = {"tuple": (x, y), "dict": {"x": x, "y": y}, "namedtuple": Pair(x, y)}[container]
    assert x.is_inference()
    loss_fn = {"tuple": classification_loss, "dict": _dict_loss, "namedtuple": _pair_loss}[
        container
    ]
    v = _randn(155, seed=16)
    block = _randn(155, 3, seed=17)
    with torch.inference_mode(probe_in_inference_mode), curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], route=route)
        hv = op.matvec(v)
        out = op.matmat(block)
    hess = _dense("mlp")
    _assert_rel_close(hv, hess @ v)
    _assert_rel_close(out, hess @ block)


# --------------------------------------------------------------------------------------------------
# split / flatten / counting
# --------------------------------------------------------------------------------------------------


def test_split_flatten_round_trip() -> None:
    model, loss_fn, batch = make_model("cnn")
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch])
    v = _randn(op.size, seed=18)
    pieces = op.split(v)
    assert [t.shape for t in pieces] == [p.shape for p in model.parameters()]
    torch.testing.assert_close(op.flatten(pieces), v, rtol=0, atol=0)
    block = _randn(op.size, 3, seed=19)
    bpieces = op.split(block)
    assert [t.shape for t in bpieces] == [(3, *p.shape) for p in model.parameters()]
    torch.testing.assert_close(bpieces[0][2].reshape(-1), block[: op.numels[0], 2])
    flat = op.parameters_flat()
    torch.testing.assert_close(
        flat, torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    )
    flat.add_(1.0)  # a copy: the model is untouched
    assert not torch.equal(flat[:3], model.conv.weight.detach().reshape(-1)[:3])


@pytest.mark.parametrize("route", ["functorch", "double_backward"])
def test_hessian_operator_counts_products(route: str) -> None:
    model, loss_fn, batch = make_model("mlp")
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], route=route)
        assert op.num_matvecs == 0
        op.matvec(_randn(155))
        op.matmat(_randn(155, 4))
        op @ _randn(155, 2)
        with pytest.raises(ValueError):
            op.matvec(_randn(154))
    assert op.num_matvecs == 1 + 4 + 2


def test_hessian_operator_leaves_parameters_untouched() -> None:
    model, loss_fn, batch = make_model("attention")
    before = [p.detach().clone() for p in model.parameters()]
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch], route="auto")
        op.matmat(_randn(op.size, 3))
        op.release()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
        assert p.grad is None


# --------------------------------------------------------------------------------------------------
# MatrixOperator
# --------------------------------------------------------------------------------------------------


def test_matrix_operator_products_and_metadata() -> None:
    a = _randn(7, 7, seed=20)
    a = a + a.T
    op = MatrixOperator(a)
    assert (op.size, op.dtype, op.device) == (7, F64, a.device)
    v, block = _randn(7, seed=21), _randn(7, 3, seed=22)
    torch.testing.assert_close(op.matvec(v), a @ v, rtol=0, atol=0)
    torch.testing.assert_close(op.matmat(block), a @ block, rtol=0, atol=0)
    torch.testing.assert_close(op @ v, a @ v, rtol=0, atol=0)
    torch.testing.assert_close(op @ block, a @ block, rtol=0, atol=0)
    assert op.matvec(v).shape == (7,)
    assert op.matmat(block[:, :1]).shape == (7, 1)


@pytest.mark.parametrize("shape", [(3, 4), (4,), (2, 2, 2)])
def test_matrix_operator_rejects_non_square(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="square"):
        MatrixOperator(torch.zeros(shape))


def test_matrix_operator_shape_errors_and_counting() -> None:
    op = MatrixOperator(torch.eye(5, dtype=F64))
    for bad in (torch.zeros(4), torch.zeros(6), torch.zeros(5, 1), torch.zeros(1, 5)):
        with pytest.raises(ValueError, match=r"matvec expects a vector of shape \(5,\)"):
            op.matvec(bad.double())
    for bad in (torch.zeros(5), torch.zeros(4, 2), torch.zeros(5, 2, 1)):
        with pytest.raises(ValueError, match=r"matmat expects a block of shape \(5, b\)"):
            op.matmat(bad.double())
    assert op.num_matvecs == 0  # rejected calls are not counted
    op.matvec(torch.ones(5, dtype=F64))
    op.matmat(torch.ones(5, 3, dtype=F64))
    op @ torch.ones(5, 2, dtype=F64)
    op @ torch.ones(5, dtype=F64)
    assert op.num_matvecs == 1 + 3 + 2 + 1


class _Checkpointed(nn.Module):
    """KernelMLP's reference layout with its middle layer under activation checkpointing."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.inner = KernelMLP()
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        m = self.inner
        h = m.act(m.l1(x))
        h = checkpoint(lambda t: m.act(m.l2(t)), h, use_reentrant=self.reentrant)
        out: Tensor = m.l3(h)
        return out


def test_activation_checkpointing_non_reentrant_is_exact_reentrant_is_refused() -> None:
    """Non-reentrant checkpointing recomputes the same graph (exact products); the reentrant
    variant refuses ``torch.autograd.grad``, with PyTorch's own advice (use_reentrant=False)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, dtype=F64, generator=gen)
    batch = (x, torch.randint(0, 3, (16,), generator=gen))
    reference = KernelMLP().double()
    with curvature_context(reference):
        truth = dense_hessian(reference, classification_loss, batch)
    for route in ("double_backward", "finite_difference"):
        model = _Checkpointed(reentrant=False).double()
        with curvature_context(model):
            op = HessianOperator(model, classification_loss, [batch], route=route)
            dense = op.matmat(torch.eye(op.size, dtype=F64))
        torch.testing.assert_close(dense, truth, rtol=1e-6, atol=1e-8)
    model = _Checkpointed(reentrant=True).double()
    with curvature_context(model), pytest.raises(RuntimeError, match="use_reentrant=False"):
        op = HessianOperator(model, classification_loss, [batch])
        op.matvec(torch.ones(op.size, dtype=F64))
