"""The loss Hessian of a model sharded by FSDP2 (``fully_shard``), on vectors kept sharded.

Under FSDP2 every parameter is a ``DTensor``: each process stores a slice of it (its *shard*)
and the whole parameter exists only inside a module's forward and backward pass, all-gathered
and freed again. Second-order autograd does not reach the sharded parameters (the all-gather is
not differentiated, so ``torch.autograd.grad`` reports them unused), but first-order gradients
do, through FSDP's own reduce-scatter into ``.grad``. So the products here are central finite
differences of gradients, ``Hv ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε``, and every vector stays
sharded: a process perturbs only its own slice of θ, and the next forward pass all-gathers the
perturbed parameters everywhere. Inner products are summed over the processes
(:class:`~lightning_landscape.operators.Sharding`), so memory per process for the solvers'
vectors falls with the number of processes.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .base import CurvatureOperator, Sharding
from .batches import batch_size, normal_tensors
from .differences import GradientDifference
from .distributed import ProbeFailure, all_reduce, collective_device, count_failures
from .hessian import HVPRoute
from .loss import LossFn, check_scalar_loss
from .params import restored_parameters, select_parameters


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter sharded by FSDP2 or tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return False
    return isinstance(tensor, DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """This process's slice of a ``DTensor`` (a view sharing its storage), else ``tensor``."""
    if is_sharded(tensor):
        local: Tensor = tensor.to_local()  # type: ignore[attr-defined]
        return local
    return tensor


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that FSDP2's ``fully_shard`` was applied to."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """Free every parameter FSDP2 holds all-gathered, so the next forward gathers current values.

    FSDP2 keeps a root module's parameters gathered after a forward pass that no backward pass
    follows (e.g. one under ``no_grad``); while gathered, the module's parameters are the whole
    tensors, not the sharded ``DTensor`` s, and a change to the shards would not be seen. A no-op
    for a model without ``fully_shard``.
    """
    for module in fsdp_modules(model):
        module.reshard()  # type: ignore[operator]


def check_fsdp2_parameters(named: Sequence[tuple[str, Tensor]]) -> None:
    """Check that the probed parameters are sharded the way :class:`ShardedHessianOperator` needs.

    Args:
        named: ``(name, parameter)`` pairs.

    Raises:
        ValueError: naming the first parameter that is not a ``DTensor`` (not managed by
            ``fully_shard``), is frozen, is not sharded along one data-parallel mesh dimension
            (tensor parallelism, HSDP), or is not floating point.
    """
    from torch.distributed.tensor import Shard

    for name, p in named:
        if not is_sharded(p):
            raise ValueError(
                f"parameter {name!r} is not sharded (not a DTensor): apply fully_shard to the "
                "module that owns it in configure_model (e.g. fully_shard(self) last), so "
                "every probed parameter is managed by FSDP2."
            )
        placements = p.placements  # type: ignore[attr-defined]
        if len(placements) != 1 or not isinstance(placements[0], Shard):
            raise ValueError(
                f"parameter {name!r} has placements {placements}: the monitor supports FSDP2 "
                "sharding over one data-parallel mesh dimension (no tensor parallelism or "
                "HSDP); probe it with params= excluding it."
            )
        if not p.requires_grad:
            raise ValueError(
                f"parameter {name!r} is frozen: under FSDP2 the probe's gradients come from "
                "FSDP's backward, which skips frozen parameters; probe trainable ones."
            )
        if not p.is_floating_point():
            raise ValueError(f"parameter {name!r} is not floating point ({p.dtype}).")


class ShardedHessianOperator(CurvatureOperator):
    """The Hessian of the probe loss of an FSDP2 model, by finite differences, on sharded vectors.

    Every process builds one with its own probe batches; the operator is the Hessian of the
    sample-weighted mean loss over every process's samples (as :class:`DistributedOperator`
    is under DDP). Vectors are this process's slices of the probed parameters, concatenated in
    :func:`~lightning_landscape.operators.select_parameters` order (:attr:`size` entries here,
    :attr:`global_size` in all); solvers reduce their inner products through :attr:`sharding`.

    A product costs four forward and backward passes per probe batch (two with ``fd_order=2``;
    two more per halving of the step, which the step control keeps for later products),
    FSDP's all-gathers and reduce-scatters included, and two scalar all-reduces. The step is
    ``ε = fd_eps · max(‖θ‖, 1) / ‖v‖`` (norms over the whole vectors, so every process takes the
    same step); see the README for measured errors against the exact single-process route.
    Parameters are perturbed in place and restored bit-for-bit after every product; ``.grad`` of
    every parameter is saved and put back around each gradient.

    FSDP's reduce-scatter averages the processes' gradients, so each process scales its loss by
    ``world · weight / total weight`` before the backward pass; every process runs the same
    number of passes (a process with fewer probe batches repeats its last one with weight 0),
    as FSDP's collectives require.

    Args:
        model: the module, with every probed parameter managed by ``fully_shard``.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: this process's probe batches.
        params: parameter subset, see :func:`select_parameters`.
        weight: this process's weight (default: its number of probe samples).
        fd_eps: relative finite-difference step (default ``ε_mach^(1/3)`` of the dtype, about
            4.9e-3 in float32).
        fd_order: ``4`` (default): Richardson-extrapolated central differences with step
            control, four gradients per vector (two more per halving of the step); ``2``: one
            central difference, two gradients, but an error of order ``ε²`` that reached 3e-2
            along the top eigenvector of a small GPT-2 (see
            :class:`~lightning_landscape.operators.differences.GradientDifference`).
        fd_rtol: the step control's tolerance (order 4).
        group: the process group FSDP shards over (default: the default group).
        timeout: bound on this operator's own all-reduces (FSDP's collectives use the process
            group's timeout).

    Raises:
        ValueError: if a probed parameter is not sharded by FSDP2, no batches are given, the
            weights are invalid, or the loss is not a scalar.

    Example::

        # on every process, with fully_shard applied to the model's blocks and root
        op = ShardedHessianOperator(model, loss_fn, [my_probe_batch])
        top = lanczos(op, k=5)   # the same eigenvalues on every process
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        *,
        params: Sequence[str] | Sequence[Tensor] | None = None,
        weight: float | None = None,
        fd_eps: float | None = None,
        fd_order: int = 4,
        fd_rtol: float = 0.02,
        group: Any | None = None,
        timeout: datetime.timedelta | None = None,
    ) -> None:
        batches = [normal_tensors(b) for b in batches]
        if not batches:
            raise ValueError("ShardedHessianOperator needs at least one probe batch.")
        named = select_parameters(model, params)
        check_fsdp2_parameters(named)
        self.params = [p for _, p in named]
        self.names = [n for n, _ in named]
        self.locals = [local_tensor(p) for p in self.params]
        dtypes = {t.dtype for t in self.locals}
        if len(dtypes) != 1:
            raise ValueError(f"All probed parameters must share one dtype, got {dtypes}.")
        super().__init__(sum(t.numel() for t in self.locals), dtypes.pop(), self.locals[0].device)
        self.model, self.loss_fn = model, loss_fn
        self.group, self.timeout = group, timeout
        self.world = dist.get_world_size(group)
        counts = [float(batch_size(b)) for b in batches]
        own = float(sum(counts)) if weight is None else float(weight)
        if not (own >= 0 and math.isfinite(own)):
            raise ValueError(f"weight must be finite and >= 0, got {weight}")
        # One all-reduce: the total weight, the whole vector's length and the most batches.
        totals = self._sum(torch.tensor([own, float(self.size), 0.0], dtype=torch.float64))
        most = self._sum(torch.tensor([float(len(batches))]), op=dist.ReduceOp.MAX)
        self.total_weight, global_size = float(totals[0]), int(totals[1])
        if not self.total_weight > 0:
            raise ValueError("The total weight over processes must be positive (no probe data?).")
        # Loss scales: FSDP averages over the processes, the operator is the weighted mean.
        share = self.world * own / self.total_weight
        self.scales = [share * c / sum(counts) for c in counts]
        self.batches = list(batches)
        while len(self.batches) < int(most[0]):  # same number of passes on every process
            self.batches.append(self.batches[-1])
            self.scales.append(0.0)
        self.sharding = Sharding(global_size, dist.get_rank(group), self._sum)
        self.difference = GradientDifference(self.dtype, fd_eps, fd_order, fd_rtol)
        self.route: HVPRoute = "finite_difference"
        self.loss_value = self._evaluate_loss()

    # ------------------------------------------------------------------ collectives
    def _sum(self, tensor: Tensor, op: Any = None) -> Tensor:
        """All-reduce (sum by default) over the group, bounded by :attr:`timeout`."""
        moved = tensor.detach().to(collective_device(self.group), copy=True)  # reduced in place
        return all_reduce(moved, self.group, self.timeout, op=op).to(tensor.device)

    # ------------------------------------------------------------------ passes
    def _evaluate_loss(self) -> float:
        local = 0.0
        with torch.no_grad():
            for scale, batch in zip(self.scales, self.batches, strict=True):
                loss = check_scalar_loss(self.loss_fn(self.model, batch))
                local += scale * float(loss)
        reshard(self.model)
        return float(self._sum(torch.tensor([local], dtype=torch.float64))[0]) / self.world

    def _gradient(self) -> Tensor:
        """This process's slice of the gradient of the weighted mean loss (FSDP's backward)."""
        every = list(self.model.parameters())
        saved = [p.grad for p in every]
        for p in every:
            p.grad = None
        try:
            with torch.enable_grad():
                for scale, batch in zip(self.scales, self.batches, strict=True):
                    loss = check_scalar_loss(self.loss_fn(self.model, batch))
                    torch.autograd.backward(loss * scale)  # FSDP reduce-scatters into .grad
                    del loss
            parts = []
            for param, local in zip(self.params, self.locals, strict=True):
                g = param.grad
                parts.append(
                    torch.zeros_like(local).reshape(-1)
                    if g is None
                    else local_tensor(g).reshape(-1).to(self.dtype)
                )
            return torch.cat(parts)
        finally:
            for p, g in zip(every, saved, strict=True):
                p.grad = g
            reshard(self.model)

    def gradient(self) -> Tensor:
        """This process's slice of the probe loss' gradient (the weighted mean over processes).

        Raises:
            ProbeFailure: on every process alike, if the gradient failed on some process.
        """
        error: BaseException | None = None
        try:
            out = self._gradient()
        except Exception as err:
            error, out = err, torch.zeros(self.size, dtype=self.dtype, device=self.device)
        self._agree(error, "gradient")
        return out

    def parameters_flat(self) -> Tensor:
        """This process's slices of the probed parameters, flat (a copy)."""
        return torch.cat([t.detach().reshape(-1) for t in self.locals])

    def _agree(self, error: BaseException | None, what: str) -> None:
        if count_failures(error is not None, self.group, self.timeout):
            if error is not None:
                raise ProbeFailure(f"this process's {what} failed: {error}") from error
            raise ProbeFailure(f"the {what} failed on another process")

    # ------------------------------------------------------------------ products
    def _matmat(self, block: Tensor) -> Tensor:
        out = torch.empty_like(block)
        error: BaseException | None = None
        try:
            with restored_parameters(self.locals) as saved:
                theta = self._norm(saved)
                for j in range(block.shape[1]):
                    out[:, j] = self.difference.hvp(
                        self.locals, saved, block[:, j], self._gradient, theta, self._vector_norm
                    )
        except Exception as err:  # keep the schedule of collectives: agree, then raise
            error = err
        self._agree(error, "Hessian-vector product")
        return out

    def _norm(self, tensors: Sequence[Tensor]) -> float:
        """The norm of the whole vector whose slices here are ``tensors`` (one all-reduce)."""
        local = math.fsum(float((t.double() ** 2).sum()) for t in tensors)
        return math.sqrt(float(self._sum(torch.tensor([local], dtype=torch.float64))[0]))

    def _vector_norm(self, v: Tensor) -> float:
        return self._norm([v])

    def release(self) -> None:
        """Nothing is retained between products: every gradient reshards (operator interface)."""
