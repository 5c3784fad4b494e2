"""LandscapeMonitor's Δ₂^(D) cadence: keys, agreement with the functional API, eigenvector
reuse, the k-sweep figure, language-model batches, errors, and no effect on training."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import lightning_landscape as ll
import lightning_landscape.probes.delta2 as delta2_mod
from lightning_landscape import LandscapeMonitor, Sharpness, Stabilization
from tests._lightning import ClassifierModule, MemoryLogger, make_dataloader, trainer_kwargs
from tests._models import TinyCausalAttention, lm_batch, lm_loss

N = 24  # eigenvalue-probe samples; Δ₂ takes one more


def _loss(module: Any, batch: Any) -> Tensor:
    out: Tensor = module.compute_loss(batch)
    return out


def _fit(monitor: LandscapeMonitor | None, logger: Any = None, max_steps: int = 10) -> Any:
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule()
    callbacks = [] if monitor is None else [monitor]
    trainer = pl.Trainer(**trainer_kwargs(max_steps=max_steps, logger=logger, callbacks=callbacks))
    trainer.fit(module, make_dataloader())
    return module


def _monitor(sharpness: dict[str, Any] | None = None, **delta2: Any) -> LandscapeMonitor:
    """Δ₂ with D = 3 every 4 steps, and a Sharpness probe with ``sharpness`` settings if given;
    eval mode (running statistics), as the functional API it is compared with."""
    probes: list[ll.Probe] = [Stabilization(**{"D": 3, "every_n_steps": 4, **delta2})]
    if sharpness is not None:
        probes.append(Sharpness(**{"lambda_min": False, **sharpness}))
    return LandscapeMonitor(
        probes=probes, num_probe_samples=N, loss_fn=_loss, norm_statistics="running"
    )


def _last(monitor: LandscapeMonitor) -> ll.StabilizationResult:
    measurement = monitor.probe_named("delta2").last_result
    assert measurement is not None
    return measurement.result


def test_keys_cadence_and_terms() -> None:
    logger = MemoryLogger()
    monitor = _monitor()
    _fit(monitor, logger)
    steps = [s for s, m in logger.records if "landscape/delta2_D" in m]
    assert steps == [4, 8, 10]  # cadence, then at train end
    last = next(m for s, m in reversed(logger.records) if "landscape/delta2_D" in m)
    r = _last(monitor)
    assert r.k == N and r.D == 3 and r.estimator == "gm"
    assert last["landscape/delta2_D"] == r.value
    assert last["landscape/delta2/k"] == N
    terms = [last[f"landscape/delta2/term_{t}"] for t in ("mean", "cross", "linear", "quadratic")]
    assert math.isclose(sum(terms), r.value, rel_tol=1e-12)
    assert last["landscape/delta2/c_norm"] == pytest.approx(float(r.c.norm()))
    assert last["landscape/delta2_cost/hvps"] == r.num_hvps > 0
    assert "landscape/delta2/slope" not in last  # no sweep asked for


def test_matches_the_functional_api_on_probe_data_plus_one_sample() -> None:
    monitor = _monitor(every_n_steps=100)
    module = _fit(monitor, max_steps=6)  # only the train-end measurement
    dataset = make_dataloader().dataset
    x = torch.stack([dataset[i][0] for i in range(N + 1)])
    y = torch.stack([dataset[i][1] for i in range(N + 1)])
    ref = ll.stabilization(module, _loss, (x, y), N, D=3)
    r = _last(monitor)
    assert r.value == pytest.approx(ref.value, rel=1e-5)
    assert r.a == pytest.approx(ref.a, rel=1e-6)
    torch.testing.assert_close(r.eigenvalues, ref.eigenvalues, rtol=1e-5, atol=0)


def test_reuses_the_probe_eigenvectors_of_the_same_hessian(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same step as an eigenvalue probe: its vectors start the solve, and H^(k) is its Hessian."""
    starts: list[Tensor | None] = []
    real = delta2_mod.stabilization

    def spy(*args: Any, **kwargs: Any) -> Any:
        starts.append(kwargs["start"])
        return real(*args, **kwargs)

    monkeypatch.setattr(delta2_mod, "stabilization", spy)
    sharpness = {"every_n_steps": 4, "top_k": 3, "tol": 1e-6, "on_train_end": False}
    monitor = _monitor(sharpness, on_train_end=False)
    _fit(monitor, max_steps=8)
    assert len(starts) == 2
    assert starts[0] is not None  # the probe at step 4 (not a cold start)
    report = monitor.history[-1]
    assert report.step == 8
    # The same Hessian: Δ₂'s D = 3 eigenvalues of H^(k) are the probe's top 3.
    torch.testing.assert_close(
        _last(monitor).eigenvalues,
        torch.tensor(report.eigenvalues, dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )


def test_warm_start_saves_products() -> None:
    """Starting from the probe's converged vectors costs fewer products than a cold start."""
    warm = _monitor({"every_n_steps": 4, "top_k": 3, "tol": 1e-6, "on_train_end": False})
    _fit(warm, max_steps=4)
    cold = _monitor()
    _fit(cold, max_steps=4)
    assert _last(warm).value == pytest.approx(_last(cold).value, rel=1e-4)
    assert _last(warm).num_hvps < _last(cold).num_hvps


def test_sweep_slope_and_tensorboard_figure(tmp_path: Any) -> None:
    logger = TensorBoardLogger(tmp_path, name="delta2")
    monitor = _monitor(every_n_steps=5, sweep=True, sweep_points=4, sweep_repeats=3)
    _fit(monitor, logger)
    sweep = monitor.probe_named("delta2").last_result.sweep
    assert sweep is not None and sweep.ks[-1] == N and len(sweep.ks) == 4
    assert sweep.slope < -1.0
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"landscape/delta2_D", "landscape/delta2/slope"} <= set(tags["scalars"])
    assert "landscape/delta2/slope_stderr" in tags["scalars"]
    assert [e.step for e in events.Images("landscape/delta2_sweep")] == [5, 10]
    assert events.Scalars("landscape/delta2/slope")[-1].value == pytest.approx(sweep.slope)


class _LanguageModule(pl.LightningModule):
    """A tiny causal LM; one sample is one sequence, the loss the token mean."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCausalAttention()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (tokens,) = batch
        return lm_loss(self.net, tokens)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_language_model_batches() -> None:
    pl.seed_everything(0, verbose=False)
    module = _LanguageModule()
    loader = DataLoader(TensorDataset(lm_batch(n=64, seed=1)), batch_size=16, shuffle=False)
    monitor = LandscapeMonitor(probes=[Stabilization(D=4, every_n_steps=4)], num_probe_samples=16)
    trainer = pl.Trainer(**trainer_kwargs(max_steps=4, callbacks=[monitor]))
    trainer.fit(module, loader)
    r = _last(monitor)
    assert r.k == 16 and math.isfinite(r.value) and r.value > 0
    tokens = lm_batch(n=64, seed=1)[:17]
    ref = ll.stabilization(module, lambda m, b: lm_loss(m.net, b), tokens, 16, D=4)
    assert r.value == pytest.approx(ref.value, rel=1e-4)


def test_training_is_unchanged() -> None:
    """Bit for bit: the same weights with and without the Δ₂ measurements (and the sweep)."""
    plain = _fit(None)
    probed = _fit(_monitor(every_n_steps=3, sweep=True, sweep_points=3))
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        _monitor(sigma=0.0)
    with pytest.raises(ValueError, match="estimator must be one of"):
        _monitor(estimator="exact")
    with pytest.raises(ValueError, match="D must be a positive integer"):
        _monitor(D=0)
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer"):
        _monitor(every_n_steps=0)
    with pytest.raises(ValueError, match="sweep_points must be an integer >= 2"):
        _monitor(sweep=True, sweep_points=1)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        _monitor(estimator="mc", num_samples=1)
    with pytest.raises(ValueError, match="D=5000 exceeds"):
        _fit(_monitor(D=5000), max_steps=1)
    with pytest.raises(ValueError, match="Raise num_probe_samples or lower Stabilization's k"):
        _fit(_monitor(k=N + 1), max_steps=1)


def test_failed_measurement_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN curvature: a warning, nothing logged, training goes on."""

    def nan_loss(module: Any, batch: Any) -> Tensor:
        return _loss(module, batch) * float("nan")

    logger = MemoryLogger()
    monitor = LandscapeMonitor(
        probes=[Stabilization(D=3, every_n_steps=4)], num_probe_samples=N, loss_fn=nan_loss
    )
    with pytest.warns(UserWarning, match="Stabilization probe at step 4"):
        _fit(monitor, logger, max_steps=4)
    assert monitor.probe_named("delta2").last_result is None
    assert not [m for _, m in logger.records if "landscape/delta2_D" in m]
