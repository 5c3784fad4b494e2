"""Tests of the curvature-aligned stabilization criterion Δ₂^(D)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_landscape import full_space_delta2, stabilization
from lightning_landscape.metrics import StabilizationResult
from tests._models import make_model

N_FEAT = 6
N_SAMPLES = 9


def _linear() -> tuple[nn.Module, Any, tuple[Tensor, Tensor]]:
    """Least squares: every sample's loss is exactly quadratic in the weights."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N_SAMPLES, N_FEAT, generator=gen, dtype=torch.float64)
    x = x * torch.linspace(0.5, 2.0, N_FEAT, dtype=torch.float64)  # spread the spectrum
    y = torch.randn(N_SAMPLES, generator=gen, dtype=torch.float64)
    model = nn.Linear(N_FEAT, 1, bias=False).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, N_FEAT, generator=gen, dtype=torch.float64))

    def loss_fn(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        xb, yb = batch
        out: Tensor = 0.5 * ((m(xb).squeeze(-1) - yb) ** 2).mean()
        return out

    return model, loss_fn, (x, y)


def _dense_quadratic(
    model: nn.Module, batch: tuple[Tensor, Tensor], k: int, D: int
) -> tuple[float, Tensor, Tensor]:
    """``a, c, B`` of the least-squares model, computed densely (U_D from eigh)."""
    x, y = batch
    weight = model.weight
    assert isinstance(weight, Tensor)
    w = weight.detach().reshape(-1)

    def parts(m: int) -> tuple[float, Tensor, Tensor]:
        xm, ym = x[:m], y[:m]
        r = xm @ w - ym
        return float(0.5 * (r**2).mean()), xm.T @ r / m, xm.T @ xm / m

    l_k, g_k, h_k = parts(k)
    l_k1, g_k1, h_k1 = parts(k + 1)
    evals, evecs = torch.linalg.eigh(h_k)
    u = evecs[:, evals.argsort(descending=True)[:D]]
    return l_k1 - l_k, u.T @ (g_k1 - g_k), u.T @ (h_k1 - h_k) @ u


def test_quadratic_model_is_exact() -> None:
    model, loss_fn, batch = _linear()
    k, D, sigma = 5, 3, 0.4
    a, c, B = _dense_quadratic(model, batch, k, D)
    gen = torch.Generator().manual_seed(123)
    z = sigma * torch.randn(200_000, D, generator=gen, dtype=torch.float64)
    q = (a + z @ c + 0.5 * ((z @ B) * z).sum(1)) ** 2
    ref, ref_se = float(q.mean()), float(q.std()) / math.sqrt(q.numel())

    gm = stabilization(model, loss_fn, batch, k, D=D, sigma=sigma, estimator="gm", tol=1e-10)
    assert isinstance(gm, StabilizationResult)
    assert gm.stderr == 0.0 and gm.c.shape == (D,) and gm.B.shape == (D, D)
    assert gm.a == pytest.approx(a, rel=1e-12, abs=1e-14)
    # invariant under the sign of each eigenvector
    assert float(gm.c @ gm.c) == pytest.approx(float(c @ c), rel=1e-8)
    assert float(torch.trace(gm.B)) == pytest.approx(float(torch.trace(B)), rel=1e-8)
    assert float((gm.B**2).sum()) == pytest.approx(float((B**2).sum()), rel=1e-8)
    assert abs(gm.value - ref) < 4 * ref_se
    for est in ("qmc", "mc"):
        res = stabilization(
            model, loss_fn, batch, k, D=D, sigma=sigma, estimator=est, num_samples=4000
        )
        assert res.stderr > 0
        assert abs(res.value - gm.value) < 4 * res.stderr, est


def test_gm_matches_direct_mc_on_mlp() -> None:
    model, loss_fn, batch = make_model("mlp")
    kw: dict[str, Any] = {"D": 5, "sigma": 1e-3, "seed": 1}
    gm = stabilization(model, loss_fn, batch, 8, estimator="gm", **kw)
    mc = stabilization(model, loss_fn, batch, 8, estimator="mc", num_samples=2000, **kw)
    assert gm.value > 0
    assert abs(mc.value - gm.value) <= 0.05 * abs(gm.value)
    # a² dominates here; with common draws (same seed) the true-loss and quadratic-model MC
    # estimates differ only by the cubic remainder, far below the σ-dependent part of Δ₂^(D).
    qmc = stabilization(model, loss_fn, batch, 8, estimator="qmc", num_samples=2000, **kw)
    excess = gm.value - gm.a**2
    assert excess > 0
    assert abs(mc.value - qmc.value) <= 1e-3 * excess
    assert gm.eigenvalues.shape == (5,)
    assert bool((gm.eigenvalues[:-1] >= gm.eigenvalues[1:]).all())
    assert gm.num_hvps >= 10


def test_full_subspace_matches_full_space() -> None:
    model, loss_fn, batch = _linear()
    k, sigma = 4, 0.3
    full, full_se = full_space_delta2(model, loss_fn, batch, k, sigma=sigma, num_samples=4000)
    mc = stabilization(
        model, loss_fn, batch, k, D=N_FEAT, sigma=sigma, estimator="mc", num_samples=4000, seed=7
    )
    assert abs(mc.value - full) < 4 * math.hypot(mc.stderr, full_se)
    gm = stabilization(model, loss_fn, batch, k, D=N_FEAT, sigma=sigma, estimator="gm")
    assert abs(gm.value - full) < 4 * full_se


def _snapshot(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_state_restored() -> None:
    model, loss_fn, batch = make_model("mlp")
    model.train()
    before = _snapshot(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    grads = [p.grad for p in model.parameters()]
    rng = torch.get_rng_state()
    stabilization(model, loss_fn, batch, 5, D=3, sigma=1e-2, estimator="mc", num_samples=8)
    full_space_delta2(model, loss_fn, batch, 5, sigma=1e-2, num_samples=8)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model), strict=True))
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
    assert model.training
    assert torch.equal(rng, torch.get_rng_state())


def test_restored_when_loss_raises() -> None:
    model, loss_fn, batch = make_model("mlp")
    before = _snapshot(model)

    def failing(m: nn.Module, b: Any) -> Tensor:
        if not all(torch.equal(p, q) for p, q in zip(m.parameters(), before, strict=True)):
            raise RuntimeError("boom")  # only at perturbed weights, i.e. inside the MC loop
        return loss_fn(m, b)

    with pytest.raises(RuntimeError, match="boom"):
        stabilization(model, failing, batch, 5, D=2, estimator="mc", num_samples=4)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model), strict=True))
    with pytest.raises(RuntimeError, match="boom"):
        full_space_delta2(model, failing, batch, 5, num_samples=4)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 16}, "batch holds 16 samples; need at least k \\+ 1"),
        ({"D": 0}, "D must be"),
        ({"D": 10**6}, "D must be"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"sigma": float("inf")}, "sigma"),
        ({"estimator": "bogus"}, "estimator"),
        ({"estimator": "mc", "num_samples": 1}, "num_samples"),
        ({"estimator": "qmc", "num_samples": 1}, "num_samples"),
    ],
)
def test_bad_input(kwargs: dict[str, Any], match: str) -> None:
    model, loss_fn, batch = make_model("mlp")
    args = {"k": 4, **kwargs}
    k = args.pop("k")
    with pytest.raises(ValueError, match=match):
        stabilization(model, loss_fn, batch, k, **args)


def test_full_space_bad_input() -> None:
    model, loss_fn, batch = make_model("mlp")
    with pytest.raises(ValueError, match="need at least"):
        full_space_delta2(model, loss_fn, batch, 15 + 1)
    with pytest.raises(ValueError, match="num_samples"):
        full_space_delta2(model, loss_fn, batch, 4, num_samples=1)
    with pytest.raises(ValueError, match="sigma"):
        full_space_delta2(model, loss_fn, batch, 4, sigma=-1.0)


def test_deterministic() -> None:
    model, loss_fn, batch = make_model("mlp")
    for est in ("gm", "qmc", "mc"):
        r1 = stabilization(model, loss_fn, batch, 6, D=3, estimator=est, num_samples=16, seed=4)
        r2 = stabilization(model, loss_fn, batch, 6, D=3, estimator=est, num_samples=16, seed=4)
        assert r1.value == r2.value and r1.stderr == r2.stderr
        assert torch.equal(r1.B, r2.B) and torch.equal(r1.c, r2.c)
    f1 = full_space_delta2(model, loss_fn, batch, 6, num_samples=16, seed=2)
    assert f1 == full_space_delta2(model, loss_fn, batch, 6, num_samples=16, seed=2)


def test_warm_start() -> None:
    model, loss_fn, batch = make_model("mlp")
    cold = stabilization(model, loss_fn, batch, 6, D=3)
    warm = stabilization(model, loss_fn, batch, 6, D=3, start=cold.eigenvectors)
    assert torch.allclose(warm.eigenvalues, cold.eigenvalues, rtol=1e-5)
    assert warm.value == pytest.approx(cold.value, rel=1e-4)


def test_nan_loss_raises_and_leaves_the_model_as_it_was() -> None:
    model, loss_fn, batch = make_model("mlp")
    before = _snapshot(model)

    def nan_loss(m: nn.Module, b: Any) -> Tensor:
        return loss_fn(m, b) * float("nan")

    with pytest.raises(FloatingPointError, match="NaN/inf"):
        stabilization(model, nan_loss, batch, 4, D=2)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model), strict=True))
