"""The Lanczos solver's Gram–Schmidt kernels: accuracy in float32 at real sizes, DGKS pass."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_landscape.solvers._orthogonality import (
    column_norms,
    orthogonality_threshold,
    project_out,
    project_out_block,
    semi_orthogonality,
    vector_norm,
)


def test_vector_norm_is_accurate_in_float32_at_ten_million_entries() -> None:
    x = torch.randn(10_000_000, generator=torch.Generator().manual_seed(0))
    exact = float(x.double().norm())
    assert abs(vector_norm(x) - exact) / exact < 1e-5
    block = torch.stack([x[:5_000_000], 2 * x[5_000_000:]], dim=1)
    exact_cols = block.double().norm(dim=0)
    torch.testing.assert_close(column_norms(block).double(), exact_cols, rtol=1e-5, atol=0)


def _orthonormal_rows(j: int, n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, j, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()


def test_project_out_takes_a_second_pass_when_the_first_cancels_most_of_w() -> None:
    basis = _orthonormal_rows(8, 50_000, seed=1)
    coeff = torch.randn(8, generator=torch.Generator().manual_seed(2))
    tiny = 1e-4 * torch.randn(50_000, generator=torch.Generator().manual_seed(3))
    w = basis.T @ coeff + tiny  # almost entirely inside the span: heavy cancellation
    h, before = project_out(w, basis)
    assert before == vector_norm(basis.T @ coeff + tiny)
    torch.testing.assert_close(h, coeff + basis @ tiny, rtol=0, atol=1e-5)
    # Orthogonal to the basis to rounding relative to what is left, not to what was removed.
    assert float((basis @ w).abs().max()) < 1e-5 * vector_norm(w)


def test_project_out_block_matches_the_vector_kernel() -> None:
    basis = _orthonormal_rows(5, 20_000, seed=4).double()
    w = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = w - basis.T @ (basis @ w)
    h, _ = project_out_block(w, basis)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-12)
    assert h.shape == (5, 3)


def test_reorthogonalisation_levels() -> None:
    for dtype in (torch.float32, torch.float64):
        eps = torch.finfo(dtype).eps
        tau = orthogonality_threshold(eps)
        assert math.isclose(tau, eps**0.75)
        assert math.isclose(semi_orthogonality(eps, 0.5), math.sqrt(eps))
        assert math.isclose(semi_orthogonality(eps, 1e-30), tau)
        mid = math.sqrt(tau * math.sqrt(eps))
        assert math.isclose(semi_orthogonality(eps, mid), mid)  # the tolerance in between
        assert eps < tau < semi_orthogonality(eps, mid)


@pytest.mark.parametrize("chunk", [7, 1 << 15])
def test_combine_rows_in_place_and_fresh(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    from lightning_landscape.solvers import _orthogonality

    monkeypatch.setattr(_orthogonality, "_COMBINE_CHUNK", chunk)  # 7: many ragged chunks
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(9, 100, generator=gen, dtype=torch.float64)
    y = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    expected = y.T @ rows
    fresh = _orthogonality.combine_rows(rows, y)
    torch.testing.assert_close(fresh, expected, rtol=1e-12, atol=1e-12)
    basis = rows.clone()
    out = _orthogonality.combine_rows(basis, y, out=basis[:4])  # overwrites its own input rows
    assert out.data_ptr() == basis.data_ptr()
    torch.testing.assert_close(basis[:4], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(basis[4:], rows[4:], rtol=0, atol=0)
