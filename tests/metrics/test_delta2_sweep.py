"""Tests of the Δ₂^(D) k-sweep: grid, log-log fit, the −2 slope near a minimum, LM batches."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from lightning_landscape import stabilization
from lightning_landscape.metrics import fit_loglog, log_spaced_ks, stabilization_sweep
from tests._models import (
    MLP,
    TinyCausalAttention,
    classification_loss,
    lm_batch,
    lm_loss,
    mlp_batch,
)


def _regularised_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy plus weight decay (which cancels in ``L_{k+1} − L_k``)."""
    reg = sum((p**2).sum() for p in model.parameters())
    return classification_loss(model, batch) + 1e-2 * reg


def _trained_mlp(n: int = 192) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """The 155-parameter MLP trained (full-batch L-BFGS, weight decay) close to a minimum."""
    torch.manual_seed(0)
    model = MLP().to(torch.float64)
    batch = mlp_batch(n=n, seed=1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _regularised_loss(model, batch)
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval(), batch


def test_log_spaced_grid() -> None:
    assert log_spaced_ks(1, 1000, 4) == (1, 10, 100, 1000)
    grid = log_spaced_ks(2, 63, 8)
    assert grid[0] == 2 and grid[-1] == 63 and list(grid) == sorted(set(grid))
    ratios = [b / a for a, b in itertools.pairwise(grid)]
    assert max(ratios) < 2.0  # roughly even in log k
    assert log_spaced_ks(1, 3, 10) == (1, 2, 3)  # rounding collapses points
    assert log_spaced_ks(5, 5, 3) == (5,)
    with pytest.raises(ValueError, match="k_min"):
        log_spaced_ks(0, 10, 3)


def test_fit_recovers_a_planted_power_law() -> None:
    ks = log_spaced_ks(1, 500, 9)
    values = torch.tensor([3.0 * k**-2.0 for k in ks], dtype=torch.float64)
    slope, stderr, intercept, r2 = fit_loglog(ks, values)
    assert slope == pytest.approx(-2.0, abs=1e-12)
    assert stderr < 1e-10 and r2 == pytest.approx(1.0)
    assert intercept == pytest.approx(math.log(3.0), abs=1e-12)
    # Noise: the standard error grows and covers the truth.
    noise = torch.tensor([1.3, 0.8, 1.1, 0.9, 1.2, 0.7, 1.0, 1.25, 0.85], dtype=torch.float64)
    slope, stderr, _, r2 = fit_loglog(ks, values * noise)
    assert stderr > 1e-3 and abs(slope + 2.0) < 3 * stderr and r2 < 1.0
    # Non-positive values are left out; too few points give NaN.
    slope, stderr, _, _ = fit_loglog([1, 10], torch.tensor([1.0, 0.01]))
    assert slope == pytest.approx(-2.0) and math.isnan(stderr)
    assert math.isnan(fit_loglog([1, 10], torch.tensor([1.0, 0.0]))[0])


def test_slope_is_minus_two_near_a_minimum() -> None:
    """The issue's acceptance test: within 0.3 of −2 for a small model near a minimum."""
    model, batch = _trained_mlp()
    grad = torch.autograd.grad(_regularised_loss(model, batch), list(model.parameters()))
    assert math.sqrt(sum(float((g**2).sum()) for g in grad)) < 1e-4  # near a minimum
    sweep = stabilization_sweep(
        model, _regularised_loss, batch, num_k=8, k_min=4, repeats=8, D=5, tol=1e-6
    )
    assert sweep.ks[0] == 4 and sweep.ks[-1] == 191
    assert abs(sweep.slope + 2.0) < 0.3, (sweep.slope, sweep.slope_stderr)
    assert 0 < sweep.slope_stderr < 0.5 and sweep.r2 > 0.7
    assert sweep.converged and sweep.num_hvps > 0 and sweep.seconds > 0
    assert sweep.per_repeat.shape == (8, len(sweep.ks))
    assert torch.allclose(sweep.values, sweep.per_repeat.mean(dim=0))
    assert bool((sweep.stderr > 0).all())
    # Δ₂ decays: the largest k is far below the smallest.
    assert float(sweep.values[-1]) < 1e-2 * float(sweep.values[0])


def test_first_repeat_matches_direct_calls() -> None:
    """Repeat 0 uses the batch's own order: its values are stabilization() at each k."""
    torch.manual_seed(0)
    model = MLP().to(torch.float64).eval()
    batch = mlp_batch(n=24, seed=2)
    sweep = stabilization_sweep(
        model, classification_loss, batch, ks=[3, 7, 15], repeats=2, D=3, tol=1e-10
    )
    for j, k in enumerate(sweep.ks):
        direct = stabilization(model, classification_loss, batch, k, D=3, tol=1e-10)
        assert float(sweep.per_repeat[0, j]) == pytest.approx(direct.value, rel=1e-6)
    # The second repeat uses another order, hence other values.
    assert not torch.allclose(sweep.per_repeat[0], sweep.per_repeat[1])
    assert sweep.last.k == 15 and sweep.last.eigenvectors.shape == (155, 3)


def test_language_model_batches() -> None:
    """One sample = one sequence (token-mean loss); the sweep runs on a LongTensor batch."""
    torch.manual_seed(0)
    model = TinyCausalAttention().to(torch.float64).eval()
    batch = lm_batch(n=32, seed=3)
    sweep = stabilization_sweep(model, lm_loss, batch, num_k=5, repeats=3, D=4)
    assert sweep.ks[-1] == 31
    assert bool(torch.isfinite(sweep.values).all()) and bool((sweep.values > 0).all())
    assert math.isfinite(sweep.slope) and sweep.slope < -1.0


def test_dict_batches_are_permuted_consistently() -> None:
    """Every tensor of a dict batch is reordered with the same permutation."""
    torch.manual_seed(0)
    model = MLP().to(torch.float64).eval()
    x, y = mlp_batch(n=20, seed=4)

    def dict_loss(m: nn.Module, b: dict[str, Tensor]) -> Tensor:
        return classification_loss(m, (b["x"], b["y"]))

    as_dict = stabilization_sweep(model, dict_loss, {"x": x, "y": y}, ks=[2, 5, 19], repeats=3, D=2)
    as_tuple = stabilization_sweep(
        model, classification_loss, (x, y), ks=[2, 5, 19], repeats=3, D=2
    )
    assert torch.allclose(as_dict.per_repeat, as_tuple.per_repeat, rtol=1e-8)


def test_bad_input() -> None:
    torch.manual_seed(0)
    model = MLP().to(torch.float64).eval()
    batch = mlp_batch(n=10, seed=0)
    with pytest.raises(ValueError, match=r"\[1, 9\]"):
        stabilization_sweep(model, classification_loss, batch, ks=[2, 10])
    with pytest.raises(ValueError, match="at least 2 distinct"):
        stabilization_sweep(model, classification_loss, batch, ks=[4, 4])
    with pytest.raises(ValueError, match="repeats"):
        stabilization_sweep(model, classification_loss, batch, repeats=0)
    with pytest.raises(ValueError, match="at least 3 samples"):
        stabilization_sweep(model, classification_loss, mlp_batch(n=2, seed=0))
    with pytest.raises(ValueError, match="sigma"):
        stabilization_sweep(model, classification_loss, batch, sigma=0.0)
