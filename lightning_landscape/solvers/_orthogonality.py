"""Gram–Schmidt kernels and Simon's orthogonality estimate for the Lanczos solver.

Everything here is bandwidth-bound vector work on ``(n,)`` vectors and an ``(m, n)`` row-major
basis: at 10 M parameters one pass over a 20-vector basis reads 0.9 GB, about a quarter of a cheap
Hessian-vector product on a CPU. The kernels therefore count passes:

* :func:`project_out` — classical Gram–Schmidt against the basis (2 passes), with the second,
  corrective pass only when the first one cancelled most of the vector (the Daniel–Gragg–
  Kaufman–Stewart test, η = 1/√2) instead of always ("twice is enough" costs 4 passes);
* :func:`semi_orthogonality` and :func:`orthogonality_threshold` — single-vector Lanczos runs on
  the three-term recurrence, measures the new vector's inner products with the basis (one pass)
  and, only when one exceeds the tolerance (clamped to ``[ε^(3/4), √ε]``), subtracts those above
  ``ε^(3/4)`` (usually the converged Ritz directions): partial reorthogonalisation in the sense
  of Simon (1984) and Larsen (PROPACK), with measured instead of estimated inner products
  (estimates by Simon's recurrence fell short of the true ones by 17× on a test matrix, so they
  are not trusted to skip the pass).

Dot products and norms of long float32 vectors go through :func:`dot` (chunks summed in float64):
``torch.linalg.vector_norm`` of a float32 vector of 10⁷ entries was measured 4e-4 off on the CPU
and a plain ``torch.dot`` of it with itself 9e-5, enough to bias a Ritz value at ``tol=1e-4``.

Every reduction over the vector dimension takes an optional ``sharding``
(:class:`~lightning_landscape.operators.Sharding`): vectors split over processes (FSDP) are then
reduced locally and summed over the processes, one all-reduce per call. Without it the code is
exactly the single-process one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..operators import CurvatureOperator, Sharding

DGKS = 1.0 / math.sqrt(2.0)  # a second Gram–Schmidt pass when ‖w_after‖ < DGKS · ‖w_before‖


_CHUNK = 1 << 18  # float32 dot products of this length are accurate to ~1e-7 relative
_GRAM_CHUNK = 1 << 12  # rows per float32 piece of gram(): the Gram of 11 M rows to ~1e-7
_COMBINE_CHUNK = 1 << 15  # columns per chunk of combine_rows on a CPU (a cache-sized buffer)


def private_generator(op: CurvatureOperator, seed: int) -> torch.Generator:
    """A generator on ``op``'s device for a solver's random vectors, seeded by ``seed``.

    When the operator is sharded each process draws its own slice of a random vector, so the
    seed is offset by the process's rank: identical slices would make the vector's entries
    dependent (a biased Hutchinson estimate), not merely a different random vector.
    """
    generator = torch.Generator(device=op.device)
    offset = 0 if op.sharding is None else (op.sharding.rank + 1) * 1_000_003
    generator.manual_seed(seed + offset)
    return generator


def local_dot(x: Tensor, y: Tensor) -> float:
    """``xᵀy`` of this process's (contiguous) vectors, float32 summed in float64 chunks."""
    n = x.numel()
    if n <= _CHUNK or x.dtype == torch.float64:
        return float(torch.dot(x, y))
    return _chunked_dot(x, y, host_sum=x.device.type == "cpu")


def _chunked_dot(x: Tensor, y: Tensor, host_sum: bool) -> float:
    """Float32 dots of ``_CHUNK``-entry pieces summed in float64.

    On the CPU each piece's dot is read at once (``math.fsum``). On an accelerator reading a
    value waits for the device, so the pieces' dots stay there and are summed in float64 before
    one read (at 10⁸ parameters, 1 wait per dot instead of 382).
    """
    pieces = (torch.dot(x[i : i + _CHUNK], y[i : i + _CHUNK]) for i in range(0, x.numel(), _CHUNK))
    if host_sum:
        return math.fsum(float(p) for p in pieces)
    return float(torch.stack(list(pieces)).to(torch.float64).sum())


def all_sum(values: list[float], sharding: Sharding | None) -> list[float]:
    """Per-process partial sums summed over the shards (``values`` itself when not sharded)."""
    if sharding is None:
        return values
    return sharding.reduce(torch.tensor(values, dtype=torch.float64)).tolist()  # type: ignore[no-any-return]


def dot(x: Tensor, y: Tensor, sharding: Sharding | None = None) -> float:
    """``xᵀy`` of two vectors, accurate in float32 at any length.

    One float32 ``torch.dot`` over 10⁷ entries was measured 9e-5 off for ``xᵀx`` on the CPU
    (``torch.linalg.vector_norm`` 4e-4): enough to bias a Ritz value at ``tol=1e-4``. Chunks of
    2¹⁸ entries (errors ≤ 4e-7) are summed in float64 instead; the cost is that of one dot.
    """
    if sharding is None:
        return local_dot(x, y)
    return all_sum([local_dot(x, y)], sharding)[0]


def vector_norm(x: Tensor, sharding: Sharding | None = None) -> float:
    """``‖x‖₂`` of a vector through :func:`dot` (accurate in float32 at 10⁷ entries)."""
    return math.sqrt(max(dot(x, x, sharding), 0.0))


def column_norms(x: Tensor, sharding: Sharding | None = None) -> Tensor:
    """Column norms of an ``(n, b)`` block, each through :func:`vector_norm`.

    (Not through the Gram matrix ``xᵀx``: that float32 GEMM over 5·10⁶ rows was measured 3e-3 off.)
    """
    columns = (x[:, i].contiguous() for i in range(x.shape[1]))
    squares = all_sum([local_dot(c, c) for c in columns], sharding)
    norms = [math.sqrt(max(s, 0.0)) for s in squares]
    return torch.tensor(norms, dtype=x.dtype, device=x.device)


def coefficients(basis: Tensor, w: Tensor, sharding: Sharding | None = None) -> Tensor:
    """``basis @ w``: the inner products of the rows of ``basis`` with ``w`` (a vector or block)."""
    h = basis @ w
    if sharding is None:
        return h
    return sharding.reduce(h.to(torch.float64)).to(dtype=h.dtype, device=h.device)


def _address_range(t: Tensor) -> tuple[int, int]:
    """The first and one past the last byte that ``t``'s elements can occupy (a superset)."""
    start = t.data_ptr()
    last = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    return start, start + (last + 1) * t.element_size()


def _may_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` may share memory (``False`` only when they certainly do not)."""
    if a.device != b.device:
        return False
    a0, a1 = _address_range(a)
    b0, b1 = _address_range(b)
    return a0 < b1 and b0 < a1


def combine_rows(rows: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
    """``yᵀ rows``: ``p`` combinations of the ``(j, n)`` rows (Ritz vectors from a Lanczos basis).

    Computed over column chunks, so no ``(p, n)`` temporary is ever allocated. Into a fresh
    ``out``, or one of the rows' dtype and device whose memory cannot overlap theirs, each chunk's
    product is written straight into its columns. Otherwise (e.g. ``out`` is the first rows of
    ``rows`` itself: a thick restart, in place) each chunk goes through one small reused buffer
    before it is copied into ``out`` (cast to its dtype and device). On a CPU the chunks fit in
    cache: with 22 rows of 11 M entries and ``p = 14`` this took 0.17 s against 0.59 s for
    ``y.T @ rows`` over 2²⁰-column slices, whose fresh temporaries cost page faults (measured on
    one core). Writing the chunks straight into ``out`` saves the buffer's copy: 0.074 s against
    0.090 s for ``p = 6``, 0.120 s against 0.141 s for ``p = 14`` (medians, two cores,
    ``benchmarks/combine_rows.py``).

    Args:
        rows: ``(j, n)`` vectors, row-major.
        y: ``(j, p)`` coefficients (cast to the rows' dtype and device).
        out: where to write the ``(p, n)`` result; may alias ``rows[:p]``.

    Returns:
        ``out``.

    Raises:
        ValueError: if ``out`` is not ``(p, n)``.
    """
    n = rows.shape[1]
    yt = y.T.to(dtype=rows.dtype, device=rows.device).contiguous()
    p = yt.shape[0]
    if out is None:
        out = torch.empty(p, n, dtype=rows.dtype, device=rows.device)
    elif tuple(out.shape) != (p, n):
        raise ValueError(f"combine_rows: out must be {(p, n)}, got {tuple(out.shape)}")
    chunk = min(n, _COMBINE_CHUNK if rows.device.type == "cpu" else 1 << 20)
    same_kind = out.dtype == rows.dtype and out.device == rows.device
    if same_kind and not _may_overlap(out, rows):
        for c0 in range(0, n, chunk):
            torch.mm(yt, rows[:, c0 : c0 + chunk], out=out[:, c0 : c0 + chunk])
        return out
    buf = torch.empty(p * chunk, dtype=rows.dtype, device=rows.device)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        piece = buf[: p * (c1 - c0)].view(p, c1 - c0)
        torch.mm(yt, rows[:, c0:c1], out=piece)
        out[:, c0:c1].copy_(piece)
    return out


def gram(block: Tensor, sharding: Sharding | None = None) -> Tensor:
    """``blockᵀ block`` of an ``(n, b)`` block: float64, on the host, summed over the shards.

    On a CPU float32 blocks are summed in float64 over float32 chunks of ``2¹²`` rows: one float32
    GEMM over 5·10⁶ rows was measured 3e-3 off, and chunks of ``2¹⁸`` left CholeskyQR's columns of
    11 M entries orthonormal only to 6e-5 (``2¹²``: 2e-7). On an accelerator chunks of ``2²⁰``
    rows are converted to float64 first (no TF32 either). One pass over the block.
    """
    b = block.shape[1]
    if block.dtype == torch.float64:
        total = (block.T @ block).cpu()
    else:
        total = torch.zeros(b, b, dtype=torch.float64, device=block.device)
        cpu = block.device.type == "cpu"
        chunk = _GRAM_CHUNK if cpu else 1 << 20  # few launches on an accelerator
        for c0 in range(0, block.shape[0], chunk):
            piece = block[c0 : c0 + chunk]
            if not cpu:  # in float64: large chunks, and no TF32 GEMM
                piece = piece.to(torch.float64)
            total += (piece.T @ piece).to(torch.float64)
        total = total.cpu()
    return total if sharding is None else sharding.reduce(total)


def orthonormal_columns(block: Tensor, sharding: Sharding | None = None) -> tuple[Tensor, Tensor]:
    """``Q, R`` with orthonormal columns ``Q`` spanning an ``(n, b)`` block's, ``block = QR``.

    CholeskyQR on the accurate Gram matrix (:func:`gram`; one all-reduce when sharded), with a
    second pass only when the block's condition number exceeds 2 (CholeskyQR's error grows with
    its square). A pass reads the block once and writes ``Q`` once; on float32 blocks of
    11 M × 6 and × 10 entries ``Q`` came out orthonormal to 5e-8–2e-7, where Householder QR
    (``torch.linalg.qr``, as long or longer) left 7e-4: its float32 norms over 10⁷ entries.
    ``Q``'s columns are contiguous rows (a column view of ``(b, n)``). A numerically
    rank-deficient block (Cholesky fails, or a diagonal under ``√ε`` of the largest) goes to
    Householder QR, or when sharded to Gram–Schmidt column by column (twice), where a column that
    adds no new direction becomes zero with a zero diagonal entry of ``R``, which callers treat
    as a breakdown.
    """
    if block.shape[1] == 0:
        return block, torch.zeros(0, 0, dtype=block.dtype, device=block.device)
    eps = torch.finfo(block.dtype).eps
    q, r_total = block, torch.eye(block.shape[1], dtype=torch.float64)
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(gram(q, sharding), upper=True)
        diag = chol.diagonal()
        # Conditioning beyond 1/√ε leaves CholeskyQR's columns far from orthogonal.
        if int(info) != 0 or bool((diag <= math.sqrt(eps) * diag.max()).any()):
            if sharding is None:
                q, r = torch.linalg.qr(block)
                return q, r
            return _gram_schmidt_columns(block, sharding)
        q = combine_rows(q.T, torch.linalg.inv(chol)).T  # q R⁻¹, as contiguous rows
        r_total = chol @ r_total
        if float(torch.linalg.cond(chol)) <= 2.0:  # well conditioned: one pass is accurate
            break
    return q, r_total.to(dtype=block.dtype, device=block.device)


def _gram_schmidt_columns(block: Tensor, sharding: Sharding | None) -> tuple[Tensor, Tensor]:
    """Gram–Schmidt (twice) column by column; a dependent column becomes zero, ``R[i, i] = 0``."""
    b = block.shape[1]
    q = torch.zeros_like(block)
    r = torch.zeros(b, b, dtype=torch.float64)
    scale = float(column_norms(block, sharding).max()) if b else 0.0
    for i in range(b):
        x = block[:, i].clone()
        for _ in range(2):
            if i:
                h = coefficients(q[:, :i].T, x, sharding)
                x -= q[:, :i] @ h
                r[:i, i] += h.to(torch.float64).cpu()
        norm = vector_norm(x, sharding)
        if norm > 100 * torch.finfo(block.dtype).eps * max(scale, 1e-300):
            q[:, i] = x / norm
            r[i, i] = norm
    return q, r.to(dtype=block.dtype, device=block.device)


def project_out(w: Tensor, basis: Tensor, sharding: Sharding | None = None) -> tuple[Tensor, float]:
    """Remove from ``w`` (a vector ``(n,)``, in place) its components along the rows of ``basis``.

    One classical Gram–Schmidt pass, and a second only when the first cancelled more than
    ``1 − DGKS`` of ``w``'s norm (then rounding in the first pass may have left components of
    relative size ``ε · ‖w_before‖ / ‖w_after‖``).

    Args:
        w: the vector, overwritten.
        basis: ``(j, n)`` orthonormal rows.
        sharding: how the vectors are split over processes (``None``: whole here).

    Returns:
        ``(h, before)``: the total coefficients ``basis @ w_original`` (``(j,)``, ``w``'s dtype)
        and ``‖w‖`` before the projection.
    """
    before = vector_norm(w, sharding)
    h = coefficients(basis, w, sharding)
    w.addmv_(basis.T, h, alpha=-1.0)
    if vector_norm(w, sharding) < DGKS * before:
        h2 = coefficients(basis, w, sharding)
        w.addmv_(basis.T, h2, alpha=-1.0)
        h += h2
    return h, before


def project_out_block(
    w: Tensor, basis: Tensor, sharding: Sharding | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`project_out` for an ``(n, b)`` block (in place).

    Returns:
        ``(h, before)``: coefficients ``(j, b)`` and the column norms before the projection.
    """
    before = column_norms(w, sharding)
    h = coefficients(basis, w, sharding)
    w.addmm_(basis.T, h, alpha=-1.0)
    if bool((column_norms(w, sharding) < DGKS * before).any()):
        h2 = coefficients(basis, w, sharding)
        w.addmm_(basis.T, h2, alpha=-1.0)
        h += h2
    return h, before


def orthogonality_threshold(eps: float) -> float:
    """Level to which a Lanczos vector is reorthogonalised once :func:`semi_orthogonality` is lost.

    ``ε^(3/4)`` (Larsen's PROPACK choice): when a new vector's largest inner product with the
    basis exceeds ``√ε``, every component above ``ε^(3/4)`` is subtracted, so that the next loss
    of semi-orthogonality is many steps away.

    Args:
        eps: unit roundoff of the basis' dtype.

    Returns:
        The threshold.
    """
    return float(eps**0.75)


def semi_orthogonality(eps: float, tol: float) -> float:
    """Largest ``|v_iᵀ v_j|`` a Lanczos basis may reach before a vector is reorthogonalised.

    The solve's tolerance clamped to ``[ε^(3/4), √ε]``. Below ``√ε`` (semi-orthogonality, Simon
    1984; PROPACK's trigger) the Ritz values are those of an orthonormal projection of ``A + E``
    with ``‖E‖ = O(ε ‖A‖)``: accurate to working precision, free of ghost copies. The residuals
    read off the recurrence, ``β |s_j|``, are off for the returned Ritz vectors by what the
    reorthogonalisations subtracted (kept out of the projected matrix), up to about the
    trigger, so a trigger at most ``tol`` keeps the stopping test honest to about ``tol``. Float32
    Hessian-vector products are not exactly symmetric: their own error leaves inner products of
    ~1e-5 between Lanczos vectors at every step, above ``ε^(3/4)`` (6e-6), where a fixed trigger
    fired on that noise at almost every step and bought no accuracy.

    Args:
        eps: unit roundoff of the basis' dtype.
        tol: the solve's relative residual tolerance.

    Returns:
        The trigger.
    """
    return float(min(math.sqrt(eps), max(eps**0.75, tol)))
