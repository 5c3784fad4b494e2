"""The probe objects on their own: against dense float64 truth, their state, their reports, one
shared operator per round, and the worked example of docs/architecture.md."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

import lightning_landscape as ll
from lightning_landscape.probes import (
    BUILTIN,
    CurvatureExponent,
    LossSlice,
    Probe,
    ProbeContext,
    Sharpness,
    SpectralDensity,
    Stabilization,
    Trace,
)
from lightning_landscape.report import tags
from lightning_landscape.report.layout import CATEGORIES, compose_layout, cost_charts
from tests._lightning import ClassifierModule, MemoryLogger, make_dataloader, trainer_kwargs
from tests._models import dense_hessian, make_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mlp() -> tuple[torch.nn.Module, Any, Any, torch.Tensor]:
    model, loss_fn, batch = make_model("mlp")  # float64, eval mode
    evals = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batch))
    return model, loss_fn, batch, evals


def _ctx(model: torch.nn.Module, loss_fn: Any, batch: Any, **kwargs: Any) -> ProbeContext:
    return ProbeContext(model, loss_fn, [batch], route="double_backward", **kwargs)


def test_sharpness_matches_the_dense_spectrum(mlp: Any) -> None:
    model, loss_fn, batch, evals = mlp
    probe = Sharpness(3, tol=1e-8)
    result = probe.run(_ctx(model, loss_fn, batch))
    torch.testing.assert_close(
        torch.tensor(result.eigenvalues, dtype=torch.float64), evals.flip(0)[:3], rtol=1e-7, atol=0
    )
    assert result.lambda_min == pytest.approx(float(evals[0]), rel=1e-6)
    assert result.converged and result.stability_threshold is None  # no optimizer given
    assert result.num_hvps == result.top.num_hvps + result.bottom.num_hvps  # type: ignore[union-attr]
    scalars = probe.scalars(result)
    assert scalars[tags.LAMBDA_MAX] == result.lambda_max
    assert [scalars[tags.eigenvalue(i)] for i in range(3)] == list(result.eigenvalues)
    assert tags.STABILITY_RATIO not in scalars


def test_sharpness_threshold_from_the_optimizer(mlp: Any) -> None:
    model, loss_fn, batch, evals = mlp
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    result = Sharpness(1, lambda_min=False, tol=1e-8).run(
        _ctx(model, loss_fn, batch, optimizers=[sgd])
    )
    assert result.stability_threshold == pytest.approx(3.0 / 0.01)
    assert result.stability_ratio == pytest.approx(float(evals[-1]) * 0.01 / 3.0, rel=1e-7)


def test_trace_and_density_match_the_dense_trace(mlp: Any) -> None:
    model, loss_fn, batch, evals = mlp
    n, exact = evals.numel(), float(evals.sum())
    trace = Trace(3 * n + 3).run(_ctx(model, loss_fn, batch))  # the sketch spans the space
    assert trace.trace == pytest.approx(exact, rel=1e-6)
    density = SpectralDensity(num_runs=4, lanczos_steps=30).run(_ctx(model, loss_fn, batch))
    # SLQ's first moment is Hutchinson's estimate, within a few standard errors of tr(H) / n.
    assert abs(density.moment(1) - exact / n) < 5 * density.moment_stderr(1)
    lower, upper = density.negative_mass_bounds()
    assert SpectralDensity().scalars(density) == {
        tags.NEGATIVE_MASS: density.negative_mass(),
        tags.NEGATIVE_MASS_LOWER: lower,
        tags.NEGATIVE_MASS_UPPER: upper,
    }
    assert 0.0 <= lower <= density.negative_mass() <= upper <= 1.0


def test_trace_reuses_converged_sharpness_pairs_only(mlp: Any) -> None:
    model, loss_fn, batch, evals = mlp
    exact = float(evals.sum())
    ctx = _ctx(model, loss_fn, batch)
    ctx.results["sharpness"] = Sharpness(5, tol=1e-9, lambda_min=False).run(ctx)
    reused = Trace(30).run(ctx)
    assert (reused.method, reused.num_hvps, reused.num_samples) == ("deflated", 10, 10)
    assert abs(reused.trace - exact) <= 4 * reused.stderr
    hutchpp = Trace(30, reuse_eigenvectors=False).run(ctx)
    assert (hutchpp.method, hutchpp.num_hvps) == ("hutch++", 30)
    # A solve that did not converge is not trusted as a sketch.
    ctx = _ctx(model, loss_fn, batch)
    ctx.results["sharpness"] = Sharpness(5, tol=1e-12, max_hvps=6, lambda_min=False).run(ctx)
    assert not ctx.results["sharpness"].top.all_converged
    assert Trace(30).run(ctx).method == "hutch++"
    with pytest.raises(ValueError, match="reuse_eigenvectors"):
        Trace(reuse_eigenvectors=1)  # type: ignore[arg-type]


def _quadratic(eigenvalues: list[float]) -> tuple[torch.nn.Module, Any, torch.Tensor]:
    """A model whose Hessian is ``Q diag(eigenvalues) Qᵀ`` for a random rotation ``Q``."""
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=_gen(3)))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    model = torch.nn.Linear(n, 1, bias=False).double()
    return model, lambda m, b: 0.5 * (m.weight @ b @ m.weight.T).sum(), a


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_trace_also_deflates_a_converged_lambda_min_below_the_top() -> None:
    # The rest of the spectrum is zero: with λ_max and λ_min deflated the estimate is exact.
    model, loss_fn, a = _quadratic([9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -5.0])
    ctx = _ctx(model, loss_fn, a)
    ctx.results["sharpness"] = Sharpness(1, tol=1e-10).run(ctx)
    both = Trace(9).run(ctx)
    assert both.trace == pytest.approx(4.0, abs=1e-9) and both.stderr < 1e-9
    # λ_max alone leaves -5 q qᵀ to Hutchinson: a noisy estimate.
    ctx = _ctx(model, loss_fn, a)
    ctx.results["sharpness"] = Sharpness(1, tol=1e-10, lambda_min=False).run(ctx)
    assert Trace(9).run(ctx).stderr > 0.1


def test_trace_deflates_top_and_bottom_once_each() -> None:
    # top_k = n - 1 with a distinct λ_min: top and bottom span everything, the trace is exact.
    model, loss_fn, a = _quadratic([3.0, 2.0, -1.0])
    ctx = _ctx(model, loss_fn, a)
    ctx.results["sharpness"] = Sharpness(2, tol=1e-10).run(ctx)
    exact = Trace(9).run(ctx)
    assert exact.trace == pytest.approx(4.0, abs=1e-9) and exact.stderr < 1e-9
    # A degenerate eigenvalue: λ_min's vector is the other one of the eigenspace, also exact.
    model, loss_fn, a = _quadratic([3.0, 2.0, 2.0])
    ctx = _ctx(model, loss_fn, a)
    sharp = ctx.results["sharpness"] = Sharpness(2, tol=1e-10).run(ctx)
    assert Trace(9).run(ctx).trace == pytest.approx(7.0, abs=1e-9)
    # A bottom pair that is one of the top pairs (its value equals the smallest top value) is
    # not counted twice: the estimate is the top-k deflation's, with the same probes.
    top = sharp.top
    last = slice(top.eigenvalues.numel() - 1, None)
    assert top.eigenvectors is not None
    copy = dataclasses.replace(
        top,
        eigenvalues=top.eigenvalues[last],
        eigenvectors=top.eigenvectors[:, last],
        residuals=top.residuals[last],
        converged=top.converged[last],
        which="smallest",
    )
    ctx.results["sharpness"] = dataclasses.replace(sharp, bottom=copy)
    alone = ll.solvers.deflated_trace(
        ctx.operator(), top.eigenvectors, top.eigenvalues, 3, seed=ctx.seed
    )
    assert Trace(9).run(ctx).trace == alone.trace


def test_one_operator_per_round_and_delta2_reuses_the_sharpness_vectors(mlp: Any) -> None:
    model, loss_fn, batch, _ = mlp
    ctx = _ctx(model, loss_fn, batch)
    sharp = Sharpness(3, tol=1e-9, lambda_min=False)
    ctx.results["sharpness"] = sharp.run(ctx)
    op = ctx.operator()
    assert ctx.operator() is op  # built once, shared
    # The trace takes the converged sharpness pairs as its sketch: 9 - 2·3 = 3 products.
    trace = Trace(9).run(ctx)
    assert trace.method == "deflated" and trace.num_hvps == 3
    assert op.num_matvecs == ctx.results["sharpness"].num_hvps + 3
    # Δ₂ with D = 3 on the same batch: H^(k) differs from H (k < n), but the solve starts from
    # the round's sharpness eigenvectors, so it agrees with a direct call given that start.
    k = ll.operators.batch_size(batch) - 1
    delta2 = Stabilization(D=3).run(ctx)
    ref = ll.stabilization(
        model,
        loss_fn,
        batch,
        k,
        D=3,
        start=ctx.results["sharpness"].top.eigenvectors,
        route="double_backward",
    )
    assert delta2.result.value == pytest.approx(ref.value, rel=1e-9)
    assert delta2.result.num_hvps == ref.num_hvps
    ctx.release()


def test_state_dicts_round_trip(mlp: Any) -> None:
    model, loss_fn, batch, _ = mlp
    sharp, delta2 = Sharpness(2), Stabilization(D=2)
    ctx = _ctx(model, loss_fn, batch)
    for probe, step in ((sharp, 7), (delta2, 7)):
        result = probe.run(ctx)
        probe.record(result, step)
        probe.last_step = step
    fresh_sharp, fresh_delta2 = Sharpness(2), Stabilization(D=2)
    fresh_sharp.load_state_dict(sharp.state_dict())
    fresh_delta2.load_state_dict(delta2.state_dict())
    assert fresh_sharp.last_step == fresh_delta2.last_step == 7
    assert fresh_sharp.trajectory == sharp.trajectory and len(sharp.trajectory) == 1
    assert sharp.warm_top is not None and fresh_sharp.warm_top is not None
    assert torch.equal(fresh_sharp.warm_top, sharp.warm_top.cpu())
    assert delta2.warm is not None and fresh_delta2.warm is not None
    assert torch.equal(fresh_delta2.warm, delta2.warm.cpu())
    assert Sharpness(2, save_warm_start=False).state_dict()["warm_top"] is None
    quiet = Stabilization(D=2, save_warm_start=False)
    quiet.record(delta2.last_result, 7)
    assert quiet.state_dict()["warm"] is None


def test_probe_reports_rows_summaries_and_charts(mlp: Any) -> None:
    model, loss_fn, batch, _ = mlp
    ctx = _ctx(model, loss_fn, batch)
    probes: list[Probe] = [
        Sharpness(2),
        Trace(9),
        SpectralDensity(2, 10),
        CurvatureExponent(3),
        Stabilization(D=2, sweep=True, sweep_points=3, sweep_repeats=2),
        LossSlice(steps=3),
    ]
    for probe in probes:
        result = probe.run(ctx)
        ctx.results[probe.name] = result
        assert probe.is_finite(result), probe.name
        assert probe.rows(result) and all(len(r) == 3 for r in probe.rows(result))
        assert probe.summary(result)
        for tag in probe.scalars(result):
            assert tag.startswith("landscape/"), tag
        for tag in probe.figures(result, 3):
            assert tag.startswith("landscape/"), tag
    assert set(probes[2].figures(ctx.results["density"], 3)) == {tags.DENSITY_FIGURE}
    assert set(probes[4].figures(ctx.results["delta2"], 3)) == {tags.DELTA2_FIGURE}
    assert tags.DELTA2_SLOPE in probes[4].scalars(ctx.results["delta2"])
    layout = compose_layout([*(p.charts() for p in probes), cost_charts()])
    assert list(layout) == list(CATEGORIES)
    results = [(p, ctx.results[p.name]) for p in probes if p.name in ctx.results]
    logged = {tag for p, result in results for tag in p.scalars(result)}
    for charts in layout.values():
        for kind, entries in charts.values():
            if kind == "Multiline":  # regular expressions
                for pattern in entries:
                    re.compile(pattern)
            else:  # a Margin chart: value, lower and upper, exact tags that are logged
                assert kind == "Margin" and len(entries) == 3 and set(entries) <= logged, entries
    ctx.release()


def test_builtin_names() -> None:
    assert list(BUILTIN) == [
        "sharpness",
        "trace",
        "batch_sharpness",
        "density",
        "alpha",
        "delta2",
        "slice",
    ]
    assert all(cls.name == name for name, cls in BUILTIN.items())


def test_trajectory_figure_only_when_new_points() -> None:
    sharp = Sharpness(1)
    assert sharp.epoch_figures() == {}
    sharp.trajectory = [(0, (2.0,), 4.0, -0.1), (5, (3.0,), 4.0, -0.2)]
    assert set(sharp.epoch_figures()) == {tags.TRAJECTORIES_FIGURE}
    assert sharp.epoch_figures() == {}  # nothing new since
    sharp.trajectory.append((10, (3.5,), None, -0.2))
    sharp.ratios = [(5, 0.4, "preconditioned"), (10, 0.9, "preconditioned")]
    figs = sharp.epoch_figures()
    assert set(figs) == {tags.TRAJECTORIES_FIGURE, tags.STABILITY_FIGURE}
    assert "λ₁(P⁻¹H)" in figs[tags.STABILITY_FIGURE].axes[0].get_title()
    assert Sharpness(1, figure=False).epoch_figures() == {}


def test_the_architecture_doc_example_runs_in_a_monitor() -> None:
    """The `GradientNorm` probe of docs/architecture.md, exactly as written there."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("## Adding a probe", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(block, "docs/architecture.md", "exec"), namespace)
    monitor = namespace["monitor"]
    assert [p.name for p in monitor.probes] == ["sharpness", "grad_norm"]
    monitor.route = "double_backward"
    logger = MemoryLogger()
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule()
    trainer = pl.Trainer(**trainer_kwargs(max_steps=50, logger=logger, callbacks=[monitor]))
    trainer.fit(module, make_dataloader())
    assert logger.steps("landscape/grad_norm") == [0, 50]
    assert logger.steps("landscape/grad_norm_cost/seconds") == [0, 50]
    norm = monitor.probe_named("grad_norm").last_result
    # ctx.single_batch: the 256 probe samples as one batch, BatchNorm on their own statistics.
    x, y = make_dataloader().dataset.tensors
    with ll.curvature_context(module, norm_statistics="batch"):
        loss = module.compute_loss((x[:256], y[:256]))
        grads = torch.autograd.grad(loss, [p for p in module.parameters() if p.requires_grad])
    expected = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    assert math.isclose(norm, expected, rel_tol=1e-5)
    assert "gradient norm" in monitor.layout()["landscape: spectrum"]
