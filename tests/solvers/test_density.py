"""Spectral density by stochastic Lanczos quadrature, and its figures."""

from __future__ import annotations

import io
import math

import pytest
import torch
from matplotlib.figure import Figure
from torch import Tensor

from lightning_landscape.operators import HessianOperator, MatrixOperator
from lightning_landscape.report.figures import (
    density_figure,
    eigenvalue_trajectories_figure,
)
from lightning_landscape.solvers import spectral_density
from lightning_landscape.solvers.results import DensityResult
from tests._models import dense_hessian, make_model, random_orthogonal

F64 = torch.float64
N = 200


def _known_spectrum() -> Tensor:
    """200 eigenvalues: 30 negative (min −5, isolated), 170 positive (max 50, isolated)."""
    gen = torch.Generator().manual_seed(3)
    neg = -0.5 - 1.5 * torch.rand(29, generator=gen, dtype=F64)
    pos = 0.1 + 9.9 * torch.rand(169, generator=gen, dtype=F64)
    return torch.cat([torch.tensor([-5.0], dtype=F64), neg, pos, torch.tensor([50.0], dtype=F64)])


def _matrix(lam: Tensor, seed: int = 0) -> Tensor:
    q = random_orthogonal(lam.numel(), seed)
    a = (q * lam) @ q.T
    return 0.5 * (a + a.T)


@pytest.fixture(scope="module")
def known() -> tuple[Tensor, Tensor, DensityResult]:
    lam = _known_spectrum()
    a = _matrix(lam)
    return lam, a, spectral_density(MatrixOperator(a), num_runs=16, lanczos_steps=40, seed=1)


def _trapezoid(x: Tensor, y: Tensor) -> float:
    return float(torch.trapezoid(y, x))


# --------------------------------------------------------------------------------------------------
# Known spectra
# --------------------------------------------------------------------------------------------------


def test_shapes_dtypes_and_weights_sum_to_one(known: tuple[Tensor, Tensor, DensityResult]) -> None:
    _, _, res = known
    assert res.nodes.shape == res.weights.shape == (16, 40)
    assert res.nodes.dtype == res.weights.dtype == F64
    assert res.nodes.device.type == "cpu"
    assert res.num_runs == 16 and res.lanczos_steps == 40 and res.num_steps == (40,) * 16
    assert res.num_hvps == 16 * 40
    assert res.seconds > 0 and res.is_finite
    torch.testing.assert_close(res.weights.sum(dim=1), torch.ones(16, dtype=F64))
    assert bool((res.weights >= 0).all())
    assert bool((res.nodes.diff(dim=1) > 0).all())  # ascending Ritz values, no ghosts


def test_smoothed_density_integrates_to_one(known: tuple[Tensor, Tensor, DensityResult]) -> None:
    _, _, res = known
    x, rho = res.smoothed()
    assert x.shape == rho.shape == (1000,) and x.dtype == rho.dtype == F64
    assert bool((rho >= 0).all())
    assert abs(_trapezoid(x, rho) - 1.0) < 1e-3
    # Default grid covers the nodes ± 5σ; the default σ is range / steps.
    sigma = (res.lambda_max - res.lambda_min) / 40
    assert float(x[0]) == pytest.approx(res.lambda_min - 5 * sigma)
    assert float(x[-1]) == pytest.approx(res.lambda_max + 5 * sigma)
    # A custom sigma and grid.
    grid = torch.linspace(-10.0, 60.0, 4001, dtype=F64)
    x2, rho2 = res.smoothed(grid, sigma=0.2)
    assert torch.equal(x2, grid)
    assert abs(_trapezoid(x2, rho2) - 1.0) < 1e-3
    # Symmetric-log smoothing integrates to 1 in u = asinh(x / a) / ln 10.
    xl, rhol = res.smoothed(log=True, num_points=3000)
    u = torch.asinh(xl / res.log_linear_width) / math.log(10)
    assert abs(_trapezoid(u, rhol) - 1.0) < 1e-3
    assert float(xl[0]) < -5.0 and float(xl[-1]) > 50.0
    assert bool((u.diff() > 0).all()) and torch.allclose(u.diff(), u.diff()[0].expand(2999))


def test_smoothed_density_matches_the_true_histogram(
    known: tuple[Tensor, Tensor, DensityResult],
) -> None:
    lam, _, res = known
    # Mass of [a, b] under the smoothed SLQ density vs the true fraction of eigenvalues there.
    grid = torch.linspace(-8.0, 55.0, 20001, dtype=F64)
    x, rho = res.smoothed(grid, sigma=0.05)
    for lo, hi in [(-2.5, 0.0), (0.0, 5.0), (5.0, 11.0), (40.0, 55.0)]:
        sel = (x >= lo) & (x <= hi)
        mass = _trapezoid(x[sel], rho[sel])
        true = float(((lam >= lo) & (lam <= hi)).double().mean())
        assert mass == pytest.approx(true, abs=0.06), (lo, hi, mass, true)


def test_moments_estimate_trace_and_frobenius(known: tuple[Tensor, Tensor, DensityResult]) -> None:
    lam, a, res = known
    assert res.moment(0) == pytest.approx(1.0, abs=1e-12)
    for p, exact in [(1, float(lam.sum())), (2, float((lam**2).sum())), (3, float((lam**3).sum()))]:
        est, err = res.moment(p) * N, res.moment_stderr(p) * N
        assert err > 0
        assert abs(est - exact) <= 4 * err, (p, est, exact, err)
    # Quadrature is exact for degree < 2m: each run's moment is the Hutchinson quadratic form, so
    # its error is the Hutchinson error; the mean is a plain Monte-Carlo mean: check the scale.
    hutch_sd = math.sqrt(2 * float((a**2).sum() - (a.diagonal() ** 2).sum())) / N
    assert res.moment_stderr(1) < 2 * hutch_sd / math.sqrt(16)


def test_negative_mass_matches_fraction_of_negative_eigenvalues(
    known: tuple[Tensor, Tensor, DensityResult],
) -> None:
    _, _, res = known
    assert res.negative_mass() == pytest.approx(30 / 200, abs=0.05)
    assert res.negative_mass(relative=0.0) == pytest.approx(res.negative_mass(), abs=1e-12)
    # An absolute threshold above the isolated −5 leaves (almost) nothing.
    assert res.negative_mass(threshold=4.0) < 0.03
    assert res.negative_mass(threshold=100.0) == 0.0
    with pytest.raises(ValueError, match="threshold"):
        res.negative_mass(threshold=-1.0)
    with pytest.raises(ValueError, match="relative"):
        res.negative_mass(relative=float("nan"))


def test_extreme_nodes_converge(known: tuple[Tensor, Tensor, DensityResult]) -> None:
    _, _, res = known
    assert res.lambda_max == pytest.approx(50.0, rel=1e-8)
    assert res.lambda_min == pytest.approx(-5.0, rel=1e-6)
    # Every run converges the isolated extremes, and no node lies outside the spectrum.
    torch.testing.assert_close(res.nodes[:, -1], torch.full((16,), 50.0, dtype=F64))
    assert bool((res.nodes >= -5.0 - 1e-9).all() and (res.nodes <= 50.0 + 1e-9).all())


def test_full_krylov_space_gives_exact_eigenvalues_and_projections() -> None:
    # Diagonal A: eigenvectors e_i, so a Rademacher start ±1/√n has squared projections 1/n.
    n = 60
    gen = torch.Generator().manual_seed(5)
    lam = torch.sort(torch.randn(n, generator=gen, dtype=F64) * 3).values
    op = MatrixOperator(torch.diag(lam))
    res = spectral_density(op, num_runs=3, lanczos_steps=100)  # capped at n
    assert res.nodes.shape == (3, n) and res.lanczos_steps == 100
    for r in range(3):
        torch.testing.assert_close(res.nodes[r], lam, rtol=0, atol=1e-10)
        torch.testing.assert_close(res.weights[r], torch.full((n,), 1 / n, dtype=F64))
    # Rotated: nodes are still the exact eigenvalues, and the weights are the squared
    # projections (q_iᵀv)² of the start vector v (the first vector the operator is applied to).
    q = random_orthogonal(n, 9)
    rot = _Recording((q * lam) @ q.T)
    res2 = spectral_density(rot, num_runs=1, lanczos_steps=n, seed=4)
    v = rot.inputs[0][:, 0]
    assert float(v.norm()) == pytest.approx(1.0) and bool(
        (v.abs() * math.sqrt(n) - 1).abs().max() < 1e-12
    )
    torch.testing.assert_close(res2.nodes[0], lam, rtol=0, atol=1e-10)
    torch.testing.assert_close(res2.weights[0], (q.T @ v) ** 2, rtol=1e-6, atol=1e-12)
    assert float(res2.weights[0].std()) > 1e-3  # not uniform


class _Recording(MatrixOperator):
    """A matrix operator that remembers every block it is applied to."""

    def __init__(self, matrix: Tensor) -> None:
        super().__init__(0.5 * (matrix + matrix.T))
        self.inputs: list[Tensor] = []

    def _matmat(self, block: Tensor) -> Tensor:
        self.inputs.append(block.clone())
        return super()._matmat(block)


def _bounds_case(lam: Tensor, steps: int, runs: int = 4) -> tuple[DensityResult, float]:
    """SLQ on a rotated spectrum, and the mean over runs of each start vector's true mass."""
    n = lam.numel()
    q = random_orthogonal(n, 11)
    rot = _Recording((q * lam) @ q.T)
    res = spectral_density(rot, num_runs=runs, lanczos_steps=steps, seed=2)
    m = min(steps, n)
    assert res.num_steps == (m,) * runs  # no breakdown: each run's first input is its start
    cutoff = 1e-5 * float(lam.abs().max())  # negative_mass's default relative cutoff
    starts = [rot.inputs[r * m][:, 0] for r in range(runs)]
    truth = [float(((q.T @ v) ** 2)[lam < -cutoff].sum()) for v in starts]
    return res, sum(truth) / runs


def test_negative_mass_bounds_contain_the_truth_and_flag_an_unresolved_bulk() -> None:
    gen = torch.Generator().manual_seed(7)
    top = 1.0 + 9.0 * torch.rand(30, generator=gen, dtype=F64)
    # A bulk of 270 eigenvalues straddling 0 (|λ| ≤ 1e-3 against λ_max ≈ 10): 8 steps give it one
    # heavy node whose sign decides negative_mass; the bounds show the quadrature cannot tell.
    bulk = -1e-3 + 2e-3 * torch.rand(270, generator=gen, dtype=F64)
    res, truth = _bounds_case(torch.cat([bulk, top]), steps=8)
    low, high = res.negative_mass_bounds()
    assert low - 1e-12 <= res.negative_mass() <= high + 1e-12
    assert low - 1e-12 <= truth <= high + 1e-12
    assert high - low > 0.5
    # A gap around 0: the nodes bracketing the cutoff carry little weight, the bounds are narrow.
    gapped = torch.cat([-1.0 - torch.rand(60, generator=gen, dtype=F64), top.repeat(8)])
    res, truth = _bounds_case(gapped, steps=30)
    low, high = res.negative_mass_bounds()
    assert low - 1e-12 <= truth <= high + 1e-12 and high - low < 0.1
    # The whole space (more steps than n): exact, the bounds meet at the truth.
    res, truth = _bounds_case(torch.cat([bulk[:40], top]), steps=100)
    low, high = res.negative_mass_bounds()
    assert low == high == pytest.approx(truth, abs=1e-9)
    with pytest.raises(ValueError, match="threshold"):
        res.negative_mass_bounds(threshold=-1.0)


def test_negative_mass_bounds_after_a_breakdown_are_exact() -> None:
    lam = torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0], dtype=F64).repeat_interleave(10)
    res = spectral_density(MatrixOperator(torch.diag(lam)), num_runs=2, lanczos_steps=20)
    assert res.num_steps == (5, 5)
    assert res.negative_mass_bounds() == pytest.approx((0.2, 0.2), abs=1e-12)


def test_breakdown_stops_early_with_exact_nodes_and_weights() -> None:
    # Five distinct eigenvalues, each ten times: the Krylov space of any start has dimension 5.
    values = torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0], dtype=F64)
    lam = values.repeat_interleave(10)
    op = MatrixOperator(torch.diag(lam))
    res = spectral_density(op, num_runs=4, lanczos_steps=20, parallel_runs=3)
    assert res.num_steps == (5, 5, 5, 5)
    assert res.num_hvps == 20 == op.num_matvecs
    assert res.nodes.shape == (4, 20)
    torch.testing.assert_close(res.nodes[:, :5], values.expand(4, 5), rtol=0, atol=1e-12)
    assert bool(res.nodes[:, 5:].isnan().all()) and bool((res.weights[:, 5:] == 0).all())
    torch.testing.assert_close(res.weights[:, :5], torch.full((4, 5), 0.2, dtype=F64))
    assert res.is_finite
    assert res.negative_mass() == pytest.approx(0.2, abs=1e-12)
    assert res.moment(1) == pytest.approx(1.0, abs=1e-12)
    assert (res.lambda_min, res.lambda_max) == pytest.approx((-1.0, 3.0), abs=1e-12)
    x, rho = res.smoothed()
    assert abs(_trapezoid(x, rho) - 1.0) < 1e-3
    # A zero operator: one node at 0 (weight 1); the smoothing floor still gives a density.
    zero = spectral_density(MatrixOperator(torch.zeros(7, 7, dtype=F64)), num_runs=2)
    assert zero.num_steps == (1, 1) and zero.lambda_max == 0.0 and zero.negative_mass() == 0.0
    xz, rz = zero.smoothed()
    assert abs(_trapezoid(xz, rz) - 1.0) < 1e-3


def test_parallel_runs_give_the_same_result() -> None:
    a = _matrix(_known_spectrum())
    r1 = spectral_density(MatrixOperator(a), num_runs=5, lanczos_steps=15, seed=2)
    op = MatrixOperator(a)
    r2 = spectral_density(op, num_runs=5, lanczos_steps=15, seed=2, parallel_runs=2)
    torch.testing.assert_close(r1.nodes, r2.nodes, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(r1.weights, r2.weights, rtol=1e-9, atol=1e-12)
    assert r1.num_hvps == r2.num_hvps == op.num_matvecs == 75


def test_float32_operator() -> None:
    lam = _known_spectrum()
    op = MatrixOperator(_matrix(lam).float())
    res = spectral_density(op, num_runs=8, lanczos_steps=30)
    assert res.nodes.dtype == F64 and res.is_finite and res.num_steps == (30,) * 8
    assert res.lambda_max == pytest.approx(50.0, rel=1e-5)
    torch.testing.assert_close(res.weights.sum(dim=1), torch.ones(8, dtype=F64))


# --------------------------------------------------------------------------------------------------
# Determinism, failure modes, arguments
# --------------------------------------------------------------------------------------------------


def test_same_seed_same_result_and_global_rng_untouched() -> None:
    a = _matrix(_known_spectrum())
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    r1 = spectral_density(MatrixOperator(a), num_runs=3, lanczos_steps=10, seed=7)
    r2 = spectral_density(MatrixOperator(a), num_runs=3, lanczos_steps=10, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(r1.nodes, r2.nodes) and torch.equal(r1.weights, r2.weights)
    gen = torch.Generator().manual_seed(7)
    r3 = spectral_density(MatrixOperator(a), num_runs=3, lanczos_steps=10, generator=gen)
    assert torch.equal(r1.nodes, r3.nodes)
    r4 = spectral_density(MatrixOperator(a), num_runs=3, lanczos_steps=10, seed=8)
    assert not torch.equal(r1.nodes, r4.nodes)
    torch.manual_seed(99)
    r5 = spectral_density(MatrixOperator(a), num_runs=3, lanczos_steps=10, seed=7)
    assert torch.equal(r1.nodes, r5.nodes)


def test_nan_operator_is_flagged_not_raised() -> None:
    a = _matrix(_known_spectrum()[:20])
    a[3, 4] = a[4, 3] = float("nan")
    res = spectral_density(MatrixOperator(a), num_runs=4, lanczos_steps=8)
    assert not res.is_finite
    assert res.num_hvps == 1  # stops at the first bad product
    assert bool(res.nodes.isnan().all()) and bool(res.weights.isnan().all())
    for value in (res.moment(1), res.moment_stderr(1), res.negative_mass()):
        assert math.isnan(value)
    assert math.isnan(res.lambda_max) and math.isnan(res.lambda_min)
    with pytest.raises(ValueError, match="non-finite"):
        res.smoothed()
    with pytest.raises(ValueError, match="non-finite"):
        density_figure(res, step=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_runs": 0}, "num_runs"),
        ({"num_runs": 2.0}, "num_runs"),
        ({"num_runs": True}, "num_runs"),
        ({"lanczos_steps": 0}, "lanczos_steps"),
        ({"lanczos_steps": -3}, "lanczos_steps"),
        ({"parallel_runs": 0}, "parallel_runs"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    op = MatrixOperator(torch.eye(4, dtype=F64))
    with pytest.raises(ValueError, match=match):
        spectral_density(op, **kwargs)  # type: ignore[arg-type]
    assert op.num_matvecs == 0


def test_bad_result_method_arguments(known: tuple[Tensor, Tensor, DensityResult]) -> None:
    _, _, res = known
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="p must"):
            res.moment(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma"):
        res.smoothed(sigma=0.0)
    with pytest.raises(ValueError, match="num_points"):
        res.smoothed(num_points=1)
    with pytest.raises(ValueError, match="grid"):
        res.smoothed(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="linear_width"):
        res.smoothed(log=True, linear_width=0.0)


# --------------------------------------------------------------------------------------------------
# A real loss Hessian
# --------------------------------------------------------------------------------------------------


def test_hessian_operator_matches_dense_reference() -> None:
    model, loss_fn, batch = make_model("mlp")
    dense = dense_hessian(model, loss_fn, batch)
    n = dense.shape[0]
    evals = torch.linalg.eigvalsh(dense)
    op = HessianOperator(model, loss_fn, [batch])
    res = spectral_density(op, num_runs=6, lanczos_steps=40, parallel_runs=3)
    assert res.is_finite and res.num_hvps == 6 * 40
    torch.testing.assert_close(res.weights.sum(dim=1), torch.ones(6, dtype=F64))
    trace, err = res.moment(1) * n, res.moment_stderr(1) * n
    assert abs(trace - float(dense.trace())) <= 4 * err + 1e-9 * abs(trace), (trace, err)
    fro, fro_err = res.moment(2) * n, res.moment_stderr(2) * n
    assert abs(fro - float((dense**2).sum())) <= 4 * fro_err + 1e-9 * fro
    assert res.lambda_max == pytest.approx(float(evals[-1]), rel=1e-6)
    assert res.lambda_min == pytest.approx(float(evals[0]), rel=1e-3)
    assert res.lambda_max <= float(evals[-1]) + 1e-9 and res.lambda_min >= float(evals[0]) - 1e-9


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_density_figure(known: tuple[Tensor, Tensor, DensityResult]) -> None:
    _, _, res = known
    fig = density_figure(res, step=42)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    lin, sym = fig.axes
    for ax in (lin, sym):
        assert len(ax.lines) == 2  # density + node rug
        assert ax.get_yscale() == "log"
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(f"mass {res.negative_mass():.3g}" in t for t in texts), texts
        rug = ax.lines[1]
        assert len(rug.get_xdata()) == res.nodes.numel()
    assert sym.get_xscale() == "asinh" and lin.get_xscale() == "linear"
    assert "step 42" in lin.get_title()
    assert _png(fig).startswith(b"\x89PNG")
    assert density_figure(res, step=0, log_scale=False).axes[0].get_yscale() == "linear"


def test_density_figure_with_padded_nodes() -> None:
    op = MatrixOperator(torch.diag(torch.tensor([-1.0, 2.0, 2.0, 5.0], dtype=F64)))
    res = spectral_density(op, num_runs=2, lanczos_steps=4)
    assert res.num_steps == (3, 3)
    fig = density_figure(res, step=1)
    assert len(fig.axes[0].lines[1].get_xdata()) == 6  # NaN padding is not drawn
    assert _png(fig).startswith(b"\x89PNG")


def test_eigenvalue_trajectories_figure() -> None:
    steps = [0, 10, 20, 30]
    eigs = [(5.0, 3.0, 1.0), (6.0, 3.5, 1.2), (8.0, 4.0), (9.5, 4.2, 1.5)]
    fig = eigenvalue_trajectories_figure(
        steps, eigs, [None, 10.0, 10.0, 10.0], [-0.1, None, -0.3, -0.2]
    )
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert len(ax.lines) == 3 + 1 + 1
    top = ax.lines[0]
    assert list(top.get_ydata()) == [5.0, 6.0, 8.0, 9.5]
    third = ax.lines[2].get_ydata()
    assert math.isnan(third[2]) and third[3] == 1.5
    threshold = ax.lines[-1]
    assert threshold.get_linestyle() == "--"
    assert math.isnan(threshold.get_ydata()[0]) and threshold.get_ydata()[1] == 10.0
    assert _png(fig).startswith(b"\x89PNG")
    # Without λ_min or thresholds only the eigenvalue lines are drawn; empty input still renders.
    fig2 = eigenvalue_trajectories_figure(steps, eigs, [None] * 4, [None] * 4)
    assert len(fig2.axes[0].lines) == 3
    assert _png(eigenvalue_trajectories_figure([], [], [], [])).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="one entry per probe"):
        eigenvalue_trajectories_figure(steps, eigs[:2], [None] * 4, [None] * 4)
