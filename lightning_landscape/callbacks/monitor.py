r"""Landscape Monitor.

Monitors the Hessian spectrum of the training loss while a LightningModule trains, on the
trainer's own device, and logs it through ``trainer.loggers`` under ``landscape/``.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from ..context import curvature_context
from ..distributed import (
    DistributedOperator,
    ProbeFailure,
    count_failures,
    max_over_ranks,
    weighted_mean,
)
from ..metrics import (
    AlphaResult,
    SliceResult,
    StabilizationResult,
    SweepResult,
)
from ..operators import (
    _ROUTES,
    CurvatureOperator,
    HessianOperator,
    HVPRoute,
    batch_size,
    select_parameters,
    split_batch,
)
from ..operators.data import _slice_batch
from ..results import DensityResult, EigenResult, ProbeReport, TraceResult
from ..solvers import hutchpp_trace, lanczos, spectral_density
from ..solvers.lanczos import Criterion
from ..thresholds import stability_threshold
from . import _delta2
from ._budget import _OverheadLedger
from ._extras import _SideMeasurements
from ._hooks import call_hook, check_hooks, hook_states, load_hook_states
from ._probe import collect_probe_batches, silenced, training_step_loss
from ._tensorboard import landscape_layout, register_layout

ProbeLossFn = Callable[[pl.LightningModule, Any], Tensor]
_LINALG_ERROR: type[Exception] = getattr(torch.linalg, "LinAlgError", RuntimeError)
_RESCHEDULE_EVERY = 25  # optimizer steps between agreed re-plans of an adaptive cadence (DDP)
_UNSUPPORTED_STRATEGIES = {
    "DeepSpeedStrategy",
    "XLAStrategy",
    "FSDPStrategy",
    "ModelParallelStrategy",
}


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
    if isinstance(err, torch.OutOfMemoryError):
        return "ran out of memory (lower num_probe_samples or top_k)"
    if isinstance(err, ProbeFailure):
        return f"failed ({err})"
    return "produced NaN/inf curvature"


def _positive_or_none(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


class LandscapeMonitor(_SideMeasurements, Callback):
    r"""Probe the loss Hessian on a cadence during training and log it under ``landscape/``.

    Each probe builds a :class:`~lightning_landscape.operators.HessianOperator` on fixed probe
    data (by default the first ``num_probe_samples`` samples of the train dataset, taken once at
    the start of training) with the model in ``eval()`` mode, runs thick-restart Lanczos for the
    top-``top_k`` eigenvalues (warm-started from the previous probe) and, optionally, for λ_min,
    and a Hutch++ trace estimate. Training is not affected: weights, RNG streams, module modes,
    ``.grad``, optimizer state and logged metrics are exactly what they would be without it.

    Logged keys (at ``trainer.global_step``, through every logger in ``trainer.loggers``):

    * ``landscape/lambda_max``: the largest Hessian eigenvalue (sharpness).
    * ``landscape/eigenvalues/<i>``: the i-th largest eigenvalue, ``i = 0 .. top_k - 1``.
    * ``landscape/lambda_min``: the algebraically smallest eigenvalue (negative: a saddle
      direction); with ``lambda_min=True``.
    * ``landscape/trace``, ``landscape/trace_stderr``: Hutch++ estimate of tr(H) and its
      standard error; with ``trace=True``.
    * ``landscape/stability_ratio``: ``η·λ_max / (2 + 2β)``, i.e. λ_max over the threshold of SGD
      with heavy-ball momentum β (``2/η`` without momentum). Values near or above 1 mean
      training is at or past the edge of stability. Only for ``torch.optim.SGD``: for Adam and
      other adaptive optimizers stability is governed by the preconditioned Hessian, so the
      ratio is not logged. ``landscape/stability_threshold`` is the threshold itself.
    * ``landscape/probe_loss``: the loss on the probe data (eval mode).
    * ``landscape/converged`` (1/0) and ``landscape/max_residual``: whether every eigenvalue met
      ``tol`` in relative Ritz residual. Values with ``converged = 0`` are estimates only.
    * ``landscape/probe_failed``: 1 when a probe hit NaN/inf or ran out of memory (and was
      skipped).
    * ``landscape/cost/seconds``, ``landscape/cost/hvps``: the probe's wall time and
      Hessian-vector products; ``landscape/cost/overhead``: the fraction of the wall time since
      training started spent in probes (with ``max_overhead``, kept within that budget).
    * With a :class:`~lightning.pytorch.loggers.TensorBoardLogger`, a histogram
      ``landscape/eigenvalues`` of the top-k eigenvalues.

    Args:
        every_n_steps: probe when ``trainer.global_step`` is a multiple of this (``None``: off).
        every_n_epochs: probe at the end of every n-th training epoch (``None``: off).
        top_k: number of largest eigenvalues.
        tol: relative Ritz-residual tolerance of the eigenvalues.
        criterion: ``"residual"`` (default; ``tol`` bounds the relative Ritz residual) or
            ``"eigenvalue"`` (``tol`` bounds the estimated relative eigenvalue error
            ``‖r‖² / gap``, with the residual at most ``√tol``; see
            :func:`~lightning_landscape.solvers.lanczos`). Cheaper when only the eigenvalues
            are needed: in ``benchmarks/warm_start.py`` it took a third fewer products per
            λ_max probe (``benchmarks/RESULTS.md``).
        lambda_min: also compute the smallest eigenvalue.
        trace: also estimate the Hessian trace.
        trace_hvps: Hessian-vector products for the trace (at least 3).
        num_probe_samples: samples taken from the train dataset for the probe batch.
        probe_dataloader: explicit probe data; every batch it yields is used (the Hessian is the
            sample-weighted mean over them). Overrides ``num_probe_samples``.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar Tensor``; default the loss returned by
            ``training_step(batch, 0)`` (a tensor or a dict with ``"loss"``), whose logging is
            suppressed during the probe.
        params: names or ``fnmatch`` patterns of the parameters to probe (default all trainable).
        route: Hessian-vector-product route: ``"auto"`` (time both on the first probe and keep
            the faster), ``"functorch"`` or ``"double_backward"``.
        max_basis: bound on the Krylov basis (memory ``(max_basis + 1) × num_params``).
        max_hvps: Hessian-vector-product budget per eigenvalue solve.
        warm_start: start each solve from the previous probe's eigenvectors.
        save_warm_start: keep the warm-start vectors in checkpoints (``top_k + 1`` vectors of
            ``num_params`` floats) so a resumed run continues exactly.
        probe_on_train_start: probe once when training starts (not when resuming from a
            checkpoint: the resumed run then probes at exactly the steps of an uninterrupted
            one, so hooks act identically).
        probe_on_train_end: probe once when training ends.
        prog_bar: show the latest λ_max in the progress bar.
        log_histogram: log the eigenvalue histogram to TensorBoard loggers.
        tensorboard_layout: register the grouped ``landscape/`` charts (λ_max with the stability
            threshold, spectrum, α by layer type, Δ₂^(D), cost) in TensorBoard's *Custom
            Scalars* tab, once per run, on every TensorBoard logger.
        enabled: ``False`` turns the callback into a no-op (handy from YAML configs).
        seed: seed of the private generators of the solvers (global RNG streams are never used).
        collective_timeout: under DDP, seconds a rank waits for the others in a probe's
            collectives before raising instead of hanging (``None``: the process group's own
            timeout).
        max_overhead: adaptive cadence: the largest fraction of training wall time the probes
            may take (e.g. ``0.02``). The monitor measures the optimizer-step time and the cost
            of its probes, and after each probe schedules the next one as early as the budget
            allows; ``every_n_steps`` then becomes the longest allowed gap (a floor on how often
            λ_max is read, which may exceed the budget). The achieved fraction is logged as
            ``landscape/cost/overhead``. The schedule depends on timings, so a resumed run may
            probe at other steps (training itself is unaffected).
        probe_micro_batch_size: memory cap: split the probe data into micro-batches of at most
            this many samples, processed one at a time (sample-weighted, so the result is the
            same; exact since probes run in eval mode). Peak probe memory is then that of one
            micro-batch, at the price of one extra forward and backward per micro-batch and
            Hessian-vector product.
        alpha_every_n_steps: also measure the per-layer curvature exponent α
            (:func:`~lightning_landscape.curvature_exponents`) every this many steps and at the
            end of training (``None``: off). It costs ``alpha_top_k`` Hessian-vector products per
            layer, so keep it much sparser than the eigenvalue cadence. Uses the first probe
            batch; under DDP each rank measures on its own shard and rank 0's values are logged.
            Logs ``landscape/alpha/<layer>``, ``landscape/alpha_r2/<layer>``,
            ``landscape/alpha_group/<type>`` (mean over reliable layers) and, with a TensorBoard
            logger, a figure ``landscape/alpha_fit`` of log h against log σ per layer type.
        alpha_top_k: singular directions per layer for α.
        alpha_layers: names or ``fnmatch`` patterns of the weights for α (default: every
            Linear/Conv weight and attention input projection).
        alpha_figure: log the α figure to TensorBoard loggers.
        delta2_every_n_steps: also measure the curvature-aligned stabilization criterion
            Δ₂^(D) (:func:`~lightning_landscape.stabilization`: how much the loss landscape
            changes, in the top-D Hessian eigenspace, when one more sample is added) every this
            many steps and at the end of training (``None``: off). With the default data (single
            process, no ``probe_dataloader``) the monitor takes one sample beyond the
            ``num_probe_samples`` of the eigenvalue probe, so ``L_k`` with the default
            ``delta2_k = num_probe_samples`` is exactly the probe loss, and when an eigenvalue
            probe ran at the same step its eigenvectors start the D-dimensional eigensolve.
            Otherwise (DDP, where each rank measures its own shard and rank 0's value is logged,
            or a ``probe_dataloader``) it uses the first probe batch with ``k`` = its size − 1
            and any same-step eigenvectors serve as an approximate warm start. Logs
            ``landscape/delta2_D``, its parts ``landscape/delta2/{a, c_norm, trace_B,
            frobenius_B, k, converged}``, the four Gaussian-moment terms
            ``landscape/delta2/term_{mean, cross, linear, quadratic}`` and
            ``landscape/delta2_cost/{seconds, hvps}``.
        delta2_D: subspace dimension D.
        delta2_sigma: per-coordinate standard deviation σ of the Gaussian, in parameter units
            (the quadratic model is trusted for small σ; see the docs).
        delta2_k: samples of the smaller loss ``L_k`` (default: all probe samples but the extra
            one, see above).
        delta2_estimator: ``"gm"`` (closed form, default), ``"qmc"`` or ``"mc"``.
        delta2_num_samples: Monte Carlo draws for ``"qmc"``/``"mc"``.
        delta2_sweep: also run the k-sweep (:func:`~lightning_landscape.stabilization_sweep`)
            on a log-spaced grid of ``k`` up to ``delta2_k`` and log its log-log slope
            ``landscape/delta2/slope`` (theory: −2) and ``landscape/delta2/slope_stderr``, plus
            a TensorBoard figure ``landscape/delta2_sweep`` of Δ₂^(D) against k. Costs
            ``delta2_sweep_points × delta2_sweep_repeats`` Δ₂ measurements.
        delta2_sweep_points: grid points of the sweep.
        delta2_sweep_repeats: sample orders averaged at each grid point.
        delta2_figure: log the sweep figure to TensorBoard loggers.
        density_every_n_probes: also estimate the spectral density by stochastic Lanczos
            quadrature (:func:`~lightning_landscape.spectral_density`, ``density_runs ×
            density_steps`` products) at every n-th eigenvalue probe (the first included), on
            the same operator (under DDP the global Hessian). Logs
            ``landscape/negative_mass`` (fraction of eigenvalues below zero: the saddle report
            with ``landscape/lambda_min``) and, with a TensorBoard logger, the figure
            ``landscape/density`` (log-scale density, negative part shaded).
        density_runs: SLQ runs (random start vectors).
        density_steps: Lanczos steps per SLQ run.
        density_figure: log the density figure to TensorBoard loggers.
        trajectory_figure: at the end of every epoch with new probes, log a TensorBoard figure
            ``landscape/eigenvalue_trajectories`` of the top-k eigenvalues, λ_min and the
            stability threshold over training.
        slice_every_n_epochs: every n-th epoch end (and at the end of training), log a
            TensorBoard image ``landscape/loss_slice`` of the loss on a plane (or line) through
            the weights (:func:`~lightning_landscape.loss_slice`, ``slice_steps ** slice_dims``
            loss evaluations on the first probe batch; on global rank zero only).
        slice_directions: ``"eigen"`` (top Hessian eigenvectors, unit length) or ``"random"``
            (filter-normalised, Li et al. 2018).
        slice_dims: 1 or 2.
        slice_steps: grid points per axis.
        slice_span: coordinates run over ``[−span, span]`` (parameter units along unit
            eigenvectors; multiples of the filter norms for random directions).
        hooks: objects with ``on_landscape(trainer, pl_module, report)`` (see
            :class:`~lightning_landscape.callbacks.LandscapeHook`), or plain callables with that
            signature, called on every rank after each successful probe with its
            :class:`~lightning_landscape.ProbeReport`, e.g.
            :class:`~lightning_landscape.StabilityLRGuard`. Their ``state_dict`` is saved with
            the monitor's, so a resumed run takes the same actions.

    Raises:
        ValueError: on invalid arguments (non-positive cadences, ``top_k < 1``, ``tol <= 0``,
            ``trace_hvps < 3``, unknown ``route``, ...).

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
        every_n_steps: int | None = 100,
        every_n_epochs: int | None = None,
        top_k: int = 5,
        tol: float = 1e-3,
        criterion: str = "residual",
        lambda_min: bool = True,
        trace: bool = True,
        trace_hvps: int = 30,
        num_probe_samples: int = 256,
        probe_dataloader: DataLoader[Any] | None = None,
        loss_fn: ProbeLossFn | None = None,
        params: list[str] | None = None,
        route: HVPRoute = "auto",
        max_basis: int | None = None,
        max_hvps: int | None = None,
        warm_start: bool = True,
        save_warm_start: bool = True,
        probe_on_train_start: bool = True,
        probe_on_train_end: bool = True,
        prog_bar: bool = False,
        log_histogram: bool = True,
        tensorboard_layout: bool = True,
        enabled: bool = True,
        seed: int = 0,
        collective_timeout: float | None = None,
        max_overhead: float | None = None,
        probe_micro_batch_size: int | None = None,
        alpha_every_n_steps: int | None = None,
        alpha_top_k: int = 20,
        alpha_layers: list[str] | None = None,
        alpha_figure: bool = True,
        delta2_every_n_steps: int | None = None,
        delta2_D: int = 10,
        delta2_sigma: float = 1e-3,
        delta2_k: int | None = None,
        delta2_estimator: str = "gm",
        delta2_num_samples: int = 64,
        delta2_sweep: bool = False,
        delta2_sweep_points: int = 6,
        delta2_sweep_repeats: int = 4,
        delta2_figure: bool = True,
        density_every_n_probes: int | None = None,
        density_runs: int = 4,
        density_steps: int = 40,
        density_figure: bool = True,
        trajectory_figure: bool = True,
        slice_every_n_epochs: int | None = None,
        slice_directions: str = "eigen",
        slice_dims: int = 2,
        slice_steps: int = 15,
        slice_span: float = 1.0,
        hooks: list[Any] | None = None,
    ) -> None:
        _positive_or_none("every_n_steps", every_n_steps)
        _positive_or_none("every_n_epochs", every_n_epochs)
        _positive_or_none("top_k", top_k)
        _positive_or_none("num_probe_samples", num_probe_samples)
        _positive_or_none("max_basis", max_basis)
        _positive_or_none("max_hvps", max_hvps)
        if top_k is None:
            raise ValueError("top_k must be a positive integer, got None")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be > 0, got {tol!r}")
        if criterion not in ("residual", "eigenvalue"):
            raise ValueError(f"criterion must be 'residual' or 'eigenvalue', got {criterion!r}")
        if isinstance(trace_hvps, bool) or not isinstance(trace_hvps, int) or trace_hvps < 3:
            raise ValueError(f"trace_hvps must be an integer >= 3 (Hutch++), got {trace_hvps!r}")
        if route not in _ROUTES:
            raise ValueError(f"route must be one of {_ROUTES}, got {route!r}")
        if max_hvps is not None and max_hvps < top_k:
            raise ValueError(f"max_hvps must be at least top_k = {top_k}, got {max_hvps}")
        if max_basis is not None and max_basis < top_k + 1:
            raise ValueError(f"max_basis must be at least top_k + 1 = {top_k + 1}, got {max_basis}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError("loss_fn must be callable: loss_fn(pl_module, batch) -> Tensor")
        if params is not None and (
            isinstance(params, str) or not all(isinstance(p, str) for p in params)
        ):
            raise ValueError("params must be a list of parameter names or fnmatch patterns")
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.top_k = top_k
        self.tol = float(tol)
        self.criterion: Criterion = "eigenvalue" if criterion == "eigenvalue" else "residual"
        self.lambda_min = lambda_min
        self.trace = trace
        self.trace_hvps = trace_hvps
        self.num_probe_samples = num_probe_samples
        self.probe_dataloader = probe_dataloader
        self.loss_fn = loss_fn
        self.params = list(params) if params is not None else None
        self.route: HVPRoute = route
        self.max_basis = max_basis
        self.max_hvps = max_hvps
        self.warm_start = warm_start
        self.save_warm_start = save_warm_start
        self.probe_on_train_start = probe_on_train_start
        self.probe_on_train_end = probe_on_train_end
        self.prog_bar = prog_bar
        self.log_histogram = log_histogram
        self.tensorboard_layout = tensorboard_layout
        self.enabled = enabled
        self.seed = seed
        if collective_timeout is not None and not collective_timeout > 0:
            raise ValueError(f"collective_timeout must be > 0 seconds, got {collective_timeout}")
        self.collective_timeout = collective_timeout
        if max_overhead is not None and not 0 < max_overhead < 1:
            raise ValueError(f"max_overhead must be a fraction in (0, 1), got {max_overhead!r}")
        self.max_overhead = max_overhead
        _positive_or_none("probe_micro_batch_size", probe_micro_batch_size)
        self.probe_micro_batch_size = probe_micro_batch_size
        _positive_or_none("alpha_every_n_steps", alpha_every_n_steps)
        _positive_or_none("alpha_top_k", alpha_top_k)
        if alpha_layers is not None and (
            isinstance(alpha_layers, str) or not all(isinstance(p, str) for p in alpha_layers)
        ):
            raise ValueError("alpha_layers must be a list of parameter names or fnmatch patterns")
        self.alpha_every_n_steps = alpha_every_n_steps
        self.alpha_top_k = alpha_top_k
        self.alpha_layers = list(alpha_layers) if alpha_layers is not None else None
        self.alpha_figure = alpha_figure
        _positive_or_none("delta2_every_n_steps", delta2_every_n_steps)
        self.delta2_every_n_steps = delta2_every_n_steps
        self._delta2 = _delta2.Delta2Settings(
            D=delta2_D,
            sigma=delta2_sigma,
            k=delta2_k,
            estimator=delta2_estimator,
            num_samples=delta2_num_samples,
            sweep=delta2_sweep,
            sweep_points=delta2_sweep_points,
            sweep_repeats=delta2_sweep_repeats,
            figure=delta2_figure,
        )
        self.last_delta2: StabilizationResult | None = None
        self.last_delta2_sweep: SweepResult | None = None
        self._last_delta2_step = -1
        self._delta2_batch: Any = None
        self._delta2_warm: Tensor | None = None
        _positive_or_none("density_every_n_probes", density_every_n_probes)
        _positive_or_none("density_runs", density_runs)
        _positive_or_none("density_steps", density_steps)
        _positive_or_none("slice_every_n_epochs", slice_every_n_epochs)
        if slice_directions not in ("eigen", "random"):
            raise ValueError(f"slice_directions must be 'eigen' or 'random': {slice_directions!r}")
        if slice_dims not in (1, 2):
            raise ValueError(f"slice_dims must be 1 or 2, got {slice_dims!r}")
        if isinstance(slice_steps, bool) or not isinstance(slice_steps, int) or slice_steps < 2:
            raise ValueError(f"slice_steps must be an integer >= 2, got {slice_steps!r}")
        if not (isinstance(slice_span, (int, float)) and 0 < slice_span < math.inf):
            raise ValueError(f"slice_span must be a finite number > 0, got {slice_span!r}")
        self.density_every_n_probes = density_every_n_probes
        self.density_runs = density_runs
        self.density_steps = density_steps
        self.density_figure = density_figure
        self.trajectory_figure = trajectory_figure
        self.slice_every_n_epochs = slice_every_n_epochs
        self.slice_directions = slice_directions
        self.slice_dims = slice_dims
        self.slice_steps = slice_steps
        self.slice_span = float(slice_span)
        self.last_density: DensityResult | None = None
        self.last_slice: SliceResult | None = None
        self._figured_probes = 0
        self._last_slice_step = -1
        self.hooks = check_hooks(hooks)
        self.last_alpha: dict[str, AlphaResult] | None = None
        self._last_alpha_step = -1
        self._probe_weight = 0.0
        self._budget = _OverheadLedger()

        self.history: list[ProbeReport] = []
        self.num_probes = 0
        self.num_failed = 0
        self._last_probe_step = -1
        self._resolved_route: HVPRoute | None = None
        self._warm_top: Tensor | None = None
        self._warm_min: Tensor | None = None
        self._probe_batches: list[Any] | None = None
        self._num_params = 0

    # ------------------------------------------------------------------ Lightning hooks
    @property
    @override
    def state_key(self) -> str:
        loss = None if self.loss_fn is None else getattr(self.loss_fn, "__qualname__", "custom")
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            every_n_epochs=self.every_n_epochs,
            top_k=self.top_k,
            params=self.params,
            loss_fn=loss,
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        strategy = trainer.strategy
        # DeepSpeed and XLA subclass DDPStrategy but partition or compile differently.
        unsupported = {c.__name__ for c in type(strategy).__mro__} & _UNSUPPORTED_STRATEGIES
        if unsupported or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise RuntimeError(
                f"LandscapeMonitor supports single-device and DDP training; "
                f"{type(strategy).__name__} shards or partitions the parameters (FSDP, "
                "DeepSpeed, model parallel), which the monitor does not support yet. Use "
                "strategy='ddp', or `enabled=False` for this run."
            )
        if trainer.world_size > self.num_probe_samples and self.probe_dataloader is None:
            raise ValueError(
                f"num_probe_samples={self.num_probe_samples} is smaller than the "
                f"{trainer.world_size} processes: each rank needs at least one probe sample."
            )
        named = select_parameters(pl_module, self.params)
        self._num_params = sum(p.numel() for _, p in named)
        if self.top_k > self._num_params:
            raise ValueError(
                f"top_k={self.top_k} exceeds the {self._num_params} probed parameters; "
                f"use top_k <= {self._num_params}."
            )
        if self.delta2_every_n_steps is not None and self._delta2.D > self._num_params:
            raise ValueError(
                f"delta2_D={self._delta2.D} exceeds the {self._num_params} probed parameters; "
                f"use delta2_D <= {self._num_params}."
            )
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError(
                "With manual optimization, training_step does not return the loss: pass "
                "`loss_fn=lambda module, batch: ...` to LandscapeMonitor."
            )
        dtypes = {p.dtype for _, p in named}
        if dtypes - {torch.float32, torch.float64}:
            rank_zero_warn(
                f"LandscapeMonitor probes parameters of dtype {dtypes}; curvature in reduced "
                "precision is noisy (~1% per Hessian-vector product). Prefer float32 weights "
                "(e.g. precision='bf16-mixed' rather than 'bf16-true')."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if optimizer is not None and stability_threshold(optimizer) is None:
            rank_zero_info(
                f"LandscapeMonitor: {type(optimizer).__name__} is not plain SGD, so "
                "landscape/stability_ratio is not logged (adaptive optimizers are stable "
                "w.r.t. the preconditioned Hessian, not the raw λ_max)."
            )
        # Δ₂^(D) on one process takes one sample beyond the eigenvalue probe's, so that L_k is
        # exactly the probe loss (and the probe's eigenvectors are those of H^(k)).
        extra = self.delta2_every_n_steps is not None
        own_data = self.probe_dataloader is None and trainer.world_size == 1
        self._probe_batches = collect_probe_batches(
            trainer,
            pl_module,
            self.num_probe_samples + (1 if extra and own_data else 0),
            self.probe_dataloader,
        )
        if extra:
            self._delta2_batch = self._probe_batches[0]
            self._delta2.resolve_k(self._delta2_batch)  # too few samples: say so now
            if own_data and batch_size(self._delta2_batch) > self.num_probe_samples:
                self._probe_batches = [_slice_batch(self._delta2_batch, 0, self.num_probe_samples)]
        if self.probe_micro_batch_size is not None:
            size = self.probe_micro_batch_size
            self._probe_batches = [m for b in self._probe_batches for m in split_batch(b, size)]
        self._probe_weight = float(sum(batch_size(b) for b in self._probe_batches))
        self._budget.start(trainer.global_step)
        if self.tensorboard_layout:
            layout = landscape_layout(
                control=bool(self.hooks),
                alpha=self.alpha_every_n_steps is not None,
                delta2=self.delta2_every_n_steps is not None,
            )
            register_layout(trainer, layout)
        if self.probe_on_train_start and trainer.ckpt_path is None:
            self._maybe_probe(trainer, pl_module)

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
        if self.max_overhead is not None:
            self._budget.record_step(step)
            floor = self.every_n_steps  # the longest gap, whatever the budget says
            if trainer.world_size == 1:
                due = self._budget.allows(self.max_overhead)
            else:
                # Wall clocks differ between ranks: decide on an agreed step, refreshed at steps
                # every rank reaches together.
                # Readiness depends on the step count only, so all ranks plan at the same step.
                plan = self._budget.next_step is None or step % _RESCHEDULE_EVERY == 0
                if self._budget.ready and plan:
                    self._schedule(trainer)
                due = self._budget.next_step is not None and step >= self._budget.next_step
            if due or (floor is not None and step - self._last_probe_step >= floor):
                self._maybe_probe(trainer, pl_module)
        elif self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0:
            self._maybe_probe(trainer, pl_module)
        alpha_every = self.alpha_every_n_steps
        if alpha_every is not None and step > 0 and step % alpha_every == 0:
            self._maybe_alpha(trainer, pl_module)
        delta2_every = self.delta2_every_n_steps
        if delta2_every is not None and step > 0 and step % delta2_every == 0:
            self._maybe_delta2(trainer, pl_module)
        if self.prog_bar and self.history:
            pl_module.log(
                "landscape/lambda_max",
                self.history[-1].lambda_max,
                prog_bar=True,
                logger=False,
                on_step=True,
                on_epoch=False,
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs is not None and epoch % self.every_n_epochs == 0:
            self._maybe_probe(trainer, pl_module)
        if self.slice_every_n_epochs is not None and epoch % self.slice_every_n_epochs == 0:
            self._maybe_slice(trainer, pl_module)
        self._log_trajectories(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and self.probe_on_train_end:
            self._maybe_probe(trainer, pl_module)
        if self.enabled and self.alpha_every_n_steps is not None:
            self._maybe_alpha(trainer, pl_module)
        if self.enabled and self.delta2_every_n_steps is not None:
            self._maybe_delta2(trainer, pl_module)
        if self.enabled and self.slice_every_n_epochs is not None:
            self._maybe_slice(trainer, pl_module)
        if self.enabled:
            self._log_trajectories(trainer)
        self._probe_batches = None
        self._delta2_batch = None

    @override
    def state_dict(self) -> dict[str, Any]:
        keep = self.save_warm_start and self.warm_start
        return {
            "num_probes": self.num_probes,
            "num_failed": self.num_failed,
            "last_probe_step": self._last_probe_step,
            "route": self._resolved_route,
            "warm_top": self._warm_top.cpu() if keep and self._warm_top is not None else None,
            "warm_min": self._warm_min.cpu() if keep and self._warm_min is not None else None,
            "history": [vars(r) for r in self.history],
            "hooks": hook_states(self.hooks),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_probes = int(state_dict.get("num_probes", 0))
        self.num_failed = int(state_dict.get("num_failed", 0))
        self._last_probe_step = int(state_dict.get("last_probe_step", -1))
        self._resolved_route = state_dict.get("route")
        self._warm_top = state_dict.get("warm_top")
        self._warm_min = state_dict.get("warm_min")
        self.history = [ProbeReport(**r) for r in state_dict.get("history", [])]
        if "hooks" in state_dict:
            load_hook_states(self.hooks, state_dict["hooks"])

    # ------------------------------------------------------------------ probing
    def _maybe_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self._last_probe_step or self._probe_batches is None:
            return
        self._last_probe_step = trainer.global_step
        t0 = time.perf_counter()
        report = self.probe(trainer, pl_module)
        self._budget.record_probe(time.perf_counter() - t0)
        if self.max_overhead is not None and trainer.world_size > 1:
            self._schedule(trainer)
        if report is not None:
            self.history.append(report)
            self._log(trainer, report)
            for hook in self.hooks:
                call_hook(hook, trainer, pl_module, report)

    def _schedule(self, trainer: pl.Trainer) -> None:
        """Under DDP: set the step of the next probe from the ledger, the same on every rank."""
        assert self.max_overhead is not None
        if not self._budget.ready:
            self._budget.next_step = None  # wait for step timings
            return
        gap = self._budget.gap(self.max_overhead)
        if self.every_n_steps is not None:
            gap = min(gap, self.every_n_steps)
        if trainer.world_size > 1:  # wall clocks differ: take the most conservative gap
            gap = round(max_over_ranks(float(gap), timeout=self._timeout()))
        self._budget.next_step = trainer.global_step + gap

    @property
    def overhead(self) -> float:
        """Fraction of the wall time since training started that went into probes."""
        return self._budget.fraction()

    def _loss(self, pl_module: torch.nn.Module, batch: Any) -> Tensor:
        assert isinstance(pl_module, pl.LightningModule)
        if self.loss_fn is not None:
            return self.loss_fn(pl_module, batch)
        return training_step_loss(pl_module, batch)

    def _warm(self, vectors: Tensor | None, device: torch.device) -> Tensor | None:
        if not self.warm_start or vectors is None or vectors.shape[0] != self._num_params:
            return None
        return vectors.to(device)

    def probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeReport | None:
        """Run one probe now and return its report (``None`` if it failed and was skipped).

        Args:
            trainer: the trainer.
            pl_module: the module being trained.

        Returns:
            The :class:`~lightning_landscape.results.ProbeReport`, or ``None`` on a skipped
            probe (NaN/inf curvature or out of memory; a warning says which).

        Raises:
            RuntimeError: if called before the probe data was collected (before training
                started).
        """
        if self._probe_batches is None:
            raise RuntimeError("No probe data yet: probes run once training has started.")
        t0 = time.perf_counter()
        step, epoch = trainer.global_step, trainer.current_epoch
        seed = self.seed + self.num_probes
        self.num_probes += 1
        timeout = self._timeout()
        world = trainer.world_size
        with (
            curvature_context(pl_module),
            silenced(pl_module),
            _rank_zero_buffers(pl_module, world),
        ):
            local: HessianOperator | None = None
            why: str | None = None
            error: Exception | None = None
            try:
                local = HessianOperator(
                    pl_module,
                    self._loss,
                    self._probe_batches,
                    params=self.params,
                    route=self._resolved_route or self.route,
                )
                if not math.isfinite(local.loss_value):
                    why = "has a NaN/inf loss on the probe data"
            except torch.OutOfMemoryError:
                why = "ran out of memory (lower num_probe_samples or top_k)"
            except Exception as err:
                if world == 1:
                    raise  # a bug in the loss or bad input: say so rather than skip
                error, why = err, f"failed ({type(err).__name__}: {err})"
            # Before any Hessian-vector product, every rank learns how many ranks failed.
            failures = count_failures(why is not None, timeout=timeout)
            if failures:
                if local is not None:
                    local.release()
                if error is not None and failures == world:
                    raise error  # the same failure everywhere: a real error, raised on all ranks
                self._fail(trainer, step, why or "failed on another rank")
                return None
            assert local is not None
            op: CurvatureOperator = local
            if world > 1:
                op = DistributedOperator(local, self._probe_weight, timeout=timeout)
            try:
                top, bottom, trace = self._solve(op, seed)
                density = None
                every = self.density_every_n_probes
                if every is not None and (self.num_probes - 1) % every == 0:
                    density = spectral_density(
                        op, num_runs=self.density_runs, lanczos_steps=self.density_steps, seed=seed
                    )
            except (torch.OutOfMemoryError, ProbeFailure, _LINALG_ERROR) as err:
                self._fail(trainer, step, _describe(err))
                return None
            finally:
                local.release()
            self._resolved_route = local.route
            probe_loss = weighted_mean(local.loss_value, self._probe_weight, timeout=timeout)
        results = [r for r in (top, bottom) if r is not None]
        finite = all(r.is_finite for r in results) and math.isfinite(probe_loss)
        if trace is not None:
            finite = finite and math.isfinite(trace.trace)
        if density is not None:
            finite = finite and density.is_finite
        if not finite:
            self._fail(trainer, step, "produced NaN/inf curvature")
            return None
        self._warm_top = top.eigenvectors
        self._warm_min = bottom.eigenvectors if bottom is not None else None
        converged = all(r.all_converged for r in results)
        max_residual = max(float(r.residuals.max()) for r in results if r.residuals.numel())
        if not converged:
            rank_zero_warn(
                f"LandscapeMonitor: eigenvalues at step {step} did not reach tol={self.tol} "
                f"(max relative residual {max_residual:.2e}); logged with "
                "landscape/converged=0. Raise max_hvps or max_basis, or loosen tol."
            )
        lam_max = float(top.eigenvalues[0])
        threshold = stability_threshold(trainer.optimizers[0]) if trainer.optimizers else None
        return ProbeReport(
            step=step,
            epoch=epoch,
            eigenvalues=tuple(float(v) for v in top.eigenvalues),
            lambda_min=float(bottom.eigenvalues[0]) if bottom is not None else None,
            trace=trace.trace if trace is not None else None,
            trace_stderr=trace.stderr if trace is not None else None,
            stability_threshold=threshold,
            stability_ratio=lam_max / threshold if threshold else None,
            probe_loss=probe_loss,
            converged=converged,
            max_residual=max_residual,
            num_hvps=local.num_matvecs,
            seconds=time.perf_counter() - t0,
            negative_mass=self._record_density(density),
        )

    def _record_density(self, density: DensityResult | None) -> float | None:
        if density is None:
            return None
        self.last_density = density
        return density.negative_mass()

    def _solve(
        self, op: CurvatureOperator, seed: int
    ) -> tuple[EigenResult, EigenResult | None, TraceResult | None]:
        top = lanczos(
            op,
            self.top_k,
            tol=self.tol,
            criterion=self.criterion,
            max_basis=self.max_basis,
            max_hvps=self.max_hvps,
            start=self._warm(self._warm_top, op.device),
            seed=seed,
        )
        bottom = None
        if self.lambda_min:
            bottom = lanczos(
                op,
                1,
                which="smallest",
                tol=self.tol,
                criterion=self.criterion,
                max_basis=self.max_basis,
                max_hvps=self.max_hvps,
                start=self._warm(self._warm_min, op.device),
                seed=seed + 7919,
            )
        trace = hutchpp_trace(op, self.trace_hvps, seed=seed) if self.trace else None
        return top, bottom, trace

    def _timeout(self) -> datetime.timedelta | None:
        if self.collective_timeout is None:
            return None
        return datetime.timedelta(seconds=self.collective_timeout)

    def _fail(self, trainer: pl.Trainer, step: int, why: str) -> None:
        self.num_failed += 1
        rank_zero_warn(f"LandscapeMonitor: the probe at step {step} {why}; skipped.")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"landscape/probe_failed": 1.0}, step=step)

    def _log(self, trainer: pl.Trainer, report: ProbeReport) -> None:
        if not trainer.is_global_zero:
            return
        metrics: dict[str, float] = {
            "landscape/lambda_max": report.lambda_max,
            "landscape/probe_loss": report.probe_loss,
            "landscape/converged": float(report.converged),
            "landscape/max_residual": report.max_residual,
            "landscape/probe_failed": 0.0,
            "landscape/cost/seconds": report.seconds,
            "landscape/cost/hvps": float(report.num_hvps),
            "landscape/cost/overhead": self._budget.fraction(),
        }
        for i, value in enumerate(report.eigenvalues):
            metrics[f"landscape/eigenvalues/{i}"] = value
        if report.lambda_min is not None:
            metrics["landscape/lambda_min"] = report.lambda_min
        if report.negative_mass is not None:
            metrics["landscape/negative_mass"] = report.negative_mass
        if report.trace is not None:
            metrics["landscape/trace"] = report.trace
            if report.trace_stderr is not None and math.isfinite(report.trace_stderr):
                metrics["landscape/trace_stderr"] = report.trace_stderr
        if report.stability_ratio is not None and report.stability_threshold is not None:
            metrics["landscape/stability_ratio"] = report.stability_ratio
            metrics["landscape/stability_threshold"] = report.stability_threshold
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=report.step)
            if self.log_histogram and isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram(
                    "landscape/eigenvalues",
                    torch.tensor(report.eigenvalues),
                    global_step=report.step,
                )
            density = self.last_density
            if (
                report.negative_mass is not None
                and density is not None
                and self.density_figure
                and isinstance(logger, TensorBoardLogger)
            ):
                from ._density_figure import density_figure

                fig = density_figure(density, report.step)
                logger.experiment.add_figure("landscape/density", fig, global_step=report.step)
