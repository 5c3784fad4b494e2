"""Curvature operators: symmetric linear maps on flat parameter vectors.

Solvers in :mod:`lightning_landscape.solvers` only see the small :class:`CurvatureOperator`
interface (``size``, ``dtype``, ``device``, ``matvec``, ``matmat``), so they work on any symmetric
operator: the loss Hessian of a model (:class:`HessianOperator`) or an explicit matrix
(:class:`MatrixOperator`, for tests and for users who already hold a matrix).
"""

from .base import CurvatureOperator, MatrixOperator, default_max_basis
from .data import (
    LossFn,
    batch_size,
    check_scalar_loss,
    restored_parameters,
    select_parameters,
    split_batch,
)
from .hessian import _ROUTES, HessianOperator, HVPRoute

__all__ = [
    "_ROUTES",
    "CurvatureOperator",
    "HVPRoute",
    "HessianOperator",
    "LossFn",
    "MatrixOperator",
    "batch_size",
    "check_scalar_loss",
    "default_max_basis",
    "restored_parameters",
    "select_parameters",
    "split_batch",
]
