"""Batch sharpness against exact enumeration of every batch of a tiny dataset (float64)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_landscape import curvature_context
from lightning_landscape.metrics import batch_sharpness
from lightning_landscape.probes import BatchSharpness, ProbeContext, check_products
from tests._models import KernelMLP, classification_loss, dense_hessian

N, B = 7, 5


def _setup() -> tuple[nn.Module, object, tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(N, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=gen)

    def loss_fn(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    return model, loss_fn, (x, y)


def _exact_values() -> list[float]:
    """``gᵀHg/gᵀg`` of every one of the C(7, 5) = 21 batches, from dense Hessians."""
    model, loss_fn, (x, y) = _setup()
    values = []
    for subset in itertools.combinations(range(N), B):
        idx = torch.tensor(subset)
        batch = (x[idx], y[idx])
        h = dense_hessian(model, loss_fn, batch)
        loss = loss_fn(model, batch)  # type: ignore[operator]
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, model.parameters())])
        values.append(float(g @ h @ g / (g @ g)))
    return values


def test_every_draw_is_one_batchs_exact_value_and_the_mean_converges() -> None:
    exact = _exact_values()
    truth = math.fsum(exact) / len(exact)
    model, loss_fn, data = _setup()
    result = batch_sharpness(
        model, loss_fn, data, B, rtol=0.1, min_batches=50, max_batches=4000, seed=1
    )
    for s in result.samples:  # each draw is exactly one of the 21 batches
        assert min(abs(s - e) for e in exact) <= 1e-9 * abs(s)
    assert result.num_batches == len(result.samples) == result.num_hvps
    assert result.converged and result.stderr <= 0.1 * abs(result.value)
    assert abs(result.value - truth) <= 4 * result.stderr  # the Monte Carlo mean is unbiased
    spread = torch.tensor(exact).std().item()
    assert result.stderr == pytest.approx(spread / math.sqrt(result.num_batches), rel=0.2)


def test_stops_at_max_batches_and_says_it_did_not_converge() -> None:
    model, loss_fn, data = _setup()
    result = batch_sharpness(model, loss_fn, data, B, rtol=1e-9, min_batches=2, max_batches=5)
    assert result.num_batches == 5 and not result.converged


def test_the_draws_leave_the_global_rng_alone_and_are_reproducible() -> None:
    model, loss_fn, data = _setup()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = batch_sharpness(model, loss_fn, data, B, max_batches=12, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = batch_sharpness(model, loss_fn, data, B, max_batches=12, seed=5)
    assert a.samples == b.samples
    assert all(p.grad is None for p in model.parameters())


def test_settings_and_data_are_checked() -> None:
    model, loss_fn, data = _setup()
    with pytest.raises(ValueError, match="holds 7"):
        batch_sharpness(model, loss_fn, data, N)
    with pytest.raises(ValueError, match="rtol"):
        batch_sharpness(model, loss_fn, data, B, rtol=0.0)
    with pytest.raises(ValueError, match="min_batches"):
        BatchSharpness(min_batches=1)
    with pytest.raises(ValueError, match="max_batches"):
        BatchSharpness(min_batches=10, max_batches=5)


def test_probe_reports_the_sgd_threshold_and_needs_a_batch_size() -> None:
    model, loss_fn, data = _setup()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    probe = BatchSharpness(max_batches=20)
    ctx = ProbeContext(model, loss_fn, [data], optimizers=[sgd], batch_size=B)
    result = probe.run(ctx)
    out = probe.scalars(result)
    assert out["landscape/stability_threshold"] == pytest.approx(3.0 / 0.1)
    assert out["landscape/batch_sharpness"] == result.value
    assert out["landscape/batch_sharpness_stderr"] == result.stderr
    adam = torch.optim.Adam(model.parameters())
    probe.run(ProbeContext(model, loss_fn, [data], optimizers=[adam], batch_size=B))
    assert "landscape/stability_threshold" not in probe.scalars(result)  # not Adam's
    from lightning_landscape.operators import ProbeFailure

    with pytest.raises(ProbeFailure, match="batch_size"):
        probe.run(ProbeContext(model, loss_fn, [data]))
    with pytest.raises(ProbeFailure, match="num_probe_samples"):
        BatchSharpness(batch_size=N).run(ProbeContext(model, loss_fn, [data]))


def test_finite_differences_draw_the_same_batches_to_their_accuracy() -> None:
    """The same seed draws the same batches; each value agrees with double backward's to the
    differences' accuracy (float64), and the parameters come back bit for bit."""
    model, loss_fn, data = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    exact = batch_sharpness(model, loss_fn, data, B, min_batches=8, max_batches=8, seed=2)
    fd = batch_sharpness(
        model, loss_fn, data, B, min_batches=8, max_batches=8, seed=2, route="finite_difference"
    )
    assert fd.num_batches == exact.num_batches == 8
    for a, b in zip(fd.samples, exact.samples, strict=True):
        assert a == pytest.approx(b, rel=1e-7)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="route"):
        batch_sharpness(model, loss_fn, data, B, route="functorch")


def test_the_probe_follows_a_switch_to_finite_differences() -> None:
    """A kernel-style GELU: double backward is off, finite differences match the reference."""
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(40, 4, dtype=torch.float64, generator=gen), torch.randint(0, 3, (40,)))

    def measure(kernel: str | None, switch: bool) -> float:
        model = KernelMLP(kernel).double()
        probe = BatchSharpness(batch_size=8, min_batches=6, max_batches=6)
        with curvature_context(model):
            ctx = ProbeContext(model, classification_loss, [data])
            if switch:
                check = check_products(ctx, switch=True)
                assert check is not None and check.switched
            return probe.run(ctx).value

    truth = measure(None, switch=False)
    assert measure("detached", switch=True) == pytest.approx(truth, rel=1e-6)
    assert abs(measure("detached", switch=False) - truth) > 1e-3 * abs(truth)
