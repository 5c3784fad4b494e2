"""The operator interface solvers see, and an explicit-matrix operator."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sharding:
    """How an operator's vectors are split over processes (sharded data parallelism, FSDP2).

    Each process holds its own slice of every vector (its shard of the probed parameters), of
    length :attr:`CurvatureOperator.size`; the whole vector has :attr:`global_size` entries.
    Solvers reduce every inner product over the shards with :attr:`reduce`, so all processes
    take the same decisions and no process ever holds a whole vector.

    Attributes:
        global_size: the dimension of the whole operator (the sum of the shards' sizes).
        rank: this process's index (seeds its private random numbers: the shards of a random
            vector must be independent).
        reduce: ``reduce(t)``: the elementwise sum of ``t`` over the processes (an all-reduce),
            the same shape back.
    """

    global_size: int
    rank: int
    reduce: Callable[[Tensor], Tensor]


class CurvatureOperator(abc.ABC):
    """A symmetric linear operator on flat vectors of length :attr:`size`.

    Subclasses implement :meth:`_matmat`; :meth:`matvec` and :meth:`matmat` validate shapes and
    count applications in :attr:`num_matvecs`. :attr:`sharding` is ``None`` for an operator whose
    vectors are whole on every process; a sharded operator (see :class:`Sharding`) acts on this
    process's slices, and :attr:`size` is the length of a slice.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.size = size
        self.dtype = dtype
        self.device = device
        self.num_matvecs = 0
        self.sharding: Sharding | None = None

    @property
    def batches_blocks(self) -> bool:
        """Whether :meth:`matmat` on a block costs less per vector than one vector at a time.

        ``True`` here (one call can share work across the vectors: a GEMM, a vmapped product, one
        collective); operators that apply a block vector by vector anyway say ``False``, and
        solvers may then feed them one vector at a time through reused buffers.
        """
        return True

    @property
    def global_size(self) -> int:
        """The operator's dimension: :attr:`size`, or the whole vector's length when sharded."""
        return self.size if self.sharding is None else self.sharding.global_size

    def matvec(self, v: Tensor) -> Tensor:
        """Apply the operator to one vector.

        Args:
            v: tensor of shape ``(size,)``.

        Returns:
            ``A @ v``, shape ``(size,)``.

        Raises:
            ValueError: if ``v`` has the wrong shape.
        """
        if v.shape != (self.size,):
            raise ValueError(
                f"matvec expects a vector of shape ({self.size},), got {tuple(v.shape)}"
            )
        self.num_matvecs += 1
        return self._matvec(v)

    def matmat(self, block: Tensor) -> Tensor:
        """Apply the operator to a block of column vectors.

        Args:
            block: tensor of shape ``(size, b)``.

        Returns:
            ``A @ block``, shape ``(size, b)``.

        Raises:
            ValueError: if ``block`` has the wrong shape.
        """
        if block.ndim != 2 or block.shape[0] != self.size:
            raise ValueError(
                f"matmat expects a block of shape ({self.size}, b), got {tuple(block.shape)}"
            )
        self.num_matvecs += block.shape[1]
        return self._matmat(block)

    def matvec_into(self, v: Tensor, out: Tensor) -> Tensor:
        """Apply the operator to one vector, writing ``A @ v`` into ``out``.

        The same product as :meth:`matvec`, counted the same way. Operators that can accumulate
        their product in place (the double-backward route of
        :class:`~lightning_landscape.operators.HessianOperator`) then need no vector-sized
        temporary: at 10⁷ parameters one float32 vector is 40 MB. Others copy.

        Args:
            v: tensor of shape ``(size,)``.
            out: tensor of shape ``(size,)``, not overlapping ``v``; overwritten.

        Returns:
            ``out``.

        Raises:
            ValueError: if ``v`` or ``out`` has the wrong shape.
        """
        if v.shape != (self.size,) or out.shape != (self.size,):
            raise ValueError(
                f"matvec_into expects vectors of shape ({self.size},), got {tuple(v.shape)} "
                f"and {tuple(out.shape)}"
            )
        self.num_matvecs += 1
        return self._matvec_into(v, out)

    def _matvec(self, v: Tensor) -> Tensor:
        return self._matmat(v.unsqueeze(1)).squeeze(1)

    def _matvec_into(self, v: Tensor, out: Tensor) -> Tensor:
        return out.copy_(self._matvec(v))

    @abc.abstractmethod
    def _matmat(self, block: Tensor) -> Tensor: ...

    def __matmul__(self, x: Tensor) -> Tensor:
        """``op @ x`` for a vector or a block."""
        return self.matvec(x) if x.ndim == 1 else self.matmat(x)


class MatrixOperator(CurvatureOperator):
    """An explicit symmetric matrix as a :class:`CurvatureOperator`.

    Args:
        matrix: square, symmetric tensor.

    Raises:
        ValueError: if ``matrix`` is not square.

    Example:
        >>> import torch
        >>> from lightning_landscape.operators import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0])))
        >>> op @ torch.tensor([1.0, 1.0])
        tensor([3., 1.])
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, block: Tensor) -> Tensor:
        return self.matrix @ block


class ScaledOperator(CurvatureOperator):
    """``S^½ (A + diag(shift)) S^½`` for an operator ``A`` and a non-negative scale per entry.

    With ``S = η / P`` for an optimizer's preconditioner ``P`` this is the preconditioned
    Hessian ``P^{-1/2} H P^{-1/2}`` (η folded in): symmetric, with the spectrum of ``η P⁻¹H``,
    so the same Lanczos solvers give its top eigenvalue. Each product costs one product of
    ``A``.

    Args:
        inner: the operator ``A``.
        scale: ``(size,)`` non-negative entries ``S``.
        shift: ``(size,)`` entries added to ``A``'s diagonal first (e.g. a coupled L2
            coefficient), or ``None``.

    Raises:
        ValueError: on a shape mismatch or a negative or non-finite scale.

    Example:
        >>> import torch
        >>> a = MatrixOperator(torch.diag(torch.tensor([1.0, 2.0])))
        >>> ScaledOperator(a, torch.tensor([4.0, 0.25])) @ torch.tensor([1.0, 1.0])
        tensor([4.0000, 0.5000])
    """

    def __init__(
        self, inner: CurvatureOperator, scale: Tensor, shift: Tensor | None = None
    ) -> None:
        super().__init__(inner.size, inner.dtype, inner.device)
        self.sharding = inner.sharding  # the scale is over the same (local) entries
        if scale.shape != (inner.size,) or (shift is not None and shift.shape != scale.shape):
            raise ValueError(f"scale and shift must have shape ({inner.size},)")
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise ValueError("scale must hold finite, non-negative entries")
        self.inner = inner
        self.root = scale.sqrt().to(device=inner.device, dtype=inner.dtype).reshape(-1, 1)
        self.diagonal = None
        if shift is not None:
            self.diagonal = (shift * scale).to(device=inner.device, dtype=inner.dtype)

    @property
    def batches_blocks(self) -> bool:
        """As the inner operator."""
        return self.inner.batches_blocks

    def _matmat(self, block: Tensor) -> Tensor:
        out = self.root * self.inner.matmat(self.root * block)
        if self.diagonal is not None:
            out = out + self.diagonal.reshape(-1, 1) * block
        return out


def default_max_basis(k: int, n: int) -> int:
    """Default bound on the Krylov basis size for ``k`` wanted eigenpairs of an ``n``-dim operator.

    Args:
        k: number of wanted eigenpairs.
        n: operator dimension.

    Returns:
        ``min(n, max(2k + 10, 20))``.
    """
    return min(n, max(2 * k + 10, 20))
