"""Integration tests of the ``LandscapeMonitor`` Lightning callback on tiny CPU Trainers."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import lightning_landscape.callbacks.monitor as monitor_mod
import lightning_landscape.probes.sharpness as sharpness_mod
from lightning_landscape import (
    BatchSharpness,
    CurvatureExponent,
    LandscapeMonitor,
    ProbeReport,
    Sharpness,
    Stabilization,
    Trace,
    UpdateCurvature,
    hessian_eigenvalues,
)
from tests._lightning import (
    AdamModule,
    ClassifierModule,
    DictLossModule,
    ManualOptModule,
    MemoryLogger,
    NoneStepModule,
    fit_with_lightning_cli,
    make_dataloader,
    make_dataset,
    sharpness_monitor,
    trainer_kwargs,
)


def _fit(
    make_module: Callable[[], pl.LightningModule],
    callbacks: list[Callback] | None = None,
    *,
    loader: DataLoader[Any] | None = None,
    loader_seed: int | None = 0,
    seed: int = 0,
    **overrides: Any,
) -> tuple[pl.LightningModule, pl.Trainer]:
    """Seed everything, build the module and a tiny CPU trainer, fit, return both."""
    pl.seed_everything(seed, verbose=False)
    module = make_module()
    loader = make_dataloader(seed=loader_seed) if loader is None else loader
    trainer = pl.Trainer(**trainer_kwargs(callbacks=callbacks or [], **overrides))
    trainer.fit(module, loader)
    return module, trainer


def _steps(monitor: LandscapeMonitor) -> list[int]:
    return [r.step for r in monitor.history]


def _assert_same_state(a: pl.LightningModule, b: pl.LightningModule) -> None:
    """Bit-identical parameters, buffers (BN running stats) and ``.grad``."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if pa.grad is None or pb.grad is None:
            assert pa.grad is None and pb.grad is None, f"{name}.grad differs"
        else:
            assert torch.equal(pa.grad, pb.grad), f"{name}.grad differs"
    modes_a = [m.training for m in a.modules()]
    modes_b = [m.training for m in b.modules()]
    assert modes_a == modes_b


def _assert_same_optimizer(ta: pl.Trainer, tb: pl.Trainer) -> None:
    oa, ob = ta.optimizers[0].state_dict(), tb.optimizers[0].state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for idx, state in oa["state"].items():
        assert state.keys() == ob["state"][idx].keys()
        for name, value in state.items():
            other = ob["state"][idx][name]
            if isinstance(value, Tensor):
                assert torch.equal(value, other), f"optimizer state {idx}/{name} differs"
            else:
                assert value == other


def _user_records(logger: MemoryLogger) -> list[tuple[int | None, dict[str, float]]]:
    """The logger's records without the monitor's ``landscape/`` keys."""
    out = []
    for step, metrics in logger.records:
        kept = {k: v for k, v in metrics.items() if not k.startswith("landscape/")}
        if kept:
            out.append((step, kept))
    return out


def _probe_batch(n: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The first ``n`` samples of the default dataset, in dataset order."""
    x, y = make_dataset(dtype=dtype).tensors
    return x[:n], y[:n]


STABILITY_THRESHOLD = "landscape/stability_threshold"


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _loss(module: Any, batch: Any) -> Tensor:
    return module.compute_loss(batch)


# --------------------------------------------------------------------------------------------------
# 1. Training is bit-identical with and without the monitor
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module_cls", "with_metric", "loader_seed", "route"),
    [
        pytest.param(ClassifierModule, True, 0, "auto", id="tensor-loss+metric-seeded-auto"),
        pytest.param(DictLossModule, True, None, "double_backward", id="dict-loss-global-rng"),
        pytest.param(ClassifierModule, False, None, "functorch", id="functorch-global-rng"),
        pytest.param(ClassifierModule, False, None, "compiled", id="compiled-global-rng"),
    ],
)
def test_training_is_bit_identical(
    module_cls: type[ClassifierModule],
    with_metric: bool,
    loader_seed: int | None,
    route: str,
    fast_compile: list[object],
) -> None:
    """Weights, BN stats, grads, optimizer state and every logged metric are unchanged.

    ``loader_seed=None`` shuffles with the global torch RNG, so any RNG draw by the probe would
    reorder the data; dropout draws from the global RNG too.
    """

    def make() -> pl.LightningModule:
        return module_cls(with_metric=with_metric)

    runs = {}
    for with_monitor in (False, True):
        logger = MemoryLogger()
        monitor = LandscapeMonitor(every_n_steps=5, top_k=3, route=route, num_probe_samples=64)
        module, trainer = _fit(
            make,
            [monitor] if with_monitor else [],
            loader_seed=loader_seed,
            max_steps=24,
            logger=logger,
        )
        runs[with_monitor] = (module, trainer, logger, monitor)

    (m0, t0, log0, _), (m1, t1, log1, mon) = runs[False], runs[True]
    assert _steps(mon) == [0, 5, 10, 15, 20, 24]
    assert all(math.isfinite(r.lambda_max) for r in mon.history)
    assert route == "auto" or mon._resolved_route == route  # e.g. no fallback from "compiled"
    assert bool(fast_compile) == (route == "compiled")  # graphs compiled for that route only
    assert t0.global_step == t1.global_step == 24

    _assert_same_state(m0, m1)
    _assert_same_optimizer(t0, t1)

    # Every user metric (train_loss per step, train_acc per epoch, epoch) is logged identically,
    # and the probes' training_step calls leaked no extra train_loss/train_acc entries.
    assert _user_records(log0) == _user_records(log1)
    assert len(log0.values("train_loss")) == len(log1.values("train_loss")) == 24
    assert t0.callback_metrics.keys() == t1.callback_metrics.keys()
    for key, value in t0.callback_metrics.items():
        assert torch.equal(value, t1.callback_metrics[key]), key
    if with_metric:
        assert log0.values("train_acc") == log1.values("train_acc")
        assert len(log1.values("train_acc")) >= 1
        # The torchmetrics state after training is the same (probes restored it).
        assert torch.equal(m0.train_acc.tp, m1.train_acc.tp)
        assert m0.train_acc._update_count == m1.train_acc._update_count


@pytest.mark.parametrize("module_cls", [AdamModule, ClassifierModule])
def test_optimizer_aware_probes_leave_training_bit_identical(module_cls: type) -> None:
    """Preconditioned sharpness, update curvature and batch sharpness change nothing either."""
    runs = {}
    for with_monitor in (False, True):
        logger = MemoryLogger()
        probes = [
            Sharpness(2, every_n_steps=5),
            UpdateCurvature(every_n_steps=5),
            BatchSharpness(every_n_steps=5, max_batches=12),
        ]
        monitor = LandscapeMonitor(probes=probes, num_probe_samples=64)
        module, trainer = _fit(
            lambda: module_cls(lr=1e-2),
            [monitor] if with_monitor else [],
            loader_seed=None,
            max_steps=12,
            logger=logger,
        )
        runs[with_monitor] = (module, trainer, logger, monitor)
    (m0, t0, log0, _), (m1, t1, log1, mon) = runs[False], runs[True]
    _assert_same_state(m0, m1)
    _assert_same_optimizer(t0, t1)
    assert _user_records(log0) == _user_records(log1)
    assert mon.num_failed == 0
    assert log1.steps("landscape/update/curvature") == [5, 10, 12]  # 12: the end (max_steps)
    assert log1.steps("landscape/batch_sharpness") == [0, 5, 10, 12]
    assert all(v > 0 for _, v in log1.values("landscape/batch_sharpness_stderr"))
    if module_cls is ClassifierModule:  # SGD: batch sharpness next to (2 + 2β)/η
        threshold = (2 + 2 * 0.9) / 1e-2
        assert all(v == pytest.approx(threshold) for _, v in log1.values(STABILITY_THRESHOLD))
    else:  # Adam: the preconditioned sharpness from the first probe after its first step
        assert log1.steps("landscape/preconditioned_lambda_max") == [5, 10, 12]


# --------------------------------------------------------------------------------------------------
# 2. Cadence
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_steps", "on_start", "on_end", "expected"),
    [
        (35, True, True, [0, 10, 20, 30, 35]),
        (35, False, True, [10, 20, 30, 35]),
        (35, True, False, [0, 10, 20, 30]),
        (35, False, False, [10, 20, 30]),
        (30, True, True, [0, 10, 20, 30]),  # the end probe coincides with a cadence probe
    ],
)
def test_cadence_every_n_steps(
    max_steps: int, on_start: bool, on_end: bool, expected: list[int]
) -> None:
    logger = MemoryLogger()
    monitor = sharpness_monitor(10, 2, on_train_start=on_start, on_train_end=on_end)
    _fit(ClassifierModule, [monitor], max_steps=max_steps, logger=logger)
    assert _steps(monitor) == expected
    assert monitor.num_probes == len(expected)
    assert monitor.probe_named("sharpness").last_step == expected[-1]
    assert logger.steps("landscape/lambda_max") == expected


def test_cadence_every_n_epochs() -> None:
    # 256 samples / batch 16 = 16 steps per epoch: epoch ends at global steps 16, 32, 48.
    monitor = sharpness_monitor(None, 2, every_n_epochs=1)
    _fit(ClassifierModule, [monitor], max_steps=-1, max_epochs=3)
    assert [(r.step, r.epoch) for r in monitor.history] == [(0, 0), (16, 0), (32, 1), (48, 2)]


def test_cadence_every_n_epochs_2_without_start() -> None:
    monitor = sharpness_monitor(None, 2, every_n_epochs=2, on_train_start=False)
    _fit(ClassifierModule, [monitor], max_steps=-1, max_epochs=3)
    assert _steps(monitor) == [32, 48]


def test_cadence_steps_and_epochs_coinciding_are_not_duplicated() -> None:
    monitor = sharpness_monitor(8, 2, every_n_epochs=1)
    _fit(ClassifierModule, [monitor], max_steps=40)
    assert _steps(monitor) == [0, 8, 16, 24, 32, 40]


def test_cadence_with_gradient_accumulation() -> None:
    # Two batches per optimizer step: on_train_batch_end sees every global_step twice.
    logger = MemoryLogger()
    monitor = sharpness_monitor(5, 2)
    _, trainer = _fit(
        ClassifierModule, [monitor], max_steps=20, accumulate_grad_batches=2, logger=logger
    )
    assert trainer.global_step == 20
    assert _steps(monitor) == [0, 5, 10, 15, 20]
    assert logger.steps("landscape/lambda_max") == [0, 5, 10, 15, 20]


def test_disabled_monitor_is_a_no_op() -> None:
    logger = MemoryLogger()
    # Settings that would fail setup (unknown parameter pattern) are not even checked.
    monitor = LandscapeMonitor(
        probes=[Sharpness(2, every_n_steps=2), Trace()], params=["nope.*"], enabled=False
    )
    _fit(ClassifierModule, [monitor], max_steps=10, logger=logger)
    assert monitor.history == []
    assert monitor.num_probes == 0
    assert not any(k.startswith("landscape/") for k in logger.keys())


# --------------------------------------------------------------------------------------------------
# 3. Logging
# --------------------------------------------------------------------------------------------------


def test_logged_keys_values_and_steps() -> None:
    lr, momentum, top_k = 0.05, 0.9, 3
    logger = MemoryLogger()
    monitor = sharpness_monitor(10, top_k, lambda_min=True, trace_hvps=9)
    _fit(
        lambda: ClassifierModule(lr=lr, momentum=momentum),
        [monitor],
        max_steps=20,
        logger=logger,
    )
    probe_steps = [0, 10, 20]
    assert _steps(monitor) == probe_steps
    expected_keys = [
        "landscape/lambda_max",
        "landscape/lambda_min",
        *(f"landscape/eigenvalues/{i}" for i in range(top_k)),
        "landscape/trace",
        "landscape/trace_stderr",
        "landscape/stability_ratio",
        "landscape/stability_threshold",
        "landscape/probe_loss",
        "landscape/converged",
        "landscape/max_residual",
        "landscape/probe_failed",
        "landscape/cost/seconds",
        "landscape/cost/hvps",
        "landscape/cost/overhead",
    ]
    for key in expected_keys:
        assert logger.steps(key) == probe_steps, key
    assert f"landscape/eigenvalues/{top_k}" not in logger.keys()

    threshold = (2 + 2 * momentum) / lr
    for report in monitor.history:
        at = {k: v for step, m in logger.records if step == report.step for k, v in m.items()}
        assert at["landscape/lambda_max"] == report.lambda_max
        for i in range(top_k):
            assert at[f"landscape/eigenvalues/{i}"] == report.eigenvalues[i]
        assert list(report.eigenvalues) == sorted(report.eigenvalues, reverse=True)
        assert report.lambda_min is not None
        assert at["landscape/lambda_min"] == report.lambda_min <= report.lambda_max
        assert at["landscape/trace"] == report.trace
        assert at["landscape/trace_stderr"] >= 0
        assert at["landscape/stability_threshold"] == pytest.approx(threshold, rel=1e-12)
        assert at["landscape/stability_ratio"] == pytest.approx(
            lr * report.lambda_max / (2 + 2 * momentum), rel=1e-12
        )
        assert at["landscape/converged"] == 1.0
        assert at["landscape/probe_failed"] == 0.0
        assert at["landscape/max_residual"] <= 1e-3
        assert at["landscape/cost/hvps"] == report.num_hvps > 0
        assert at["landscape/cost/seconds"] == report.seconds > 0
        assert at["landscape/probe_loss"] == report.probe_loss > 0


class _AdamWModule(ClassifierModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=0.1)


def test_adamw_run_logs_the_preconditioned_sharpness_of_dense_truth() -> None:
    """λ₁(P⁻¹H), 38/η-type threshold and ratio of a float64 AdamW run against a dense solve."""
    lr, beta1, beta2, eps = 1e-2, 0.9, 0.95, 1e-8
    data = make_dataset(64, dtype=torch.float64)
    probe = DataLoader(data, batch_size=64)
    monitor = LandscapeMonitor(
        probes=[Sharpness(2, tol=1e-8, every_n_steps=5)], probe_dataloader=probe
    )
    logger = MemoryLogger()
    module = _AdamWModule(lr=lr, dropout=0.0, batch_norm=False)
    _fit(lambda: module, [monitor], max_steps=10, logger=logger, precision="64-true")
    assert _steps(monitor) == [0, 5, 10]
    first, *later = monitor.history
    assert first.stability_ratio is None and first.preconditioned_lambda_max is None  # no state
    assert "landscape/preconditioned_lambda_max" in logger.keys()
    assert logger.steps("landscape/stability_ratio") == [5, 10]

    # Dense truth at the last probe (step 10, the optimizer's state after its 10th step).
    (optimizer,) = module.trainer.optimizers
    params = list(module.parameters())
    x, y = data.tensors
    hessian = torch.autograd.functional.hessian(
        lambda flat: F.cross_entropy(
            torch.func.functional_call(module, _unflatten(module, flat), (x,)), y
        ),
        torch.cat([p.detach().reshape(-1) for p in params]),
    )
    t = 10
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in params])
    precond = (1 - beta1**t) * ((v / (1 - beta2**t)).sqrt() + eps)
    threshold = (2 + 2 * beta1) / ((1 - beta1) * lr)
    truth = torch.linalg.eigvals(hessian / precond[:, None]).real.max().item()  # λ₁(P⁻¹H)
    last = later[-1]
    assert last.stability_threshold == pytest.approx(threshold, rel=1e-12)
    assert last.preconditioned_lambda_max == pytest.approx(truth, rel=1e-5)
    assert last.stability_ratio == pytest.approx(truth / threshold, rel=1e-5)
    assert last.lambda_max == pytest.approx(torch.linalg.eigvalsh(hessian).max().item(), rel=1e-6)
    at_10 = {k: v for step, m in logger.records if step == 10 for k, v in m.items()}
    assert at_10["landscape/preconditioned_lambda_max"] == last.preconditioned_lambda_max
    assert at_10["landscape/stability_threshold"] == last.stability_threshold
    assert at_10["landscape/stability_ratio"] == last.stability_ratio


class _DecayToZeroModule(ClassifierModule):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1 - t / 12))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def test_a_schedule_that_ends_at_zero_still_logs_the_preconditioned_sharpness() -> None:
    """The end-of-training round of a linear decay to η = 0: λ₁(P⁻¹H) (in the terms of the
    rate the schedule scales), ratio 0, and no threshold (38/η is infinite)."""
    monitor = LandscapeMonitor(probes=[Sharpness(1, tol=1e-6, every_n_steps=5)])
    logger = MemoryLogger()
    module = _DecayToZeroModule(lr=1e-2, dropout=0.0, batch_norm=False)
    _fit(lambda: module, [monitor], max_steps=12, logger=logger)
    assert _steps(monitor) == [0, 5, 10, 12]
    (optimizer,) = module.trainer.optimizers
    assert optimizer.param_groups[0]["lr"] == 0.0
    end = monitor.history[-1]
    assert end.stability_ratio == 0.0 and end.stability_threshold is None
    assert end.preconditioned_lambda_max is not None and end.preconditioned_lambda_max > 0
    assert logger.steps("landscape/preconditioned_lambda_max") == [5, 10, 12]
    assert logger.steps("landscape/stability_ratio") == [5, 10, 12]
    assert logger.steps("landscape/stability_threshold") == [5, 10]
    # at step 10 (η = 1e-2 · 2/12) the ratio is λ₁(P⁻¹H) over 38/η, as always
    at_10 = monitor.history[2]
    assert at_10.stability_threshold == pytest.approx(38 / (1e-2 * 2 / 12), rel=1e-9)
    assert at_10.stability_ratio == pytest.approx(
        at_10.preconditioned_lambda_max / at_10.stability_threshold, rel=1e-12
    )


def _unflatten(module: torch.nn.Module, flat: Tensor) -> dict[str, Tensor]:
    out, offset = {}, 0
    for name, p in module.named_parameters():
        out[name] = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    return out


def test_no_stability_ratio_without_a_known_threshold() -> None:
    class AdagradModule(ClassifierModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adagrad(self.parameters(), lr=self.lr)

    logger = MemoryLogger()
    monitor = sharpness_monitor(5, 2)
    _fit(AdagradModule, [monitor], max_steps=10, logger=logger)
    assert _steps(monitor) == [0, 5, 10]
    assert "landscape/lambda_max" in logger.keys()
    assert "landscape/stability_ratio" not in logger.keys()
    assert "landscape/stability_threshold" not in logger.keys()
    assert all(r.stability_ratio is None and r.stability_threshold is None for r in monitor.history)


def test_adam_and_unknown_optimizer_info_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    messages: list[str] = []
    monkeypatch.setattr(monitor_mod, "rank_zero_info", lambda msg, *a, **k: messages.append(msg))
    _fit(lambda: AdamModule(lr=1e-2), [sharpness_monitor(5, 2)], max_steps=10)
    said = [m for m in messages if "first step" in m]
    assert len(said) == 1 and "Adam" in said[0]  # once, at the step-0 probe
    assert not any("is not logged" in m for m in messages)

    class AdagradModule(ClassifierModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adagrad(self.parameters(), lr=self.lr)

    messages.clear()
    _fit(AdagradModule, [sharpness_monitor(5, 2)], max_steps=5)
    assert any("stability_ratio is not logged" in m and "Adagrad" in m for m in messages)


# --------------------------------------------------------------------------------------------------
# 4. Correctness against an independent computation
# --------------------------------------------------------------------------------------------------


def _reference_hessian(
    module: torch.nn.Module, batch: Any, norm_statistics: str, **lanczos_kw: Any
) -> Any:
    """Dense-exact eigenpairs (max_basis = n) of the Hessian the monitor should measure: eval mode,
    or BatchNorm on the statistics of each chunk of the training batch size (16), running
    statistics untouched."""
    from lightning_landscape import HessianOperator, curvature_context, lanczos, split_batch

    chunks = [batch] if norm_statistics == "running" else split_batch(batch, 16, min_size=2)
    with curvature_context(module, norm_statistics=norm_statistics):  # type: ignore[arg-type]
        op = HessianOperator(module, _loss, chunks, route="double_backward")
        n = op.size
        return lanczos(op, max_basis=n, **lanczos_kw), op.loss_value


@pytest.mark.parametrize("norm_statistics", ["batch", "running"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_lambda_max_matches_independent_hessian(dtype: torch.dtype, norm_statistics: str) -> None:
    n_probe, top_k = 64, 3
    monitor = sharpness_monitor(
        10, top_k, lambda_min=True, num_probe_samples=n_probe, norm_statistics=norm_statistics
    )
    loader = make_dataloader(make_dataset(dtype=dtype))  # batch size 16
    module, _ = _fit(lambda: ClassifierModule().to(dtype), [monitor], loader=loader, max_steps=20)
    final = monitor.history[-1]
    assert final.step == 20 and final.converged

    batch = _probe_batch(n_probe, dtype)
    top, loss = _reference_hessian(module, batch, norm_statistics, k=top_k, tol=1e-8)
    bottom, _ = _reference_hessian(module, batch, norm_statistics, k=1, which="smallest")
    assert final.eigenvalues == pytest.approx(top.eigenvalues.tolist(), rel=1e-3)
    assert final.lambda_min == pytest.approx(float(bottom.eigenvalues[0]), rel=1e-3, abs=1e-4)
    assert final.probe_loss == pytest.approx(loss, rel=1e-5)

    # The probe really is on the first samples in dataset order (not on another subset).
    x, y = make_dataset(dtype=dtype).tensors
    other, _ = _reference_hessian(module, (x[-n_probe:], y[-n_probe:]), norm_statistics, k=1)
    assert final.lambda_max != pytest.approx(float(other.eigenvalues[0]), rel=1e-3)


def test_batch_and_running_statistics_give_different_hessians() -> None:
    """Early in training the running statistics lag: the two Hessians differ (the module has
    BatchNorm), and the batch-statistics one is the default."""
    runs = {}
    for stats in ("batch", "running"):
        extra = {} if stats == "batch" else {"norm_statistics": stats}
        monitor = sharpness_monitor(None, 1, on_train_end=False, **extra)
        _fit(ClassifierModule, [monitor], max_steps=1)
        runs[stats] = monitor.history[0].lambda_max
    assert runs["batch"] != pytest.approx(runs["running"], rel=1e-2)


def test_sync_batchnorm_under_several_ranks_is_said(
    monkeypatch: pytest.MonkeyPatch, as_two_ranks: Callable[[], None]
) -> None:
    """With batch statistics, SyncBatchNorm in a group of several ranks is probed on each rank's
    own statistics: the monitor says so at the start of training (not with running ones)."""
    import torch.distributed as dist

    checked: list[torch.nn.Module] = []
    original = LandscapeMonitor._check_sync_batchnorm

    def spy(self: LandscapeMonitor, pl_module: pl.LightningModule) -> None:
        checked.append(pl_module)
        original(self, pl_module)

    monkeypatch.setattr(LandscapeMonitor, "_check_sync_batchnorm", spy)
    fitted, _ = _fit(
        ClassifierModule, [sharpness_monitor(None, 1, on_train_end=False)], max_steps=1
    )
    assert checked == [fitted]  # once per fit, at its start (after the strategy's conversion)
    module = ClassifierModule()
    module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    as_two_ranks()
    with pytest.warns(UserWarning, match=r"SyncBatchNorm layers \(1\) .* own statistics"):
        LandscapeMonitor()._check_sync_batchnorm(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LandscapeMonitor(norm_statistics="running")._check_sync_batchnorm(module)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
        LandscapeMonitor()._check_sync_batchnorm(module)


def test_precision_64_true() -> None:
    monitor = sharpness_monitor(5, 2, norm_statistics="running")
    module, _ = _fit(ClassifierModule, [monitor], max_steps=10, precision="64-true")
    assert _steps(monitor) == [0, 5, 10]
    n = _num_params(module)
    batch = _probe_batch(64, torch.float64)
    ref = hessian_eigenvalues(module, _loss, batch, k=2, tol=1e-8, max_basis=n)
    assert monitor.history[-1].eigenvalues == pytest.approx(ref.eigenvalues.tolist(), rel=1e-3)


def test_probe_dataloader_with_uneven_batches() -> None:
    x, y = make_dataset(num_samples=70, seed=5).tensors
    probe_loader = DataLoader(TensorDataset(x, y), batch_size=48)  # batches of 48 and 22
    assert [len(b[0]) for b in probe_loader] == [48, 22]
    monitor = sharpness_monitor(
        10,
        2,
        probe_dataloader=probe_loader,
        num_probe_samples=8,  # ignored: the loader wins
    )
    module, _ = _fit(lambda: ClassifierModule(batch_norm=False), [monitor], max_steps=10)
    n = _num_params(module)
    ref = hessian_eigenvalues(module, _loss, (x, y), k=2, tol=1e-8, max_basis=n)
    assert monitor.history[-1].eigenvalues == pytest.approx(ref.eigenvalues.tolist(), rel=1e-3)
    # Not just the first batch: its Hessian differs.
    first = hessian_eigenvalues(module, _loss, (x[:48], y[:48]), k=1, tol=1e-8, max_basis=n)
    assert monitor.history[-1].lambda_max != pytest.approx(float(first.eigenvalues[0]), rel=1e-3)


def test_probe_dataloader_batches_are_one_batch_for_single_batch_probes() -> None:
    # A probe loader with the training batch size (16) yields 16 + 16 + 8 samples: batch
    # sharpness draws training-size batches from all 40 (from the first batch alone it could not).
    x, y = make_dataset(num_samples=40, seed=5).tensors
    monitor = sharpness_monitor(
        10,
        1,
        extra=[BatchSharpness(every_n_steps=10, min_batches=2, max_batches=4)],
        probe_dataloader=DataLoader(TensorDataset(x, y), batch_size=16),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(lambda: ClassifierModule(batch_norm=False), [monitor], max_steps=10)
    assert not [w for w in caught if "LandscapeMonitor" in str(w.message)]
    assert monitor.num_failed == 0
    probe = monitor.probe_named("batch_sharpness")
    assert probe.last_step == 10 and probe.last_result.num_batches >= 2


def test_probe_dataloader_batches_that_cannot_be_joined_are_said() -> None:
    x, y = make_dataset(num_samples=40, seed=5).tensors
    ragged = [(x[:24], y[:24]), (x[24:, :-1], y[24:])]  # the second has one feature fewer
    monitor = sharpness_monitor(10, 1, probe_dataloader=ragged)  # type: ignore[arg-type]
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[monitor], max_steps=1))
    with pytest.warns(UserWarning, match=r"2 batches cannot be joined .* first batch only \(24"):
        monitor._collect(trainer, ClassifierModule(batch_norm=False))
    torch.testing.assert_close(monitor._single_batch[0], x[:24], rtol=0, atol=0)


def test_custom_loss_fn_is_used() -> None:
    # Probes are deterministic and do not affect training: two runs give the same trajectory.
    default = sharpness_monitor(5, 2)
    _fit(ClassifierModule, [default], max_steps=10)
    scaled = sharpness_monitor(5, 2, loss_fn=lambda m, b: 2.0 * m.compute_loss(b))
    _fit(ClassifierModule, [scaled], max_steps=10)
    assert _steps(default) == _steps(scaled) == [0, 5, 10]
    for a, b in zip(default.history, scaled.history, strict=True):
        assert b.eigenvalues == pytest.approx([2 * v for v in a.eigenvalues], rel=1e-3)
        assert b.probe_loss == pytest.approx(2 * a.probe_loss, rel=1e-6)


def test_two_monitors_with_different_loss_fns() -> None:
    default = sharpness_monitor(5, 2)
    scaled = sharpness_monitor(5, 2, loss_fn=lambda m, b: 2.0 * m.compute_loss(b))
    _fit(ClassifierModule, [default, scaled], max_steps=5)
    assert scaled.history[-1].lambda_max == pytest.approx(2 * default.history[-1].lambda_max)


# --------------------------------------------------------------------------------------------------
# 5. Warm start
# --------------------------------------------------------------------------------------------------


def test_warm_start_saves_hvps() -> None:
    def make() -> pl.LightningModule:
        return ClassifierModule(lr=2e-3, momentum=0.0)  # weights change slowly

    runs = {}
    for warm in (True, False):
        monitor = sharpness_monitor(4, 1, warm_start=warm, tol=1e-4, num_probe_samples=128)
        _fit(make, [monitor], max_steps=24)
        runs[warm] = monitor
    warm, cold = runs[True], runs[False]
    assert _steps(warm) == _steps(cold) == [0, 4, 8, 12, 16, 20, 24]
    # Same first probe (nothing to warm-start from), same answers afterwards.
    assert warm.history[0].num_hvps == cold.history[0].num_hvps
    for a, b in zip(warm.history, cold.history, strict=True):
        assert a.eigenvalues == pytest.approx(b.eigenvalues, rel=1e-3)
    warm_cost = sum(r.num_hvps for r in warm.history[1:]) / (len(warm.history) - 1)
    cold_cost = sum(r.num_hvps for r in cold.history[1:]) / (len(cold.history) - 1)
    assert warm_cost < 0.8 * cold_cost, (warm_cost, cold_cost)


# --------------------------------------------------------------------------------------------------
# 6. Checkpointing and resuming
# --------------------------------------------------------------------------------------------------


class _StateSpy(Callback):
    """Snapshots the monitor's restored state when training (re)starts, before it probes."""

    def __init__(self, monitor: LandscapeMonitor) -> None:
        self.monitor = monitor
        self.at_start: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = self.monitor
        sharpness = m.sharpness
        assert sharpness is not None
        self.at_start = {
            "global_step": trainer.global_step,
            "num_probes": m.num_probes,
            "last_probe_step": sharpness.last_step,
            "history": list(m.history),
            "warm_top": None if sharpness.warm_top is None else sharpness.warm_top.clone(),
            "route": m._resolved_route,
        }


def test_checkpoint_resume_continues_cadence(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpts"

    def checkpointing(dirpath: Path = ckpt_dir) -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=dirpath, every_n_train_steps=10, save_top_k=-1)

    first = sharpness_monitor(5, 2)
    _fit(ClassifierModule, [first, checkpointing()], max_steps=20, enable_checkpointing=True)
    assert _steps(first) == [0, 5, 10, 15, 20]
    ckpt_path = ckpt_dir / "epoch=0-step=10.ckpt"
    assert ckpt_path.exists()

    # The checkpoint holds the monitor's state as of step 10 (it probed before the save).
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    saved = ckpt["callbacks"][first.state_key]
    saved_sharpness = saved["probes"]["sharpness"]
    assert saved_sharpness["last_step"] == 10 and saved["num_probes"] == 3
    assert [r["step"] for r in saved["history"]] == [0, 5, 10]
    assert saved_sharpness["warm_top"] is not None and saved_sharpness["warm_top"].shape[1] == 2

    resumed = sharpness_monitor(5, 2)
    spy = _StateSpy(resumed)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        **trainer_kwargs(
            callbacks=[spy, resumed, checkpointing(tmp_path / "resumed")],
            max_steps=20,
            enable_checkpointing=True,
        )
    )
    trainer.fit(ClassifierModule(), make_dataloader(), ckpt_path=str(ckpt_path))

    restored = spy.at_start
    assert restored["global_step"] == 10
    assert restored["num_probes"] == 3
    assert restored["last_probe_step"] == 10
    assert restored["history"] == first.history[:3]
    assert restored["route"] == "double_backward"
    assert restored["warm_top"] is not None
    assert torch.equal(restored["warm_top"], saved_sharpness["warm_top"])

    # No duplicate probe at the resume step; the cadence continues at 15 and 20.
    assert _steps(resumed) == [0, 5, 10, 15, 20]
    assert resumed.num_probes == 5
    assert resumed.probe_named("sharpness").last_step == 20
    assert resumed.history[:3] == first.history[:3]


def test_state_dict_round_trip(tmp_path: Path) -> None:
    monitor = sharpness_monitor(5, 2, lambda_min=True)
    _fit(ClassifierModule, [monitor], max_steps=10)
    state = monitor.state_dict()
    sharp = state["probes"]["sharpness"]
    assert sharp["warm_top"].shape == (_num_params(ClassifierModule()), 2)
    assert sharp["warm_min"] is not None
    assert [point[0] for point in sharp["trajectory"]] == [0, 5, 10]

    # Through torch.save / torch.load(weights_only=True), like a checkpoint.
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = sharpness_monitor(5, 2)
    fresh.load_state_dict(loaded)
    assert fresh.num_probes == monitor.num_probes == 3
    assert fresh.num_failed == monitor.num_failed == 0
    a, b = fresh.sharpness, monitor.sharpness
    assert a is not None and b is not None
    assert a.last_step == b.last_step == 10
    assert a.trajectory == b.trajectory
    assert fresh._resolved_route == monitor._resolved_route
    assert fresh.history == monitor.history
    assert all(isinstance(r, ProbeReport) for r in fresh.history)
    assert isinstance(fresh.history[0].eigenvalues, tuple)
    assert a.warm_top is not None and b.warm_top is not None
    assert torch.equal(a.warm_top, b.warm_top)
    assert a.warm_min is not None and b.warm_min is not None
    assert torch.equal(a.warm_min, b.warm_min)
    assert fresh.state_key == monitor.state_key

    # Mutating the restored monitor does not alias the original's state.
    fresh.history.append(copy.copy(fresh.history[0]))
    assert len(monitor.history) == 3

    # Warm-start vectors are left out when not wanted; an empty state resets everything.
    no_vectors = sharpness_monitor(5, 2, save_warm_start=False)
    no_vectors.load_state_dict(state)
    assert no_vectors.state_dict()["probes"]["sharpness"]["warm_top"] is None
    assert no_vectors.state_dict()["history"] == state["history"]
    empty = sharpness_monitor(5, 2)
    empty.load_state_dict({})
    assert empty.sharpness is not None
    assert (empty.num_probes, empty.sharpness.last_step, empty.history) == (0, -1, [])


# --------------------------------------------------------------------------------------------------
# 7. Failure isolation
# --------------------------------------------------------------------------------------------------


def _nan_loss(module: Any, batch: Any) -> Tensor:
    return module.compute_loss(batch) * float("nan")


def _nan_hessian_loss(module: Any, batch: Any) -> Tensor:
    # Finite loss, but d/dw sqrt(|0·w|) is inf·0 = NaN: the gradient and Hessian are NaN.
    return module.compute_loss(batch) + (module.net[0].weight * 0).abs().sqrt().sum()


@pytest.mark.parametrize("loss_fn", [_nan_loss, _nan_hessian_loss], ids=["nan-loss", "nan-hessian"])
def test_non_finite_probe_is_skipped(loss_fn: Callable[..., Tensor]) -> None:
    logger = MemoryLogger()
    monitor = sharpness_monitor(5, 2, loss_fn=loss_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, trainer = _fit(ClassifierModule, [monitor], max_steps=10, logger=logger)
    assert any(issubclass(w.category, UserWarning) and "NaN/inf" in str(w.message) for w in caught)
    assert trainer.global_step == 10
    assert monitor.history == []
    assert monitor.num_failed == 3
    assert logger.values("landscape/probe_failed") == [(0, 1.0), (5, 1.0), (10, 1.0)]
    reference, _ = _fit(ClassifierModule, max_steps=10)
    _assert_same_state(module, reference)


def test_out_of_memory_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    real_lanczos = sharpness_mod.lanczos
    calls = {"n": 0}

    def flaky_lanczos(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # the second probe (step 5) runs out of memory
            raise torch.OutOfMemoryError("simulated out of memory")
        return real_lanczos(*args, **kwargs)

    monkeypatch.setattr(sharpness_mod, "lanczos", flaky_lanczos)
    logger = MemoryLogger()
    monitor = sharpness_monitor(5, 2)
    with pytest.warns(UserWarning, match="out of memory"):
        module, trainer = _fit(ClassifierModule, [monitor], max_steps=15, logger=logger)
    assert trainer.global_step == 15
    assert _steps(monitor) == [0, 10, 15]
    assert monitor.num_failed == 1
    assert monitor.num_probes == 4
    assert logger.values("landscape/probe_failed") == [(0, 0.0), (5, 1.0), (10, 0.0), (15, 0.0)]
    assert logger.steps("landscape/lambda_max") == [0, 10, 15]

    monkeypatch.setattr(sharpness_mod, "lanczos", real_lanczos)
    reference, _ = _fit(ClassifierModule, max_steps=15)
    _assert_same_state(module, reference)


def test_out_of_memory_on_every_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("simulated out of memory")

    monkeypatch.setattr(sharpness_mod, "lanczos", oom)
    logger = MemoryLogger()
    monitor = sharpness_monitor(5, 2)
    with pytest.warns(UserWarning, match="out of memory"):
        _, trainer = _fit(ClassifierModule, [monitor], max_steps=10, logger=logger)
    assert trainer.global_step == 10
    assert monitor.history == [] and monitor.num_failed == 3
    assert logger.values("landscape/probe_failed") == [(0, 1.0), (5, 1.0), (10, 1.0)]
    assert "landscape/lambda_max" not in logger.keys()


def test_non_convergence_is_flagged() -> None:
    logger = MemoryLogger()
    monitor = sharpness_monitor(5, 3, max_hvps=3, max_basis=4)
    with pytest.warns(UserWarning, match=r"did not reach tol"):
        _, trainer = _fit(ClassifierModule, [monitor], max_steps=10, logger=logger)
    assert trainer.global_step == 10
    assert _steps(monitor) == [0, 5, 10]
    assert all(not r.converged and r.max_residual > 1e-3 for r in monitor.history)
    assert all(r.num_hvps <= 3 for r in monitor.history)
    assert logger.values("landscape/converged") == [(0, 0.0), (5, 0.0), (10, 0.0)]
    assert [v for _, v in logger.values("landscape/max_residual")] == [
        r.max_residual for r in monitor.history
    ]


# --------------------------------------------------------------------------------------------------
# 8. Error paths
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, r"top_k must be a positive integer"),
        ({"top_k": None}, r"top_k must be a positive integer"),
        ({"every_n_steps": 0}, r"every_n_steps must be a positive integer"),
        ({"every_n_steps": True}, r"every_n_steps must be a positive integer"),
        ({"num_probe_samples": 0}, r"num_probe_samples must be a positive integer"),
        ({"route": "bogus"}, r"route must be one of .*'functorch'"),
        ({"params": "abc"}, r"params must be a non-empty list of parameter names"),
        ({"params": [1, 2]}, r"params must be a non-empty list of parameter names"),
        ({"loss_fn": "loss"}, r"loss_fn must be callable"),
        ({"probes": Sharpness()}, r"probes must be a list of Probe objects"),
        ({"probes": [Sharpness(), "trace"]}, r"probes\[1\] is a str"),
        ({"probes": [Sharpness(), Sharpness(3)]}, r"two Sharpness probes"),
        ({"probes": [Trace()], "hooks": [lambda t, m, r: None]}, r"add a Sharpness probe"),
        ({"probes": [Trace()], "top_k": 3}, r"set them on the probes"),
        ({"probes": [Trace()], "every_n_steps": 7}, r"set them on the probes"),
        ({"max_overhead": 1.5}, r"max_overhead must be a finite number in \(0, 1\)"),
        ({"collective_timeout": 0}, r"collective_timeout must be a finite number > 0"),
        ({"enabled": "yes"}, r"enabled must be True or False"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LandscapeMonitor(**kwargs)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Sharpness(tol=0), r"tol must be a finite number in \(0, 1\)"),
        (lambda: Sharpness(tol=-1e-3), r"tol must be a finite number in \(0, 1\)"),
        (lambda: Sharpness(tol=2), r"tol must be a finite number in \(0, 1\)"),
        (lambda: Sharpness(every_n_epochs=0), r"every_n_epochs must be a positive integer"),
        (lambda: Sharpness(max_hvps=0), r"max_hvps must be a positive integer"),
        (
            lambda: Sharpness(3, max_basis=4),
            r"max_basis must be at least top_k \+ 1 \+ 1 \(lambda_min\) = 5",
        ),
        (
            lambda: Sharpness(3, lambda_min=False, max_basis=3),
            r"max_basis must be at least top_k \+ 1 = 4",
        ),
        (lambda: Sharpness(on_train_end=1), r"on_train_end must be True or False"),
        (lambda: Trace(2), r"num_hvps must be an integer >= 3"),
        (lambda: CurvatureExponent(layers="fc.weight"), r"layers must be a non-empty list"),
    ],
)
def test_probe_validation(make: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_probe_before_training_raises() -> None:
    monitor = sharpness_monitor()
    with pytest.raises(RuntimeError, match="No probe data yet"):
        monitor.probe(pl.Trainer(**trainer_kwargs()), ClassifierModule())


def test_unknown_param_pattern_fails_at_fit_start() -> None:
    monitor = sharpness_monitor(5, 2, params=["nope.*"])
    with pytest.raises(ValueError, match=r"'nope\.\*' matches no parameter.*net\.0\.weight"):
        _fit(ClassifierModule, [monitor], max_steps=5)


def test_param_subset() -> None:
    monitor = sharpness_monitor(5, 2, params=["net.4.*"], norm_statistics="running")
    module, _ = _fit(ClassifierModule, [monitor], max_steps=5)
    head = [p for n, p in module.named_parameters() if n.startswith("net.4.")]
    ref = hessian_eigenvalues(
        module, _loss, _probe_batch(64), k=2, tol=1e-8, params=head, route="double_backward"
    )
    assert monitor.history[-1].eigenvalues == pytest.approx(ref.eigenvalues.tolist(), rel=1e-3)
    assert monitor.sharpness is not None
    warm = monitor.sharpness.warm_top
    assert warm is not None and warm.shape == (16 * 3 + 3, 2)


def test_param_subset_functorch_route_keeps_no_graph() -> None:
    monitor = sharpness_monitor(5, 2, params=["net.4.*"], route="functorch")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Converting a tensor with requires_grad")
        _fit(ClassifierModule, [monitor], max_steps=5)
    assert _steps(monitor) == [0, 5]
    assert monitor.sharpness is not None
    warm = monitor.sharpness.warm_top
    assert warm is not None
    assert not warm.requires_grad and warm.grad_fn is None
    copy.deepcopy(monitor.state_dict())


def test_top_k_larger_than_num_params() -> None:
    n = _num_params(ClassifierModule())
    monitor = sharpness_monitor(5, n + 1)
    with pytest.raises(ValueError, match=rf"top_k <= {n}"):
        _fit(ClassifierModule, [monitor], max_steps=5)
    # With a parameter subset the bound is the subset's size (16 * 3 + 3 = 51).
    subset = sharpness_monitor(5, 52, params=["net.4.*"])
    with pytest.raises(ValueError, match=r"top_k <= 51"):
        _fit(ClassifierModule, [subset], max_steps=5)


def test_all_parameters_frozen() -> None:
    def make() -> pl.LightningModule:
        module = ClassifierModule()
        module.requires_grad_(False)
        return module

    monitor = sharpness_monitor(5, 2)
    with pytest.raises(ValueError, match=r"no trainable parameters"):
        _fit(make, [monitor], max_steps=5)


def test_manual_optimization_needs_loss_fn() -> None:
    monitor = sharpness_monitor(5, 2)
    with pytest.raises(ValueError, match=r"loss_fn"):
        _fit(ManualOptModule, [monitor], max_steps=5)
    # With loss_fn it works, and still does not affect training.
    monitor = sharpness_monitor(5, 2, loss_fn=_loss)
    module, trainer = _fit(ManualOptModule, [monitor], max_steps=10)
    assert trainer.global_step == 10
    assert _steps(monitor) == [0, 5, 10]
    reference, _ = _fit(ManualOptModule, max_steps=10)
    _assert_same_state(module, reference)


def test_training_step_returning_none_needs_loss_fn() -> None:
    monitor = sharpness_monitor(5, 2)
    with pytest.raises(ValueError, match=r"training_step returned NoneType.*loss_fn"):
        _fit(NoneStepModule, [monitor], max_steps=5)
    monitor = sharpness_monitor(5, 2, loss_fn=_loss)
    _fit(NoneStepModule, [monitor], max_steps=5, max_epochs=1, limit_train_batches=4)
    assert monitor.history and math.isfinite(monitor.history[0].lambda_max)


def test_non_scalar_loss_fn() -> None:
    def per_sample(module: Any, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(module(x), y, reduction="none")

    monitor = sharpness_monitor(5, 2, loss_fn=per_sample)
    with pytest.raises(ValueError, match=r"scalar"):
        _fit(ClassifierModule, [monitor], max_steps=5)


def test_non_tensor_loss_fn() -> None:
    monitor = sharpness_monitor(5, 2, loss_fn=lambda m, b: 1.0)
    with pytest.raises(TypeError, match=r"scalar torch.Tensor"):
        _fit(ClassifierModule, [monitor], max_steps=5)


# --------------------------------------------------------------------------------------------------
# 12. LightningCLI with a YAML config
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False])
def test_lightning_cli_yaml_with_nested_probes(tmp_path: Path, enabled: bool) -> None:
    monitor = fit_with_lightning_cli(
        tmp_path,
        {
            "probes": [
                {
                    "class_path": "lightning_landscape.probes.Sharpness",
                    "init_args": {"top_k": 2, "every_n_steps": 5, "tol": 1e-4},
                },
                {
                    "class_path": "lightning_landscape.Trace",
                    "init_args": {"num_hvps": 9, "every_n_steps": 10, "on_train_end": False},
                },
                {
                    "class_path": "lightning_landscape.probes.CurvatureExponent",
                    "init_args": {"top_k": 4, "every_n_steps": 6, "layers": ["net.0.weight"]},
                },
            ],
            "route": "double_backward",
            "num_probe_samples": 64,
            "params": ["net.*"],
            "enabled": enabled,
        },
    )
    assert [type(p).__name__ for p in monitor.probes] == ["Sharpness", "Trace", "CurvatureExponent"]
    sharpness = monitor.probe_named("sharpness")
    assert isinstance(sharpness, Sharpness) and (sharpness.top_k, sharpness.tol) == (2, 1e-4)
    assert monitor.probe_named("trace").cadence.every_n_steps == 10
    assert monitor.params == ["net.*"] and monitor.enabled is enabled
    if enabled:
        assert _steps(monitor) == [0, 5, 10, 12]
        assert [r.trace is not None for r in monitor.history] == [True, False, True, False]
        assert all(r.lambda_min is not None for r in monitor.history)
        alpha = monitor.probe_named("alpha")
        assert alpha.last_step == 12 and list(alpha.last_result) == ["net.0.weight"]
    else:
        assert monitor.history == [] and monitor.num_probes == 0


def test_lightning_cli_yaml_one_liner_keeps_todays_defaults(tmp_path: Path) -> None:
    """The flat form of the README and examples/cli_config.yaml: default probes."""
    monitor = fit_with_lightning_cli(
        tmp_path, {"every_n_steps": 5, "top_k": 2, "num_probe_samples": 64, "enabled": True}
    )
    assert [type(p).__name__ for p in monitor.probes] == ["Sharpness", "UpdateCurvature", "Trace"]
    sharpness = monitor.sharpness
    assert sharpness is not None and sharpness.top_k == 2 and sharpness.lambda_min
    assert _steps(monitor) == [0, 5, 10, 12]
    assert all(r.trace is not None and r.lambda_min is not None for r in monitor.history)


def test_criterion_eigenvalue_is_passed_through() -> None:
    probes = {}
    for criterion in ("residual", "eigenvalue"):
        monitor = sharpness_monitor(10, 1, tol=1e-4, criterion=criterion, warm_start=False)
        assert monitor.sharpness is not None and monitor.sharpness.criterion == criterion
        _fit(ClassifierModule, [monitor], max_steps=20)
        probes[criterion] = monitor.history
    hv_res = sum(r.num_hvps for r in probes["residual"])
    hv_eig = sum(r.num_hvps for r in probes["eigenvalue"])
    assert hv_eig < hv_res, (hv_eig, hv_res)  # fewer: the criterion really reached lanczos
    for a, b in zip(probes["residual"], probes["eigenvalue"], strict=True):
        assert b.converged and b.num_hvps <= a.num_hvps
        assert b.lambda_max == pytest.approx(a.lambda_max, rel=1e-4)
    with pytest.raises(ValueError, match="criterion"):
        Sharpness(criterion="eigen")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# 13. Every probe's state survives a resume (Δ₂'s warm start included)
# --------------------------------------------------------------------------------------------------


def _all_probes_monitor(save_warm_start: bool = True) -> LandscapeMonitor:
    return LandscapeMonitor(
        probes=[
            Sharpness(2, every_n_steps=3, lambda_min=True, on_train_end=False),
            Trace(9, every_n_steps=3, on_train_end=False),
            Stabilization(D=3, every_n_steps=5, save_warm_start=save_warm_start),
            CurvatureExponent(4, every_n_steps=5),
        ],
        route="double_backward",
        num_probe_samples=48,
    )


class _ProbeStateSpy(Callback):
    """The probes' state_dicts when training (re)starts, before any probe runs."""

    def __init__(self, monitor: LandscapeMonitor) -> None:
        self.monitor = monitor
        self.at_start: dict[str, dict[str, Any]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_start = {p.name: copy.deepcopy(p.state_dict()) for p in self.monitor.probes}


def _delta2(monitor: LandscapeMonitor) -> Any:
    return monitor.probe_named("delta2").last_result.result


def test_every_probe_state_survives_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_landscape.probes.delta2 as delta2_mod

    starts: list[Tensor | None] = []
    real = delta2_mod.stabilization

    def spy(*args: Any, **kwargs: Any) -> Any:
        starts.append(kwargs["start"])
        return real(*args, **kwargs)

    monkeypatch.setattr(delta2_mod, "stabilization", spy)

    def fit(monitor: LandscapeMonitor, ckpt_path: Path | None, dirpath: Path) -> _ProbeStateSpy:
        checkpoint = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=5, save_top_k=-1)
        state_spy = _ProbeStateSpy(monitor)
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(
            **trainer_kwargs(
                callbacks=[state_spy, monitor, checkpoint], max_steps=10, enable_checkpointing=True
            )
        )
        resume = None if ckpt_path is None else str(ckpt_path)
        trainer.fit(ClassifierModule(), make_dataloader(), ckpt_path=resume)
        return state_spy

    first = _all_probes_monitor()
    fit(first, None, tmp_path / "first")
    ckpt = tmp_path / "first" / "epoch=0-step=5.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"][first.state_key]

    starts.clear()
    resumed = _all_probes_monitor()
    restored = fit(resumed, ckpt, tmp_path / "resumed").at_start
    for name, state in saved["probes"].items():
        assert restored[name].keys() == state.keys(), name
        expected = 3 if name in ("sharpness", "trace") else 5
        assert restored[name]["last_step"] == state["last_step"] == expected, name
    warm = saved["probes"]["delta2"]["warm"]
    assert warm is not None and warm.shape == (_num_params(ClassifierModule()), 3)
    assert torch.equal(restored["delta2"]["warm"], warm)
    assert torch.equal(restored["sharpness"]["warm_top"], saved["probes"]["sharpness"]["warm_top"])
    assert restored["sharpness"]["trajectory"] == saved["probes"]["sharpness"]["trajectory"]
    assert (
        resumed.probe_named("sharpness").trajectory[:2]
        == first.probe_named("sharpness").trajectory[:2]
    )
    # The resumed run's first Δ₂ solve (step 10) starts from step 5's saved eigenvectors...
    assert len(starts) == 1 and starts[0] is not None and torch.equal(starts[0], warm)

    # ... and so spends fewer products than the same resume from a checkpoint without them (the
    # same weights: training is bit-identical with either monitor).
    fit(_all_probes_monitor(save_warm_start=False), None, tmp_path / "cold_first")
    starts.clear()
    cold = _all_probes_monitor(save_warm_start=False)
    restored_cold = fit(cold, tmp_path / "cold_first" / "epoch=0-step=5.ckpt", tmp_path / "cold")
    restored_cold = restored_cold.at_start
    assert restored_cold["delta2"]["warm"] is None and starts == [None]
    a, b = _delta2(resumed), _delta2(cold)
    assert a.k == b.k == 48
    assert a.value == pytest.approx(b.value, rel=1e-4)
    assert a.num_hvps < b.num_hvps, (a.num_hvps, b.num_hvps)
