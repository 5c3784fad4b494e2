"""Curvature-driven monitor hooks: StabilityLRGuard, SharpnessAdaptiveRho, plain callables."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import ProbeReport
from lightning_landscape.callbacks.control import SharpnessAdaptiveRho, StabilityLRGuard
from tests._lightning import (
    ClassifierModule,
    MemoryLogger,
    fit_with_lightning_cli,
    make_dataloader,
    sharpness_monitor,
    trainer_kwargs,
)

SCALE = "landscape/control/lr_scale"
RATIO = "landscape/control/stability_ratio_effective"
RHO = "landscape/control/rho"


def _report(lambda_max: float, step: int = 0) -> ProbeReport:
    return ProbeReport(
        step=step,
        epoch=0,
        eigenvalues=(lambda_max,),
        lambda_min=None,
        trace=None,
        trace_stderr=None,
        stability_threshold=None,
        stability_ratio=None,
        probe_loss=0.0,
        converged=True,
        max_residual=0.0,
        num_hvps=0,
        seconds=0.0,
    )


def _fake_trainer(optimizer: torch.optim.Optimizer, rank_zero: bool = True) -> Any:
    logger = MemoryLogger()
    return SimpleNamespace(optimizers=[optimizer], loggers=[logger], is_global_zero=rank_zero)


def _sgd(*lrs: float, momentum: float = 0.0, **extra: Any) -> torch.optim.SGD:
    groups = [{"params": [nn.Parameter(torch.zeros(2))], "lr": lr, **extra} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=momentum)


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


# --------------------------------------------------------------------------------------------------
# 1. StabilityLRGuard: the rule, on fake reports and a real SGD
# --------------------------------------------------------------------------------------------------


def test_guard_cuts_to_target_and_holds() -> None:
    opt = _sgd(0.1)  # threshold 2/0.1 = 20; λ = 30 → unscaled ratio 1.5
    guard = StabilityLRGuard(target=0.9)
    assert guard.apply(opt, 30.0) == pytest.approx(0.6)
    assert _lrs(opt) == [pytest.approx(0.06)]
    assert guard.last_ratio == pytest.approx(0.9)
    # Same curvature: the scale stays (recovery is capped by the target), the rate is not re-cut
    # from the already scaled value.
    for _ in range(3):
        assert guard.apply(opt, 30.0) == pytest.approx(0.6)
    assert _lrs(opt) == [pytest.approx(0.06)]


def test_guard_does_nothing_below_target() -> None:
    opt = _sgd(0.1)
    guard = StabilityLRGuard(target=0.9)
    assert guard.apply(opt, 17.0) == 1.0  # ratio 0.85
    assert guard.apply(opt, -5.0) == 1.0  # negative curvature: no constraint
    assert _lrs(opt) == [0.1]


def test_guard_recovers_gradually() -> None:
    opt = _sgd(0.1)
    guard = StabilityLRGuard(target=0.9, recovery=1.1)
    guard.apply(opt, 30.0)
    scales = [guard.apply(opt, 10.0) for _ in range(7)]  # unscaled ratio 0.5: room to recover
    expected = [0.66, 0.726, 0.7986, 0.87846, 0.966306, 1.0, 1.0]
    assert scales == pytest.approx(expected)
    assert _lrs(opt) == [pytest.approx(0.1)]


def test_guard_recovery_capped_by_target() -> None:
    opt = _sgd(0.1)
    guard = StabilityLRGuard(target=0.9, recovery=1.1)
    guard.apply(opt, 30.0)  # 0.6
    # Unscaled ratio 1.25: the target allows 0.72; recovery gets there in two reports.
    assert guard.apply(opt, 25.0) == pytest.approx(0.66)
    assert guard.apply(opt, 25.0) == pytest.approx(0.72)
    assert guard.apply(opt, 25.0) == pytest.approx(0.72)
    assert guard.last_ratio == pytest.approx(0.9)
    # Sharper again: cut at once.
    assert guard.apply(opt, 45.0) == pytest.approx(0.4)
    assert _lrs(opt) == [pytest.approx(0.04)]


def test_guard_min_scale_floor_warns_once() -> None:
    opt = _sgd(0.1)
    guard = StabilityLRGuard(target=0.9, min_scale=0.01)
    with pytest.warns(UserWarning, match="min_scale"):
        assert guard.apply(opt, 1e6) == 0.01
    assert _lrs(opt) == [pytest.approx(1e-3)]
    assert guard.last_ratio is not None and guard.last_ratio > 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert guard.apply(opt, 1e6) == 0.01


def test_guard_uses_momentum_threshold() -> None:
    # (2 + 2·0.9)/0.1 = 38: λ = 57 gives ratio 1.5 (without momentum it would be 2.85).
    opt = _sgd(0.1, momentum=0.9)
    guard = StabilityLRGuard(target=0.9)
    assert guard.apply(opt, 57.0) == pytest.approx(0.6)
    assert guard.last_ratio == pytest.approx(0.9)


def test_guard_param_groups_selection() -> None:
    # Group 0: ratio 0.1·30/2 = 1.5, group 1: 0.15.
    opt = _sgd(0.1, 0.01)
    StabilityLRGuard(param_groups=[1]).apply(opt, 30.0)
    assert _lrs(opt) == [0.1, 0.01]  # group 1 alone is stable
    StabilityLRGuard(param_groups=[0]).apply(opt, 30.0)
    assert _lrs(opt) == [pytest.approx(0.06), 0.01]

    opt = _sgd(0.1, 0.01)
    StabilityLRGuard().apply(opt, 30.0)  # all groups, one scale set by the most restrictive
    assert _lrs(opt) == [pytest.approx(0.06), pytest.approx(0.006)]

    with pytest.raises(ValueError, match="only 2 param group"):
        StabilityLRGuard(param_groups=[2]).apply(opt, 30.0)


def test_guard_refuses_optimizers_without_a_threshold_before_the_first_step() -> None:
    class AdagradModule(ClassifierModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adagrad(self.parameters(), lr=self.lr)

    guard = StabilityLRGuard()
    monitor = sharpness_monitor(5, 1, hooks=[guard])
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[monitor], max_steps=5))
    with pytest.raises(TypeError, match=r"SGD, Adam, AdamW and RMSprop.*not Adagrad"):
        trainer.fit(AdagradModule(), make_dataloader())
    assert trainer.global_step == 0 and monitor.history == []  # refused, not failed mid-run


def test_guard_refuses_some_groups_of_an_adaptive_optimizer() -> None:
    opt = torch.optim.AdamW(
        [{"params": [nn.Parameter(torch.zeros(2))]}, {"params": [nn.Parameter(torch.zeros(2))]}]
    )
    with pytest.raises(ValueError, match="leave param_groups unset"):
        StabilityLRGuard(param_groups=[0]).check(_fake_trainer(opt), Any)
    StabilityLRGuard(param_groups=[0, 1]).check(_fake_trainer(opt), Any)  # all of them: fine


def test_guard_acts_on_the_preconditioned_ratio_with_adam() -> None:
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1e-3)
    guard = StabilityLRGuard(target=0.5, recovery=3.0)
    trainer = _fake_trainer(opt)
    before_state = dataclasses.replace(_report(1e9), stability_ratio=None)
    guard.on_landscape(trainer, Any, before_state)  # no optimizer state yet: nothing to act on
    assert float(opt.param_groups[0]["lr"]) == 1e-3 and guard.scale == 1.0
    # The raw λ_max is ignored under Adam: the preconditioned ratio sets the scale.
    report = dataclasses.replace(
        _report(1e9), stability_ratio=2.0, preconditioned_lambda_max=2.0 * 38 / 1e-3
    )
    guard.on_landscape(trainer, Any, report)
    assert guard.scale == pytest.approx(0.25) and guard.last_ratio == pytest.approx(0.5)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(2.5e-4)
    # Measured again at the scaled rate: ratio 0.2 → the unscaled ratio is 0.8, recover to 0.5.
    report = dataclasses.replace(report, stability_ratio=0.2)
    guard.on_landscape(trainer, Any, report)
    assert guard.scale == pytest.approx(0.5 / 0.8)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-3 * 0.5 / 0.8)
    with pytest.raises(ValueError, match="finite and non-negative"):
        guard.apply_ratio(opt, float("nan"))


class _AdamQuadratic(pl.LightningModule):
    """``½ θᵀ diag(1..10) θ`` under Adam with a large ε and a linear warm-up.

    With ``ε`` far above the gradients, ``P ≈ ε`` barely adapts, so past the edge the iterates
    grow until the gradients reach ``ε`` (Adam's self-stabilisation through ``v`` kicks in only
    then). The learning rate puts the steady-state preconditioned ratio at 1.5 × the edge:
    ``η (1 − β₁) λ_max / ((2 + 2β₁) ε) = 1.5``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.ones(10, dtype=torch.float64))
        self.register_buffer("curvatures", torch.linspace(1, 10, 10, dtype=torch.float64))
        self.losses: list[float] = []

    def loss(self) -> Tensor:
        return 0.5 * (self.curvatures * self.theta**2).sum()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss()
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> Any:
        eps = 1e4
        lr = 1.5 * (2 + 2 * 0.9) * eps / ((1 - 0.9) * 10.0)
        opt = torch.optim.Adam(self.parameters(), lr=lr, eps=eps)
        warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=30)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


@pytest.mark.parametrize("guarded", [False, True])
def test_guard_keeps_adam_below_its_edge_on_a_quadratic(guarded: bool) -> None:
    from lightning_landscape import LandscapeMonitor, Sharpness

    module = _AdamQuadratic()
    sharp = Sharpness(top_k=1, lambda_min=False, every_n_steps=2, histogram=False, figure=False)
    hooks = [StabilityLRGuard(target=0.9, log=False)] if guarded else []
    monitor = LandscapeMonitor(
        probes=[sharp], loss_fn=lambda m, b: m.loss(), num_probe_samples=2, hooks=hooks
    )
    data = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[monitor], max_steps=160))
    trainer.fit(module, data)
    ratios = [r.stability_ratio for r in monitor.history if r.stability_ratio is not None]
    assert len(ratios) >= 70
    if guarded:  # held below the edge; the loss falls by orders of magnitude
        assert max(ratios) < 1.0
        assert max(module.losses) < 2 * module.losses[0] and module.losses[-1] < 1e-3
    else:  # past the edge: the loss blows up by six orders of magnitude before v catches up
        assert max(ratios) > 1.1
        assert max(module.losses) > 1e6 * module.losses[0]


def test_guard_logs_on_rank_zero_only() -> None:
    opt = _sgd(0.1)
    trainer = _fake_trainer(opt)
    guard = StabilityLRGuard(target=0.9)
    guard.on_landscape(trainer, Any, _report(30.0, step=7))
    guard.on_landscape(trainer, Any, _report(10.0, step=9))
    logger = trainer.loggers[0]
    assert logger.values(SCALE) == [(7, pytest.approx(0.6)), (9, pytest.approx(0.66))]
    assert logger.values(RATIO) == [(7, pytest.approx(0.9)), (9, pytest.approx(0.33))]

    other = _fake_trainer(_sgd(0.1), rank_zero=False)
    StabilityLRGuard().on_landscape(other, Any, _report(30.0))
    assert other.loggers[0].records == []
    assert float(other.optimizers[0].param_groups[0]["lr"]) == pytest.approx(0.06)  # acts anyway

    quiet = _fake_trainer(_sgd(0.1))
    StabilityLRGuard(log=False).on_landscape(quiet, Any, _report(30.0))
    assert quiet.loggers[0].records == []


def test_guard_composes_with_chainable_scheduler() -> None:
    opt = _sgd(0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    guard = StabilityLRGuard(target=0.9, recovery=1.1)
    guard.apply(opt, 30.0)  # scale 0.6
    sched.step()  # multiplies the scaled rate: 0.03 = schedule 0.05 × 0.6
    assert _lrs(opt) == [pytest.approx(0.03)]
    # The guard sees the schedule's 0.05 (ratio 0.75) and recovers from 0.6, not from scratch.
    assert guard.apply(opt, 30.0) == pytest.approx(0.66)
    assert _lrs(opt) == [pytest.approx(0.05 * 0.66)]
    sched.step()
    assert _lrs(opt) == [pytest.approx(0.025 * 0.66)]


def test_guard_composes_with_closed_form_scheduler() -> None:
    def run(kind: str) -> tuple[float, float]:
        opt = _sgd(0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)
        guard = StabilityLRGuard(target=0.9, recovery=1.1, scheduler=kind)  # type: ignore[arg-type]
        guard.apply(opt, 30.0)  # 0.06
        sched.step()  # overwrites with the unscaled schedule: 0.05
        assert _lrs(opt) == [pytest.approx(0.05)]
        return guard.apply(opt, 30.0), _lrs(opt)[0]

    # closed_form: 0.05 is the unscaled rate (ratio 0.75), the scale recovers to 0.66.
    scale, lr = run("closed_form")
    assert scale == pytest.approx(0.66) and lr == pytest.approx(0.05 * 0.66)
    # chainable (wrong for LambdaLR) would take 0.05 / 0.6 as the schedule and exceed it.
    scale, lr = run("chainable")
    assert lr > 0.05

    # Untouched by a scheduler between reports, closed_form keeps its scale.
    opt = _sgd(0.1)
    guard = StabilityLRGuard(scheduler="closed_form")
    guard.apply(opt, 30.0)
    assert guard.apply(opt, 30.0) == pytest.approx(0.6)
    assert _lrs(opt) == [pytest.approx(0.06)]


def test_guard_state_dict_round_trip(tmp_path: Path) -> None:
    opt_a, opt_b = _sgd(0.1), _sgd(0.1)
    a = StabilityLRGuard(target=0.8, scheduler="closed_form")
    a.apply(opt_a, 30.0)
    a.apply(opt_a, 12.0)
    opt_b.load_state_dict(opt_a.state_dict())  # the optimizer saves the scaled lr
    torch.save(a.state_dict(), tmp_path / "guard.pt")
    b = StabilityLRGuard(target=0.8, scheduler="closed_form")
    b.load_state_dict(torch.load(tmp_path / "guard.pt", weights_only=True))
    assert b.state_dict() == a.state_dict()
    for lam in (20.0, 50.0, 5.0):
        assert b.apply(opt_b, lam) == a.apply(opt_a, lam)
        assert _lrs(opt_b) == _lrs(opt_a)
    # Without its state a guard misreads the scaled rate as the schedule.
    c, opt_c = StabilityLRGuard(target=0.8), _sgd(0.1)
    opt_c.load_state_dict(opt_b.state_dict())
    assert c.apply(opt_c, 20.0) != b.apply(opt_b, 20.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": 0.0}, "target"),
        ({"target": 1.5}, "target"),
        ({"target": math.nan}, "target"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"min_scale": 2.0}, "min_scale"),
        ({"recovery": 0.9}, "recovery"),
        ({"param_groups": []}, "param_groups"),
        ({"param_groups": [0, 0]}, "param_groups"),
        ({"param_groups": [-1]}, "param_groups"),
        ({"param_groups": "0"}, "param_groups"),
        ({"optimizer_index": -1}, "optimizer_index"),
        ({"scheduler": "cosine"}, "scheduler"),
    ],
)
def test_guard_bad_args(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StabilityLRGuard(**kwargs)


def test_guard_bad_optimizer_index() -> None:
    guard = StabilityLRGuard(optimizer_index=1)
    with pytest.raises(ValueError, match="optimizer_index=1"):
        guard.on_landscape(_fake_trainer(_sgd(0.1)), Any, _report(30.0))


# --------------------------------------------------------------------------------------------------
# 2. StabilityLRGuard in training: a quadratic with a known Hessian
# --------------------------------------------------------------------------------------------------

_N, _D = 64, 8


def _regression_data() -> tuple[Tensor, Tensor, float]:
    """Linear regression data and λ_max of the Hessian XᵀX/n of ½·mean((Xw − y)²)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(_N, _D, generator=gen) * torch.linspace(0.3, 2.0, _D)
    y = x @ torch.randn(_D, generator=gen) + 0.1 * torch.randn(_N, generator=gen)
    hessian = x.double().T @ x.double() / _N
    return x, y, float(torch.linalg.eigvalsh(hessian)[-1])


class QuadraticModule(pl.LightningModule):
    """Full-batch least squares: the Hessian is XᵀX/n whatever the weights."""

    def __init__(
        self, lr: float, momentum: float = 0.0, step_size: int | None = None, gamma: float = 0.5
    ) -> None:
        super().__init__()
        self.lr, self.momentum, self.step_size, self.gamma = lr, momentum, step_size, gamma
        self.linear = nn.Linear(_D, 1, bias=False)
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = 0.5 * (self.linear(x).squeeze(-1) - y).pow(2).mean()
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if self.step_size is None:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, self.step_size, self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _full_batch() -> DataLoader[Any]:
    x, y, _ = _regression_data()
    return DataLoader(TensorDataset(x, y), batch_size=_N, shuffle=False)


@pytest.mark.parametrize(("momentum", "edge_multiple"), [(0.0, 1.5), (0.5, 1.5)])
def test_guard_keeps_diverging_sgd_stable(momentum: float, edge_multiple: float) -> None:
    _, _, lam = _regression_data()
    lr = edge_multiple * (2 + 2 * momentum) / lam  # η·λ_max = 1.5 × the edge 2 + 2β: diverges
    runs = {}
    for guarded in (False, True):
        guard = StabilityLRGuard(target=0.9)
        logger = MemoryLogger()
        monitor = sharpness_monitor(5, 1, hooks=[guard] if guarded else None)
        pl.seed_everything(0, verbose=False)
        module = QuadraticModule(lr, momentum)
        trainer = pl.Trainer(**trainer_kwargs(callbacks=[monitor], max_steps=40, logger=logger))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unguarded run's late probes may overflow
            trainer.fit(module, _full_batch())
        runs[guarded] = (module.losses, logger, monitor, guard)

    losses, _, monitor, _ = runs[False]
    assert monitor.history[0].lambda_max == pytest.approx(lam, rel=1e-4)
    assert not math.isfinite(losses[-1]) or losses[-1] > 1e6 * losses[0]

    losses, logger, monitor, guard = runs[True]
    assert all(math.isfinite(v) for v in losses)
    assert max(losses) <= losses[0] * 1.01
    assert losses[-1] < 0.1 * losses[0]
    # Cut at the first probe (step 0) to exactly the target, then held there.
    assert guard.scale == pytest.approx(0.9 / edge_multiple, rel=1e-3)
    assert (
        logger.steps(SCALE)
        == [r.step for r in monitor.history]
        == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    )
    assert [v for _, v in logger.values(RATIO)] == pytest.approx([0.9] * 9, rel=1e-3)
    # The monitor's own ratio is read before the guard acts: 1.5 at step 0, then 0.9.
    ratios = [r.stability_ratio for r in monitor.history]
    assert ratios[0] == pytest.approx(edge_multiple, rel=1e-3)
    assert ratios[1:] == pytest.approx([0.9] * 8, rel=1e-3)


class _LrTrace(Callback):
    """The learning rate each optimizer step uses."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))


def _resumable_run(
    dirpath: Path,
    every_n_steps: int = 2,
    ckpt_path: Path | None = None,
    guard_cls: type[StabilityLRGuard] = StabilityLRGuard,
) -> tuple[QuadraticModule, MemoryLogger, _LrTrace, StabilityLRGuard]:
    """20 steps of guarded SGD (momentum 0.5, unscaled ratio 1.5) under StepLR(8, 0.5).

    Checkpoints at step 10 into ``dirpath``; resumes from ``ckpt_path`` if given.
    """
    _, _, lam = _regression_data()
    lr = 1.5 * 3.0 / lam  # momentum 0.5: edge 3
    guard = guard_cls(target=0.9, recovery=1.1)
    monitor = sharpness_monitor(every_n_steps, 1, hooks=[guard])
    trace, logger = _LrTrace(), MemoryLogger()
    checkpoint = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=10, save_top_k=-1)
    pl.seed_everything(0, verbose=False)
    module = QuadraticModule(lr, momentum=0.5, step_size=8)
    trainer = pl.Trainer(
        **trainer_kwargs(
            callbacks=[monitor, trace, checkpoint],
            max_steps=20,
            logger=logger,
            enable_checkpointing=True,
        )
    )
    trainer.fit(module, _full_batch(), ckpt_path=None if ckpt_path is None else str(ckpt_path))
    assert trainer.global_step == 20
    return module, logger, trace, guard


def _assert_resume_identical(
    tmp_path: Path, every_n_steps: int
) -> tuple[MemoryLogger, _LrTrace, Path]:
    """Run uninterrupted and resumed at step 10; return the full run's log, rates and checkpoint."""
    full, full_log, full_trace, full_guard = _resumable_run(tmp_path / "full", every_n_steps)
    ckpt = tmp_path / "full" / "epoch=9-step=10.ckpt"
    assert ckpt.exists()
    resumed, log, trace, guard = _resumable_run(tmp_path / "resumed", every_n_steps, ckpt)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert trace.lrs == full_trace.lrs[10:]
    assert log.values(SCALE) == [(s, v) for s, v in full_log.values(SCALE) if s > 10]
    assert log.values(RATIO) == [(s, v) for s, v in full_log.values(RATIO) if s > 10]
    assert guard.state_dict() == full_guard.state_dict()
    return full_log, full_trace, ckpt


def test_guard_resume_from_checkpoint_is_identical(tmp_path: Path) -> None:
    """Uninterrupted vs resumed at step 10: same weights, rates and guard decisions.

    StepLR halves the schedule every 8 steps: the guard first cuts (unscaled ratio 1.5), then
    recovers as the schedule decays, still recovering at the resume step.
    """
    full_log, full_trace, ckpt = _assert_resume_identical(tmp_path, every_n_steps=2)
    scales = dict(full_log.values(SCALE))
    assert scales[0] == pytest.approx(0.6) and scales[20] == 1.0  # it cut, then recovered
    assert 0.6 < scales[10] < 1.0

    # Control: a guard that forgets its state on resume takes other actions.
    class Forgetful(StabilityLRGuard):
        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            pass

    _, _, trace, _ = _resumable_run(tmp_path / "forgetful", 2, ckpt, Forgetful)
    assert trace.lrs != full_trace.lrs[10:]


def test_guard_resume_off_cadence_is_identical(tmp_path: Path) -> None:
    _assert_resume_identical(tmp_path, every_n_steps=3)


def test_guard_with_sam() -> None:
    sam_cls = pytest.importorskip("lightning_landscape.optim").SAM
    _, _, lam = _regression_data()

    class SAMQuadratic(QuadraticModule):
        def configure_optimizers(self) -> Any:
            return sam_cls(
                self.parameters(), torch.optim.SGD, rho=0.01, lr=self.lr, momentum=self.momentum
            )

    guard = StabilityLRGuard(target=0.9)
    monitor = sharpness_monitor(2, 1, hooks=[guard])
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[monitor], max_steps=4))
    trainer.fit(SAMQuadratic(1.5 * 3.0 / lam, momentum=0.5), _full_batch())
    # The base SGD's threshold (2 + 2·0.5)/η: cut to 0.9 of it at step 0, then held.
    assert guard.scale == pytest.approx(0.6, rel=1e-3)
    optimizer = trainer.optimizers[0]
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(0.9 * 3.0 / lam, rel=1e-3)
    assert optimizer.base_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


# --------------------------------------------------------------------------------------------------
# 3. SharpnessAdaptiveRho
# --------------------------------------------------------------------------------------------------


def _rho_opt(rho: float = 0.05, groups: int = 2) -> torch.optim.SGD:
    return _sgd(*([0.1] * groups), rho=rho)


def _rhos(optimizer: torch.optim.Optimizer) -> list[float]:
    return [g["rho"] for g in optimizer.param_groups]


def test_rho_follows_sharpness_within_bounds() -> None:
    opt = _rho_opt()
    hook = SharpnessAdaptiveRho(rho_min=0.01, rho_max=0.5, base_rho=0.05)
    assert hook.apply(opt, 10.0) == pytest.approx(0.05)  # the first λ_max is the reference
    assert hook.lambda_ref == 10.0
    assert hook.apply(opt, 20.0) == pytest.approx(0.1)
    assert _rhos(opt) == [pytest.approx(0.1)] * 2
    assert hook.apply(opt, 1e3) == 0.5
    assert hook.apply(opt, 1.0) == 0.01
    assert hook.apply(opt, -3.0) == 0.01
    assert _rhos(opt) == [0.01, 0.01]


def test_rho_reference() -> None:
    opt = _rho_opt()
    hook = SharpnessAdaptiveRho(reference=5.0)
    assert hook.apply(opt, 10.0) == pytest.approx(0.1)
    # Without a reference, non-positive sharpness cannot set one: ρ is left alone.
    opt = _rho_opt(0.2)
    hook = SharpnessAdaptiveRho()
    assert hook.apply(opt, -1.0) is None and hook.lambda_ref is None
    assert _rhos(opt) == [0.2, 0.2]


def test_rho_logging_and_state(tmp_path: Path) -> None:
    opt = _rho_opt()
    trainer = _fake_trainer(opt)
    hook = SharpnessAdaptiveRho()
    hook.on_landscape(trainer, Any, _report(-1.0, step=0))  # no reference yet: nothing logged
    hook.on_landscape(trainer, Any, _report(4.0, step=3))
    hook.on_landscape(trainer, Any, _report(8.0, step=6))
    assert trainer.loggers[0].values(RHO) == [(3, pytest.approx(0.05)), (6, pytest.approx(0.1))]

    torch.save(hook.state_dict(), tmp_path / "rho.pt")
    fresh = SharpnessAdaptiveRho()
    fresh.load_state_dict(torch.load(tmp_path / "rho.pt", weights_only=True))
    assert fresh.lambda_ref == 4.0 and fresh.rho == pytest.approx(0.1)
    assert fresh.apply(_rho_opt(), 6.0) == pytest.approx(0.075)
    assert SharpnessAdaptiveRho().apply(_rho_opt(), 6.0) == pytest.approx(0.05)  # control


def test_rho_needs_rho_in_param_groups() -> None:
    opt = _sgd(0.1)
    with pytest.raises(TypeError, match=r"no 'rho' in param_groups\[0\]"):
        SharpnessAdaptiveRho().on_landscape(_fake_trainer(opt), Any, _report(1.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho_min": -0.1}, "rho_min"),
        ({"rho_max": 0.0, "rho_min": 0.0, "base_rho": 0.0}, "rho_max"),
        ({"rho_min": 0.6, "rho_max": 0.5}, "must not exceed"),
        ({"base_rho": 0.6}, "base_rho"),
        ({"base_rho": 0.001}, "base_rho"),
        ({"reference": 0.0}, "reference"),
        ({"reference": math.inf}, "reference"),
        ({"optimizer_index": 1.5}, "optimizer_index"),
    ],
)
def test_rho_bad_args(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SharpnessAdaptiveRho(**kwargs)


@pytest.mark.parametrize("base", ["SGD", "AdamW"])
def test_rho_drives_sam_in_training(base: str) -> None:
    sam = pytest.importorskip("lightning_landscape.optim").SAM

    class SAMModule(ClassifierModule):
        def configure_optimizers(self) -> Any:
            if base == "AdamW":
                return sam(self.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)
            return sam(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)

    hook = SharpnessAdaptiveRho(rho_min=0.01, rho_max=0.5, base_rho=0.05)
    logger = MemoryLogger()
    monitor = sharpness_monitor(3, 1, hooks=[hook])
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[monitor], max_steps=9, logger=logger))
    trainer.fit(SAMModule(batch_norm=False, dropout=0.0), make_dataloader())
    lams = [r.lambda_max for r in monitor.history]
    expected = [min(0.5, max(0.01, 0.05 * lam / lams[0])) for lam in lams]
    assert [v for _, v in logger.values(RHO)] == pytest.approx(expected)
    assert logger.steps(RHO) == [0, 3, 6, 9]
    assert _rhos(trainer.optimizers[0]) == [pytest.approx(expected[-1])]
    assert expected[-1] != pytest.approx(0.05)  # sharpness moved, so did ρ
    if base == "AdamW":  # SAM over AdamW: the preconditioned ratio of its base optimizer
        assert all(r.stability_ratio is not None for r in monitor.history[1:])
        assert monitor.history[-1].stability_threshold == pytest.approx(3.8 / (0.1 * 1e-2))


# --------------------------------------------------------------------------------------------------
# 4. Plain callables; errors propagate
# --------------------------------------------------------------------------------------------------


def test_plain_callable_hook_sees_every_report() -> None:
    seen: list[tuple[int, ProbeReport]] = []

    def hook(trainer: pl.Trainer, pl_module: pl.LightningModule, report: ProbeReport) -> None:
        seen.append((trainer.global_step, report))

    monitor = sharpness_monitor(4, 1, hooks=[hook])
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[monitor], max_steps=10))
    trainer.fit(ClassifierModule(), make_dataloader())
    assert len(seen) == len(monitor.history) == 4  # steps 0, 4, 8 and the end (10)
    assert [r for _, r in seen] == monitor.history
    assert [s for s, _ in seen] == [r.step for r in monitor.history] == [0, 4, 8, 10]


def test_a_failing_hook_is_skipped_and_training_goes_on() -> None:
    class Boom(RuntimeError):
        pass

    def hook(trainer: pl.Trainer, pl_module: pl.LightningModule, report: ProbeReport) -> None:
        if report.step == 4:
            raise Boom(f"bug in user hook at step {report.step}")

    logger = MemoryLogger()
    monitor = sharpness_monitor(4, 1, hooks=[hook])
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[monitor], max_steps=10, logger=logger))
    with pytest.warns(UserWarning, match=r"the hook .*hook at step 4 failed \(Boom: bug in user"):
        trainer.fit(ClassifierModule(), make_dataloader())
    assert trainer.global_step == 10 and [r.step for r in monitor.history] == [0, 4, 8, 10]
    assert monitor.num_failed == 1
    failed = logger.values("landscape/probe_failed")
    assert failed == [(0, 0.0), (4, 1.0), (8, 0.0), (10, 0.0)]


# --------------------------------------------------------------------------------------------------
# 5. LightningCLI YAML
# --------------------------------------------------------------------------------------------------


def test_lightning_cli_yaml_hooks(tmp_path: Path) -> None:
    guard_yaml = {
        "class_path": "lightning_landscape.callbacks.control.StabilityLRGuard",
        "init_args": {"target": 0.8},
    }
    sharpness = {
        "class_path": "lightning_landscape.Sharpness",
        "init_args": {"top_k": 1, "lambda_min": False, "every_n_steps": 3},
    }
    monitor = fit_with_lightning_cli(
        tmp_path,
        {
            "probes": [sharpness],
            "hooks": [guard_yaml],
            "route": "double_backward",
            "num_probe_samples": 64,
        },
        max_steps=6,
    )
    (guard,) = monitor.hooks
    assert isinstance(guard, StabilityLRGuard)
    assert guard.target == 0.8 and guard.recovery == 1.1
    assert len(monitor.history) == 3
    assert guard.last_ratio is not None  # it acted
