"""LandscapeMonitor's α cadence: logged keys, TensorBoard scalars and figure, errors."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_landscape as ll
from lightning_landscape import CurvatureExponent, LandscapeMonitor
from tests._lightning import ClassifierModule, MemoryLogger, make_dataloader, trainer_kwargs


def _fit(monitor: LandscapeMonitor, logger, max_steps: int = 12) -> ClassifierModule:  # type: ignore[no-untyped-def]
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule()
    trainer = pl.Trainer(**trainer_kwargs(max_steps=max_steps, logger=logger, callbacks=[monitor]))
    trainer.fit(module, make_dataloader())
    return module


def _last_alpha(monitor: LandscapeMonitor) -> dict[str, ll.AlphaResult]:
    result = monitor.probe_named("alpha").last_result
    assert result is not None
    return dict(result)


def test_alpha_cadence_logs_per_layer_and_group_values() -> None:
    logger = MemoryLogger()
    monitor = LandscapeMonitor(probes=[CurvatureExponent(4, every_n_steps=5)], num_probe_samples=32)
    module = _fit(monitor, logger)
    alpha_steps = [s for s, m in logger.records if "landscape/alpha_cost/hvps" in m]
    assert alpha_steps == [5, 10, 12]  # cadence, then at train end
    weights = [n for n, p in module.named_parameters() if p.ndim == 2]
    assert set(_last_alpha(monitor)) == set(weights)
    last = dict(next(m for s, m in reversed(logger.records) if "landscape/alpha_cost/hvps" in m))
    assert last["landscape/alpha_cost/hvps"] == sum(
        r.num_hvps for r in _last_alpha(monitor).values()
    )
    for name, r in _last_alpha(monitor).items():
        if math.isfinite(r.alpha):
            assert last[f"landscape/alpha/{name}"] == r.alpha
            assert last[f"landscape/alpha_r2/{name}"] == r.r2
        else:
            assert f"landscape/alpha/{name}" not in last
    for kind, value in ll.group_alphas(_last_alpha(monitor)).items():
        assert (f"landscape/alpha_group/{kind}" in last) == math.isfinite(value)


def test_alpha_matches_the_functional_api_on_the_probe_batch() -> None:
    monitor = LandscapeMonitor(  # eval mode: the functional API's default
        probes=[CurvatureExponent(4, every_n_steps=100)],
        num_probe_samples=32,
        loss_fn=lambda m, b: m.compute_loss(b),
        norm_statistics="running",
    )
    module = _fit(monitor, None, max_steps=6)  # only the train-end measurement
    dataset = make_dataloader().dataset
    x = torch.stack([dataset[i][0] for i in range(32)])
    y = torch.stack([dataset[i][1] for i in range(32)])
    ref = ll.curvature_exponents(module, lambda m, b: m.compute_loss(b), (x, y), top_k=4)
    for name, r in ref.items():
        torch.testing.assert_close(_last_alpha(monitor)[name].h, r.h, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(_last_alpha(monitor)[name].sigma, r.sigma, rtol=1e-5, atol=1e-12)


def test_alpha_tensorboard_scalars_and_figure(tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path, name="alpha")
    monitor = LandscapeMonitor(probes=[CurvatureExponent(4, every_n_steps=6)], num_probe_samples=32)
    _fit(monitor, logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert any(t.startswith("landscape/alpha_r2/") for t in tags["scalars"])
    assert "landscape/alpha_cost/seconds" in tags["scalars"]
    assert "landscape/alpha_fit" in tags["images"]
    assert [e.step for e in events.Images("landscape/alpha_fit")] == [6, 12]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"top_k": 0}, "top_k"),
        ({"layers": "net.*"}, "layers must be a non-empty list"),
    ],
)
def test_alpha_arguments_are_validated(kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        CurvatureExponent(**kwargs)


def test_mistyped_layer_pattern_fails_before_training() -> None:
    monitor = LandscapeMonitor(probes=[CurvatureExponent(layers=["net.9.*"])])
    trainer = pl.Trainer(**trainer_kwargs(max_steps=5, callbacks=[monitor]))
    with pytest.raises(ValueError, match=r"CurvatureExponent\(layers=\['net.9.\*'\]\).*matches no"):
        trainer.fit(ClassifierModule(), make_dataloader())
    assert trainer.global_step == 0
