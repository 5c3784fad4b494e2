"""The loss Hessian on fixed probe data, with exact and finite-difference product routes."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._validate import choice, integer
from .base import CurvatureOperator
from .batches import batch_size, iter_tensors, normal_tensors
from .differences import GradientDifference
from .loss import LossFn, LossModule, check_scalar_loss
from .params import differentiable, restored_parameters, select_parameters

# Per model, the products whose compilation failed (probed parameters, block width, batch shapes):
# later operators on them (a monitor builds one per round) take "functorch" at once.
_UNCOMPILABLE: weakref.WeakKeyDictionary[nn.Module, set[tuple[Any, ...]]] = (
    weakref.WeakKeyDictionary()
)

HVPRoute = Literal["auto", "functorch", "compiled", "double_backward", "finite_difference"]
ROUTES: tuple[HVPRoute, ...] = (
    "auto",
    "functorch",
    "compiled",
    "double_backward",
    "finite_difference",
)


class HessianOperator(CurvatureOperator):
    """Hessian of ``loss_fn(model, batch)`` w.r.t. a parameter subset, on fixed probe data.

    Four routes compute Hessian-vector products, three of them exact:

    * ``"double_backward"`` (Pearlmutter): the gradient graph of a batch (forward, then backward
      with ``create_graph``) is differentiated once more per product; blocks use
      ``is_grads_batched`` when possible. See ``retain_graph`` for whether graphs are kept.
    * ``"functorch"``: forward-over-reverse ``jvp(grad(loss))`` via :mod:`torch.func`, batched
      over a block of vectors with ``vmap``, recomputed on every product one batch at a time.
      Needs a model that ``torch.func`` can trace (e.g. no NumPy conversion of activations or
      in-place updates of module state inside the loss).
    * ``"compiled"``: the ``"functorch"`` product through :func:`torch.compile` (the whole
      forward-over-reverse product in one graph, as curvlinops compiles it; blocks through a
      compiled ``vmap``; ``logging`` calls inside the loss are skipped while tracing). Each new
      block width and batch shape compiles once, on its first product (a minute or more for an
      11 M ResNet-18 or a 27 M GPT on a 2-core CPU; a monitor's first round compiles a few:
      its product check's block, single vectors, the trace's block); later operators on the
      same model, parameters and shapes reuse the compiled code. Where compiling fails (a graph
      break, an operation dynamo cannot trace, the recompilation limit) and the uncompiled
      product works, the operator warns and continues on ``"functorch"``, and so do later
      operators on the same model, parameters, width and batch shapes, without trying again
      (e.g. a parameter subset of a Hugging Face GPT-2 failed in dynamo at its LayerNorm,
      torch 2.13; the whole model compiles). Out of memory is raised as it is. Under DDP each
      rank compiles inside the round: give the monitor a ``collective_timeout`` above the
      compilation time. ``"auto"`` does not pick it: on the CPU a single product measured no
      faster than the double backward (ResNet-18 0.22 s against 0.19 s, a 27 M GPT 2.54 s
      against 2.54 s; only blocks on the GPT were faster, 2.01 s per vector against 2.35 s),
      and it has not been measured on a GPU yet (``benchmarks/gpu_suite.py`` times it there).

    ``"auto"`` (default) uses ``"double_backward"`` on the CPU (measured 2-3× faster there, see
    ``benchmarks/RESULTS.md``); on accelerators (or with ``calibrate=True``) it times both routes on
    the first product and keeps the faster one, falling back to ``"double_backward"`` if
    ``torch.func`` fails on the model. The calibration's
    extra products are counted in :attr:`num_matvecs` (the operator's total cost), not in the
    ``num_hvps`` of solver results.

    Probed parameters may be frozen (``requires_grad=False``) when selected explicitly; they are
    differentiated all the same and stay frozen.

    * ``"finite_difference"``: central differences of first-order gradients,
      ``(∇L(θ + εv) − ∇L(θ − εv)) / 2ε``, Richardson-extrapolated with step control
      (``fd_order``), four gradients per vector or more, for settings where second-order
      autograd is unavailable. The parameters are perturbed in place and restored bit-for-bit
      after every product. The nominal ``ε = fd_eps · max(‖θ‖, 1) / ‖v‖`` with ``fd_eps``
      defaulting to ``ε_mach^(1/3)`` of the parameter dtype (about 4.9e-3 in float32, 6e-6 in
      float64). It is approximate: see the README for its measured accuracy against the exact
      routes. Never chosen by ``"auto"``.

    With several batches the operator is the sample-weighted mean of the per-batch Hessians, i.e.
    the Hessian of the mean loss over the union of the batches (exact for models whose forward
    pass does not couple samples, e.g. no BatchNorm in train mode).

    Memory cap: every route processes the batches one at a time, so passing a large probe batch as
    micro-batches (:func:`~lightning_landscape.operators.split_batch`) bounds the probe's peak
    memory by that of one micro-batch, provided the double-backward route does not retain its
    graphs (``retain_graph=False``, the default with several batches). Retaining them holds the
    activations and gradient graph of every batch for the operator's lifetime (until
    :meth:`release`), which is the memory of the whole batch again.

    Use it inside :func:`lightning_landscape.curvature_context` so the model is in a deterministic
    mode and training state is restored afterwards.

    Args:
        model: the module (its parameters are read, never modified).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: the probe batches (a sequence; wrap a single batch in a list).
        params: parameter subset, see :func:`select_parameters`.
        weights: per-batch weights; default the number of samples in each batch.
        route: ``"auto"``, ``"functorch"``, ``"compiled"``, ``"double_backward"`` or
            ``"finite_difference"``.
        max_block: largest number of vectors pushed through one vmapped product.
        fd_eps: relative step of the finite-difference route (default ``ε_mach^(1/3)``).
        fd_order: the finite-difference route's scheme: ``4`` (default), Richardson-extrapolated
            central differences with step control (four gradients per vector, two more per
            halving of the step); ``2``, one central difference at the nominal step (two
            gradients, error of order ``ε²``: 99 % along the top eigenvector of a GPT whose
            embedding table dominates ``‖θ‖``). See
            :class:`~lightning_landscape.operators.differences.GradientDifference`.
        fd_rtol: the step control's tolerance on the ``ε²`` term (order 4).
        calibrate: with ``route="auto"``, time both routes on the first product (``True``) or
            take ``"double_backward"`` directly (``False``); default ``True`` except on the CPU.
        retain_graph: double-backward route only. ``True`` builds each batch's gradient graph
            once and keeps it, so a product costs one backward pass per batch, but the graphs of
            all batches stay in memory together. ``False`` rebuilds the graph of one batch at a
            time on every product and frees it before the next batch, so peak memory is that of
            one batch, at the price of one extra forward and backward pass per batch per
            product. ``None`` (default): ``True`` for a single batch (nothing to save by
            rebuilding), ``False`` for several (a memory cap, see above).

    Raises:
        ValueError: for an unknown route, no batches, mixed parameter dtypes/devices, a
            non-positive weight, or a loss that is not a scalar.
        TypeError: if ``retain_graph`` is not a bool or None.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_landscape.operators import HessianOperator
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x = torch.eye(2)
        >>> loss_fn = lambda m, b: 0.5 * (m(b) ** 2).sum()
        >>> op = HessianOperator(model, loss_fn, [x])
        >>> op @ torch.tensor([1.0, 0.0])  # H = X^T X = I
        tensor([1., 0.])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        *,
        params: Sequence[str] | Sequence[Tensor] | None = None,
        weights: Sequence[float] | None = None,
        route: HVPRoute = "auto",
        max_block: int = 16,
        fd_eps: float | None = None,
        fd_order: int = 4,
        fd_rtol: float = 0.02,
        calibrate: bool | None = None,
        retain_graph: bool | None = None,
    ) -> None:
        choice("route", route, ROUTES)
        if retain_graph is not None and not isinstance(retain_graph, bool):
            raise TypeError(f"retain_graph must be True, False or None, got {retain_graph!r}")
        integer("max_block", max_block)
        batches = [normal_tensors(b) for b in batches]
        if not batches:
            raise ValueError("HessianOperator needs at least one probe batch.")
        named = select_parameters(model, params)
        dtypes = {p.dtype for _, p in named}
        devices = {p.device for _, p in named}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"All probed parameters must share one dtype and device, got {dtypes} on {devices}."
            )
        size = sum(p.numel() for _, p in named)
        super().__init__(size, dtypes.pop(), devices.pop())
        if weights is None:
            weights = [float(batch_size(b)) for b in batches] if len(batches) > 1 else [1.0]
        if len(weights) != len(batches) or any(not (w > 0) for w in weights):
            raise ValueError("`weights` must hold one positive number per batch.")
        total = float(sum(weights))
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        self.weights = [float(w) / total for w in weights]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.max_block = max_block
        self.difference = GradientDifference(self.dtype, fd_eps, fd_order, fd_rtol)
        self.route: HVPRoute = route
        self.calibrate = calibrate
        self.retain_graph = len(batches) == 1 if retain_graph is None else retain_graph
        self.route_seconds: dict[str, float] = {}
        self._wrapper = LossModule(model, loss_fn)
        self._graphs: list[tuple[list[int], tuple[Tensor, ...]]] | None = None
        self._func_hvps: list[Callable[..., tuple[Tensor, ...]]] | None = None
        self._compiled: dict[bool, list[Callable[..., tuple[Tensor, ...]]]] = {}
        self.loss_value = self._evaluate_loss()

    # ------------------------------------------------------------------ helpers
    def _evaluate_loss(self) -> float:
        with torch.no_grad():
            total = 0.0
            for w, batch in zip(self.weights, self.batches, strict=True):
                total += w * float(check_scalar_loss(self.loss_fn(self.model, batch)).detach())
        return total

    def split(self, flat: Tensor) -> list[Tensor]:
        """Split a flat vector (or a ``(size, b)`` block) into parameter-shaped pieces.

        Args:
            flat: tensor of shape ``(size,)`` or ``(size, b)``.

        Returns:
            One tensor per parameter, shaped like it (with a trailing block dimension moved to
            the front for blocks: ``(b, *shape)``).
        """
        pieces = torch.split(flat, self.numels, dim=0)
        if flat.ndim == 1:
            return [t.view(s) for t, s in zip(pieces, self.shapes, strict=True)]
        b = flat.shape[1]
        # Contiguous pieces: batched products on strided ones copied them inside every op.
        return [t.T.reshape(b, *s).contiguous() for t, s in zip(pieces, self.shapes, strict=True)]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors into one flat vector.

        Args:
            tensors: one tensor per probed parameter.

        Returns:
            The flat vector of length :attr:`size`.
        """
        return torch.cat([t.reshape(-1) for t in tensors])

    def parameters_flat(self) -> Tensor:
        """Current values of the probed parameters as one flat vector (a copy).

        Returns:
            Tensor of shape ``(size,)``.
        """
        return self.flatten([p.detach() for p in self.params])

    def gradient(self) -> Tensor:
        """The gradient of the (weighted) probe loss over the probed parameters, flat.

        One forward and backward pass per batch; the retained Hessian graphs are not touched.

        Returns:
            Tensor of shape ``(size,)``.

        Example:
            >>> import torch
            >>> model = torch.nn.Linear(2, 1, bias=False)
            >>> with torch.no_grad():
            ...     _ = model.weight.fill_(1.0)
            >>> op = HessianOperator(model, lambda m, b: 0.5 * (m(b) ** 2).sum(), [torch.eye(2)])
            >>> op.gradient()  # Xᵀ X w = w
            tensor([1., 1.])
        """
        with torch.enable_grad(), self._differentiable():
            return self._gradient()

    # ------------------------------------------------------------------ double backward
    def _differentiable(self) -> contextlib.AbstractContextManager[None]:
        """Let autograd differentiate w.r.t. probed parameters that are frozen (restored after)."""
        return differentiable(self.params)

    def _batch_graph(self, batch: Any) -> tuple[list[int], tuple[Tensor, ...]]:
        """One batch's gradient graph: indices of gradients that carry a graph, and those."""
        loss = check_scalar_loss(self.loss_fn(self.model, batch))
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        # A gradient without a graph (unused parameter, or one the loss is linear in) has a zero
        # Hessian row: leave it out of the second differentiation.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return live, tuple(grads[i] for i in live)  # type: ignore[misc]

    def _build_graphs(self) -> list[tuple[list[int], tuple[Tensor, ...]]]:
        """The retained gradient graphs of all batches (built on the first call)."""
        if self._graphs is None:
            with self._differentiable():
                self._graphs = [self._batch_graph(batch) for batch in self.batches]
        return self._graphs

    def _each_graph(self, product: Callable[[float, list[int], tuple[Tensor, ...]], None]) -> None:
        """Call ``product(weight, live, grads)`` on every batch's gradient graph, in order.

        Without retained graphs each batch's graph is built here and its last reference dropped
        (`del`) before the next batch's forward pass: one graph alive at a time.
        """
        graphs = self._build_graphs() if self.retain_graph else None
        with self._differentiable():
            for i, (w, batch) in enumerate(zip(self.weights, self.batches, strict=True)):
                live, grads = graphs[i] if graphs is not None else self._batch_graph(batch)
                product(w, live, grads)
                del live, grads

    def _db_matvec_into(self, v: Tensor, out: Tensor) -> Tensor:
        """Every batch's product written straight into ``out``: no vector-sized temporary.

        The first batch's product overwrites ``out`` (no zero-filling pass over it), later ones
        are added to it.
        """
        written = False

        def add(w: float, live: list[int], grads: tuple[Tensor, ...]) -> None:
            nonlocal written
            if live:  # else the loss is at most linear in the probed parameters: H = 0
                self._second_backward(live, grads, v, into=out, alpha=w, accumulate=written)
                written = True

        self._each_graph(add)
        return out if written else out.zero_()

    def _db_matmat(self, block: Tensor) -> Tensor:
        if block.shape[1] == 1:
            out = torch.empty(self.size, dtype=self.dtype, device=self.device)
            return self._db_matvec_into(block[:, 0], out).unsqueeze(1)
        if self._db_one_at_a_time:
            # On a CPU a batched product is no cheaper per vector than a single one, and over
            # many vectors dearer (11 M-parameter ResNet-18, 16 samples, one thread: 0.15 s
            # per vector alone, 0.17 s in pairs, 0.36 s in tens), so with the graphs retained
            # the vectors go one at a time. Without them the batched product builds each
            # batch's graph once for all the vectors.
            rows = torch.empty(block.shape[1], self.size, dtype=self.dtype, device=self.device)
            for j in range(block.shape[1]):
                self._db_matvec_into(block[:, j].contiguous(), rows[j])
            return rows.T
        total: list[Tensor] = []  # the running sum, once the first batch has one

        def add(w: float, live: list[int], grads: tuple[Tensor, ...]) -> None:
            if live:  # else the loss is at most linear in the probed parameters: H = 0
                hv = self._batched_products(live, grads, block)
                # The first batch's product becomes the output itself (no zero-filled buffer, no
                # scaled copy): at 10⁷ parameters every avoided vector-sized temporary saves
                # ~10 ms and 40 MB.
                if total:
                    total[0].add_(hv, alpha=w)
                else:
                    total.append(hv.mul_(w) if w != 1.0 else hv)

        self._each_graph(add)
        return total[0] if total else torch.zeros_like(block)

    def _batched_products(
        self, live: list[int], grads: tuple[Tensor, ...], block: Tensor
    ) -> Tensor:
        """``H_batch @ block`` (``(size, b)``) from one batch's gradient graph, all at once."""
        b = block.shape[1]
        try:
            return self._second_backward(live, grads, block, batched=b)
        except RuntimeError:  # an op without a batching rule: one vector at a time
            return torch.stack(
                [self._second_backward(live, grads, block[:, j]) for j in range(b)], dim=1
            )

    def _second_backward(
        self,
        live: list[int],
        grads: tuple[Tensor, ...],
        v: Tensor,
        batched: int | None = None,
        into: Tensor | None = None,
        alpha: float = 1.0,
        accumulate: bool = True,
    ) -> Tensor:
        """``∂(g · v)/∂θ`` on a batch's gradient graph; ``batched`` vectors at once if set.

        With ``into`` (one vector only), ``alpha`` times the product is added to it in place
        (``accumulate``) or written over it.
        """
        pieces = self.split(v)
        hv = torch.autograd.grad(
            grads,
            self.params,
            grad_outputs=[pieces[i] for i in live],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched is not None,
        )
        return self._flat_or_zero(hv, batched, into, alpha, accumulate)

    # ------------------------------------------------------------------ finite differences
    def _gradient(self) -> Tensor:
        """Weighted gradient over the batches, one batch at a time (its graph freed by backward)."""
        total = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        for w, batch in zip(self.weights, self.batches, strict=True):
            loss = check_scalar_loss(self.loss_fn(self.model, batch))
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            self._flat_or_zero(grads, into=total, alpha=w)
            del loss, grads
        return total

    def _fd_matmat(self, block: Tensor) -> Tensor:
        out = torch.empty_like(block)
        with restored_parameters(self.params) as saved, self._differentiable():
            theta = float(torch.sqrt(sum((t.double() ** 2).sum() for t in saved)))  # type: ignore[arg-type]
            for j in range(block.shape[1]):
                v = block[:, j]
                out[:, j] = self.difference.hvp(self.params, saved, v, self._gradient, theta, _norm)
        return out

    @property
    def fd_eps(self) -> float:
        """The finite-difference route's relative nominal step."""
        return self.difference.eps

    @property
    def fd_order(self) -> int:
        """The finite-difference route's scheme (2 or 4)."""
        return self.difference.order

    def _flat_or_zero(
        self,
        hv: Sequence[Tensor | None],
        batched: int | None = None,
        into: Tensor | None = None,
        alpha: float = 1.0,
        accumulate: bool = True,
    ) -> Tensor:
        """The per-parameter pieces as one flat vector (``(size, b)`` columns when ``batched``).

        Each piece is copied once, straight into its slice (``reshape`` + ``cat`` copied the
        non-contiguous pieces twice: ~20 ms per product at 10⁷ parameters on a CPU). With
        ``into`` (a flat vector; not with ``batched``) ``alpha`` times the pieces are added to it
        in place (``accumulate``) or written over it, and it is returned: no vector-sized
        temporary at all.
        """
        rows = 1 if batched is None else batched
        if into is not None:
            offset = 0
            for h, p in zip(hv, self.params, strict=True):
                piece = into[offset : offset + p.numel()].view(p.shape)
                if h is None:
                    if not accumulate:
                        piece.zero_()
                elif accumulate:
                    piece.add_(h, alpha=alpha)
                elif alpha == 1.0:
                    piece.copy_(h)
                else:
                    torch.mul(h, alpha, out=piece)
                offset += p.numel()
            return into
        out = torch.empty(rows, self.size, dtype=self.dtype, device=self.device)
        offset = 0
        for h, p in zip(hv, self.params, strict=True):
            piece = out[:, offset : offset + p.numel()]
            if h is None:
                piece.zero_()
            else:
                piece.view(rows, *p.shape).copy_(h)
            offset += p.numel()
        return out[0] if batched is None else out.T

    # ------------------------------------------------------------------ functorch
    def _functorch_hvps(self) -> list[Callable[..., tuple[Tensor, ...]]]:
        """One traced ``v ↦ H_batch v`` per batch (unweighted)."""
        if self._func_hvps is None:
            from torch.func import functional_call, grad, jvp

            names = ["inner." + n for n in self.names]
            primals = tuple(p.detach() for p in self.params)
            probed = set(self.names)
            # Unprobed parameters enter as constants, so no autograd graph is built through them.
            frozen = {
                "inner." + n: p.detach()
                for n, p in self.model.named_parameters()
                if n not in probed
            }
            wrapper = self._wrapper
            argnums = tuple(range(len(primals)))

            def batch_hvp(batch: Any) -> Callable[..., tuple[Tensor, ...]]:
                # One batch per traced function, so a product never holds the activations of
                # more than one batch (a memory cap with micro-batches, see `split_batch`).
                def loss_of(*ps: Tensor) -> Tensor:
                    values = {**frozen, **dict(zip(names, ps, strict=True))}
                    return check_scalar_loss(functional_call(wrapper, values, (batch,)))

                grad_fn = grad(loss_of, argnums=argnums)

                def hvp(*tangents: Tensor) -> tuple[Tensor, ...]:
                    return tuple(jvp(lambda *ps: grad_fn(*ps), primals, tangents)[1])

                return hvp

            self._func_hvps = [batch_hvp(batch) for batch in self.batches]
        return self._func_hvps

    def _compiled_hvps(self, vmapped: bool) -> list[Callable[..., tuple[Tensor, ...]]]:
        """:meth:`_functorch_hvps` through ``torch.compile`` (``vmapped``: over a block).

        Static shapes: each block width compiles once (a dynamic width failed in dynamo's fake
        tensors on convolutions and attention), and the widths a solver uses are few (1, its
        block size, a trace's probe count, the last chunk of ``max_block``).
        """
        if vmapped not in self._compiled:
            self._compiled[vmapped] = [
                _compile(torch.vmap(h) if vmapped else h) for h in self._functorch_hvps()
            ]
        return self._compiled[vmapped]

    def _func_matmat(self, block: Tensor, compiled: bool = False) -> Tensor:
        """Forward-over-reverse products of the columns of ``block``, compiled or not."""
        out = torch.zeros_like(block)
        if block.shape[1] == 1:
            hvps = self._compiled_hvps(False) if compiled else self._functorch_hvps()
            for w, hvp in zip(self.weights, hvps, strict=True):
                out[:, 0] += w * self.flatten(hvp(*self.split(block[:, 0])))
            return out
        if compiled:
            blocked = self._compiled_hvps(True)
        else:
            blocked = [torch.vmap(h) for h in self._functorch_hvps()]
        for start in range(0, block.shape[1], self.max_block):
            chunk = block[:, start : start + self.max_block]
            tangents = self.split(chunk)
            for w, hvp in zip(self.weights, blocked, strict=True):
                hv = hvp(*tangents)
                flat = torch.cat([h.reshape(chunk.shape[1], -1) for h in hv], dim=1).T
                out[:, start : start + chunk.shape[1]] += w * flat
                del hv, flat
        return out

    @functools.cached_property
    def _batch_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shapes of every tensor in the probe batches (fixed for the operator's life)."""
        return tuple(tuple(t.shape) for batch in self.batches for t in iter_tensors(batch))

    def _compiled_matmat(self, block: Tensor) -> Tensor:
        """The compiled products, or where they fail the uncompiled ones from then on.

        A failure is blamed on the compilation only if the uncompiled product then works (else
        that error is raised, and nothing is remembered); out of memory is raised as it is. It is
        remembered for this model, parameter set, block width and batch shapes: later operators
        on them skip compiling.
        """
        key = (tuple(self.names), block.shape[1], self._batch_shapes)
        failure: Exception | None = None
        if key not in _UNCOMPILABLE.get(self.model, ()):
            try:
                return self._func_matmat(block, compiled=True)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # dynamo/inductor cannot compile (or run) the product
                failure = err
        out = self._func_matmat(block)
        self.route = "functorch"
        self._compiled = {}
        if failure is not None:
            _UNCOMPILABLE.setdefault(self.model, set()).add(key)
            warnings.warn(
                f"torch.compile failed on the Hessian-vector product ({type(failure).__name__}: "
                f"{str(failure)[:300]}); using the uncompiled route 'functorch' for this model, "
                "parameter set and batch shapes from now on.",
                RuntimeWarning,
                stacklevel=4,
            )
        return out

    # ------------------------------------------------------------------ dispatch
    @property
    def batches_blocks(self) -> bool:
        """Whether :meth:`matmat` batches its vectors.

        ``False`` where it goes vector by vector anyway: the finite-difference route, and the
        double backward with retained graphs on a CPU (which ``auto`` takes there).
        """
        if self.route == "finite_difference":
            return False
        double_backward = self.route == "double_backward" or (
            self.route == "auto" and not self._calibrates(self.device)
        )
        return not (double_backward and self._db_one_at_a_time)

    @property
    def _db_one_at_a_time(self) -> bool:
        """Whether the double backward applies a block one vector at a time (see ``_db_matmat``)."""
        return self.retain_graph and self.device.type == "cpu"

    def _calibrates(self, device: torch.device) -> bool:
        """Whether ``auto`` times both routes on the first product (by default off the CPU)."""
        return device.type != "cpu" if self.calibrate is None else self.calibrate

    def _skip_calibration(self, like: Tensor) -> None:
        if self.route == "auto" and not self._calibrates(like.device):
            # On the CPU the retained-graph double backward measured 2-3x faster per product than
            # forward-over-reverse on every benchmarked model (benchmarks/RESULTS.md); calibrating
            # would only spend products to learn that.
            self.route = "double_backward"

    def _matvec_into(self, v: Tensor, out: Tensor) -> Tensor:
        """Double backward: every batch's product is added straight into ``out``."""
        self._skip_calibration(v)
        if self.route != "double_backward":
            return super()._matvec_into(v, out)
        return self._db_matvec_into(v, out)

    def _matmat(self, block: Tensor) -> Tensor:
        self._skip_calibration(block)
        if self.route == "auto":
            out = self._calibrate(block)
        elif self.route == "functorch":
            out = self._func_matmat(block)
        elif self.route == "compiled":
            out = self._compiled_matmat(block)
        elif self.route == "finite_difference":
            out = self._fd_matmat(block)
        else:
            out = self._db_matmat(block)
        return out.detach()

    def _calibrate(self, block: Tensor) -> Tensor:
        """Time both routes on the first product, keep the faster one (and its result).

        The functorch route is run twice (its first call pays one-off dispatch set-up) and, when
        graphs are retained (``retain_graph``), the graphs of the double-backward route are built
        before timing, so both timings are per-product steady-state costs (without retained graphs
        the rebuild is part of every product, and so of its timing). The extra products are
        counted in ``num_matvecs``.
        """
        sync = _synchronizer(block.device)
        try:
            result = self._func_matmat(block)
            sync()
            t0 = time.perf_counter()
            self._func_matmat(block)
            sync()
            self.route_seconds["functorch"] = time.perf_counter() - t0
            self.num_matvecs += block.shape[1]
        except Exception as err:  # torch.func cannot trace this model: use autograd
            warnings.warn(
                f"torch.func HVPs are not supported by this model ({type(err).__name__}: {err}); "
                "using double backward.",
                RuntimeWarning,
                stacklevel=3,
            )
            self.route = "double_backward"
            self._func_hvps = None
            return self._db_matmat(block)
        if self.retain_graph:
            self._build_graphs()
        sync()
        t0 = time.perf_counter()
        self._db_matmat(block)
        sync()
        self.route_seconds["double_backward"] = time.perf_counter() - t0
        self.num_matvecs += block.shape[1]  # the second product was a real cost
        if self.route_seconds["functorch"] <= self.route_seconds["double_backward"]:
            self.route = "functorch"
            self._graphs = None  # free the retained graph
        else:
            self.route = "double_backward"
            self._func_hvps = None
        return result

    def release(self) -> None:
        """Free retained autograd graphs and traced functions (call when done probing)."""
        self._graphs = None
        self._func_hvps = None
        self._compiled = {}


def eager_route(route: HVPRoute) -> HVPRoute:
    """``route`` for operators that each cover a different layer or batch size (α, Δ₂).

    ``"compiled"`` becomes ``"functorch"``: every such operator would compile a graph of its own
    (about a minute each on a CPU), and one layer of a Hugging Face GPT-2 failed in dynamo at its
    LayerNorm (torch 2.13). Other routes are returned as they are.

    Example:
        >>> eager_route("compiled"), eager_route("double_backward")
        ('functorch', 'double_backward')
    """
    return "functorch" if route == "compiled" else route


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile`` for a product.

    One graph (``fullgraph``: a graph break raises, so the route falls back instead of running
    partly eager), static shapes, and, where this torch has the option, room for the block widths
    and batch shapes of many operators before the recompilation limit (which with ``fullgraph``
    raises too).
    """
    options: dict[str, Any] = {"dynamic": False, "fullgraph": True}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        options["recompile_limit"] = 64
    compiled = torch.compile(fn, **options)

    def run(*args: Any) -> Any:
        with _silent_logging():
            return compiled(*args)

    return run


def _silent_logging() -> contextlib.AbstractContextManager[Any]:
    """Dynamo settings under which ``logging.Logger`` calls inside the product are no-ops.

    Otherwise each is a graph break, which ``fullgraph`` refuses: a Hugging Face GPT-2's forward
    pass logs through ``logger.warning_once`` (transformers adds that method to
    ``logging.Logger``). The messages are the loss's own, which training's forward passes log.
    """
    import torch._dynamo

    config = torch._dynamo.config
    # The setting's name in torch 2.13, and its older one; a torch with neither keeps the breaks.
    setting = next(
        (n for n in ("ignore_logging_functions", "ignore_logger_methods") if hasattr(config, n)),
        None,
    )
    if setting is None:
        return contextlib.nullcontext()
    names = ("debug", "info", "warning", "info_once", "warning_once")
    methods = {getattr(logging.Logger, n) for n in names if hasattr(logging.Logger, n)}
    changes: dict[str, Any] = {setting: set(getattr(config, setting)) | methods}
    patched: contextlib.AbstractContextManager[Any] = config.patch(**changes)
    return patched


def _norm(t: Tensor) -> float:
    return float(t.norm())


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for queued kernels on ``device`` (a no-op on the CPU)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return sync
