"""The solvers on sharded vectors: every process holds a slice, inner products are reduced.

Processes are simulated by threads that meet at a barrier to sum tensors (what an all-reduce
does), so the sharded code paths run here against matrices of known spectrum, with shards of
different sizes, without starting a process group. The FSDP2 operator itself is tested with two
gloo processes in ``tests/test_fsdp.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_landscape.operators import CurvatureOperator, Sharding
from lightning_landscape.solvers import deflated_trace, hutchpp_trace, lanczos, spectral_density
from tests._models import skewed_pair


class _Group:
    """``world`` threads that sum tensors: each call is one all-reduce."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list[Tensor | None] = [None] * world
        self.calls = 0

    def reduce(self, rank: int, t: Tensor) -> Tensor:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        total = torch.stack([s for s in self.slots if s is not None]).sum(dim=0)
        if rank == 0:
            self.calls += 1
        self.barrier.wait()
        return total


class _ShardOp(CurvatureOperator):
    """Rows ``lo:hi`` of ``matrix @ x``, from every process's slice of ``x``."""

    def __init__(self, matrix: Tensor, bounds: list[int], rank: int, group: _Group) -> None:
        self.lo, self.hi = bounds[rank], bounds[rank + 1]
        super().__init__(self.hi - self.lo, matrix.dtype, matrix.device)
        self.matrix, self.group, self.rank = matrix, group, rank
        self.sharding = Sharding(matrix.shape[0], rank, lambda t: group.reduce(rank, t))

    def _matmat(self, block: Tensor) -> Tensor:
        whole = torch.zeros(self.matrix.shape[0], block.shape[1], dtype=block.dtype)
        whole[self.lo : self.hi] = block
        whole = self.group.reduce(self.rank, whole)  # an all-gather, the test's way
        return (self.matrix @ whole)[self.lo : self.hi]


def _on_shards(matrix: Tensor, bounds: list[int], fn: Callable[[_ShardOp], Any]) -> list[Any]:
    """``fn(op)`` on every simulated process; each one's return value."""
    world = len(bounds) - 1
    group = _Group(world)
    out: list[Any] = [None] * world
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            out[rank] = fn(_ShardOp(matrix, bounds, rank, group))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return out


def _matrix(spectrum: Tensor, seed: int = 0) -> Tensor:
    n = spectrum.numel()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    return (q * spectrum) @ q.T


SPECTRUM = torch.cat(
    [torch.tensor([50.0, 31.0, 20.0, -12.0]), torch.linspace(-3.0, 5.0, 76)]
).double()
BOUNDS = [0, 23, 57, 80]  # three processes with slices of 23, 34 and 23 entries


@pytest.mark.parametrize("block_size", [1, 2])
def test_sharded_lanczos_finds_the_top_eigenvalues_on_every_process(block_size: int) -> None:
    a = _matrix(SPECTRUM)
    results = _on_shards(a, BOUNDS, lambda op: lanczos(op, k=3, tol=1e-9, block_size=block_size))
    want = torch.tensor([50.0, 31.0, 20.0], dtype=torch.float64)
    for res in results:
        assert res.converged.all()
        torch.testing.assert_close(res.eigenvalues, want, atol=1e-7 * 50, rtol=0)
        assert torch.equal(res.eigenvalues, results[0].eigenvalues)  # the same decisions
    vectors = torch.cat([r.eigenvectors for r in results])  # the shards, stacked
    residual = a @ vectors - vectors * want
    assert float(residual.norm(dim=0).max()) < 1e-6 * 50
    torch.testing.assert_close(
        vectors.T @ vectors, torch.eye(3, dtype=torch.float64), atol=1e-9, rtol=0
    )


def test_sharded_lanczos_smallest_with_a_warm_start_and_float32() -> None:
    a = _matrix(SPECTRUM, seed=1).float()
    cold = _on_shards(a, BOUNDS, lambda op: lanczos(op, k=1, which="smallest", tol=1e-4))
    assert abs(float(cold[0].eigenvalues[0]) + 12.0) < 1e-3 * 50
    starts = [r.eigenvectors for r in cold]
    warm = _on_shards(
        a,
        BOUNDS,
        lambda op: lanczos(op, k=1, which="smallest", tol=1e-4, start=starts[op.rank]),
    )
    assert warm[0].num_hvps < cold[0].num_hvps
    assert abs(float(warm[0].eigenvalues[0]) + 12.0) < 1e-3 * 50


def test_sharded_lanczos_over_the_whole_space_is_exact() -> None:
    """``max_basis`` = n: no dense shortcut when sharded (no process holds a column of A)."""
    spectrum = torch.tensor([4.0, 3.0, 2.0, 1.0, -1.0, 0.5], dtype=torch.float64)
    a = _matrix(spectrum)
    results = _on_shards(a, [0, 2, 6], lambda op: lanczos(op, k=2, tol=1e-10, max_basis=6))
    torch.testing.assert_close(results[0].eigenvalues, torch.tensor([4.0, 3.0]).double())


def test_sharded_hutchpp_is_exact_when_the_sketch_spans_the_space() -> None:
    spectrum = torch.linspace(-1.0, 6.0, 12, dtype=torch.float64)
    a = _matrix(spectrum)
    results = _on_shards(a, [0, 5, 12], lambda op: hutchpp_trace(op, num_hvps=36))
    for res in results:
        assert res.trace == pytest.approx(float(spectrum.sum()), abs=1e-9)
        assert res.stderr == 0.0


def test_sharded_hutchpp_is_unbiased_on_independent_shards() -> None:
    """The shards' random signs must be independent: equal slices would bias the estimate."""
    a = torch.diag(torch.arange(1.0, 81.0, dtype=torch.float64)) + 0.5
    truth = float(torch.trace(a))
    estimates = [
        _on_shards(a, [0, 40, 80], lambda op, s=seed: hutchpp_trace(op, num_hvps=9, seed=s))[0]
        for seed in range(40)
    ]
    values = torch.tensor([e.trace for e in estimates])
    spread = float(values.std()) / len(estimates) ** 0.5
    assert abs(float(values.mean()) - truth) < 4 * spread


@pytest.mark.parametrize("off", [2.0, 0.5])  # (YᵀY)⁻¹ applied as it is; Y orthonormalised
def test_sharded_deflated_trace_is_exact_on_a_skewed_basis_of_the_eigenspace(off: float) -> None:
    """Every process takes the same projection path (from the all-reduced Gram matrix) and gets
    the exact trace. ``A`` is zero off a rotated two-dimensional eigenspace whose vectors have
    entries on both shards, so a projection that missed the other shard's part would leave a
    non-zero remainder."""
    u = torch.linalg.qr(
        torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    )[0]
    lam = torch.tensor([9.0, 5.0] + [0.0] * 10, dtype=torch.float64)
    a = (u * lam) @ u.T
    y = skewed_pair(u, off)
    results = _on_shards(
        0.5 * (a + a.T),
        [0, 5, 12],
        lambda op: deflated_trace(op, y[op.lo : op.hi], lam[:2], num_hvps=4),
    )
    for res in results:
        assert res.trace == pytest.approx(14.0, abs=1e-9)
        assert res.stderr == pytest.approx(0.0, abs=1e-9)


def test_sharded_density_has_the_exact_nodes_on_every_process() -> None:
    spectrum = torch.linspace(-2.0, 7.0, 10, dtype=torch.float64)
    a = _matrix(spectrum)
    results = _on_shards(
        a, [0, 3, 10], lambda op: spectral_density(op, num_runs=3, lanczos_steps=10)
    )
    res = results[0]
    torch.testing.assert_close(res.nodes[0], spectrum, atol=1e-8, rtol=0)
    assert torch.equal(res.nodes, results[1].nodes)
    torch.testing.assert_close(res.weights.sum(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(res.weights, results[1].weights)
