r"""Landscape Monitor: runs probes on their cadences during training and logs what they measure.

The monitor owns what the probes share (the probe data, the loss, the parameter subset, the
Hessian-vector-product route, the overhead budget, hooks and logging) and nothing of any single
measurement: that lives in the probes (:mod:`lightning_landscape.probes`). It schedules them,
isolates their faults (a failing measurement is skipped with a warning; under DDP every rank
takes the same decision), logs through ``trainer.loggers`` on global rank zero and checkpoints
their state.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from .._validate import choice, flag, integer, optional_integer, patterns, real
from ..context import (
    NORM_STATISTICS,
    NormStatistics,
    batch_statistics,
    compiled_modules,
    curvature_context,
    synchronised_batch_norms,
)
from ..operators import (
    ROUTES,
    HVPRoute,
    ProbeFailure,
    batch_size,
    check_scalar_loss,
    join_batches,
    select_parameters,
    slice_batch,
    split_batch,
)
from ..operators.distributed import count_failures, max_over_ranks
from ..operators.sharded import (
    check_fsdp2_parameters,
    fsdp_modules,
    is_sharded,
    local_tensor,
    reshard,
)
from ..optim.thresholds import probed_stability
from ..probes import Probe, ProbeContext, Sharpness, Trace, UpdateCurvature
from ..probes.checks import ProductCheck, check_products
from ..report import tags
from ..report.layout import Layout, compose_layout, control_charts, cost_charts
from .budget import OverheadLedger
from .data import collect_probe_batches, silenced, training_step_loss
from .hooks import (
    ProbeReport,
    call_hook,
    check_hook,
    check_hooks,
    hook_states,
    load_hook_states,
)

ProbeLossFn = Callable[[pl.LightningModule, Any], Tensor]
_RESCHEDULE_EVERY = 25  # optimizer steps between agreed re-plans of an adaptive cadence (DDP)
_UNSUPPORTED_STRATEGIES = {"DeepSpeedStrategy", "XLAStrategy", "FSDPStrategy"}


@contextlib.contextmanager
def _rank_zero_buffers(module: torch.nn.Module, world: int) -> Iterator[None]:
    """Under DDP, probe every rank with rank 0's buffers (what DDP's next forward would use).

    DDP broadcasts rank 0's buffers (BatchNorm running statistics) at the start of each forward
    pass, so between steps the ranks' copies differ. The probe uses rank 0's on every rank and
    puts each rank's own values back afterwards, so training is unaffected.
    """
    if world == 1:
        yield
        return
    buffers = [b for b in module.buffers() if b.numel()]
    saved = [b.detach().clone() for b in buffers]
    try:
        with torch.no_grad():
            for b in buffers:
                torch.distributed.broadcast(b, src=0)
        yield
    finally:
        with torch.no_grad():
            for b, old in zip(buffers, saved, strict=True):
                b.copy_(old)


def _describe(err: BaseException) -> str:
    """Why a measurement failed, phrased to follow "the <name> probe at step N"."""
    if isinstance(err, torch.OutOfMemoryError):
        return "ran out of memory (lower num_probe_samples, set probe_micro_batch_size)"
    if isinstance(err, ProbeFailure):
        text = str(err)
        return (
            text
            if text.startswith(("has ", "ran ", "failed ", "produced "))
            else f"failed ({text})"
        )
    return f"failed ({type(err).__name__}: {err})"


def _default_probes(every_n_steps: int | None, top_k: int) -> list[Probe]:
    return [
        Sharpness(top_k, every_n_steps=every_n_steps),
        Trace(every_n_steps=every_n_steps),
        UpdateCurvature(every_n_steps=every_n_steps),
    ]


class LandscapeMonitor(Callback):
    r"""Run landscape probes on their cadences during training and log them under ``landscape/``.

    ``LandscapeMonitor(every_n_steps=100, top_k=5)`` (the defaults) measures the top-5 Hessian
    eigenvalues with λ_min (:class:`~lightning_landscape.probes.Sharpness`) and the trace
    (:class:`~lightning_landscape.probes.Trace`) every 100 optimizer steps, when training starts
    and when it ends. Any other selection is a list of probes, each with its own settings and
    cadence::

        from lightning_landscape.probes import CurvatureExponent, Sharpness, SpectralDensity

        LandscapeMonitor(probes=[
            Sharpness(top_k=3, every_n_steps=50),
            SpectralDensity(every_n_steps=500),
            CurvatureExponent(every_n_steps=2000),
        ])

    Probes due at the same step form a *round*: they share one Hessian operator on the fixed
    probe data (by default the first ``num_probe_samples`` samples of the train dataset, taken
    once when training starts), in ``eval()`` mode, and a probe may reuse an earlier one's result
    (Δ₂^(D) starts from the sharpness eigenvectors). Training is not affected: weights, RNG
    streams, module modes, ``.grad``, optimizer state and logged metrics are exactly what they
    would be without the monitor. A measurement that fails at run time on the data (NaN/inf, out
    of memory, a failed eigensolve) is skipped with a warning naming it and
    ``landscape/probe_failed = 1``; under DDP every rank takes the same decision.

    Logged by the monitor itself: ``landscape/probe_failed`` (per round),
    ``landscape/cost/seconds`` and ``landscape/cost/hvps`` (the round's probes on the shared
    operator; α, Δ₂ and slices report theirs as ``landscape/<name>_cost/...``) and
    ``landscape/cost/overhead`` (the fraction of wall time since training started spent in
    probes). Every probe documents its own tags. After each round with a ``Sharpness`` result a
    :class:`~lightning_landscape.ProbeReport` is appended to :attr:`history` and passed to every
    hook.

    Args:
        probes: the measurements (default: ``Sharpness(top_k, every_n_steps=every_n_steps)``,
            ``Trace(every_n_steps=every_n_steps)`` and
            ``UpdateCurvature(every_n_steps=every_n_steps)``). Each probe class at most once.
        every_n_steps: cadence of the default probes (``None``: only at the start and end of
            training); with ``probes=`` set it on the probes instead.
        top_k: top eigenvalues of the default ``Sharpness``; with ``probes=`` set it there.
        num_probe_samples: samples taken from the train dataset for the probe data.
        probe_dataloader: explicit probe data; every batch it yields is used (the Hessian is the
            sample-weighted mean over them). Overrides ``num_probe_samples``. Measurements that
            take the probe data as one batch (α, loss slices, batch sharpness, Δ₂) get its
            batches joined (:func:`~lightning_landscape.operators.join_batches`), as they get
            the whole of the monitor's own probe set (and, likewise, only the first micro-batch
            under ``probe_micro_batch_size``); where the batches cannot be joined (ragged
            shapes) a warning says so and they use the first.
        probe_micro_batch_size: memory cap: split the probe data into micro-batches of at most
            this many samples, processed one at a time (sample-weighted, so the result is the
            same; exact since probes run in eval mode). Peak probe memory is then that of one
            micro-batch, at the price of one extra forward and backward per micro-batch and
            Hessian-vector product.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar Tensor``; default the loss returned by
            ``training_step(batch, 0)`` (a tensor or a dict with ``"loss"``), whose logging is
            suppressed during probes.
        params: names or ``fnmatch`` patterns of the parameters to probe (default all trainable).
        route: Hessian-vector-product route: ``"auto"`` (see
            :class:`~lightning_landscape.HessianOperator`; resolved on the first round and kept),
            ``"functorch"``, ``"compiled"`` (``torch.compile`` of the functorch product; the
            first round compiles, about a minute per graph on a CPU, so under DDP set
            ``collective_timeout`` above that), ``"double_backward"`` or
            ``"finite_difference"``.
        max_overhead: adaptive cadence: the largest fraction of training wall time the probes
            may take (e.g. ``0.02``). The monitor measures the optimizer-step time and the cost
            of its rounds, and runs the probes that have no epoch cadence together as early as
            the budget allows; a probe's ``every_n_steps`` becomes its longest allowed gap (a
            floor that may exceed the budget). The achieved fraction is logged as
            ``landscape/cost/overhead``. The schedule depends on timings, so a resumed run may
            probe at other steps (training itself is unaffected).
        hooks: objects with ``on_landscape(trainer, pl_module, report)`` (see
            :class:`~lightning_landscape.callbacks.LandscapeHook`), or plain callables with that
            signature, called on every rank after each round with a ``Sharpness`` result, e.g.
            :class:`~lightning_landscape.StabilityLRGuard`. Their ``state_dict`` is saved with
            the monitor's, so a resumed run takes the same actions.
        seed: seed of the probes' private generators (global RNG streams are never used).
        collective_timeout: under DDP, seconds a rank waits for the others in a probe's
            collectives before raising instead of hanging (``None``: the process group's own).
        norm_statistics: which Hessian is measured on models with BatchNorm (or InstanceNorm
            with running statistics): ``"batch"`` (default), that of the loss training
            optimises: those layers normalise each chunk of the probe data, of the training
            batch size (``probe_micro_batch_size`` if set), with its own statistics, the
            Hessian is the mean over the chunks, and the running statistics are left untouched;
            ``"running"``, that of the function evaluation computes (eval mode, running
            statistics). Dropout is off in both. Early in training the running statistics lag
            far behind, and the two can differ by orders of magnitude (see the README). Under
            DDP, ``SyncBatchNorm`` layers (``Trainer(sync_batchnorm=True)``) take each rank's
            own statistics with ``"batch"``: their synchronised forward has no double backward.
        check_products: before the first round of each ``fit``, check with 4 products that the
            Hessian-vector products are symmetric, as a Hessian's are
            (:func:`~lightning_landscape.solvers.symmetry_defect`). They are not when an
            operation's backward pass is not differentiable by autograd (fused kernels), and
            then silently wrong; the monitor warns and, with ``route="auto"``, probes by finite
            differences of the gradient for the rest of the fit if those pass the check (every
            probe: the shared operator and those that build their own products). A resumed
            fit checks again (without the check it keeps a checkpointed switch); an explicit
            ``route`` is kept with a warning. :attr:`product_check` holds the outcome.
        tensorboard_layout: register the probes' charts in TensorBoard's *Custom Scalars* tab
            (λ_max with the stability threshold, spectrum, α by layer type, Δ₂^(D), cost), once
            per run, on every TensorBoard logger.
        enabled: ``False`` turns the callback into a no-op (handy from YAML configs).

    Raises:
        ValueError: on invalid arguments (non-positive cadences or sizes, an unknown route, two
            probes of one class, hooks without a ``Sharpness`` probe, ...).

    Example::

        from lightning.pytorch import Trainer
        from lightning_landscape import LandscapeMonitor

        monitor = LandscapeMonitor(every_n_steps=100, top_k=5)
        trainer = Trainer(max_epochs=10, callbacks=[monitor])
        trainer.fit(model, datamodule=dm)
        print(monitor.history[-1].lambda_max)
    """

    def __init__(
        self,
        probes: list[Probe] | None = None,
        every_n_steps: int | None = 100,
        top_k: int = 5,
        num_probe_samples: int = 256,
        probe_dataloader: DataLoader[Any] | None = None,
        probe_micro_batch_size: int | None = None,
        loss_fn: ProbeLossFn | None = None,
        params: list[str] | None = None,
        route: HVPRoute = "auto",
        max_overhead: float | None = None,
        hooks: list[Any] | None = None,
        seed: int = 0,
        collective_timeout: float | None = None,
        norm_statistics: NormStatistics = "batch",
        check_products: bool = True,
        tensorboard_layout: bool = True,
        enabled: bool = True,
    ) -> None:
        every_n_steps = optional_integer("every_n_steps", every_n_steps)
        top_k = integer("top_k", top_k)
        if probes is None:
            probes = _default_probes(every_n_steps, top_k)
        elif every_n_steps != 100 or top_k != 5:
            raise ValueError(
                "every_n_steps and top_k configure the default probes; with probes=[...] set "
                "them on the probes instead, e.g. Sharpness(top_k=3, every_n_steps=50)."
            )
        self.probes: list[Probe] = self._check_probes(probes)
        self.num_probe_samples = integer("num_probe_samples", num_probe_samples)
        self.probe_dataloader = probe_dataloader
        self.probe_micro_batch_size = optional_integer(
            "probe_micro_batch_size", probe_micro_batch_size
        )
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError("loss_fn must be callable: loss_fn(pl_module, batch) -> Tensor")
        self.loss_fn = loss_fn
        self.params = patterns("params", params)
        self.route: HVPRoute = choice("route", route, ROUTES)
        self.max_overhead = None
        if max_overhead is not None:
            self.max_overhead = real("max_overhead", max_overhead, low=0, high=1, high_open=True)
        self.hooks = check_hooks(hooks)
        if self.hooks and self.sharpness is None:
            raise ValueError(
                "hooks act on the sharpness report: add a Sharpness probe to probes=[...]."
            )
        self.seed = integer("seed", seed, minimum=0)
        self.collective_timeout = None
        if collective_timeout is not None:
            self.collective_timeout = real("collective_timeout", collective_timeout, low=0)
        self.norm_statistics: NormStatistics = choice(
            "norm_statistics", norm_statistics, NORM_STATISTICS
        )
        self.check_products = flag("check_products", check_products)
        self.tensorboard_layout = flag("tensorboard_layout", tensorboard_layout)
        self.enabled = flag("enabled", enabled)

        self.history: list[ProbeReport] = []
        self.num_probes = 0  # rounds run
        self.num_failed = 0  # measurements skipped
        self.product_check: ProductCheck | None = None  # this fit's (None: not yet, or nothing)
        self._products_checked = False  # in this fit
        self._resolved_route: HVPRoute | None = None
        self._batches: list[Any] | None = None
        self._sample_batch: Any = None
        self._single_batch: Any = None
        self._retain_graph: bool | None = None
        self._weight = 0.0
        self._budget = OverheadLedger()
        self._previous: tuple[int, Tensor] | None = None  # (step it precedes, flat parameters)
        self._batch_idx = -1
        self._sharded = False  # FSDP2 (ModelParallelStrategy): set in setup

    @staticmethod
    def _check_probes(probes: Sequence[Probe]) -> list[Probe]:
        if isinstance(probes, Probe) or not isinstance(probes, (list, tuple)):
            raise ValueError(f"probes must be a list of Probe objects, got {probes!r}")
        seen: set[str] = set()
        for i, probe in enumerate(probes):
            if not isinstance(probe, Probe):
                raise ValueError(
                    f"probes[{i}] is a {type(probe).__name__}, not a lightning_landscape Probe"
                )
            if probe.name in seen:
                raise ValueError(f"probes holds two {type(probe).__name__} probes; give one.")
            seen.add(probe.name)
        return sorted(probes, key=lambda p: p.order)

    @property
    def sharpness(self) -> Sharpness | None:
        """The monitor's :class:`~lightning_landscape.probes.Sharpness` probe, if it has one."""
        return next((p for p in self.probes if isinstance(p, Sharpness)), None)

    def probe_named(self, name: str) -> Probe:
        """The probe called ``name`` (``"sharpness"``, ``"alpha"``, ...).

        Raises:
            KeyError: if the monitor has none.
        """
        for probe in self.probes:
            if probe.name == name:
                return probe
        raise KeyError(f"the monitor has no {name!r} probe; it has {[p.name for p in self.probes]}")

    @property
    def probe_seconds(self) -> float:
        """Wall time spent in probe rounds since training started."""
        return self._budget.spent

    @property
    def overhead(self) -> float:
        """Fraction of the wall time since training started that went into probes."""
        return self._budget.fraction()

    # ------------------------------------------------------------------ Lightning hooks
    @property
    @override
    def state_key(self) -> str:
        loss = None if self.loss_fn is None else getattr(self.loss_fn, "__qualname__", "custom")
        return self._generate_state_key(
            probes=[repr(p) for p in self.probes], params=self.params, loss_fn=loss
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        self._check_strategy(trainer)
        if trainer.world_size > self.num_probe_samples and self.probe_dataloader is None:
            raise ValueError(
                f"num_probe_samples={self.num_probe_samples} is smaller than the "
                f"{trainer.world_size} processes: each rank needs at least one probe sample."
            )
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError(
                "With manual optimization, training_step does not return the loss: pass "
                "`loss_fn=lambda module, batch: ...` to LandscapeMonitor."
            )
        named = select_parameters(pl_module, self.params)
        if not any(p.requires_grad for _, p in named):
            raise ValueError(
                f"params={self.params} selects only frozen parameters (requires_grad=False): "
                "training does not move them, so their curvature says nothing about its "
                "stability. Select trainable ones, or drop params= for all of them."
            )
        num_params = sum(p.numel() for _, p in named)
        for probe in self.probes:
            probe.check(pl_module, num_params)
        compiled = compiled_modules(pl_module)
        if compiled:
            names = ", ".join(n or "the module itself" for n in compiled)
            rank_zero_info(
                f"LandscapeMonitor: {names} is compiled (torch.compile); probes run it eagerly "
                "(the same parameters), since compiled autograd has no double backward."
            )
        dtypes = {p.dtype for _, p in named}
        if dtypes - {torch.float32, torch.float64}:
            rank_zero_warn(
                f"LandscapeMonitor probes parameters of dtype {dtypes}; curvature in reduced "
                "precision is noisy (~1% per Hessian-vector product). Prefer float32 weights "
                "(e.g. precision='bf16-mixed' rather than 'bf16-true')."
            )

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        """Refuse strategies (and, under FSDP2, probes and routes) the monitor cannot serve."""
        strategy = trainer.strategy
        names = {c.__name__ for c in type(strategy).__mro__}
        if "FSDPStrategy" in names:
            raise RuntimeError(
                "LandscapeMonitor does not support FSDPStrategy (FSDP1): Lightning builds it only "
                "on GPUs and this path has not been tested on one. Use FSDP2 instead, "
                "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with "
                "fully_shard in configure_model, or `enabled=False` for this run."
            )
        # DeepSpeed and XLA subclass DDPStrategy but partition or compile differently.
        unsupported = names & _UNSUPPORTED_STRATEGIES
        supported = (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)
        if unsupported or not isinstance(strategy, supported):
            raise RuntimeError(
                f"LandscapeMonitor supports single-device, DDP and FSDP2 (ModelParallelStrategy) "
                f"training; {type(strategy).__name__} partitions the parameters in a way the "
                "monitor does not support. Use strategy='ddp' or ModelParallelStrategy, or "
                "`enabled=False` for this run."
            )
        self._sharded = isinstance(strategy, ModelParallelStrategy)
        if not self._sharded:
            return
        tensor_parallel = getattr(strategy, "_tensor_parallel_size", 1)  # "auto" until set up
        if isinstance(tensor_parallel, int) and tensor_parallel > 1:
            raise RuntimeError(
                f"LandscapeMonitor under ModelParallelStrategy supports FSDP2 data parallelism "
                f"only, not tensor parallelism (tensor_parallel_size={tensor_parallel}). Use "
                "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)."
            )
        refused = [type(p).__name__ for p in self.probes if not p.supports_sharding]
        if refused:
            raise ValueError(
                f"Under FSDP2 (ModelParallelStrategy) the monitor measures with sharded "
                f"parameters, which {', '.join(refused)} cannot use (they need second-order "
                "autograd or whole parameter tensors). Sharded runs support Sharpness (with the "
                "preconditioned sharpness), Trace, SpectralDensity and UpdateCurvature."
            )
        if self.route not in ("auto", "finite_difference"):
            raise ValueError(
                f"route={self.route!r} needs second-order autograd, which does not reach FSDP2's "
                "sharded parameters; under ModelParallelStrategy the products are finite "
                "differences (route='auto' or 'finite_difference')."
            )

    def _check_sharded_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under FSDP2, after ``configure_model``: every probed parameter sharded over one mesh."""
        mesh = getattr(trainer.strategy, "device_mesh", None)
        names = getattr(mesh, "mesh_dim_names", None) or ()
        if mesh is not None and "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise RuntimeError(
                "LandscapeMonitor under ModelParallelStrategy supports FSDP2 data parallelism "
                f"only; this run has a tensor-parallel mesh of {mesh['tensor_parallel'].size()}. "
                "Use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)."
            )
        named = select_parameters(pl_module, self.params)
        if not any(is_sharded(p) for _, p in named):
            raise RuntimeError(
                "LandscapeMonitor: under ModelParallelStrategy no probed parameter is sharded; "
                "apply fully_shard to the model in configure_model (or use strategy='ddp')."
            )
        check_fsdp2_parameters(named)
        # Each fully_shard call without mesh= builds its own (equal) default mesh: compare ranks.
        meshes = {tuple(p.device_mesh.mesh.flatten().tolist()) for _, p in named}  # type: ignore[attr-defined]
        if meshes != {tuple(range(trainer.world_size))}:
            raise RuntimeError(
                f"LandscapeMonitor: the probed parameters are sharded over the ranks "
                f"{sorted(meshes)}; it supports one mesh over all {trainer.world_size} "
                "processes (FSDP2 data parallelism)."
            )
        for module in fsdp_modules(pl_module):
            policy = getattr(getattr(module, "_get_fsdp_state", lambda: None)(), "_mp_policy", None)
            dtype = getattr(policy, "param_dtype", None)
            if dtype is not None and dtype != torch.float32 and dtype != torch.float64:
                rank_zero_warn(
                    f"LandscapeMonitor: FSDP2 computes in {dtype} (MixedPrecisionPolicy "
                    "param_dtype); the probes' finite differences of gradients in reduced "
                    "precision are noise. Probe with param_dtype=None, or expect inaccurate "
                    "curvature."
                )
                break

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        if self._sharded:
            self._check_sharded_model(trainer, pl_module)
        if self.sharpness is not None and trainer.optimizers:
            probed = [p for _, p in select_parameters(pl_module, self.params)]
            _, why = probed_stability(trainer.optimizers, probed)
            if why is not None:
                rank_zero_info(f"LandscapeMonitor: landscape/stability_ratio is not logged: {why}")
        for hook in self.hooks:
            check_hook(hook, trainer, pl_module)  # e.g. a guard that cannot drive this optimizer
        self._check_sync_batchnorm(pl_module)
        self._collect(trainer, pl_module)
        self._check_loss(pl_module)
        self._products_checked = False  # once per fit, on its first round
        self.product_check = None
        checks_again = self.check_products and self.route == "auto"
        if checks_again and self._resolved_route == "finite_difference":
            self._resolved_route = None  # a checkpointed switch: this fit checks again
        self._budget.start(trainer.global_step)
        if self.tensorboard_layout:
            _register_layout(trainer, self.layout())
        if trainer.ckpt_path is None:
            self._run(trainer, pl_module, [p for p in self.probes if p.cadence.on_train_start])

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the probe data once and cut it into chunks.

        One process takes the extra samples a probe asks for. The chunks are of the training
        batch size where normalisation layers use batch statistics, and of
        ``probe_micro_batch_size`` where that is set.
        """
        own_data = self.probe_dataloader is None
        extra = max((p.extra_samples for p in self.probes), default=0)
        extra = extra if own_data and trainer.world_size == 1 else 0
        if own_data:
            available = _dataset_size(trainer)
            if available is not None and available < self.num_probe_samples:
                rank_zero_warn(
                    f"LandscapeMonitor: num_probe_samples={self.num_probe_samples} but the train "
                    f"dataset holds {available} samples; the probes use all {available}."
                )
        batches = collect_probe_batches(
            trainer, pl_module, self.num_probe_samples + extra, self.probe_dataloader
        )
        sample = batches[0]
        if len(batches) > 1:  # a probe_dataloader's batches: single-batch measurements join them
            joined = join_batches(batches)
            if joined is None:
                rank_zero_warn(
                    f"LandscapeMonitor: the probe_dataloader's {len(batches)} batches cannot be "
                    "joined into one (their tensors differ in shape or type beyond the sample "
                    "dimension), so the measurements that take the probe data as one batch (α, "
                    f"loss slices, batch sharpness, Δ₂) use its first batch only "
                    f"({batch_size(sample)} samples). Pad them to one shape, or yield one batch."
                )
            else:
                sample = joined
        for probe in self.probes:
            probe.check_data(sample)  # e.g. too few samples for Δ₂'s k: say so now
        if extra and batch_size(sample) > self.num_probe_samples:
            batches = [slice_batch(sample, 0, self.num_probe_samples)]
        # Single-batch measurements (α, slices) take the probe set as one batch ...
        whole = batches[0] if len(batches) == 1 else sample
        chunk, self._retain_graph = self.probe_micro_batch_size, None
        statistics = batch_statistics(pl_module, self.norm_statistics)
        if chunk is None and statistics and own_data:
            chunk = _train_batch_size(trainer)
            if chunk is None:
                rank_zero_warn(
                    "LandscapeMonitor: the model normalises with batch statistics, but the "
                    "training batch size is unknown, so the whole probe set is one batch; set "
                    "probe_micro_batch_size= to the training batch size."
                )
            else:
                self._retain_graph = True  # chunks for the statistics, not to save memory
        if chunk is not None:
            # Train-mode BatchNorm needs two samples per chunk: a last single one joins the one
            # before it.
            batches = [m for b in batches for m in split_batch(b, chunk, min_size=2)]
            if self.probe_micro_batch_size is not None:
                whole = batches[0]  # ... but only one micro-batch under a memory cap
        self._batches, self._sample_batch, self._single_batch = batches, sample, whole
        self._weight = float(sum(batch_size(b) for b in batches))

    def _check_sync_batchnorm(self, pl_module: pl.LightningModule) -> None:
        """Say once that ``SyncBatchNorm`` is probed on each rank's own batch statistics.

        Checked at the start of training, after the strategy has converted the model
        (``Trainer(sync_batchnorm=True)`` does so after ``setup``).
        """
        synced = synchronised_batch_norms(pl_module) if self.norm_statistics == "batch" else []
        if synced:
            rank_zero_warn(
                f"LandscapeMonitor: the model's SyncBatchNorm layers ({len(synced)}) "
                "synchronise batch statistics across ranks in training. PyTorch cannot "
                "differentiate that twice (pytorch#61222), so the probes normalise each rank's "
                "probe chunks with that rank's own statistics, as BatchNorm under DDP does. With "
                "a few samples per rank and chunk the measured Hessian can differ from "
                "training's; norm_statistics='running' measures the eval-mode Hessian instead."
            )

    def _check_loss(self, pl_module: pl.LightningModule) -> None:
        """Evaluate the probe loss once before training.

        A loss that cannot be probed is a configuration error, said now rather than skipped at
        every probe.
        """
        assert self._batches is not None
        with (
            curvature_context(pl_module, norm_statistics=self.norm_statistics),
            silenced(pl_module),
            torch.no_grad(),
        ):
            check_scalar_loss(self._loss(pl_module, self._batches[0]))
        reshard(pl_module)  # FSDP2 keeps a root gathered after a forward without backward

    def layout(self) -> Layout:
        """The custom-scalars layout of this monitor's probes (and hooks, and cost)."""
        fragments = [p.charts() for p in self.probes]
        if self.hooks:
            fragments.append(control_charts())
        fragments.append(cost_charts())
        return compose_layout(fragments)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Copy the probed parameters before a step that a ``needs_previous`` probe follows."""
        if not self.enabled:
            return
        step = trainer.global_step + 1  # the step this optimizer step leads to
        if self._previous is not None and self._previous[0] == step:
            return  # several optimizers step towards the same global step: the first copy
        if not any(self._wants_previous(trainer, p, step) for p in self.probes):
            return
        with torch.no_grad():
            named = select_parameters(pl_module, self.params)
            flat = [local_tensor(p).detach().reshape(-1) for _, p in named]
            buffer = None if self._previous is None else self._previous[1]
            numel = sum(t.numel() for t in flat)
            if buffer is None or buffer.numel() != numel or buffer.dtype != flat[0].dtype:
                buffer = torch.empty(numel, dtype=flat[0].dtype, device=flat[0].device)
            torch.cat(flat, out=buffer)
        self._previous = (step, buffer)

    def _wants_previous(self, trainer: pl.Trainer, probe: Probe, step: int) -> bool:
        """Whether ``probe`` may measure at ``step`` and needs the parameters before it."""
        if not probe.needs_previous:
            return False
        c = probe.cadence
        if self.max_overhead is not None and c.every_n_epochs is None:
            return True  # the budget decides at the batch's end: keep a copy before every step
        last_batch = self._batch_idx + 1 >= _num_training_batches(trainer)
        epoch_end = last_batch and c.due_at_epoch_end(trainer.current_epoch + 1)
        last_epoch = (
            trainer.max_epochs is not None and trainer.current_epoch + 1 == trainer.max_epochs
        )
        train_end = c.on_train_end and (
            0 < trainer.max_steps == step or (last_batch and last_epoch)
        )
        return c.due_at_step(step) or epoch_end or train_end

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.enabled:
            return
        step = trainer.global_step
        if self.max_overhead is None:
            due = [p for p in self.probes if p.cadence.due_at_step(step)]
        else:
            due = self._budgeted(trainer, step)
        self._run(trainer, pl_module, due)
        for probe in self.probes:
            for tag, value in probe.progress_bar().items():
                pl_module.log(tag, value, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def _budgeted(self, trainer: pl.Trainer, step: int) -> list[Probe]:
        """The probes due under ``max_overhead``: all budgeted ones when the budget allows."""
        assert self.max_overhead is not None
        self._budget.record_step(step)
        if trainer.world_size == 1:
            allowed = self._budget.allows(self.max_overhead)
        else:
            # Wall clocks differ between ranks: decide on an agreed step, refreshed at steps every
            # rank reaches together (readiness depends on the step count only).
            plan = self._budget.next_step is None or step % _RESCHEDULE_EVERY == 0
            if self._budget.ready and plan:
                self._schedule(trainer)
            allowed = self._budget.next_step is not None and step >= self._budget.next_step
        due = []
        for probe in self.probes:
            n = probe.cadence.every_n_steps
            if probe.cadence.every_n_epochs is not None:
                if probe.cadence.due_at_step(step):
                    due.append(probe)
            elif allowed or (n is not None and step - probe.last_step >= n):
                due.append(probe)
        return due

    def _schedule(self, trainer: pl.Trainer) -> None:
        """Under DDP: set the step of the next round from the ledger, the same on every rank."""
        assert self.max_overhead is not None
        if not self._budget.ready:
            self._budget.next_step = None  # wait for step timings
            return
        gap = self._budget.gap(self.max_overhead)
        floors = [
            p.cadence.every_n_steps
            for p in self.probes
            if p.cadence.every_n_epochs is None and p.cadence.every_n_steps is not None
        ]
        if floors:
            gap = min(gap, *floors)
        # Wall clocks differ: take the most conservative gap.
        gap = round(max_over_ranks(float(gap), timeout=self._timeout()))
        self._budget.next_step = trainer.global_step + gap

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        epochs = trainer.current_epoch + 1
        self._run(
            trainer, pl_module, [p for p in self.probes if p.cadence.due_at_epoch_end(epochs)]
        )
        self._log_epoch_figures(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            self._run(trainer, pl_module, [p for p in self.probes if p.cadence.on_train_end])
            self._log_epoch_figures(trainer)
        self._batches = self._sample_batch = self._single_batch = None
        self._previous = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_probes": self.num_probes,
            "num_failed": self.num_failed,
            "route": self._resolved_route,
            "history": [vars(r) for r in self.history],
            "hooks": hook_states(self.hooks),
            "probes": {p.name: p.state_dict() for p in self.probes},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_probes = int(state_dict.get("num_probes", 0))
        self.num_failed = int(state_dict.get("num_failed", 0))
        self._resolved_route = state_dict.get("route")
        self.history = [ProbeReport(**r) for r in state_dict.get("history", [])]
        if "hooks" in state_dict:
            load_hook_states(self.hooks, state_dict["hooks"])
        saved = state_dict.get("probes", {})
        for probe in self.probes:
            if probe.name in saved:
                probe.load_state_dict(saved[probe.name])

    # ------------------------------------------------------------------ probing
    def _loss(self, pl_module: torch.nn.Module, batch: Any) -> Tensor:
        assert isinstance(pl_module, pl.LightningModule)
        if self.loss_fn is not None:
            return self.loss_fn(pl_module, batch)
        return training_step_loss(pl_module, batch)

    def _timeout(self) -> datetime.timedelta | None:
        if self.collective_timeout is None:
            return None
        return datetime.timedelta(seconds=self.collective_timeout)

    def probe(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        probes: Sequence[Probe] | None = None,
    ) -> ProbeReport | None:
        """Run one round now, outside the cadence, log it, and return its report.

        Args:
            trainer: the trainer.
            pl_module: the module being trained.
            probes: which of the monitor's probes to run (default: all).

        Returns:
            The :class:`~lightning_landscape.ProbeReport` of the round, or ``None`` if it had
            no successful ``Sharpness`` measurement.

        Raises:
            RuntimeError: if called before the probe data was collected (before training
                started).
        """
        if self._batches is None:
            raise RuntimeError("No probe data yet: probes run once training has started.")
        return self._round(trainer, pl_module, list(self.probes if probes is None else probes))

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: list[Probe]) -> None:
        """A round of the due probes not yet run at this step (nothing without probe data)."""
        due = [p for p in due if p.last_step != trainer.global_step]
        if due and self._batches is not None:
            self._round(trainer, pl_module, due)

    def _round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: list[Probe]
    ) -> ProbeReport | None:
        """Measure, book the round's wall time, log, then report to the hooks."""
        t0 = time.perf_counter()
        ctx, measured, failed = self._measure_all(trainer, pl_module, due)
        self._budget.record_probe(time.perf_counter() - t0)
        if self.max_overhead is not None and trainer.world_size > 1:
            self._schedule(trainer)
        step = trainer.global_step
        shared = [(s, p.cost_hvps(r)) for p, r, s in measured if p.cost_group == tags.COST]
        cost = (sum(s for s, _ in shared), sum(h for _, h in shared))
        report = ProbeReport.from_results(step, trainer.current_epoch, ctx.results, cost)
        if report is not None:
            self.history.append(report)
            failed = not self._call_hooks(trainer, pl_module, report) or failed
        self._log(trainer, measured, step, failed)
        return report

    def _call_hooks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: ProbeReport
    ) -> bool:
        """Call every hook; one that raises is reported and skipped. Whether all succeeded."""
        ok = True
        for hook in self.hooks:
            why = None
            try:
                call_hook(hook, trainer, pl_module, report)
            except Exception as err:
                why = _describe(err)
            if trainer.world_size > 1:  # every rank reports alike
                failures = count_failures(why is not None, timeout=self._timeout())
                if failures and why is None:
                    why = "failed on another rank (its ranks may now disagree)"
            if why is not None:
                ok = False
                self.num_failed += 1
                name = getattr(hook, "__qualname__", type(hook).__name__)
                rank_zero_warn(
                    f"LandscapeMonitor: the hook {name} at step {report.step} {why}; skipped."
                )
        return ok

    def _measure_all(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: list[Probe]
    ) -> tuple[ProbeContext, list[tuple[Probe, Any, float]], bool]:
        """Run the due probes on one shared context: (context, measured, any failed)."""
        assert self._batches is not None
        step, world = trainer.global_step, trainer.world_size
        previous = None
        if self._previous is not None and self._previous[0] == step:
            previous = self._previous[1]
        ctx = ProbeContext(
            pl_module,
            self._loss,
            self._batches,
            sample_batch=self._sample_batch,
            single_batch=self._single_batch,
            params=self.params,
            route=(self._resolved_route or "auto") if self.route == "auto" else self.route,
            seed=self.seed + self.num_probes,
            step=step,
            epoch=trainer.current_epoch,
            optimizers=trainer.optimizers,
            weight=self._weight,
            world_size=world,
            timeout=self._timeout(),
            retain_graph=self._retain_graph,
            warn=lambda message: rank_zero_warn(f"LandscapeMonitor: {message}"),
            note=lambda message: rank_zero_info(f"LandscapeMonitor: {message}"),
            previous=previous,
            batch_size=_train_batch_size(trainer),
            sharded=self._sharded,
        )
        self.num_probes += 1
        measured: list[tuple[Probe, Any, float]] = []
        failed = False
        reported: list[BaseException] = []  # a failed shared operator is reported once
        reshard(pl_module)  # FSDP2: probe the sharded parameters, not a stale gathered copy
        with (
            curvature_context(pl_module, norm_statistics=self.norm_statistics),
            silenced(pl_module),
            _rank_zero_buffers(pl_module, world),
        ):
            try:
                if self.check_products and not self._products_checked:
                    self._check_products(ctx)
                for probe in sorted(due, key=lambda p: p.order):
                    probe.last_step = step
                    if probe.scope == "rank_zero" and not trainer.is_global_zero:
                        continue
                    start = time.perf_counter()
                    result, why, cause = self._measure(probe, ctx)
                    if why is not None:
                        failed = True
                        if not any(cause is seen for seen in reported):
                            self._fail(probe, step, why)
                        if cause is not None:
                            reported.append(cause)
                        continue
                    if result is None:  # nothing to measure this time
                        continue
                    probe.record(result, step)
                    ctx.results[probe.name] = result
                    measured.append((probe, result, time.perf_counter() - start))
            finally:
                ctx.release()
                reshard(pl_module)
        self._resolved_route = ctx.resolved_route or self._resolved_route
        return ctx, measured, failed

    def _check_products(self, ctx: ProbeContext) -> None:
        """Check that the round's products are symmetric (see ``check_products``)."""
        try:
            check = check_products(ctx, switch=self.route == "auto", seed=self.seed)
        except Exception:  # the probes meet the same failure, and report it
            return
        self._products_checked = check is None or not check.inconclusive  # NaN: next round
        self.product_check = check
        message = None if check is None else check.message(f"pass route={check.route!r}")
        if message is not None:
            rank_zero_warn(f"LandscapeMonitor: {message}")

    def _measure(
        self, probe: Probe, ctx: ProbeContext
    ) -> tuple[Any, str | None, BaseException | None]:
        """Run one probe: its result, or why it is skipped and the exception that caused it.

        Under DDP the decision is the same on every rank.
        """
        result: Any = None
        why: str | None = None
        cause: BaseException | None = None
        try:
            result = probe.run(ctx)
            if result is not None and not probe.is_finite(result):
                why = "produced NaN/inf values"
        except Exception as err:  # nothing after setup stops training: skip, and say why
            why, cause = _describe(err), err
        if ctx.world_size > 1 and probe.scope != "rank_zero":
            failures = count_failures(why is not None, timeout=ctx.timeout)
            if failures and why is None:
                why = "failed on another rank"
        return result, why, cause

    def _fail(self, probe: Probe, step: int, why: str) -> None:
        self.num_failed += 1
        rank_zero_warn(
            f"LandscapeMonitor: the {type(probe).__name__} probe at step {step} {why}; skipped."
        )

    def _log(
        self,
        trainer: pl.Trainer,
        measured: list[tuple[Probe, Any, float]],
        step: int,
        failed: bool,
    ) -> None:
        if not trainer.is_global_zero:
            return
        metrics: dict[str, float] = {tags.PROBE_FAILED: float(failed)}
        costs: dict[str, list[float]] = {}
        for probe, result, seconds in measured:
            metrics.update(probe.scalars(result))
            total = costs.setdefault(probe.cost_group, [0.0, 0.0])
            total[0] += seconds
            total[1] += probe.cost_hvps(result)
        for group, (seconds, hvps) in costs.items():
            metrics[tags.cost_seconds(group)] = seconds
            metrics[tags.cost_hvps(group)] = hvps
        metrics[tags.OVERHEAD] = self._budget.fraction()
        boards = _tensorboards(trainer)
        histograms: dict[str, Tensor] = {}
        images: dict[str, Figure] = {}
        for probe, result, _ in measured if boards else []:
            try:
                histograms.update(probe.histograms(result))
                images.update(probe.figures(result, step))
            except Exception as err:
                metrics[tags.PROBE_FAILED] = 1.0
                self._figure_failed(probe, step, err)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for tag, values in histograms.items():
            for board in boards:
                board.experiment.add_histogram(tag, values, global_step=step)
        _add_figures(boards, images, step)

    def _figure_failed(self, probe: Probe, step: int, err: Exception) -> None:
        self.num_failed += 1
        rank_zero_warn(
            f"LandscapeMonitor: the {type(probe).__name__} figure at step {step} "
            f"{_describe(err)}; skipped."
        )

    def _log_epoch_figures(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        boards = _tensorboards(trainer)
        if not boards:
            return
        images: dict[str, Figure] = {}
        step = max((p.last_step for p in self.probes), default=trainer.global_step)
        for probe in self.probes:
            try:
                images.update(probe.epoch_figures())
            except Exception as err:
                self._figure_failed(probe, step, err)
                for logger in trainer.loggers:
                    logger.log_metrics({tags.PROBE_FAILED: 1.0}, step=step)
        _add_figures(boards, images, step)


def _tensorboards(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _add_figures(boards: list[TensorBoardLogger], images: dict[str, Figure], step: int) -> None:
    for tag, fig in images.items():
        for board in boards:
            board.experiment.add_figure(tag, fig, global_step=step, close=False)


def _register_layout(trainer: pl.Trainer, layout: Layout) -> int:
    """Write a layout once to every TensorBoard logger of the run (rank zero).

    A ``SummaryWriter`` accepts one layout per writer, so a logger that already received one
    (e.g. from a second monitor or a resumed ``fit`` in the same process) is skipped.

    Returns:
        The number of loggers the layout was written to.
    """
    if not trainer.is_global_zero:
        return 0
    count = 0
    for board in _tensorboards(trainer):
        writer = board.experiment
        if getattr(writer, "_landscape_layout", False):
            continue
        writer.add_custom_scalars(layout)
        writer._landscape_layout = True
        count += 1
    return count


def _train_batch_size(trainer: pl.Trainer) -> int | None:
    """The train dataloader's batch size (per process), if it has a plain one."""
    loader = trainer.train_dataloader
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size if isinstance(size, int) and size > 0 else None


def _num_training_batches(trainer: pl.Trainer) -> float:
    """Training batches per epoch (``inf`` for an iterable without a length)."""
    value = trainer.num_training_batches
    return float(value) if isinstance(value, (int, float)) else float("inf")


def _dataset_size(trainer: pl.Trainer) -> int | None:
    """Samples in the train dataloader's dataset, if it has a length."""
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:  # an IterableDataset
        return None
