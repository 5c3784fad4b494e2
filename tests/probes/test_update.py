"""Curvature along the update: dense float64 truth in a Lightning run; when the copy is taken."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_landscape import LandscapeMonitor, UpdateCurvature
from lightning_landscape.optim import SAM
from lightning_landscape.probes import ProbeContext
from tests._lightning import (
    ClassifierModule,
    MemoryLogger,
    make_dataloader,
    make_dataset,
    trainer_kwargs,
)


def _flat(module: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class _Recorder(Callback):
    """The parameters after every step, and when the monitor held a copy for the next step."""

    def __init__(self, monitor: LandscapeMonitor) -> None:
        self.monitor = monitor
        self.theta: dict[int, Tensor] = {}
        self.copies: list[int] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.theta[0] = _flat(pl_module)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        previous = self.monitor._previous
        if previous is not None and previous[0] == trainer.global_step + 1:
            self.copies.append(trainer.global_step + 1)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.theta[trainer.global_step] = _flat(pl_module)


class _Adam(ClassifierModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)


class _Sam(ClassifierModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return SAM(self.parameters(), torch.optim.SGD, rho=0.1, lr=self.lr, momentum=0.9)


class _Adagrad(ClassifierModule):  # no stability threshold known: the update probe still works
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adagrad(self.parameters(), lr=self.lr)


@pytest.mark.parametrize("module_cls", [ClassifierModule, _Adam, _Sam, _Adagrad])
def test_update_curvature_and_overshoot_match_dense_truth(module_cls: type) -> None:
    data = make_dataset(48, dtype=torch.float64)
    monitor = LandscapeMonitor(
        probes=[UpdateCurvature(every_n_steps=4)], probe_dataloader=DataLoader(data, batch_size=48)
    )
    recorder = _Recorder(monitor)
    logger = MemoryLogger()
    pl.seed_everything(0, verbose=False)
    module = module_cls(lr=0.05, dropout=0.0, batch_norm=False)
    trainer = pl.Trainer(
        **trainer_kwargs(
            callbacks=[monitor, recorder], max_steps=8, logger=logger, precision="64-true"
        )
    )
    trainer.fit(module, make_dataloader(make_dataset(64, dtype=torch.float64)))
    # A copy only before the steps that precede a probe (4 and 8), not before every step (SAM
    # calls the hook at both of its passes: the copy is the first, at the unperturbed θ).
    assert sorted(set(recorder.copies)) == [4, 8]
    assert logger.steps("landscape/update/curvature") == [4, 8]  # nothing at step 0
    x, y = data.tensors
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]

    def loss(flat: Tensor) -> Tensor:
        pieces = flat.split([s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return F.cross_entropy(torch.func.functional_call(module, params, (x,)), y)

    theta = recorder.theta[8]
    u = theta - recorder.theta[7]
    hessian = torch.autograd.functional.hessian(loss, theta)
    grad = torch.autograd.functional.jacobian(loss, theta)
    result = monitor.probe_named("update").last_result
    uhu = float(u @ hessian @ u)
    assert result.curvature == pytest.approx(uhu / float(u @ u), rel=1e-9)
    assert result.step_norm == pytest.approx(float(u.norm()), rel=1e-12)
    gu = float(grad @ u)
    assert result.descent == pytest.approx(-gu / float(grad.norm() * u.norm()), rel=1e-9)
    if gu < 0:
        assert result.overshoot == pytest.approx(uhu / (-2 * gu), rel=1e-9)
    else:
        assert result.overshoot is None
    at_8 = {k: v for step, m in logger.records if step == 8 for k, v in m.items()}
    assert at_8["landscape/update/curvature"] == result.curvature


def test_overshoot_predicts_whether_repeating_the_step_raises_the_loss() -> None:
    """On a quadratic the model is exact: overshoot > 1 iff L(θ + u) > L(θ)."""
    model = torch.nn.Linear(2, 1, bias=False).double()
    x = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64).sqrt())  # H = diag(1, 10)

    def loss_fn(m: torch.nn.Module, b: Tensor) -> Tensor:
        return 0.5 * (m(b) ** 2).sum()

    seen: set[Any] = set()
    for lr in (0.05, 0.09, 0.15):  # η λ_max = 0.5, 0.9, 1.5
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[1.0, 1.0]]))
        previous = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        optimizer.zero_grad()
        loss_fn(model, x).backward()
        optimizer.step()
        result = UpdateCurvature().run(ProbeContext(model, loss_fn, [x], previous=previous))
        u = model.weight.detach().reshape(-1) - previous
        with torch.no_grad():
            before = float(loss_fn(model, x))
            model.weight.add_(u.view(1, 2))
            after = float(loss_fn(model, x))
        assert result is not None
        assert result.curvature == pytest.approx(
            float(u @ (torch.tensor([1.0, 10.0]) * u) / (u @ u))
        )
        if result.overshoot is None:  # uphill from θ_t: repeating the step raises the loss
            assert after > before
            seen.add("uphill")
        else:
            assert (result.overshoot > 1) == (after > before), lr
            seen.add(result.overshoot > 1)
    assert seen == {False, True, "uphill"}


def test_no_step_behind_reports_nothing() -> None:
    model = torch.nn.Linear(2, 1)
    loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    batch = torch.randn(4, 2)
    assert UpdateCurvature().run(ProbeContext(model, loss_fn, [batch])) is None
    same = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert UpdateCurvature().run(ProbeContext(model, loss_fn, [batch], previous=same)) is None
