"""The Lanczos solver's Gram–Schmidt kernels: accuracy in float32 at real sizes, DGKS pass."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_landscape.solvers._orthogonality import (
    _chunked_dot,
    column_norms,
    gram,
    orthogonality_threshold,
    orthonormal_columns,
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


@pytest.mark.parametrize("host_sum", [True, False])
def test_chunked_dot_both_summations_match_float64(host_sum: bool) -> None:
    """The CPU's per-piece reads and the accelerators' on-device float64 sum (one read)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3_000_001, generator=g), torch.randn(3_000_001, generator=g) + 0.5
    xd, yd = x.double(), y.double()
    scale = float(xd.norm() * yd.norm())  # the rounding scale of a dot with cancellation
    assert abs(_chunked_dot(x, y, host_sum=host_sum) - float(xd @ yd)) < 1e-8 * scale
    assert abs(_chunked_dot(y, y, host_sum=host_sum) / float(yd @ yd) - 1) < 1e-5  # as vector_norm


@pytest.mark.parametrize("layout", ["rows", "row_major"])
def test_orthonormal_columns_are_orthonormal_to_float32_rounding_at_millions(layout: str) -> None:
    """CholeskyQR on the float64-accumulated Gram: Householder QR in float32 left 11 M-entry
    columns orthonormal only to 7e-4 (its float32 norms); this keeps them at ~1e-7."""
    g = torch.Generator().manual_seed(1)
    n, b = 4_000_000, 6
    rows = torch.randn(b, n, generator=g)
    rows[1] += 0.5 * rows[0]  # not orthogonal to begin with: condition number ~2.6, two passes
    block = rows.T if layout == "rows" else rows.T.contiguous()
    q, r = orthonormal_columns(block)
    wide = q.double()
    eye = torch.eye(b, dtype=torch.float64)
    assert float((wide.T @ wide - eye).abs().max()) < 1e-6
    assert float((wide @ r.double() - block.double()).abs().max()) < 1e-5 * float(block.abs().max())
    assert q.T.is_contiguous()  # columns are contiguous rows, as Lanczos and the trace use them
    exact = block.double().T @ block.double()
    assert float((gram(block) - exact).abs().max()) < 1e-6 * float(exact.diagonal().max())


def test_orthonormal_columns_rank_deficient_block_gets_a_zero_direction() -> None:
    """A dependent column fails the Cholesky route; Householder QR marks it in R's diagonal."""
    g = torch.Generator().manual_seed(2)
    block = torch.randn(1000, 3, generator=g, dtype=torch.float64)
    block[:, 2] = block[:, 0] - 2 * block[:, 1]
    q, r = orthonormal_columns(block)
    assert float(r.diagonal().abs().min()) < 1e-10 * float(r.diagonal().abs().max())
    torch.testing.assert_close(q @ r, block)
    q, r = orthonormal_columns(block[:, :0])  # no columns: nothing to do
    assert q.shape == (1000, 0) and r.shape == (0, 0)


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
    # A given output elsewhere (the straight-write path) is written in place, not replaced.
    target = torch.full((4, 100), math.nan, dtype=torch.float64)
    assert _orthogonality.combine_rows(rows, y, out=target) is target
    torch.testing.assert_close(target, expected, rtol=1e-12, atol=1e-12)
    # An output in the same storage but other rows (the buffered path) is correct too.
    both = torch.cat([rows, torch.zeros(4, 100, dtype=torch.float64)])
    _orthogonality.combine_rows(both[:9], y, out=both[9:])
    torch.testing.assert_close(both[9:], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both[:9], rows, rtol=0, atol=0)
    # The same memory through another storage object (NumPy views): still the buffered path.
    array = rows.numpy().copy()
    shared_rows = torch.from_numpy(array)
    shifted = torch.from_numpy(array[1:5])  # overlaps rows 1-4
    assert shifted.untyped_storage().data_ptr() != shared_rows.untyped_storage().data_ptr()
    _orthogonality.combine_rows(shared_rows, y, out=shifted)
    torch.testing.assert_close(shifted, expected, rtol=1e-12, atol=1e-12)
    # Another dtype is cast on the copy; a wrong shape is refused.
    single = torch.empty(4, 100, dtype=torch.float32)
    _orthogonality.combine_rows(rows, y, out=single)
    torch.testing.assert_close(single, expected.float())
    with pytest.raises(ValueError, match=r"\(4, 100\)"):
        _orthogonality.combine_rows(rows, y, out=torch.empty(4, 101, dtype=torch.float64))
