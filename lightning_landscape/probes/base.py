"""What every probe is: settings, a cadence, state, and the tags, charts and figures it reports.

A *probe* is one measurement (sharpness, trace, α, ...). It is configured once (its constructor
validates its settings), measures on a :class:`ProbeContext` (the model, the loss, the fixed probe
data and a Hessian operator shared by the probes of one round), keeps what the next measurement
needs (warm-start vectors, the last result) in its ``state_dict``, and says what to log:
scalars by tag, histograms, figures and its charts of TensorBoard's custom-scalars layout.

The same probe objects run inside training (:class:`~lightning_landscape.LandscapeMonitor`
schedules them by their :class:`Cadence`) and on checkpoints (``lightning-landscape analyze``
runs them once), so both report the same numbers under the same tags.
"""

from __future__ import annotations

import abc
import datetime
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from .._validate import flag, optional_integer
from ..operators import (
    CurvatureOperator,
    DistributedOperator,
    HessianOperator,
    HVPRoute,
    LossFn,
    ProbeFailure,
    select_parameters,
)
from ..operators.distributed import count_failures, weighted_mean, weighted_mean_tensor
from ..operators.sharded import ShardedHessianOperator, check_fsdp2_parameters, local_tensor
from ..report import tags
from ..report.layout import Layout

Scope = Literal["global", "local", "rank_zero"]
"""Where a probe runs under data parallelism.

* ``"global"``: on every rank, on the Hessian of the union of the ranks' probe data (products
  all-reduced), so every rank gets the same result;
* ``"local"``: on every rank, on its own shard (rank 0's result is logged);
* ``"rank_zero"``: on global rank zero only.
"""

Row = list[str]
"""One row of the ``analyze`` table: quantity, value, notes."""


def fmt(value: float | None, digits: int = 6) -> str:
    """A number for a table cell (``-`` for missing, ``nan`` kept visible).

    Example:
        >>> fmt(3.14159265, 3), fmt(None)
        ('3.14', '-')
    """
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


@dataclass(frozen=True)
class Cadence:
    """When the monitor runs a probe.

    Attributes:
        every_n_steps: when ``trainer.global_step`` is a positive multiple of this (``None``:
            not by steps). Under the monitor's ``max_overhead`` budget it is the longest gap
            instead (see :class:`~lightning_landscape.LandscapeMonitor`).
        every_n_epochs: at the end of every n-th training epoch (``None``: not by epochs).
        on_train_start: once when training starts (not when resuming from a checkpoint).
        on_train_end: once when training ends.

    Raises:
        ValueError: on a non-positive interval or a non-bool switch.
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    on_train_start: bool = False
    on_train_end: bool = True

    def __post_init__(self) -> None:
        optional_integer("every_n_steps", self.every_n_steps)
        optional_integer("every_n_epochs", self.every_n_epochs)
        flag("on_train_start", self.on_train_start)
        flag("on_train_end", self.on_train_end)

    def due_at_step(self, step: int) -> bool:
        """Whether the step cadence asks for a measurement at optimizer step ``step``."""
        n = self.every_n_steps
        return n is not None and step > 0 and step % n == 0

    def due_at_epoch_end(self, epochs_done: int) -> bool:
        """Whether the epoch cadence asks for one after ``epochs_done`` finished epochs."""
        n = self.every_n_epochs
        return n is not None and epochs_done % n == 0


class _RoundOperator(CurvatureOperator):
    """The round's shared operator: once a product fails, the round does not use it again.

    The failure (out of memory, or a failure on some rank agreed through the all-reduce) is kept
    on the context, so every later probe of the round is skipped for the same reason, and the
    monitor reports it once.
    """

    def __init__(self, inner: CurvatureOperator, ctx: ProbeContext) -> None:
        super().__init__(inner.size, inner.dtype, inner.device)
        self.sharding = inner.sharding
        self.inner = inner
        self.ctx = ctx

    def _matmat(self, block: Tensor) -> Tensor:
        try:
            return self.inner.matmat(block)
        except (ProbeFailure, torch.OutOfMemoryError) as err:
            self.ctx._failure = err
            raise

    def _matvec_into(self, v: Tensor, out: Tensor) -> Tensor:
        try:
            return self.inner.matvec_into(v, out)
        except (ProbeFailure, torch.OutOfMemoryError) as err:
            self.ctx._failure = err
            raise


class ProbeContext:
    """What the probes of one round measure on.

    The Hessian operator over the probed parameters on the probe batches is built the first time
    a probe asks for it (:meth:`operator`) and shared by every probe of the round; under data
    parallelism it is the sample-weighted mean over ranks, and a failure while building it on
    any rank is agreed on before the first product. Probes run inside
    :func:`~lightning_landscape.curvature_context` (the monitor and ``analyze`` enter it for the
    round), which sets the modules' modes; they do not change them.

    Args:
        model: the module (a LightningModule inside training).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: the probe batches (several: the Hessian of the sample-weighted mean loss).
        sample_batch: the first probe batch before micro-batching, with any extra samples a
            probe asked for (:attr:`Probe.extra_samples`); default ``batches[0]``.
        single_batch: the probe data as one batch, for measurements that take a single batch
            (α, loss slices); default ``batches[0]``. The monitor passes the whole probe set
            when it cut it into chunks for BatchNorm's statistics, and the first micro-batch
            when ``probe_micro_batch_size`` caps memory.
        params: names or patterns of the probed parameters (default: all trainable).
        route: Hessian-vector-product route of the operator.
        seed: seed of this round's solvers.
        step: the global step (``0`` outside training).
        epoch: the epoch.
        optimizers: the trainer's optimizers (for stability thresholds), if any.
        weight: this rank's number of probe samples (for the mean over ranks).
        world_size: processes in the default process group.
        timeout: bound on every collective.
        retain_graph: passed to the :class:`~lightning_landscape.HessianOperator` (``None``:
            its default, which rebuilds each batch's graph when there are several).
        warn: where soft problems go (the monitor: ``rank_zero_warn``).
        note: where information that is not a problem goes (the monitor: ``rank_zero_info``).
        previous: the probed parameters (flat, in the operator's order) before the optimizer
            step that led to this step, if the monitor kept them (it does only before the steps
            that precede a probe that asks for them, see :attr:`Probe.needs_previous`).
        batch_size: the training batch size (for
            :class:`~lightning_landscape.probes.BatchSharpness`), if known.
        sharded: the probed parameters are sharded by FSDP2 (``fully_shard``): the operator is
            then a :class:`~lightning_landscape.operators.ShardedHessianOperator` (finite
            differences, whatever ``route`` says) on this process's slices of the vectors, and
            :meth:`gradient` and :meth:`parameters_flat` return this process's slices. Only
            probes with :attr:`Probe.supports_sharding` run on it.

    Attributes:
        results: the results of the probes already run in this round, by probe name.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        *,
        sample_batch: Any = None,
        single_batch: Any = None,
        params: Sequence[str] | None = None,
        route: HVPRoute = "auto",
        seed: int = 0,
        step: int = 0,
        epoch: int = 0,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        weight: float | None = None,
        world_size: int = 1,
        timeout: datetime.timedelta | None = None,
        retain_graph: bool | None = None,
        warn: Callable[[str], None] | None = None,
        note: Callable[[str], None] | None = None,
        previous: Tensor | None = None,
        batch_size: int | None = None,
        sharded: bool = False,
    ) -> None:
        if not batches:
            raise ValueError("A probe context needs at least one probe batch.")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.sample_batch = self.batches[0] if sample_batch is None else sample_batch
        self.single_batch = self.batches[0] if single_batch is None else single_batch
        self.params = None if params is None else list(params)
        self.route: HVPRoute = route
        self.seed = seed
        self.step = step
        self.epoch = epoch
        self.optimizers = list(optimizers)
        self.weight = weight
        self.world_size = world_size
        self.timeout = timeout
        self.retain_graph = retain_graph
        self._warn = warn
        self._note = note
        self.previous = previous
        self.batch_size = batch_size
        self.sharded = sharded
        self.results: dict[str, Any] = {}
        self._local: HessianOperator | ShardedHessianOperator | None = None
        self._op: CurvatureOperator | None = None
        self._failure: BaseException | None = None
        self._loss: float | None = None

    @property
    def num_params(self) -> int:
        """Number of probed parameters (scalars)."""
        return sum(p.numel() for _, p in select_parameters(self.model, self.params))

    @property
    def resolved_route(self) -> HVPRoute | None:
        """The route the shared operator settled on (``None`` before it was built)."""
        return None if self._local is None else self._local.route

    def use_route(self, route: HVPRoute) -> None:
        """Compute this round's products by ``route`` from now on.

        Sets :attr:`route` (which probes that build their own operators, α and Δ₂, pass on) and
        the shared operator's route, freeing its retained graphs: finite-difference products
        move the parameters in place, which invalidates them, and they are rebuilt on the next
        double-backward product. Works after a failed product too (to restore a route). The
        sharded operator always uses finite differences and is left as it is.

        Raises:
            ProbeFailure: as :meth:`operator`, if the shared operator was not built yet and
                building it fails.
        """
        if self._local is None:
            self.operator()
        self.route = route
        if isinstance(self._local, HessianOperator):
            self._local.release()
            self._local.route = route

    def warn(self, message: str) -> None:
        """Report a soft problem (once per rank, or on rank zero inside the monitor)."""
        if self._warn is not None:
            self._warn(message)

    def note(self, message: str) -> None:
        """Report information that is not a problem (on rank zero inside the monitor)."""
        if self._note is not None:
            self._note(message)

    def operator(self) -> CurvatureOperator:
        """The Hessian operator shared by the probes of this round (built on first use).

        Returns:
            The local :class:`~lightning_landscape.HessianOperator`, or on several processes a
            :class:`~lightning_landscape.DistributedOperator` over the ranks.

        Raises:
            ProbeFailure: on every rank alike, if building it failed on some rank (out of
                memory, a NaN/inf probe loss, an error in the loss), or one of its products
                failed earlier in this round (then the same exception again).
        """
        if self._failure is not None:
            raise self._failure
        if self._op is not None:
            return self._op
        local: HessianOperator | ShardedHessianOperator | None = None
        why: str | None = None
        if self.sharded:  # agree on the set-up before the operator's first collective
            try:
                check_fsdp2_parameters(select_parameters(self.model, self.params))
            except Exception as err:
                why = f"failed ({type(err).__name__}: {err})"
            if count_failures(why is not None, timeout=self.timeout):
                self._failure = ProbeFailure(why or "failed on another rank")
                raise self._failure
        try:
            if self.sharded:
                local = ShardedHessianOperator(
                    self.model,
                    self.loss_fn,
                    self.batches,
                    params=self.params,
                    weight=self.weight,
                    timeout=self.timeout,
                )
            else:
                local = HessianOperator(
                    self.model,
                    self.loss_fn,
                    self.batches,
                    params=self.params,
                    route=self.route,
                    retain_graph=self.retain_graph,
                )
            if not math.isfinite(local.loss_value):
                why = "has a NaN/inf loss on the probe data"
        except torch.OutOfMemoryError:
            why = "ran out of memory (lower num_probe_samples or set probe_micro_batch_size)"
        except Exception as err:
            why = f"failed ({type(err).__name__}: {err})"
        # Before any Hessian-vector product, every rank learns how many ranks failed.
        failures = count_failures(why is not None, timeout=self.timeout)
        if failures:
            if local is not None:
                local.release()
            self._failure = ProbeFailure(why or "failed on another rank")
            raise self._failure
        assert local is not None
        self._local = local
        op: CurvatureOperator = local
        if self.world_size > 1 and not self.sharded:  # sharded: FSDP reduces the gradients
            weight = float(self.weight if self.weight is not None else 0.0)
            op = DistributedOperator(local, weight, timeout=self.timeout)
        self._op = _RoundOperator(op, self)
        return self._op

    def parameters_flat(self) -> Tensor:
        """The probed parameters' current values, flat, in the operator's order (a copy).

        When sharded, this process's slices of them.
        """
        named = select_parameters(self.model, self.params)
        return torch.cat([local_tensor(p).detach().reshape(-1) for _, p in named])

    def gradient(self) -> Tensor:
        """The gradient of the probe loss (the sample-weighted mean over every rank), flat.

        Raises:
            ProbeFailure: on every rank alike, as :meth:`operator`, or if the gradient failed on
                some rank.
        """
        op = self.operator()
        assert self._local is not None
        local = self._local
        if isinstance(local, ShardedHessianOperator):  # already the mean over every process
            return local.gradient()
        weight = float(self.weight if self.weight is not None else 1.0)
        like = torch.empty(op.size, dtype=op.dtype, device=op.device)
        return weighted_mean_tensor(local.gradient, weight, like, timeout=self.timeout)

    def probe_loss(self) -> float:
        """The loss on the probe data (the mean over every rank's samples).

        Raises:
            ProbeFailure: as :meth:`operator`.
        """
        if self._loss is None:
            self.operator()
            assert self._local is not None
            if isinstance(self._local, ShardedHessianOperator):  # already the global mean
                self._loss = self._local.loss_value
                return self._loss
            weight = float(self.weight if self.weight is not None else 1.0)
            self._loss = weighted_mean(self._local.loss_value, weight, timeout=self.timeout)
        return self._loss

    def release(self) -> None:
        """Free the shared operator's retained graphs (call once the round is over)."""
        if self._local is not None:
            self._local.release()


class Probe(abc.ABC):
    """One measurement: settings, cadence, state, and what it reports.

    Subclasses set :attr:`name` and implement :meth:`run` and :meth:`scalars`; everything else
    has a default. See ``docs/architecture.md`` for a worked example.

    Args:
        every_n_steps: see :class:`Cadence`.
        every_n_epochs: see :class:`Cadence`.
        on_train_start: see :class:`Cadence`.
        on_train_end: see :class:`Cadence`.

    Attributes:
        name: the probe's name: its key in results, state and ``analyze --probes``.
        scope: where it runs under data parallelism (see :data:`Scope`).
        cost_group: the tag group of its cost (``landscape/<group>/seconds``, ``.../hvps``):
            probes that share the Hessian operator report one total under ``"cost"``.
        order: probes due at the same step run in ascending order (so that a probe can reuse
            an earlier one's result from :attr:`ProbeContext.results`).
        needs_previous: whether it measures the step just taken: the monitor then copies the
            probed parameters just before each optimizer step that precedes one of its
            measurements (:attr:`ProbeContext.previous`).
        supports_sharding: whether it runs on parameters sharded by FSDP2 (it uses only the
            shared operator, :meth:`ProbeContext.gradient` and
            :meth:`ProbeContext.parameters_flat`, reducing its own inner products over the
            shards); the monitor refuses the others under sharded training.
        cadence: when the monitor runs it.
        last_result: the result of the last successful measurement (``None`` before).
        last_step: the global step of the last attempt (``-1`` before).
    """

    name: ClassVar[str]
    scope: ClassVar[Scope] = "global"
    cost_group: ClassVar[str] = tags.COST
    order: ClassVar[int] = 50
    needs_previous: ClassVar[bool] = False
    supports_sharding: ClassVar[bool] = False

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        on_train_start: bool = False,
        on_train_end: bool = True,
    ) -> None:
        self.cadence = Cadence(every_n_steps, every_n_epochs, on_train_start, on_train_end)
        self.last_result: Any = None
        self.last_step = -1

    def __repr__(self) -> str:
        c = self.cadence
        return (
            f"{type(self).__name__}(every_n_steps={c.every_n_steps}, "
            f"every_n_epochs={c.every_n_epochs})"
        )

    # ------------------------------------------------------------------ set-up
    @property
    def extra_samples(self) -> int:
        """Samples this probe needs beyond the probe set in :attr:`ProbeContext.sample_batch`."""
        return 0

    def check(self, model: nn.Module, num_params: int) -> None:  # noqa: B027 - optional hook
        """Check the settings against the model before training starts.

        Args:
            model: the module to probe.
            num_params: the number of probed parameters.

        Raises:
            ValueError: naming the setting and the fix.
        """

    def check_data(self, sample_batch: Any) -> None:  # noqa: B027 - optional hook
        """Check the settings against the probe data once it is collected.

        Args:
            sample_batch: the first probe batch, with any :attr:`extra_samples`.

        Raises:
            ValueError: naming the setting and the fix.
        """

    # ------------------------------------------------------------------ measuring
    @abc.abstractmethod
    def run(self, ctx: ProbeContext) -> Any:
        """Measure once.

        Args:
            ctx: the round's context.

        Returns:
            The result (a frozen dataclass, or a mapping of them), or ``None`` when there is
            nothing to measure this time (e.g. no step was taken yet): then nothing is
            recorded or logged.

        Raises:
            ProbeFailure: a data-dependent failure: the measurement is skipped with a warning.
        """

    def is_finite(self, result: Any) -> bool:
        """Whether the result holds only finite numbers (a non-finite one is skipped)."""
        return True

    def record(self, result: Any, step: int) -> None:
        """Keep what the next measurement needs (called after each successful one).

        Args:
            result: the result of :meth:`run`.
            step: the global step.
        """
        self.last_result = result

    @staticmethod
    def cost_hvps(result: Any) -> int:
        """Hessian-vector products the measurement spent."""
        return int(getattr(result, "num_hvps", 0))

    # ------------------------------------------------------------------ reporting
    @abc.abstractmethod
    def scalars(self, result: Any) -> dict[str, float]:
        """The scalars to log, by tag (see :mod:`lightning_landscape.report.tags`)."""

    def histograms(self, result: Any) -> dict[str, Tensor]:
        """Histograms to log to TensorBoard, by tag."""
        return {}

    def figures(self, result: Any, step: int) -> dict[str, Figure]:
        """Figures of one result, by tag (asked for only where a logger or a file takes them)."""
        return {}

    def progress_bar(self) -> dict[str, float]:
        """Values to show in Lightning's progress bar (by tag), after every training batch."""
        return {}

    def epoch_figures(self) -> dict[str, Figure]:
        """Figures of the whole run so far, logged at epoch ends (e.g. trajectories)."""
        return {}

    def charts(self) -> Layout:
        """This probe's charts of the custom-scalars layout."""
        return {}

    def rows(self, result: Any) -> list[Row]:
        """Rows of the ``analyze`` table (quantity, value, notes)."""
        return [
            [tag.removeprefix("landscape/"), fmt(v), ""] for tag, v in self.scalars(result).items()
        ]

    def summary(self, result: Any) -> dict[str, Any]:
        """The JSON-able part of ``analyze``'s ``summary.json`` for one result."""
        return dict(self.scalars(result))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly (saved in the monitor's state)."""
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Args:
            state_dict: the saved state.
        """
        self.last_step = int(state_dict.get("last_step", -1))


def join_columns(blocks: Sequence[Tensor]) -> Tensor:
    """``(n, b_i)`` blocks side by side: one ``(n, Σ b_i)`` block with contiguous rows as columns.

    (``torch.cat(dim=1)`` makes the columns strided: every later per-column pass over them then
    gathers a whole vector, 45 MB at 11 M parameters.) A single block is returned as it is.

    Args:
        blocks: at least one ``(n, b_i)`` block, all of the same ``n``.

    Returns:
        The joined ``(n, Σ b_i)`` block.
    """
    if len(blocks) == 1:
        return blocks[0]
    return torch.cat([b.T for b in blocks]).T


def warm_vectors(vectors: Tensor | None, op_size: int, device: torch.device) -> Tensor | None:
    """Saved start vectors if they fit an operator of ``op_size`` (else ``None``), on ``device``.

    Args:
        vectors: ``(n, b)`` vectors from an earlier solve, or ``None``.
        op_size: the operator's dimension.
        device: where the solver runs.

    Returns:
        The vectors on ``device``, or ``None`` if absent or of another size.
    """
    if vectors is None or vectors.shape[0] != op_size:
        return None
    return vectors.to(device)
