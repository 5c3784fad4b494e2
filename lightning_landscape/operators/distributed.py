"""Curvature across processes: one all-reduce per product, and failures every rank agrees on.

Under data parallelism each rank holds a shard of the probe data. :class:`DistributedOperator`
wraps the rank's local operator (the Hessian of the mean loss on its shard) and returns the
sample-weighted mean over ranks, i.e. the Hessian of the mean loss on the union of the shards:

    H v = Σ_r (n_r / N) H_r v,         N = Σ_r n_r.

Each product costs **one all-reduce of ``(size + 1) × b`` values** for a block of ``b`` vectors:
the weighted local product plus one row carrying a failure flag. Because the reduced result is
identical on every rank, and solvers draw their random vectors from seeded private generators,
every rank runs the same iterations and takes the same decisions (converged, restart, stop), so
no rank ever waits on a collective the others skipped. If a rank's local product raises (out of
memory, a bug in the loss), it contributes zeros and sets the flag; every rank then raises
:class:`ProbeFailure` after the same all-reduce. NaN/inf anywhere propagates through the sum, so
every rank sees a non-finite result at the same time.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .base import CurvatureOperator


class ProbeFailure(RuntimeError):
    """A probe failed on some rank; raised on every rank at the same collective."""


def distributed_world(group: Any | None = None) -> int:
    """Number of processes in ``group`` (1 when torch.distributed is not initialised).

    Args:
        group: a process group, or ``None`` for the default group.

    Returns:
        The world size, or 1 outside an initialised process group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def all_reduce(
    tensor: Tensor,
    group: Any | None = None,
    timeout: datetime.timedelta | None = None,
    op: Any = None,
) -> Tensor:
    """Reduce ``tensor`` over the ranks of ``group`` in place (default: sum), within ``timeout``.

    Args:
        tensor: the local contribution (replaced by the sum).
        group: a process group, or ``None`` for the default group.
        timeout: raise instead of waiting longer than this for the other ranks.
        op: another ``torch.distributed.ReduceOp`` (e.g. ``MAX``) instead of the sum.

    Returns:
        ``tensor``, now holding the reduction.
    """
    op = dist.ReduceOp.SUM if op is None else op
    if timeout is None:
        dist.all_reduce(tensor, op=op, group=group)
    else:
        work = dist.all_reduce(tensor, op=op, group=group, async_op=True)
        assert work is not None
        work.wait(timeout)
    return tensor


def agree_on_failure(
    failed: bool, group: Any | None = None, timeout: datetime.timedelta | None = None
) -> bool:
    """Whether any rank failed: one all-reduce of a flag, so all ranks decide alike.

    Args:
        failed: this rank's verdict.
        group: a process group, or ``None`` for the default group.
        timeout: bound on the wait for the other ranks.

    Returns:
        ``True`` on every rank if any rank passed ``failed=True``; ``failed`` itself when not
        running distributed.
    """
    return count_failures(failed, group, timeout) > 0


def count_failures(
    failed: bool, group: Any | None = None, timeout: datetime.timedelta | None = None
) -> int:
    """How many ranks failed: one all-reduce of a flag, so all ranks decide alike.

    Args:
        failed: this rank's verdict.
        group: a process group, or ``None`` for the default group.
        timeout: bound on the wait for the other ranks.

    Returns:
        The number of ranks that passed ``failed=True`` (0 or 1 when not running distributed).
    """
    if distributed_world(group) == 1:
        return int(failed)
    device = collective_device(group)
    flag = torch.tensor([1.0 if failed else 0.0], dtype=torch.float64, device=device)
    return round(float(all_reduce(flag, group, timeout).item()))


def weighted_mean(
    value: float, weight: float, group: Any | None = None, timeout: datetime.timedelta | None = None
) -> float:
    """The ``weight``-weighted mean of a scalar over ranks.

    Args:
        value: this rank's value.
        weight: this rank's weight (e.g. its number of samples).
        group: a process group, or ``None`` for the default group.
        timeout: bound on the wait for the other ranks.

    Returns:
        ``Σ w_r x_r / Σ w_r``; ``value`` itself when not running distributed.
    """
    if distributed_world(group) == 1:
        return value
    device = collective_device(group)
    both = torch.tensor([value * weight, weight], dtype=torch.float64, device=device)
    all_reduce(both, group, timeout)
    return float(both[0] / both[1])


def weighted_mean_tensor(
    compute: Callable[[], Tensor],
    weight: float,
    like: Tensor,
    group: Any | None = None,
    timeout: datetime.timedelta | None = None,
) -> Tensor:
    """The ``weight``-weighted mean over ranks of a tensor each rank computes, failures agreed.

    Like :class:`DistributedOperator`'s products: a rank whose ``compute()`` raises contributes
    zeros and a flag to the one all-reduce, so no rank waits on it, and every rank raises.

    Args:
        compute: computes this rank's tensor (shaped and typed like ``like``).
        weight: this rank's weight (e.g. its number of samples).
        like: a tensor of the result's shape, dtype and device.
        group: a process group, or ``None`` for the default group.
        timeout: bound on the wait for the other ranks.

    Returns:
        ``Σ w_r t_r / Σ w_r`` (``compute()`` itself when not running distributed).

    Raises:
        ProbeFailure: on every rank, if ``compute()`` raised on any rank.
    """
    if distributed_world(group) == 1:
        return compute()
    error: BaseException | None = None
    try:
        local = compute().reshape(-1) * weight
    except Exception as err:
        error, local = err, torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
    tail = torch.tensor([weight, 1.0 if error is not None else 0.0], dtype=like.dtype)
    packed = torch.cat([local, tail.to(local.device)]).to(collective_device(group))
    reduced = all_reduce(packed, group, timeout).to(like.device)
    if error is not None:
        raise ProbeFailure(f"this rank's computation failed: {error}") from error
    if bool(reduced[-1] > 0):
        raise ProbeFailure("the computation failed on another rank")
    return (reduced[:-2] / reduced[-2]).reshape(like.shape)


def max_over_ranks(
    value: float, group: Any | None = None, timeout: datetime.timedelta | None = None
) -> float:
    """The largest of a scalar over ranks (``value`` itself when not running distributed).

    Args:
        value: this rank's value.
        group: a process group, or ``None`` for the default group.
        timeout: bound on the wait for the other ranks.

    Returns:
        ``max_r x_r``.
    """
    if distributed_world(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device(group))
    return float(all_reduce(t, group, timeout, op=dist.ReduceOp.MAX)[0])


def collective_device(group: Any | None) -> torch.device:
    """Where ``group``'s collectives take their tensors: the current GPU for NCCL, else the CPU."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DistributedOperator(CurvatureOperator):
    """The sample-weighted mean over ranks of each rank's local curvature operator.

    Args:
        local: this rank's operator (e.g. a :class:`~lightning_landscape.HessianOperator` on its
            shard of the probe data). All ranks must use the same parameter layout.
        weight: this rank's weight, normally its number of probe samples (may be 0 for a rank
            without data, as long as the total is positive).
        group: the process group (default: the default group).
        timeout: bound on every collective; a rank that waits longer raises instead of hanging.

    Construction costs two small all-reduces (a MAX over 3 numbers checking that every rank has
    the same operator size and a valid weight, and the SUM of the weights); every product then
    costs one all-reduce of ``(size + 1) × b`` numbers.

    Raises:
        ValueError: on every rank alike, if any rank's weight is negative or not finite, the
            total weight is not positive, or the ranks' operator sizes differ.

    Example::

        # on every rank, inside an initialised process group
        local = HessianOperator(model, loss_fn, [my_shard])
        op = DistributedOperator(local, weight=len(my_shard))
        top = lanczos(op, k=5)   # identical on every rank
    """

    def __init__(
        self,
        local: CurvatureOperator,
        weight: float,
        *,
        group: Any | None = None,
        timeout: datetime.timedelta | None = None,
    ) -> None:
        super().__init__(local.size, local.dtype, local.device)
        self.local = local
        self.group = group
        self.timeout = timeout
        self.world_size = distributed_world(group)
        self.num_all_reduces = 0
        self.floats_reduced = 0
        # Handshake, so every rank takes the same decision: the largest and smallest operator
        # size (MAX of [s, -s]) and whether any weight is negative, then the total weight.
        bad = not (weight >= 0 and math.isfinite(weight))
        checks = torch.tensor(
            [float(local.size), -float(local.size), 1.0 if bad else 0.0],
            dtype=torch.float64,
            device=self._comm_device(),
        )
        self._reduce(checks, dist.ReduceOp.MAX)
        if checks[2] > 0:
            raise ValueError(f"Every rank's weight must be finite and >= 0 (this rank: {weight}).")
        if checks[0] != -checks[1]:
            raise ValueError(
                f"The ranks' operators differ in size ({int(-checks[1])} to {int(checks[0])}): "
                "every rank must probe the same parameters."
            )
        total = torch.tensor([float(weight)], dtype=torch.float64, device=self._comm_device())
        self._reduce(total)
        self.total_weight = float(total[0])
        if not self.total_weight > 0:
            raise ValueError("The total weight over ranks must be positive (no probe data?).")
        self.weight = float(weight)

    def _comm_device(self) -> torch.device:
        if self.world_size == 1:
            return self.device
        backend = dist.get_backend(self.group)
        return self.device if backend == "nccl" else torch.device("cpu")

    def _reduce(self, tensor: Tensor, op: Any = None) -> Tensor:
        if self.world_size == 1:
            return tensor
        self.num_all_reduces += 1
        self.floats_reduced += tensor.numel()
        return all_reduce(tensor, self.group, self.timeout, op=op)

    def _matmat(self, block: Tensor) -> Tensor:
        b = block.shape[1]
        error: BaseException | None = None
        try:
            local = self.local.matmat(block) * (self.weight / self.total_weight)
        except Exception as err:  # keep the collective schedule: contribute zeros + a flag
            error = err
            local = torch.zeros_like(block)
        flag = torch.full((1, b), 1.0 if error is not None else 0.0, dtype=block.dtype)
        packed = torch.cat([local, flag.to(local.device)], dim=0)
        comm = self._comm_device()
        reduced = self._reduce(packed.to(comm)).to(block.device)
        if error is not None:
            raise ProbeFailure(f"this rank's Hessian-vector product failed: {error}") from error
        if bool(reduced[-1, 0] > 0):
            raise ProbeFailure("another rank's Hessian-vector product failed")
        return reduced[:-1]

    def release(self) -> None:
        """Release the local operator's retained graphs, if it has any."""
        release = getattr(self.local, "release", None)
        if callable(release):
            release()
