"""Hutch++ trace estimation: on explicit matrices and on the loss Hessians of the test models."""

from __future__ import annotations

import functools
import math
import random
import sys

import numpy as np
import pytest
import torch
from torch import Tensor

from lightning_landscape import (
    HessianOperator,
    MatrixOperator,
    TraceResult,
    curvature_context,
    deflated_trace,
    hessian_eigenvalues,
    hessian_trace,
    hutchpp_trace,
)
from lightning_landscape.operators import ScaledOperator
from tests._models import KINDS, dense_hessian, make_model, random_orthogonal, skewed_pair

F64 = torch.float64


def _psd_decaying(n: int = 200, seed: int = 0) -> tuple[Tensor, float]:
    """PSD matrix with eigenvalues 100 / i², i = 1..n, and its exact trace."""
    lam = 100.0 / torch.arange(1, n + 1, dtype=F64) ** 2
    q = random_orthogonal(n, seed)
    a = (q * lam) @ q.T
    return 0.5 * (a + a.T), float(lam.sum())


def _hutchinson(a: Tensor, num: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    probes = torch.randint(0, 2, (a.shape[0], num), generator=gen).to(F64) * 2 - 1
    return float(torch.sum(probes * (a @ probes), dim=0).mean())


# --------------------------------------------------------------------------------------------------
# Explicit matrices
# --------------------------------------------------------------------------------------------------


def test_hutchpp_is_unbiased_within_its_standard_error() -> None:
    a, exact = _psd_decaying()
    for seed in range(10):
        res = hutchpp_trace(MatrixOperator(a), 60, seed=seed)
        assert isinstance(res, TraceResult)
        assert res.method == "hutch++"
        assert res.stderr > 0
        assert abs(res.trace - exact) <= 4 * res.stderr, (seed, res.trace, exact, res.stderr)


def _top_pairs(a: Tensor, k: int) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(a)
    return vectors[:, -k:], values[-k:]


def test_deflated_trace_is_unbiased_and_beats_hutchinson() -> None:
    a, exact = _psd_decaying()
    vectors, values = _top_pairs(a, 5)
    errors = []
    for seed in range(10):
        res = deflated_trace(MatrixOperator(a), vectors, values, 10, seed=seed)
        assert (res.method, res.num_hvps, res.num_samples) == ("deflated", 10, 10)
        assert abs(res.trace - exact) <= 4 * res.stderr, (seed, res.trace, exact, res.stderr)
        errors.append(abs(res.trace - exact))
    plain = [abs(_hutchinson(a, 10, seed=100 + s) - exact) for s in range(10)]
    assert np.mean(errors) < 0.1 * np.mean(plain)  # the top 5 carry most of the variance


def test_deflated_trace_is_exact_when_the_pairs_span_the_space() -> None:
    a, exact = _psd_decaying(n=12)
    vectors, values = _top_pairs(a, 12)
    res = deflated_trace(MatrixOperator(a), vectors, values, 4)
    assert res.trace == pytest.approx(exact, rel=1e-12)
    assert res.stderr == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("off", "fast"), [(2.0, True), (0.5, False)])
def test_deflated_trace_projects_off_the_span_of_non_orthonormal_vectors(
    off: float, fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gram eigenvalues 0.55 / 1.45 (off = 2) go through ``(YᵀY)⁻¹``; 0.11 / 1.89 (off = 0.5) are
    orthonormalised first. Either way the projector is onto the span: with ``A`` the identity off
    its top two eigenvectors, the result is exact."""
    lam = torch.tensor([9.0, 5.0, 1, 1, 1, 1, 1, 1], dtype=F64)
    a, q = torch.diag(lam), torch.eye(8, dtype=F64)  # coordinate axes: no Rademacher variance
    trace_module = sys.modules["lightning_landscape.solvers.trace"]
    calls: list[int] = []
    original = trace_module.orthonormal_columns

    def spy(block: Tensor, sharding: object = None) -> tuple[Tensor, Tensor]:
        calls.append(block.shape[1])
        return original(block, sharding)

    monkeypatch.setattr(trace_module, "orthonormal_columns", spy)
    res = deflated_trace(MatrixOperator(a), skewed_pair(q[:, :2], off), lam[:2], 4, seed=1)
    assert res.trace == pytest.approx(float(lam.sum()), rel=1e-12)
    assert res.stderr == pytest.approx(0.0, abs=1e-12)
    assert calls == ([] if fast else [2])


def test_deflated_trace_same_estimate_for_any_basis_of_the_span() -> None:
    """The same probes give the same estimate whether the top pairs come orthonormal or mixed by
    a well-conditioned matrix (the projector onto their span is the same)."""
    a, _ = _psd_decaying()
    vectors, values = _top_pairs(a, 5)
    mix = torch.eye(5, dtype=F64) + 0.05 * torch.randn(
        5, 5, generator=torch.Generator().manual_seed(0), dtype=F64
    )
    mixed = vectors @ mix
    spread = torch.linalg.eigvalsh(mixed.T @ mixed)
    assert spread.min() >= 0.5 and spread.max() <= 2.0  # the (YᵀY)⁻¹ path
    plain = deflated_trace(MatrixOperator(a), vectors, values, 10, seed=2)
    skew = deflated_trace(MatrixOperator(a), mixed, values, 10, seed=2)
    assert skew.trace == pytest.approx(plain.trace, rel=1e-10)
    assert skew.stderr == pytest.approx(plain.stderr, rel=1e-8)


def test_deflated_trace_with_ritz_pairs_of_a_model_hessian() -> None:
    model, loss_fn, batch = make_model("mlp")
    exact = float(torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batch).detach()).sum())
    top = hessian_eigenvalues(model, loss_fn, batch, 4, tol=1e-6, return_eigenvectors=True)
    assert top.eigenvectors is not None
    with curvature_context(model):
        op = HessianOperator(model, loss_fn, [batch])
        res = deflated_trace(op, top.eigenvectors, top.eigenvalues, 20, seed=3)
    assert abs(res.trace - exact) <= 4 * res.stderr, (res.trace, exact, res.stderr)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.eye(6)[:, :2], torch.ones(2), 1), "num_hvps >= 2"),
        ((torch.eye(6)[:5, :2], torch.ones(2), 4), "vectors must be"),
        ((torch.eye(6)[:, :2], torch.ones(3), 4), "vectors must be"),
        ((torch.eye(6)[:, :2], torch.tensor([1.0, math.nan]), 4), "values are not finite"),
        (
            (
                torch.eye(6)[:, :2].index_put((torch.tensor([4]),), torch.tensor(math.inf)),
                torch.ones(2),
                4,
            ),
            "vectors are",
        ),
        (
            (
                torch.eye(6)[:, :2].index_put((torch.tensor([3]),), torch.tensor(math.nan)),
                torch.ones(2),
                4,
            ),
            "vectors are",
        ),
    ],
)
def test_deflated_trace_validation(args: tuple, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        deflated_trace(MatrixOperator(torch.eye(6)), *args)


def test_hutchpp_beats_hutchinson_at_equal_budget() -> None:
    a, exact = _psd_decaying()
    budget, seeds = 60, range(10)
    err_pp = [abs(hutchpp_trace(MatrixOperator(a), budget, seed=s).trace - exact) for s in seeds]
    err_h = [abs(_hutchinson(a, budget, seed=100 + s) - exact) for s in seeds]
    # With a 1/i² spectrum the sketch captures almost all of the variance.
    assert np.mean(err_pp) < 0.1 * np.mean(err_h), (np.mean(err_pp), np.mean(err_h))
    # ... and the reported standard error is much smaller than Hutchinson's.
    res = hutchpp_trace(MatrixOperator(a), budget)
    lam = 100.0 / torch.arange(1, 201, dtype=F64) ** 2
    # Rademacher Hutchinson variance per probe <= 2 ||A||_F^2.
    assert res.stderr < 0.1 * math.sqrt(2 * float((lam**2).sum()) / budget)


@pytest.mark.parametrize("budget", [36, 38, 50])
def test_exact_when_the_sketch_spans_the_space(budget: int) -> None:
    n = 12
    gen = torch.Generator().manual_seed(1)
    lam = torch.randn(n, generator=gen, dtype=F64) * 3  # indefinite is fine too
    q = random_orthogonal(n, 2)
    a = (q * lam) @ q.T
    op = MatrixOperator(0.5 * (a + a.T))
    res = hutchpp_trace(op, budget)  # budget // 3 >= n
    assert res.stderr == 0.0
    assert res.num_samples == 0
    assert res.trace == pytest.approx(float(lam.sum()), rel=1e-12, abs=1e-12)
    assert res.num_hvps == 2 * n == op.num_matvecs  # no products wasted once exact
    assert res.num_hvps <= budget


@pytest.mark.parametrize("budget", [3, 4, 5, 6, 7, 8, 9, 10, 11, 30, 31, 32])
def test_products_spent_equal_the_budget(budget: int) -> None:
    a, _ = _psd_decaying(n=50)
    op = MatrixOperator(a)
    res = hutchpp_trace(op, budget)
    assert op.num_matvecs == res.num_hvps
    assert res.num_hvps == budget
    sketch = budget // 3
    assert res.num_samples == budget - 2 * sketch
    if res.num_samples >= 2:
        assert math.isfinite(res.stderr) and res.stderr > 0


@pytest.mark.parametrize("budget", [2, 1, 0, -3])
def test_too_small_budget_is_rejected(budget: int) -> None:
    op = MatrixOperator(torch.eye(10, dtype=F64))
    with pytest.raises(ValueError, match="num_hvps >= 3"):
        hutchpp_trace(op, budget)
    assert op.num_matvecs == 0


def test_deterministic_and_leaves_global_rng_alone() -> None:
    a, _ = _psd_decaying(n=80)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    r1 = hutchpp_trace(MatrixOperator(a), 30, seed=3)
    r2 = hutchpp_trace(MatrixOperator(a), 30, seed=3)
    r3 = hutchpp_trace(MatrixOperator(a), 30, generator=torch.Generator().manual_seed(3))
    r4 = hutchpp_trace(MatrixOperator(a), 30, seed=4)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert (r1.trace, r1.stderr) == (r2.trace, r2.stderr) == (r3.trace, r3.stderr)
    assert r4.trace != r1.trace


def test_float32_operator() -> None:
    a, exact = _psd_decaying(n=60)
    res = hutchpp_trace(MatrixOperator(a.float()), 180)  # exact up to float32 rounding
    assert res.stderr == 0.0
    assert res.trace == pytest.approx(exact, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# hessian_trace on the test models
# --------------------------------------------------------------------------------------------------


@functools.cache
def _dense(kind: str) -> Tensor:
    model, loss_fn, batch = make_model(kind)
    return dense_hessian(model, loss_fn, batch).detach()


@pytest.mark.parametrize("kind", KINDS)
def test_hessian_trace_within_stderr(kind: str) -> None:
    model, loss_fn, batch = make_model(kind)
    exact = float(torch.trace(_dense(kind)))
    for seed in range(3):
        res = hessian_trace(model, loss_fn, batch, num_hvps=90, seed=seed)
        assert res.num_hvps == 90
        assert res.num_samples == 30
        assert 0 < res.stderr < abs(exact)
        assert abs(res.trace - exact) <= 4 * res.stderr, (seed, res.trace, exact, res.stderr)


@pytest.mark.parametrize("kind", KINDS)
def test_hessian_trace_exact_with_budget_3n(kind: str) -> None:
    model, loss_fn, batch = make_model(kind)
    hess = _dense(kind)
    n = hess.shape[0]
    res = hessian_trace(model, loss_fn, batch, num_hvps=3 * n)
    assert res.stderr == 0.0
    assert res.num_hvps == 2 * n
    assert res.trace == pytest.approx(float(torch.trace(hess)), rel=1e-8, abs=1e-10)


@pytest.mark.parametrize(
    ("kind", "patterns"),
    [("mlp", ["fc3.*"]), ("cnn", ["conv.*", "bn.*"]), ("attention", ["head.*", "ln2.*"])],
)
@pytest.mark.parametrize("route", ["functorch", "double_backward"])
def test_hessian_trace_of_a_parameter_subset(kind: str, patterns: list[str], route: str) -> None:
    model, loss_fn, batch = make_model(kind)
    names = [
        name
        for name, _ in model.named_parameters()
        if any(name.startswith(p[:-1]) for p in patterns)  # patterns are "prefix.*"
    ]
    sub = dense_hessian(model, loss_fn, batch, params=names).detach()
    m = sub.shape[0]
    res = hessian_trace(model, loss_fn, batch, num_hvps=3 * m, params=patterns, route=route)
    assert res.stderr == 0.0
    assert res.trace == pytest.approx(float(torch.trace(sub)), rel=1e-8, abs=1e-10)


def test_hessian_trace_rejects_small_budget_and_restores_model() -> None:
    model, loss_fn, batch = make_model("cnn")
    model.train()
    with pytest.raises(ValueError, match="num_hvps"):
        hessian_trace(model, loss_fn, batch, num_hvps=2)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rademacher_probes_are_independent_signs(dtype: torch.dtype) -> None:
    from lightning_landscape.solvers.trace import _rademacher

    like = torch.empty(0, dtype=dtype)
    n, b = 10_001, 7  # n·b not a multiple of 8: the last byte is partly used
    x = _rademacher(n, b, like, torch.Generator().manual_seed(0))
    assert x.shape == (n, b) and x.dtype == dtype
    assert x.T.is_contiguous()  # contiguous rows, as batched products split blocks
    assert bool(((x == 1) | (x == -1)).all())
    # Balanced, uncorrelated across positions and columns (bits of the same byte included).
    assert abs(float(x.mean())) < 4 / (n * b) ** 0.5
    gram = (x.T @ x) / n
    off = gram - torch.eye(b, dtype=dtype)
    assert float(off.abs().max()) < 5 / n**0.5
    flat = x.T.reshape(-1)
    for lag in (1, 2, 7, 8):
        assert abs(float((flat[:-lag] * flat[lag:]).mean())) < 5 / flat.numel() ** 0.5
    same = _rademacher(n, b, like, torch.Generator().manual_seed(0))
    assert torch.equal(x, same)


@pytest.mark.parametrize(("n", "b"), [(10_001, 7), (64, 3), (13, 1)])
@pytest.mark.parametrize("c", [1, 2])
def test_rademacher_blocks_are_the_block_rows(n: int, b: int, c: int) -> None:
    """A few probes at a time (one, on the CPU path) draws exactly the block's probes, whatever
    n mod 8."""
    from lightning_landscape.solvers.trace import _rademacher, _rademacher_blocks

    like = torch.empty(0)
    block = _rademacher(n, b, like, torch.Generator().manual_seed(3))
    parts = [p.clone() for p in _rademacher_blocks(n, b, c, like, torch.Generator().manual_seed(3))]
    rows = torch.cat(parts, dim=1)
    assert rows.shape == (n, b) and all(p.shape[1] <= c for p in parts)
    for i in range(b):
        assert torch.equal(rows[:, i], block[:, i])


class _OneAtATime(MatrixOperator):
    """A matrix operator that says it applies blocks vector by vector (as CPU double backward)."""

    @property
    def batches_blocks(self) -> bool:
        return False


@pytest.mark.parametrize(("deflate", "skew"), [(4, False), (0, False), (4, True)])
def test_probes_one_at_a_time_match_the_block_estimate(deflate: int, skew: bool) -> None:
    """The one-at-a-time path (two reused vectors) and the block path give the same samples,
    with orthonormal vectors and with a skewed basis projected through ``(QᵀQ)⁻¹``."""
    from lightning_landscape.solvers import trace as trace_module

    torch.manual_seed(0)
    a = torch.randn(300, 300, dtype=torch.float64)
    a = a + a.T
    q = torch.linalg.qr(torch.randn(300, deflate, dtype=torch.float64))[0]
    inverse = None
    if skew:
        q = q @ (
            torch.eye(deflate, dtype=torch.float64)
            + 0.1 * torch.randn(deflate, deflate, dtype=torch.float64)
        )
        inverse = torch.linalg.inv(q.T @ q)
    single, block = _OneAtATime(a), MatrixOperator(a)
    one = trace_module._deflated_hutchinson(single, q, 6, torch.Generator().manual_seed(1), inverse)
    many = trace_module._deflated_hutchinson(block, q, 6, torch.Generator().manual_seed(1), inverse)
    p = torch.eye(300, dtype=torch.float64) - q @ (q.T if inverse is None else inverse @ q.T)
    pz = p @ trace_module._rademacher(300, 6, q, torch.Generator().manual_seed(1))
    samples = (pz * (a @ pz)).sum(0)
    for got in (one, many):
        assert got[0] == pytest.approx(float(samples.mean()), rel=1e-12)
        assert got[1] == pytest.approx(float(samples.std() / 6**0.5), rel=1e-10)
    assert single.num_matvecs == block.num_matvecs == 6


def test_which_operators_batch_blocks() -> None:
    """The CPU double backward with retained graphs goes vector by vector; so does finite
    differencing; a scaled operator answers as its inner one; a matrix batches."""
    model, loss_fn, batch = make_model("mlp")
    retained = HessianOperator(model, loss_fn, [batch])
    assert retained.retain_graph and not retained.batches_blocks
    rebuilt = HessianOperator(model, loss_fn, [batch, batch])  # several batches: graphs rebuilt
    assert not rebuilt.retain_graph and rebuilt.batches_blocks
    assert not HessianOperator(model, loss_fn, [batch], route="finite_difference").batches_blocks
    assert HessianOperator(model, loss_fn, [batch], route="functorch").batches_blocks
    scale = torch.ones(retained.size)
    assert not ScaledOperator(retained, scale).batches_blocks
    assert ScaledOperator(rebuilt, scale).batches_blocks
    assert MatrixOperator(torch.eye(3)).batches_blocks
