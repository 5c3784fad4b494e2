"""Curvature operators: symmetric linear maps on flat parameter vectors.

Solvers in :mod:`lightning_landscape.solvers` only see the small :class:`CurvatureOperator`
interface (``size``, ``dtype``, ``device``, ``matvec``, ``matmat``), so they work on any symmetric
operator: the loss Hessian of a model (:class:`HessianOperator`), an explicit matrix
(:class:`MatrixOperator`, for tests and for users who already hold a matrix), or the mean of the
ranks' operators under data parallelism (:class:`DistributedOperator`).
"""

from .base import (
    CurvatureOperator,
    MatrixOperator,
    ScaledOperator,
    Sharding,
    default_max_basis,
)
from .batches import (
    batch_size,
    iter_tensors,
    join_batches,
    map_tensors,
    normal_tensors,
    slice_batch,
    split_batch,
    take_batch,
    tensor_paths,
)
from .distributed import DistributedOperator, ProbeFailure
from .hessian import ROUTES, HessianOperator, HVPRoute
from .loss import LossFn, LossModule, check_scalar_loss
from .params import differentiable, restored_parameters, select_parameters

__all__ = [
    "ROUTES",
    "CurvatureOperator",
    "DistributedOperator",
    "HVPRoute",
    "HessianOperator",
    "LossFn",
    "LossModule",
    "MatrixOperator",
    "ProbeFailure",
    "ScaledOperator",
    "Sharding",
    "batch_size",
    "check_scalar_loss",
    "default_max_basis",
    "differentiable",
    "iter_tensors",
    "join_batches",
    "map_tensors",
    "normal_tensors",
    "restored_parameters",
    "select_parameters",
    "slice_batch",
    "split_batch",
    "take_batch",
    "tensor_paths",
]
