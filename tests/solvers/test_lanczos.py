"""Thick-restart block Lanczos on explicit matrices of known spectrum, ``Q diag(λ) Qᵀ``."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_landscape import EigenResult, MatrixOperator, lanczos, lanczos_ends
from lightning_landscape.operators import CurvatureOperator
from tests._models import random_orthogonal

F64 = torch.float64
N = 300


def _matrix(eigs: Tensor, seed: int = 0) -> Tensor:
    q = random_orthogonal(len(eigs), seed)
    a = (q * eigs) @ q.T
    return 0.5 * (a + a.T)


def _uniform(n: int, low: float, high: float, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, generator=gen, dtype=F64)


def _spectrum(name: str, n: int = N) -> Tensor:
    """Eigenvalues (unsorted order does not matter: Q is random)."""
    if name == "separated":
        top = torch.tensor([100.0, 80.0, 65.0, 50.0, 40.0, 30.0], dtype=F64)
        bottom = torch.tensor([0.05, 0.1, 0.2, 0.35, 0.5, 0.7], dtype=F64)
        bulk = _uniform(n - 12, 1.0, 10.0, seed=1)
    elif name == "clustered":  # spacing 1e-6 at both ends
        top = 10.0 - 1e-6 * torch.arange(6, dtype=F64)
        bottom = 0.5 + 1e-6 * torch.arange(6, dtype=F64)
        bulk = _uniform(n - 12, 1.0, 5.0, seed=2)
    elif name == "indefinite":  # the most negative eigenvalue dominates in magnitude
        top = torch.tensor([30.0, 25.0, 20.0, 17.0, 15.0, 13.0], dtype=F64)
        bottom = torch.tensor([-50.0, -20.0, -12.0, -9.0, -8.0, -7.0], dtype=F64)
        bulk = _uniform(n - 12, -5.0, 10.0, seed=3)
    else:  # pragma: no cover
        raise ValueError(name)
    return torch.cat([top, bottom, bulk])


def _reference(eigs: Tensor, k: int, which: str) -> Tensor:
    return torch.sort(eigs, descending=which == "largest").values[:k]


def _true_residuals(a: Tensor, res: EigenResult) -> Tensor:
    v = res.eigenvectors
    assert v is not None
    lam = res.eigenvalues.to(v.dtype)
    # Relative to the spectral scale ‖A‖ (the solver estimates it by its largest Ritz magnitude).
    return (a @ v - v * lam).norm(dim=0) / torch.linalg.eigvalsh(a).abs().max()


def _check_solution(
    a: Tensor, res: EigenResult, ref: Tensor, tol: float, *, eigs: Tensor | None = None
) -> None:
    """Check a converged solve against the reference eigenvalues ``ref``.

    With ``eigs`` given (near-degenerate clusters), each returned value need only be within 1e-8
    of *some* true eigenvalue no further from the wanted end than the k-th one: which members
    of a 1e-6-spaced cluster single-vector Lanczos resolves first is tested separately.
    """
    k = len(ref)
    assert res.eigenvalues.shape == (k,)
    assert res.eigenvalues.dtype == F64
    # 1e-8 relative, or 1 % of the guarantee tol · ‖A‖ (Weyl) for eigenvalues far below ‖A‖.
    scale = 0.01 * tol * float(torch.linalg.eigvalsh(a).abs().max())
    if eigs is None:
        torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-8, atol=scale)
    else:
        nearest = eigs[(eigs[None, :] - res.eigenvalues[:, None]).abs().argmin(dim=1)]
        torch.testing.assert_close(res.eigenvalues, nearest, rtol=1e-8, atol=scale)
        assert len(set(nearest.tolist())) == k  # k different eigenvalues
        assert bool(((res.eigenvalues - ref[-1]).abs() <= (ref[0] - ref[-1]).abs() + 1e-8).all())
    order = res.eigenvalues.argsort(descending=res.which == "largest")
    assert torch.equal(order, torch.arange(k))
    assert res.all_converged
    assert bool((res.residuals <= tol).all())
    assert torch.equal(res.converged, res.residuals <= tol)
    assert res.eigenvectors is not None and res.eigenvectors.shape == (a.shape[0], k)
    # The reported residuals are the true ones up to what the reorthogonalisations left out of
    # the projected matrix: at most about the trigger (the tolerance, see the solver's docstring).
    true = _true_residuals(a, res)
    assert bool(((true - res.residuals).abs() <= tol).all()), (true, res.residuals)
    gram = res.eigenvectors.T @ res.eigenvectors
    # Semi-orthogonal basis (inner products below the trigger): Ritz vectors orthonormal to ~j·τ.
    semi = 20 * max(torch.finfo(F64).eps ** 0.75, tol)
    torch.testing.assert_close(gram, torch.eye(k, dtype=F64), rtol=0, atol=semi)


# --------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("spectrum", ["separated", "clustered", "indefinite"])
def test_accuracy_on_known_spectra(spectrum: str, which: str, k: int) -> None:
    eigs = _spectrum(spectrum)
    a = _matrix(eigs)
    op = MatrixOperator(a)
    tol = 1e-8
    res = lanczos(op, k, which=which, tol=tol)
    cluster = eigs if spectrum == "clustered" else None
    _check_solution(a, res, _reference(eigs, k, which), tol, eigs=cluster)
    assert res.which == which
    assert res.tol == tol
    assert res.num_hvps == op.num_matvecs  # the cost is reported honestly
    assert res.num_hvps < N  # the Krylov path, not a dense solve
    assert res.seconds >= 0


def test_indefinite_ordering_is_algebraic_not_magnitude() -> None:
    eigs = _spectrum("indefinite")
    a = _matrix(eigs)
    top = lanczos(MatrixOperator(a), 3, which="largest", tol=1e-10)
    bottom = lanczos(MatrixOperator(a), 3, which="smallest", tol=1e-10)
    # |-50| is the largest magnitude, but "largest" means algebraically largest, descending.
    torch.testing.assert_close(top.eigenvalues, torch.tensor([30.0, 25.0, 20.0], dtype=F64))
    # "smallest": the most negative first, ascending.
    torch.testing.assert_close(bottom.eigenvalues, torch.tensor([-50.0, -20.0, -12.0], dtype=F64))


@pytest.mark.parametrize("k", [3, 6])
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_clusters_fully_resolved_with_a_block_as_large_as_the_cluster(which: str, k: int) -> None:
    eigs = _spectrum("clustered")
    a = _matrix(eigs)
    for seed in range(3):
        res = lanczos(
            MatrixOperator(a), k, which=which, tol=1e-8, block_size=6, max_basis=60, seed=seed
        )
        # Every member (spacing 1e-6) in order: the error is far below the spacing.
        _check_solution(a, res, _reference(eigs, k, which), 1e-8)


@pytest.mark.xfail(
    strict=True,
    reason="Known limitation (documented in lanczos): single-vector Lanczos can stop before "
    "a member of a tight cluster enters the Krylov space; block_size >= cluster size fixes it",
)
def test_single_vector_lanczos_does_not_skip_cluster_members() -> None:
    eigs = _spectrum("clustered")
    a = _matrix(eigs)
    wrong = []
    for k in (3, 5):
        expected = _reference(eigs, k, "largest")
        for seed in range(4):
            res = lanczos(MatrixOperator(a), k, tol=1e-8, seed=seed)
            assert res.all_converged
            if not torch.allclose(res.eigenvalues, expected, rtol=1e-8, atol=0):
                wrong.append((k, seed, ((res.eigenvalues - expected) / 1e-6).tolist()))
    assert not wrong, f"(k, seed, error in units of the 1e-6 spacing): {wrong}"


# --------------------------------------------------------------------------------------------------
# Degenerate eigenvalues
# --------------------------------------------------------------------------------------------------


def _degenerate(n: int = N) -> Tensor:
    return torch.cat(
        [torch.tensor([20.0, 20.0, 20.0, 15.0], dtype=F64), _uniform(n - 4, 0.0, 10.0, seed=4)]
    )


@pytest.mark.parametrize("k", [3, 4])
def test_triple_eigenvalue_found_with_block_size_3(k: int) -> None:
    eigs = _degenerate()
    a = _matrix(eigs, seed=5)
    res = lanczos(MatrixOperator(a), k, tol=1e-10, block_size=3, max_basis=40)
    _check_solution(a, res, _reference(eigs, k, "largest"), 1e-10)
    # The three vectors span the whole 3-dim eigenspace of 20.
    q = random_orthogonal(N, 5)
    idx = torch.nonzero(eigs == 20.0).squeeze(1)
    proj = q[:, idx] @ q[:, idx].T
    v = res.eigenvectors[:, :3]  # type: ignore[index]
    torch.testing.assert_close(proj @ v, v, rtol=0, atol=1e-8)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_dense_path_is_exact_with_repeated_eigenvalues(which: str) -> None:
    eigs = torch.tensor([5.0, 5.0, 5.0, 1.0, -2.0, 0.5], dtype=F64)
    a = _matrix(eigs, seed=6)
    op = MatrixOperator(a)
    res = lanczos(op, 3, which=which, tol=1e-12)  # default max_basis = min(n, 20) = n
    expected = [5.0, 5.0, 5.0] if which == "largest" else [-2.0, 0.5, 1.0]
    torch.testing.assert_close(
        res.eigenvalues, torch.tensor(expected, dtype=F64), rtol=1e-13, atol=0
    )
    assert res.num_hvps == 6 == op.num_matvecs
    assert res.num_restarts == 0
    assert res.all_converged
    v = res.eigenvectors
    assert v is not None
    torch.testing.assert_close(v.T @ v, torch.eye(3, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(a @ v, v * res.eigenvalues, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Restarts, warm starts, budgets
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("spectrum", ["separated", "clustered", "indefinite"])
def test_small_basis_forces_restarts_and_still_converges(spectrum: str, which: str) -> None:
    eigs = _spectrum(spectrum)
    a = _matrix(eigs)
    op = MatrixOperator(a)
    res = lanczos(op, 3, which=which, tol=1e-8, max_basis=10, max_hvps=2000)
    assert res.num_restarts > 0
    assert res.num_hvps == op.num_matvecs
    cluster = eigs if spectrum == "clustered" else None
    _check_solution(a, res, _reference(eigs, 3, which), 1e-8, eigs=cluster)


def _warm_problem() -> tuple[Tensor, Tensor]:
    """A matrix with moderately separated top eigenvalues and a slightly perturbed copy."""
    eigs = torch.cat([10.0 - 0.2 * torch.arange(6, dtype=F64), _uniform(N - 6, 0.0, 8.5, seed=7)])
    a = _matrix(eigs, seed=8)
    gen = torch.Generator().manual_seed(9)
    e = torch.randn(N, N, generator=gen, dtype=F64)
    e = (e + e.T) / (2 * N**0.5)
    return a, a + 1e-3 * e


@pytest.mark.parametrize("k", [1, 5])
def test_warm_start_needs_fewer_products(k: int) -> None:
    a, perturbed = _warm_problem()
    previous = lanczos(MatrixOperator(a), k, tol=1e-8)
    assert previous.eigenvectors is not None
    start = previous.eigenvectors[:, 0] if k == 1 else previous.eigenvectors
    for seed in range(3):
        cold = lanczos(MatrixOperator(perturbed), k, tol=1e-8, seed=seed)
        warm = lanczos(MatrixOperator(perturbed), k, tol=1e-8, seed=seed, start=start)
        assert warm.all_converged and cold.all_converged
        assert warm.num_hvps < cold.num_hvps, (seed, warm.num_hvps, cold.num_hvps)
        torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-9, atol=0)


def test_non_convergence_is_reported() -> None:
    eigs = _spectrum("clustered")
    a = _matrix(eigs)
    op = MatrixOperator(a)
    res = lanczos(op, 3, tol=1e-8, max_hvps=10)
    assert res.num_hvps <= 10
    assert op.num_matvecs == res.num_hvps
    assert res.eigenvalues.shape == (3,)
    assert not res.all_converged
    assert not bool(res.converged.all())
    assert torch.equal(res.converged, res.residuals <= 1e-8)
    # The reported residuals are real: the Ritz vectors are not eigenvectors yet.
    true = _true_residuals(a, res)
    torch.testing.assert_close(true, res.residuals, rtol=1e-3, atol=1e-12)
    assert res.is_finite


def test_budget_too_small_for_k_pairs_is_rejected() -> None:
    a = torch.diag(torch.arange(1.0, 101.0, dtype=F64))
    top = torch.zeros(100, dtype=F64)
    top[-1] = 1.0
    with pytest.raises(ValueError, match="max_hvps >= 3"):
        lanczos(MatrixOperator(a), 3, tol=1e-8, max_hvps=1, start=top, start_noise=0.0)
    with pytest.raises(ValueError, match="max_hvps >= 6"):
        lanczos(MatrixOperator(a), 3, block_size=4, max_basis=20, max_hvps=5)
    res = lanczos(MatrixOperator(a), 3, tol=1e-8, max_hvps=3, start=top, start_noise=0.0)
    assert len(res.eigenvalues) == 3


@pytest.mark.parametrize("n", [6, 50], ids=["dense_path", "krylov_path"])
def test_non_finite_operator_is_reported_not_raised(n: int) -> None:
    a = _matrix(torch.arange(1.0, n + 1.0, dtype=F64), seed=11)
    a[0, 1] = a[1, 0] = float("nan")
    res = lanczos(MatrixOperator(a), 2, tol=1e-8)
    assert res.eigenvalues.shape == (2,)
    assert not res.is_finite
    assert not res.all_converged
    assert not bool(res.converged.any())


# --------------------------------------------------------------------------------------------------
# Determinism and RNG hygiene
# --------------------------------------------------------------------------------------------------


def test_same_seed_same_result_and_global_rng_untouched() -> None:
    a = _matrix(_spectrum("separated"))
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    r1 = lanczos(MatrixOperator(a), 3, tol=1e-8, seed=7)
    r2 = lanczos(MatrixOperator(a), 3, tol=1e-8, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues)
    assert torch.equal(r1.eigenvectors, r2.eigenvectors)  # type: ignore[arg-type]
    assert torch.equal(r1.residuals, r2.residuals)
    assert r1.num_hvps == r2.num_hvps
    # An explicit generator seeded the same way is equivalent to `seed=`.
    r3 = lanczos(MatrixOperator(a), 3, tol=1e-8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(r1.eigenvectors, r3.eigenvectors)  # type: ignore[arg-type]
    # ... and the seed is actually used.
    r4 = lanczos(MatrixOperator(a), 3, tol=1e-8, seed=8)
    assert not torch.equal(r1.eigenvectors, r4.eigenvectors)  # type: ignore[arg-type]
    torch.testing.assert_close(r4.eigenvalues, r1.eigenvalues, rtol=1e-8, atol=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_global_seed_does_not_influence_result() -> None:
    a = _matrix(_spectrum("indefinite"))
    torch.manual_seed(0)
    r1 = lanczos(MatrixOperator(a), 2, tol=1e-8)
    torch.manual_seed(99)
    r2 = lanczos(MatrixOperator(a), 2, tol=1e-8)
    assert torch.equal(r1.eigenvectors, r2.eigenvectors)  # type: ignore[arg-type]


def test_return_eigenvectors_false() -> None:
    a = _matrix(_spectrum("separated"))
    res = lanczos(MatrixOperator(a), 2, tol=1e-8, return_eigenvectors=False)
    assert res.eigenvectors is None
    torch.testing.assert_close(res.eigenvalues, torch.tensor([100.0, 80.0], dtype=F64))


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

_A = _matrix(_spectrum("separated", n=50), seed=10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "positive integer"),
        ({"k": -2}, "positive integer"),
        ({"k": 2.0}, "positive integer"),
        ({"k": True}, "positive integer"),
        ({"k": 51}, "k <= 50"),
        ({"tol": 0.0}, "tol"),
        ({"tol": -1e-3}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"which": "LM"}, "which"),
        ({"which": "LA"}, "which"),
        ({"k": 5, "max_basis": 5}, "max_basis"),
        ({"k": 1, "max_basis": 0}, "max_basis"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": -1}, "block_size"),
        ({"block_size": 1.5}, "block_size"),
        ({"max_hvps": 0}, "max_hvps"),
        ({"max_basis_bytes": 0}, "max_basis_bytes"),
        ({"k": 3, "max_basis_bytes": 4 * 50 * 8}, r"too few for k=3.*>= 2000"),
        ({"start": torch.ones(49, dtype=F64)}, "rows"),
        ({"start": torch.ones(49, 2, dtype=F64)}, "rows"),
        ({"start": torch.ones(50, 2, 1, dtype=F64)}, "rows"),
    ],
)
def test_validation_errors(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    args = {"k": 1, **kwargs}
    k = args.pop("k")
    with pytest.raises(ValueError, match=match):
        lanczos(MatrixOperator(_A), k, **args)


def test_max_basis_bytes_is_max_basis_in_bytes() -> None:
    """A byte bound is the vector bound it fits: the same solve, product for product."""
    a = _matrix(_spectrum("separated", n=300), seed=11)
    vector = 300 * 8
    for k, vectors in ((1, 8), (3, 10)):
        by_count = lanczos(MatrixOperator(a), k, tol=1e-10, max_basis=vectors - 1)
        by_bytes = lanczos(MatrixOperator(a), k, tol=1e-10, max_basis_bytes=vectors * vector + 7)
        assert by_bytes.num_hvps == by_count.num_hvps
        assert by_bytes.num_restarts == by_count.num_restarts > 0
        torch.testing.assert_close(by_bytes.eigenvalues, by_count.eigenvalues, rtol=0, atol=0)
        assert by_bytes.all_converged
    # A byte bound above the default changes nothing.
    default = lanczos(MatrixOperator(a), 2, tol=1e-10)
    roomy = lanczos(MatrixOperator(a), 2, tol=1e-10, max_basis_bytes=10**9)
    assert roomy.num_hvps == default.num_hvps


def test_bad_start_rejected_on_dense_path_too() -> None:
    small = _matrix(torch.arange(1.0, 7.0, dtype=F64))
    with pytest.raises(ValueError, match="rows"):
        lanczos(MatrixOperator(small), 1, start=torch.ones(5, dtype=F64))


# --------------------------------------------------------------------------------------------------
# float32
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_float32_operator(which: str) -> None:
    eigs = _spectrum("indefinite")
    a = _matrix(eigs).float()
    res = lanczos(MatrixOperator(a), 3, which=which, tol=1e-4)
    assert res.all_converged
    assert res.eigenvectors is not None and res.eigenvectors.dtype == torch.float32
    assert res.eigenvalues.dtype == F64
    torch.testing.assert_close(res.eigenvalues, _reference(eigs, 3, which), rtol=1e-4, atol=0)
    v = res.eigenvectors.double()
    true = (a.double() @ v - v * res.eigenvalues).norm(dim=0) / res.eigenvalues.abs()
    assert bool((true <= 1e-3).all())


class _NoisyOperator(MatrixOperator):
    """A float32 matrix whose products carry a relative error of ``noise`` (not symmetric), like
    a float32 Hessian-vector product through a deep network (measured ~1e-5)."""

    def __init__(self, matrix: Tensor, noise: float, seed: int = 0) -> None:
        super().__init__(matrix)
        self.noise = noise
        self.gen = torch.Generator().manual_seed(seed)

    def _matmat(self, block: Tensor) -> Tensor:
        out = super()._matmat(block)
        jitter = torch.randn(out.shape, generator=self.gen, dtype=out.dtype)
        return out + self.noise * out.norm(dim=0) / out.shape[0] ** 0.5 * jitter


@pytest.mark.parametrize("k", [1, 5])
def test_products_asymmetric_at_1e5_still_give_honest_residuals(k: int) -> None:
    """The reorthogonalisation trigger sits above such noise; the residuals stay honest."""
    top = 1.0 - 0.02 * torch.arange(6, dtype=F64)  # gaps of 2 %: restarts needed
    eigs = torch.cat([top, _uniform(1994, -0.1, 0.85, seed=4)])
    a = _matrix(eigs, seed=3).float()
    res = lanczos(_NoisyOperator(a, 1e-5), k, tol=1e-4, max_basis=2 * k + 8)
    assert res.all_converged and res.num_restarts > 0
    assert res.eigenvectors is not None
    v = res.eigenvectors.double()
    true = (a.double() @ v - v * res.eigenvalues).norm(dim=0) / float(eigs.abs().max())
    assert bool((true <= 2e-4).all()), true  # tol plus the products' own error
    torch.testing.assert_close(res.eigenvalues, _reference(eigs, k, "largest"), rtol=1e-4, atol=0)


# --------------------------------------------------------------------------------------------------
# criterion="eigenvalue": stop on the estimated eigenvalue error ‖r‖² / gap
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tol", [1e-4, 1e-6])
@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("spectrum", ["separated", "clustered", "indefinite"])
def test_eigenvalue_criterion_meets_tol_with_no_more_products(
    spectrum: str, which: str, tol: float
) -> None:
    eigs = _spectrum(spectrum)
    a = _matrix(eigs)
    k = 1 if spectrum == "clustered" else 3
    ref = _reference(eigs, k, which)
    by_res = lanczos(MatrixOperator(a), k, which=which, tol=tol)
    by_eig = lanczos(MatrixOperator(a), k, which=which, tol=tol, criterion="eigenvalue")
    assert by_eig.all_converged and by_eig.criterion == "eigenvalue"
    assert by_res.criterion == "residual"
    if spectrum == "clustered":  # 1e-6 spacing: which member comes first is not the point here
        ref = eigs[(eigs[None, :] - by_eig.eigenvalues[:, None]).abs().argmin(dim=1)]
    err = (by_eig.eigenvalues - ref).abs()
    anorm = eigs.abs().max()  # the guarantee is relative to the spectral scale ‖A‖
    assert bool((err <= tol * anorm).all()), (err / anorm).tolist()
    assert by_eig.num_hvps <= by_res.num_hvps
    assert by_eig.error_bounds is not None and bool((by_eig.error_bounds <= tol).all())
    # residuals stay the true relative residuals, now only up to √tol
    torch.testing.assert_close(_true_residuals(a, by_eig), by_eig.residuals, rtol=0.1, atol=1e-12)
    assert bool((by_eig.residuals <= tol**0.5).all())


def test_eigenvalue_criterion_needs_fewer_products_when_separated() -> None:
    a = _matrix(_spectrum("separated"))
    for k, tol in [(1, 1e-4), (3, 1e-6)]:
        by_res = lanczos(MatrixOperator(a), k, tol=tol)
        by_eig = lanczos(MatrixOperator(a), k, tol=tol, criterion="eigenvalue")
        assert by_eig.num_hvps < by_res.num_hvps, (k, by_eig.num_hvps, by_res.num_hvps)
        assert not bool((by_eig.residuals <= tol).all())  # it really stopped on the bound


def _pair_on_top(delta: float, low: float, high: float) -> tuple[Tensor, Tensor]:
    """λ₁ = 1, λ₂ = 1 − delta, the rest uniform in [low, high]; (matrix, eigenvectors)."""
    eigs = torch.cat([torch.tensor([1.0, 1.0 - delta], dtype=F64), _uniform(N - 2, low, high, 4)])
    q = random_orthogonal(N, 5)
    return 0.5 * ((q * eigs) @ q.T + ((q * eigs) @ q.T).T), q


@pytest.mark.parametrize(("low", "high"), [(-3.0, -1.0), (-1.0, 0.5), (0.0, 0.5)])
@pytest.mark.parametrize("warm", [False, True])
def test_eigenvalue_criterion_safeguards_against_a_bad_gap_estimate(
    monkeypatch: pytest.MonkeyPatch, low: float, high: float, warm: bool
) -> None:
    """A near-degenerate top pair (spacing 1e-2 = 100·tol): the Ritz gap to the bulk is far too
    large until the pair splits, so a plain r² / (θ₁ − θ₂) stop is wrong; ours is not."""
    import importlib

    mod = importlib.import_module("lightning_landscape.solvers.lanczos")
    a, q = _pair_on_top(1e-2, low, high)
    start = q[:, 0] + q[:, 1] if warm else None  # an even mix of the pair: hardest to split
    tol = 1e-4
    ours = lanczos(MatrixOperator(a), 1, tol=tol, criterion="eigenvalue", start=start)
    assert ours.all_converged
    # The error is bounded relative to the spectral scale ‖A‖: within tol·‖A‖ once the pair's
    # spacing is at least √tol·‖A‖, within √tol·‖A‖ always (the documented limit in between).
    anorm = max(abs(low), 1.0)
    bound = tol if 1e-2 / anorm >= tol**0.5 else tol**0.5
    assert abs(float(ours.eigenvalues[0]) - 1.0) <= bound * anorm

    def naive_bounds(theta: Tensor, raw: Tensor, cols: Tensor, scale: Tensor) -> Tensor:
        dist = (theta[cols, None] - theta[None, :]).abs()
        dist[torch.arange(len(cols)), cols] = float("inf")
        return raw[cols] ** 2 / dist.min(dim=1).values / scale

    def naive_converged(resid: Tensor, bounds: Tensor, tol: float, *_: object) -> Tensor:
        return bounds <= tol

    monkeypatch.setattr(mod, "_error_bounds", naive_bounds)
    monkeypatch.setattr(mod, "_converged", naive_converged)
    # and without the near-zero guard, which here would hide the gap rule's early stop
    monkeypatch.setattr(mod, "_separated", lambda theta, *_: torch.ones_like(theta, dtype=bool))
    naive = lanczos(MatrixOperator(a), 1, tol=tol, criterion="eigenvalue", start=start)
    assert abs(float(naive.eigenvalues[0]) - 1.0) > 10 * tol  # the unsafe rule stops wrongly


@pytest.mark.parametrize("delta", [3e-3, 1e-3])
def test_eigenvalue_criterion_limit_is_sqrt_tol(delta: float) -> None:
    """Documented limit: an unresolved neighbour between tol and √tol away can cost accuracy,
    but never beyond √tol (the safeguard); the residual criterion stays within tol."""
    a, _ = _pair_on_top(delta, -1.0, 0.5)
    tol = 1e-4
    ours = lanczos(MatrixOperator(a), 1, tol=tol, criterion="eigenvalue")
    assert abs(float(ours.eigenvalues[0]) - 1.0) <= tol**0.5
    by_res = lanczos(MatrixOperator(a), 1, tol=tol)
    assert abs(float(by_res.eigenvalues[0]) - 1.0) <= tol


def test_eigenvalue_criterion_dense_path_and_validation() -> None:
    a = torch.diag(torch.arange(1.0, 11.0, dtype=F64))
    res = lanczos(MatrixOperator(a), 2, tol=1e-6, criterion="eigenvalue")
    assert res.eigenvalues.tolist() == [10.0, 9.0] and res.all_converged
    assert res.error_bounds is not None and res.error_bounds.shape == (2,)
    with pytest.raises(ValueError, match="criterion"):
        lanczos(MatrixOperator(_A), 1, criterion="eigen")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Both ends from one Krylov space
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ends", [(1, 1), (5, 1), (3, 2)])
@pytest.mark.parametrize("spectrum", ["separated", "clustered", "indefinite"])
def test_both_ends_match_the_separate_solves(spectrum: str, ends: tuple[int, int]) -> None:
    eigs = _spectrum(spectrum)
    a = _matrix(eigs)
    op = MatrixOperator(a)
    tol = 1e-8
    top, bottom = lanczos_ends(op, *ends, tol=tol)
    cluster = eigs if spectrum == "clustered" else None
    _check_solution(a, top, _reference(eigs, ends[0], "largest"), tol, eigs=cluster)
    _check_solution(a, bottom, _reference(eigs, ends[1], "smallest"), tol, eigs=cluster)
    assert (top.which, bottom.which) == ("largest", "smallest")
    # One solve: its cost is counted once, in the first result.
    assert top.num_hvps == op.num_matvecs < N and bottom.num_hvps == 0 and bottom.seconds == 0
    both = torch.cat([top.eigenvectors, bottom.eigenvectors], dim=1)  # type: ignore[list-item]
    gram = both.T @ both
    torch.testing.assert_close(gram, torch.eye(sum(ends), dtype=F64), rtol=0, atol=1e-6)
    separate = MatrixOperator(a)
    lanczos(separate, ends[0], tol=tol)
    lanczos(separate, ends[1], which="smallest", tol=tol)
    assert op.num_matvecs < separate.num_matvecs  # both ends at once cost less than two solves


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize(("spectrum", "ends"), [("indefinite", (5, 1)), ("clustered", (3, 2))])
def test_reported_residuals_are_true_to_the_tolerance(
    spectrum: str, ends: tuple[int, int], seed: int
) -> None:
    """Over start vectors, with many reorthogonalisations and restarts: the reported residuals
    are off the true ones by less than the tolerance (the reorthogonalisation trigger)."""
    a = _matrix(_spectrum(spectrum))
    tol = 1e-8
    for res in lanczos_ends(MatrixOperator(a), *ends, tol=tol, seed=seed):
        true = _true_residuals(a, res)  # converged or stopped by the budget alike
        assert bool(((true - res.residuals).abs() <= tol).all())


def test_both_ends_through_restarts_and_on_the_dense_path() -> None:
    eigs = _spectrum("indefinite")
    a = _matrix(eigs)
    op = MatrixOperator(a)
    top, bottom = lanczos_ends(op, 3, 2, tol=1e-8, max_basis=10, max_hvps=3000)
    assert top.num_restarts > 0
    _check_solution(a, top, _reference(eigs, 3, "largest"), 1e-8)
    _check_solution(a, bottom, _reference(eigs, 2, "smallest"), 1e-8)
    small = _matrix(torch.arange(-3.0, 7.0, dtype=F64), seed=5)  # 10 × 10: materialised
    top, bottom = lanczos_ends(MatrixOperator(small), 2, 2, tol=1e-10)
    torch.testing.assert_close(top.eigenvalues, torch.tensor([6.0, 5.0], dtype=F64))
    torch.testing.assert_close(bottom.eigenvalues, torch.tensor([-3.0, -2.0], dtype=F64))
    assert top.num_hvps == 10 and bottom.num_hvps == 0


def test_both_ends_warm_start_and_validation() -> None:
    a, perturbed = _warm_problem()
    top, bottom = lanczos_ends(MatrixOperator(a), 2, 1, tol=1e-8)
    start = torch.cat([top.eigenvectors, bottom.eigenvectors], dim=1)  # type: ignore[list-item]
    cold_op, warm_op = MatrixOperator(perturbed), MatrixOperator(perturbed)
    cold = lanczos_ends(cold_op, 2, 1, tol=1e-8)
    warm = lanczos_ends(warm_op, 2, 1, tol=1e-8, start=start)
    assert warm_op.num_matvecs < cold_op.num_matvecs
    for w, c in zip(warm, cold, strict=True):
        assert w.all_converged and c.all_converged
        torch.testing.assert_close(w.eigenvalues, c.eigenvalues, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="k_smallest must be a positive integer"):
        lanczos_ends(MatrixOperator(a), 1, 0)
    with pytest.raises(ValueError, match="at least k \\+ 1 = 4"):
        lanczos_ends(MatrixOperator(a), 2, 1, max_basis=3)
    nan = a.clone()
    nan[0, 1] = nan[1, 0] = float("nan")
    top, bottom = lanczos_ends(MatrixOperator(nan), 2, 1)
    assert not top.is_finite and not bottom.is_finite and bottom.eigenvalues.shape == (1,)


class _Diagonal(CurvatureOperator):
    """``diag(d)`` without a dense matrix: a large dimension, as a network's Hessian has."""

    def __init__(self, d: Tensor) -> None:
        super().__init__(d.numel(), d.dtype, d.device)
        self.d = d

    def _matmat(self, block: Tensor) -> Tensor:
        return self.d[:, None] * block


def _bulk_and_outliers(n: int = 100_000) -> Tensor:
    """A dense bulk in [-1e-2, 1e-2] and two outliers, λ_max = 50 and λ_min = -204 (a
    train-mode ResNet-18 early in training looked like this: λ_max 129, λ_min -204)."""
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(n, generator=g, dtype=F64) * 2 - 1) * 1e-2
    d[0], d[1] = 50.0, -204.0
    return d


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_a_ritz_value_in_the_bulk_near_zero_is_not_taken_for_the_end(
    monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    """From a random start in a large dimension the first Ritz values sit in the bulk near zero
    with residuals far below tol·‖A‖; without the guard most seeds stop there after 2 products."""
    import importlib

    d = _bulk_and_outliers()
    if which == "smallest":  # the mirror image: λ_min = -50 beside λ_max = 204
        d = -d
    want = 50.0 if which == "largest" else -50.0
    ours = [lanczos(_Diagonal(d), 1, which=which, tol=1e-3, seed=s) for s in range(10)]
    for res in ours:
        assert res.all_converged
        assert abs(float(res.eigenvalues[0]) - want) <= 1e-3 * 204
    mod = importlib.import_module("lightning_landscape.solvers.lanczos")
    monkeypatch.setattr(mod, "_separated", lambda theta, *_: torch.ones_like(theta, dtype=bool))
    unguarded = [lanczos(_Diagonal(d), 1, which=which, tol=1e-3, seed=s) for s in range(10)]
    wrong = [r for r in unguarded if abs(float(r.eigenvalues[0])) < 1.0]
    assert len(wrong) >= 3 and all(r.all_converged and r.num_hvps == 2 for r in wrong)


def test_an_eigenvalue_at_zero_still_converges_after_the_floor() -> None:
    """A true end at zero (a PSD Hessian's λ_min: 50 exact zeros below a bulk in [1, 11]) is
    never separated from zero, so it is accepted once ARPACK's default Krylov dimension (20) is
    spent, not earlier (14 products without the guard) and not much later."""
    g = torch.Generator().manual_seed(1)
    d = 1 + torch.rand(5_000, generator=g, dtype=F64) * 10
    d[:50] = 0.0
    res = lanczos(_Diagonal(d), 1, which="smallest", tol=1e-3)
    assert res.all_converged and 20 <= res.num_hvps <= 22
    assert abs(float(res.eigenvalues[0])) <= 1e-3 * 11
    top, bottom = lanczos_ends(_Diagonal(d), 2, 1, tol=1e-3)
    assert top.all_converged and bottom.all_converged
    assert abs(float(bottom.eigenvalues[0])) <= 1e-3 * 11


def test_a_budget_below_the_floor_reports_a_value_near_zero_unconverged() -> None:
    """With ``max_hvps`` under the floor the guard still holds: a Ritz value in the bulk comes
    back flagged unconverged (the monitor then warns), not as a converged λ_max."""
    d = _bulk_and_outliers()
    for seed in range(10):
        res = lanczos(_Diagonal(d), 1, tol=1e-3, seed=seed, max_hvps=2)
        if abs(float(res.eigenvalues[0])) < 1.0:
            assert not res.all_converged
    short = [lanczos(_Diagonal(d), 1, tol=1e-3, seed=s, max_hvps=2) for s in range(10)]
    assert sum(abs(float(r.eigenvalues[0])) < 1.0 for r in short) >= 3
