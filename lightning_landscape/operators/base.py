"""The operator interface solvers see, and an explicit-matrix operator."""

from __future__ import annotations

import abc

import torch
from torch import Tensor


class CurvatureOperator(abc.ABC):
    """A symmetric linear operator on flat vectors of length :attr:`size`.

    Subclasses implement :meth:`_matmat`; :meth:`matvec` and :meth:`matmat` validate shapes and
    count applications in :attr:`num_matvecs`.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.size = size
        self.dtype = dtype
        self.device = device
        self.num_matvecs = 0

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

    def _matvec(self, v: Tensor) -> Tensor:
        return self._matmat(v.unsqueeze(1)).squeeze(1)

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


def default_max_basis(k: int, n: int) -> int:
    """Default bound on the Krylov basis size for ``k`` wanted eigenpairs of an ``n``-dim operator.

    Args:
        k: number of wanted eigenpairs.
        n: operator dimension.

    Returns:
        ``min(n, max(2k + 10, 20))``.
    """
    return min(n, max(2 * k + 10, 20))
