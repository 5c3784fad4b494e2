"""Preconditioned sharpness against dense float64 truth (Adam, AdamW, coupled L2, RMSprop).

The preconditioner ``P`` of the truth is recovered from the step the optimizer actually took
(``Δθ = −η P⁻¹ m``), not from the formula the library uses, so a wrong bias correction, a
missing ε or a group's learning rate applied to the wrong entries would show. torch computes
the bias corrections from its float32 ``step`` tensor, so the step it takes differs from the
float64 formula by ~2e-8 relative: the comparisons are at 1e-6.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_landscape.optim import SAM, probed_stability
from lightning_landscape.probes import ProbeContext, Sharpness
from tests._models import dense_hessian, make_model

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _per_entry(model: nn.Module, optimizer: torch.optim.Optimizer, key: str) -> Tensor:
    """A hyper-parameter of each parameter entry's param group, flat."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p in model.parameters():
        value = group_of[id(p)][key]
        out.append(torch.full((p.numel(),), float(value[0] if key == "betas" else value)))
    return torch.cat(out).double()


def _train(factory: OptimizerFactory, steps: int) -> tuple[Any, ...]:
    model, loss_fn, batch = make_model("mlp")
    optimizer = factory(model)
    before = grad = _flat(model)
    for i in range(steps):
        optimizer.zero_grad()
        # a different batch per step, so v is not the square of one gradient
        x, y = batch
        loss_fn(model, (x * (1 + 0.3 * i), y)).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
        before = _flat(model)
        optimizer.step()
    return model, loss_fn, batch, optimizer, before, grad


def _adam_truth(factory: OptimizerFactory, steps: int, decoupled: bool) -> tuple[Any, ...]:
    """The model, its optimizer and the dense ratio λ₁(S^½(H + Γ)S^½) and λ₁(P⁻¹H)."""
    model, loss_fn, batch, optimizer, before, _ = _train(factory, steps)
    lr = _per_entry(model, optimizer, "lr")
    beta = _per_entry(model, optimizer, "betas")
    decay = _per_entry(model, optimizer, "weight_decay")
    m = torch.cat([optimizer.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    step = _flat(model) - before
    if decoupled:  # AdamW first shrinks θ by (1 − ηγ), then takes the Adam step
        step = step + lr * decay * before
    assert bool((m.abs() > 1e-12).all())
    precond = -lr * m / step  # Δθ = −η P⁻¹ m, per entry
    hessian = dense_hessian(model, loss_fn, batch)
    if not decoupled:
        hessian = hessian + torch.diag(decay)  # coupled L2: γθ is part of the gradient
    scale = lr * (1 - beta) / ((2 + 2 * beta) * precond)
    root = scale.sqrt()
    ratio = torch.linalg.eigvalsh(root[:, None] * hessian * root[None, :]).max().item()
    return model, loss_fn, batch, optimizer, ratio, hessian, precond


def _measure(model: nn.Module, loss_fn: Any, batch: Any, optimizer: Any, **kw: Any) -> Any:
    sharpness = Sharpness(top_k=1, lambda_min=False, tol=1e-9, **kw)
    return sharpness.run(ProbeContext(model, loss_fn, [batch], optimizers=[optimizer]))


@pytest.mark.parametrize(
    ("name", "factory", "steps", "decoupled"),
    [
        ("adam t=1", lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), 1, False),
        ("adam t=2", lambda m: torch.optim.Adam(m.parameters(), lr=3e-3), 2, False),
        (
            "adam amsgrad eps",
            lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, eps=1e-3, amsgrad=True),
            3,
            False,
        ),
        (
            "adamw",
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.95, 0.99)),
            4,
            True,
        ),
        (
            "adam coupled L2",
            lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=0.5),
            2,
            False,
        ),
        (
            "two groups",
            lambda m: torch.optim.AdamW(
                [
                    {"params": m.fc1.parameters(), "lr": 3e-2, "betas": (0.8, 0.999)},
                    {"params": [*m.fc2.parameters(), *m.fc3.parameters()], "lr": 1e-3},
                ],
                weight_decay=0.1,
            ),
            2,
            True,
        ),
    ],
)
def test_preconditioned_ratio_matches_dense_truth(
    name: str, factory: OptimizerFactory, steps: int, decoupled: bool
) -> None:
    model, loss_fn, batch, optimizer, ratio, hessian, precond = _adam_truth(
        factory, steps, decoupled
    )
    result = _measure(model, loss_fn, batch, optimizer)
    assert result.preconditioned is not None and result.preconditioned.all_converged
    assert result.stability_ratio == pytest.approx(ratio, rel=1e-6), name
    group = optimizer.param_groups[0]  # the reference group: the first probed one
    beta, lr = group["betas"][0], group["lr"]
    threshold = (2 + 2 * beta) / ((1 - beta) * lr)
    assert result.stability_threshold == pytest.approx(threshold, rel=1e-12)
    assert result.preconditioned_lambda_max == pytest.approx(ratio * threshold, rel=1e-6)
    if len(optimizer.param_groups) == 1:  # λ₁ of the non-symmetric P⁻¹(H + Γ), directly
        direct = torch.linalg.eigvals(hessian / precond[:, None]).real.max().item()
        assert result.preconditioned_lambda_max == pytest.approx(direct, rel=1e-6)
    # the raw λ_max is measured as before, and is not compared with Adam's threshold
    assert result.lambda_max == pytest.approx(
        torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batch)).max().item(), rel=1e-7
    )
    assert result.raw_threshold is None


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_rmsprop_ratio_matches_dense_truth(momentum: float) -> None:
    lr = 1e-3
    model, loss_fn, batch, optimizer, before, grad = _train(
        lambda m: torch.optim.RMSprop(m.parameters(), lr=lr, momentum=momentum), 1
    )
    precond = -lr * grad / (_flat(model) - before)  # t = 1: Δθ = −η g / P (buffer = g / P)
    hessian = dense_hessian(model, loss_fn, batch)
    root = (lr / ((2 + 2 * momentum) * precond)).sqrt()
    ratio = torch.linalg.eigvalsh(root[:, None] * hessian * root[None, :]).max().item()
    result = _measure(model, loss_fn, batch, optimizer)
    assert result.stability.optimizer == "RMSprop"
    assert result.stability_ratio == pytest.approx(ratio, rel=1e-6)
    assert result.stability_threshold == pytest.approx((2 + 2 * momentum) / lr)


def test_entries_no_optimizer_updates_do_not_count() -> None:
    """Probed parameters outside the optimizer do not move: their scale is 0."""
    model, loss_fn, batch, optimizer, *_ = _train(
        lambda m: torch.optim.Adam([*m.fc2.parameters(), *m.fc3.parameters()], lr=1e-2), 2
    )
    n1 = sum(p.numel() for p in model.fc1.parameters())
    stability, why = probed_stability([optimizer], list(model.parameters()))
    assert why is None and stability is not None and stability.scale is not None
    assert bool((stability.scale[:n1] == 0).all()) and bool((stability.scale[n1:] > 0).all())
    hessian = dense_hessian(model, loss_fn, batch)
    root = stability.scale.sqrt()
    pre = torch.linalg.eigvalsh(root[:, None] * hessian * root[None, :]).max().item()
    sub = hessian[n1:, n1:]
    inner = root[n1:]
    assert pre == pytest.approx(
        torch.linalg.eigvalsh(inner[:, None] * sub * inner[None, :]).max().item(), rel=1e-10
    )
    result = _measure(model, loss_fn, batch, optimizer)
    assert result.preconditioned_lambda_max == pytest.approx(pre, rel=1e-6)
    assert result.stability_ratio == pytest.approx(pre / stability.threshold, rel=1e-6)


def _groups_model(lr: tuple[float, float]) -> tuple[Any, ...]:
    """Two AdamW groups (other η and β₁) after two steps, with LR schedulers' ``initial_lr``."""

    def factory(m: nn.Module) -> torch.optim.Optimizer:
        groups = [
            {"params": m.fc1.parameters(), "lr": lr[0], "betas": (0.8, 0.999)},
            {"params": [*m.fc2.parameters(), *m.fc3.parameters()], "lr": lr[1]},
        ]
        optimizer = torch.optim.AdamW(groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]  # what a scheduler keeps
        return optimizer

    return _train(factory, 2)


def test_at_a_learning_rate_of_zero_the_preconditioned_sharpness_is_still_measured() -> None:
    """η = 0 (a decay to 0, a warm-up's start): λ₁(P⁻¹H) as at the rates the schedule scales,
    ratio 0 (no step is unstable), no threshold logged."""
    model, loss_fn, batch, optimizer, *_ = _groups_model((3e-2, 1e-3))
    live = _measure(model, loss_fn, batch, optimizer)
    assert live.stability_threshold == pytest.approx(3.6 / (0.2 * 3e-2), rel=1e-12)
    for group in optimizer.param_groups:  # the end of a schedule that decays to 0
        group["lr"] = 0.0
    stability, why = probed_stability([optimizer], list(model.parameters()))
    assert why is None and stability is not None and stability.threshold == math.inf
    assert stability.edge is None
    ended = _measure(model, loss_fn, batch, optimizer)
    assert ended.preconditioned_lambda_max == pytest.approx(live.preconditioned_lambda_max, 1e-6)
    assert ended.stability_ratio == 0.0 and ended.stability_threshold is None
    logged = tags_of(Sharpness(), ended)
    assert {"preconditioned_lambda_max", "stability_ratio"} <= logged
    assert "stability_threshold" not in logged
    # without initial_lr (η set to 0 by hand) every group counts alike
    for group in optimizer.param_groups:
        del group["initial_lr"]
    alike = _measure(model, loss_fn, batch, optimizer)
    assert alike.stability_ratio == 0.0 and alike.preconditioned_lambda_max is not None
    assert alike.preconditioned_lambda_max != pytest.approx(live.preconditioned_lambda_max, 1e-3)


def test_a_group_at_zero_learning_rate_does_not_move() -> None:
    """Only the reference group's η = 0 means "no edge"; another group at 0 is frozen."""
    model, _, _, optimizer, *_ = _groups_model((3e-2, 1e-3))
    optimizer.param_groups[1]["lr"] = 0.0
    stability, _ = probed_stability([optimizer], list(model.parameters()))
    assert stability is not None and stability.scale is not None
    n1 = sum(p.numel() for p in model.fc1.parameters())
    assert bool((stability.scale[n1:] == 0).all()) and bool((stability.scale[:n1] > 0).all())
    assert stability.threshold == pytest.approx(3.6 / (0.2 * 3e-2), rel=1e-12)
    assert stability.edge == stability.threshold


def test_sgd_at_a_learning_rate_of_zero_has_ratio_zero() -> None:
    model, loss_fn, batch = make_model("mlp")
    result = _measure(model, loss_fn, batch, torch.optim.SGD(model.parameters(), lr=0.0))
    assert result.stability is not None and result.stability.threshold == math.inf
    assert result.stability_ratio == 0.0
    assert result.stability_threshold is None and result.raw_threshold is None


def test_before_the_first_step_there_is_no_preconditioned_sharpness() -> None:
    model, loss_fn, batch = make_model("mlp")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    notes: list[str] = []
    sharpness = Sharpness(top_k=1, lambda_min=False)
    for _ in range(2):
        ctx = ProbeContext(model, loss_fn, [batch], optimizers=[optimizer], note=notes.append)
        result = sharpness.run(ctx)
    assert result.preconditioned is None and result.stability_ratio is None
    assert result.stability_threshold is None and result.preconditioned_lambda_max is None
    assert tags_of(sharpness, result) == {"lambda_max", "probe_loss", "converged", "max_residual"}
    assert len(notes) == 1 and "first step" in notes[0]  # said once, not at every probe


def test_preconditioned_off_and_sgd_keep_the_raw_meaning() -> None:
    model, loss_fn, batch, optimizer, *_ = _train(
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), 2
    )
    off = _measure(model, loss_fn, batch, optimizer, preconditioned=False)
    assert off.preconditioned is None and off.stability_ratio is None
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    raw = _measure(model, loss_fn, batch, sgd)
    assert raw.preconditioned is None and raw.stability.kind == "raw"
    assert raw.stability_ratio == pytest.approx(raw.lambda_max * 0.1 / 3.8, rel=1e-12)
    assert raw.raw_threshold == pytest.approx(38.0)


def test_sam_over_adamw_uses_its_base_optimizer_state() -> None:
    model, loss_fn, batch = make_model("mlp")
    sam = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)

    def closure() -> Tensor:
        sam.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    for _ in range(2):
        sam.step(closure)
    via_sam, _ = probed_stability([sam], list(model.parameters()))
    direct, _ = probed_stability([sam.base_optimizer], list(model.parameters()))
    assert via_sam is not None and direct is not None and via_sam.optimizer == "AdamW"
    assert via_sam.scale is not None and direct.scale is not None
    assert torch.equal(via_sam.scale, direct.scale)
    assert via_sam.threshold == pytest.approx((2 + 2 * 0.9) / (0.1 * 1e-2))


def test_other_optimizers_have_no_threshold() -> None:
    model, *_ = make_model("mlp")
    stability, why = probed_stability(
        [torch.optim.Adagrad(model.parameters())], list(model.parameters())
    )
    assert stability is None and why is not None and "Adagrad" in why
    warmup, _ = probed_stability(
        [torch.optim.AdamW(model.parameters(), lr=0.0)], list(model.parameters())
    )  # a warm-up from 0 before the first step: no edge, and no state yet
    assert warmup is not None and warmup.threshold == math.inf and warmup.scale is None


def tags_of(sharpness: Sharpness, result: Any) -> set[str]:
    return {k.removeprefix("landscape/") for k in sharpness.scalars(result)} - {"eigenvalues/0"}
