"""Sanity checks of the test models and the dense-Hessian oracle in tests/_models.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests._models import (
    KINDS,
    MLP,
    SmallCNN,
    TinyCausalAttention,
    classification_loss,
    dense_hessian,
    make_model,
    mlp_batch,
    num_params,
)


def _flat_grad(model: nn.Module, loss_fn, batch) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model, batch), params)
    return torch.cat([g.reshape(-1) for g in grads])


def _hvp(model: nn.Module, loss_fn, batch, v: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model, batch), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    hv = torch.autograd.grad(flat @ v, params)
    return torch.cat([h.reshape(-1) for h in hv])


def test_param_counts_are_small() -> None:
    assert num_params(MLP()) == 155
    assert num_params(SmallCNN()) < 500
    assert num_params(TinyCausalAttention()) < 600


def test_dense_hessian_symmetric_and_matches_finite_differences() -> None:
    torch.manual_seed(0)
    model = MLP().double().eval()
    batch = mlp_batch()
    hess = dense_hessian(model, classification_loss, batch, symmetrize=False)
    n = num_params(model)
    assert hess.shape == (n, n)
    assert hess.dtype == torch.float64
    torch.testing.assert_close(hess, hess.T, rtol=0, atol=1e-12)

    # Central differences of autograd gradients, one column per parameter coordinate.
    params = [p for p in model.parameters()]
    flat = torch.nn.utils.parameters_to_vector(params).detach()
    h = 1e-5
    fd = torch.empty(n, n, dtype=torch.float64)
    with torch.no_grad():
        for j in range(n):
            e = torch.zeros_like(flat)
            e[j] = h
            torch.nn.utils.vector_to_parameters(flat + e, params)
            with torch.enable_grad():
                g_plus = _flat_grad(model, classification_loss, batch)
            torch.nn.utils.vector_to_parameters(flat - e, params)
            with torch.enable_grad():
                g_minus = _flat_grad(model, classification_loss, batch)
            fd[:, j] = (g_plus - g_minus) / (2 * h)
        torch.nn.utils.vector_to_parameters(flat, params)
    torch.testing.assert_close(hess, fd, rtol=0, atol=1e-6)
    # The model's parameters were restored / never modified by the oracle.
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector(params), flat)


def test_dense_hessian_param_subset_is_a_block() -> None:
    model, loss_fn, batch = make_model("mlp")
    full = dense_hessian(model, loss_fn, batch)
    # fc2.weight / fc2.bias occupy [56, 56 + 72) in named_parameters order.
    sub = dense_hessian(model, loss_fn, batch, params=[model.fc2.weight, "fc2.bias"])
    torch.testing.assert_close(sub, full[56:128, 56:128], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_make_model_kinds(kind: str) -> None:
    model, loss_fn, batch = make_model(kind)
    assert not model.training
    loss = loss_fn(model, batch)
    assert loss.ndim == 0
    assert loss.dtype == torch.float64
    assert torch.isfinite(loss)
    # Deterministic in the seed, independent of the global RNG.
    torch.manual_seed(123)
    model2, _, batch2 = make_model(kind)
    torch.testing.assert_close(loss_fn(model2, batch2), loss, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_dense_hessian_matches_autograd_hvp(kind: str) -> None:
    model, loss_fn, batch = make_model(kind)
    hess = dense_hessian(model, loss_fn, batch)
    n = num_params(model)
    assert hess.shape == (n, n)
    assert torch.isfinite(hess).all()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(hess @ v, _hvp(model, loss_fn, batch, v), rtol=1e-9, atol=1e-10)


def test_attention_hessian_raw_is_symmetric() -> None:
    model, loss_fn, batch = make_model("attention")
    hess = dense_hessian(model, loss_fn, batch, symmetrize=False)
    torch.testing.assert_close(hess, hess.T, rtol=0, atol=1e-10)
    # Not a degenerate (e.g. all-zero) Hessian: it has both signs of curvature somewhere.
    eig = torch.linalg.eigvalsh(hess)
    assert eig.max() > 1e-3


def test_cnn_batchnorm_running_stats_are_nontrivial() -> None:
    model, loss_fn, batch = make_model("cnn")
    bn = model.bn
    assert isinstance(bn, nn.BatchNorm2d)
    assert bn.running_mean is not None and bn.running_var is not None
    assert bn.running_mean.abs().min() > 1e-3
    assert (bn.running_var - 1).abs().min() > 1e-3
    with torch.no_grad():
        eval_loss = loss_fn(model, batch).item()
        model.train()
        train_loss = loss_fn(model, batch).item()
        model.eval()
    assert abs(eval_loss - train_loss) > 1e-6


def test_float32_model() -> None:
    model, loss_fn, batch = make_model("mlp", dtype=torch.float32)
    hess = dense_hessian(model, loss_fn, batch)
    assert hess.dtype == torch.float32
    assert hess.shape == (155, 155)
