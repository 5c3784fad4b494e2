"""LandscapeMonitor's pictures: SLQ density with the negative mass, eigenvalue trajectories,
loss slices (TensorBoard images), and that none of them changes training."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_landscape import (
    CurvatureExponent,
    LandscapeMonitor,
    LossSlice,
    Sharpness,
    SpectralDensity,
    Stabilization,
)
from tests._lightning import ClassifierModule, MemoryLogger, make_dataloader, trainer_kwargs


def _fit(monitor: LandscapeMonitor | None, logger: Any = None, **kwargs: Any) -> Any:
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule()
    callbacks = [] if monitor is None else [monitor]
    args = {"max_epochs": 2, "max_steps": -1, **kwargs}
    trainer = pl.Trainer(**trainer_kwargs(logger=logger, callbacks=callbacks, **args))
    trainer.fit(module, make_dataloader(batch_size=32))  # 8 steps per epoch
    return module


def _events(logger: TensorBoardLogger) -> EventAccumulator:
    return EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()


def test_density_every_other_probe_with_negative_mass(tmp_path: Any) -> None:
    logger = TensorBoardLogger(tmp_path, name="density")
    monitor = LandscapeMonitor(
        probes=[
            Sharpness(2, every_n_steps=4),
            SpectralDensity(num_runs=4, lanczos_steps=20, every_n_steps=8),
        ],
        num_probe_samples=64,
    )
    _fit(monitor, logger)
    steps = [r.step for r in monitor.history]
    assert steps == [0, 4, 8, 12, 16]
    with_density = [r.step for r in monitor.history if r.negative_mass is not None]
    assert with_density == [0, 8, 16]  # every other round, sharing its Hessian operator
    last = monitor.history[-1]
    density = monitor.probe_named("density").last_result
    assert density is not None and density.is_finite
    assert last.negative_mass == density.negative_mass()
    assert 0.0 <= last.negative_mass < 0.5
    assert last.negative_mass_bounds == density.negative_mass_bounds()
    low, high = last.negative_mass_bounds
    assert 0.0 <= low <= last.negative_mass <= high <= 1.0
    assert [r.negative_mass_bounds is None for r in monitor.history] == [False, True] * 2 + [False]
    # SLQ's extreme node is a lower bound on λ_max and close to it.
    assert density.lambda_max <= last.lambda_max * (1 + 1e-3)
    assert density.lambda_max > 0.9 * last.lambda_max
    events = _events(logger)
    for tag in ("negative_mass", "negative_mass_lower", "negative_mass_upper"):
        assert [e.step for e in events.Scalars(f"landscape/{tag}")] == [0, 8, 16]
    assert events.Scalars("landscape/negative_mass_upper")[-1].value == pytest.approx(high)
    assert [e.step for e in events.Images("landscape/density")] == [0, 8, 16]


def test_trajectory_figure_at_epoch_ends(tmp_path: Any) -> None:
    logger = TensorBoardLogger(tmp_path, name="traj")
    monitor = LandscapeMonitor(probes=[Sharpness(2, every_n_steps=3)], num_probe_samples=64)
    _fit(monitor, logger)
    images = _events(logger).Images("landscape/eigenvalue_trajectories")
    # epoch 1 ends at step 8 (last probe 6), epoch 2 at 16 (probe 15), train end adds step 16.
    assert [e.step for e in images] == [6, 15, 16]
    assert images[-1].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    # SGD: the stability ratio's trajectory next to it (every probe has a ratio)
    ratios = _events(logger).Images("landscape/stability_ratio_trajectory")
    assert [e.step for e in ratios] == [6, 15, 16]


def test_no_trajectory_figure_when_off(tmp_path: Any) -> None:
    logger = TensorBoardLogger(tmp_path, name="off")
    monitor = LandscapeMonitor(probes=[Sharpness(1, every_n_steps=3, figure=False)])
    _fit(monitor, logger, max_epochs=1)
    assert "landscape/eigenvalue_trajectories" not in _events(logger).Tags()["images"]


@pytest.mark.parametrize("directions", ["eigen", "random"])
def test_loss_slice_every_epoch(tmp_path: Any, directions: str) -> None:
    logger = TensorBoardLogger(tmp_path, name=directions)
    monitor = LandscapeMonitor(
        probes=[LossSlice(directions, steps=5, span=0.5, every_n_epochs=1)],  # type: ignore[arg-type]
        num_probe_samples=64,
        loss_fn=lambda m, b: m.compute_loss(b),
        norm_statistics="running",  # the centre loss is checked against eval mode below
    )
    module = _fit(monitor, logger)
    result = monitor.probe_named("slice").last_result
    assert result is not None and result.losses.shape == (5, 5) and result.directions == directions
    assert bool(torch.isfinite(result.losses).all())
    # The centre of the grid is the loss at the weights, on the first probe batch.
    assert float(result.losses[2, 2]) == pytest.approx(result.center_loss, rel=1e-6)
    x = torch.stack([make_dataloader().dataset[i][0] for i in range(64)])
    y = torch.stack([make_dataloader().dataset[i][1] for i in range(64)])
    module.eval()
    with torch.no_grad():
        assert result.center_loss == pytest.approx(float(module.compute_loss((x, y))), rel=1e-6)
    # epochs end at steps 8 and 16; train end is step 16 again (not repeated)
    assert [e.step for e in _events(logger).Images("landscape/loss_slice")] == [8, 16]


def test_pictures_do_not_change_training() -> None:
    plain = _fit(None)
    monitor = LandscapeMonitor(
        probes=[
            Sharpness(2, every_n_steps=5),
            SpectralDensity(num_runs=2, lanczos_steps=10, every_n_steps=5),
            LossSlice(steps=3, every_n_epochs=1),
        ],
        num_probe_samples=64,
    )
    probed = _fit(monitor, MemoryLogger())
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert monitor.probe_named("slice").last_result is not None
    assert all(r.negative_mass is not None for r in monitor.history)


def test_history_round_trips_with_negative_mass() -> None:
    monitor = LandscapeMonitor(
        probes=[Sharpness(1, every_n_steps=4), SpectralDensity(2, 8, every_n_steps=4)]
    )
    _fit(monitor, max_epochs=1)
    state = monitor.state_dict()
    again = LandscapeMonitor(every_n_steps=4, top_k=1)
    again.load_state_dict(state)
    assert again.history == monitor.history
    assert all(r.negative_mass_bounds is not None for r in again.history)
    fields = ("negative_mass", "negative_mass_bounds")
    old = {k: v for k, v in state["history"][0].items() if k not in fields}
    again.load_state_dict({**state, "history": [old]})  # checkpoints from before the fields
    assert again.history[0].negative_mass is None and math.isfinite(again.history[0].lambda_max)
    assert again.history[0].negative_mass_bounds is None


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SpectralDensity(every_n_steps=0), "every_n_steps must be a positive integer"),
        (lambda: SpectralDensity(num_runs=0), "num_runs must be a positive integer"),
        (lambda: LossSlice(every_n_epochs=0), "every_n_epochs must be a positive integer"),
        (lambda: LossSlice(directions="pca"), "directions must be one of"),
        (lambda: LossSlice(dims=3), "dims must be one of"),
        (lambda: LossSlice(steps=1), "steps must be an integer >= 2"),
        (lambda: LossSlice(span=0.0), "span must be a finite number > 0"),
    ],
)
def test_bad_arguments(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def _layout_titles(logger: TensorBoardLogger) -> dict[str, list[str]]:
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0}).Reload()
    (event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    return {c.title: [chart.title for chart in c.chart] for c in layout.category}


def test_layout_lists_only_what_is_measured(tmp_path: Any) -> None:
    plain = TensorBoardLogger(tmp_path, name="plain")
    _fit(LandscapeMonitor(probes=[Sharpness(1, every_n_steps=4)]), plain, max_epochs=1)
    titles = _layout_titles(plain)
    assert list(titles) == ["landscape: sharpness", "landscape: spectrum", "landscape: cost"]
    assert not any("control" in t for t in titles["landscape: sharpness"])

    full = TensorBoardLogger(tmp_path, name="full")
    monitor = LandscapeMonitor(
        probes=[
            Sharpness(1, every_n_steps=4),
            CurvatureExponent(3, every_n_steps=100),
            Stabilization(D=2, every_n_steps=100),
        ],
        hooks=[lambda trainer, module, report: None],
    )
    _fit(monitor, full, max_epochs=1)
    titles = _layout_titles(full)
    assert len(titles) == 5 and "landscape: stabilization Δ₂^(D)" in titles
    assert any("control" in t for t in titles["landscape: sharpness"])


def test_a_failing_figure_is_skipped(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_landscape.report.figures as figures

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("no such colormap")

    monkeypatch.setattr(figures, "density_figure", broken)
    logger = TensorBoardLogger(tmp_path, name="broken")
    monitor = LandscapeMonitor(
        probes=[Sharpness(1, every_n_steps=8), SpectralDensity(2, 10, every_n_steps=8)],
        num_probe_samples=64,
    )
    with pytest.warns(UserWarning, match=r"SpectralDensity figure at step 0 failed \(ValueError"):
        _fit(monitor, logger, max_epochs=1)
    events = _events(logger)
    assert [e.step for e in events.Scalars("landscape/negative_mass")] == [0, 8]  # still logged
    assert [e.value for e in events.Scalars("landscape/probe_failed")] == [1.0, 1.0]
    assert "landscape/density" not in events.Tags()["images"]
    assert [r.step for r in monitor.history] == [0, 8]
